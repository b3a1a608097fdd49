"""Evaluate a (fine-tuned) Qwen2.5 as a forecaster of Lotka-Volterra trajectories, as published.

    python evaluate.py --run runs/x                         # the run's model, adapter (best/), data, split, scaling
    python evaluate.py --model DIR --data FILE --preset tutt --limit 20
    python evaluate.py --run runs/x --samples 20 --temperature 0.7 --top-p 0.9
    python evaluate.py --compare evals/base/results.json evals/x/results.json

The recipe: load the model (+ adapter, merged), rebuild the run's split and scaling, then
  1. cross-entropy per token on the test split (token windows, padding masked), as reported;
  2. forecasts: the first k steps of each test series as the prompt, the next h generated
     (greedy, or N samples sharing one prefill; digits and separators only unless --unrestricted);
     output is decoded and repaired by data/llmtime.py's rules, repairs counted;
  3. metrics in original units (data/metrics.py) for the model and the baselines (data/baselines.py);
  4. results.json, a markdown table on screen, forecasts.png and error_vs_horizon.png in --out.
docs/evaluate.md defines every metric and JSON key.
"""

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from data import baselines, llmtime, lotka_volterra, metrics, splits, windows
from data.forecast import forecast_tasks, read_forecast
import flops
from qwen_min import Qwen2, Tokenizer, generate
from qwen_min.generate import produced_lengths
from qwen_min.loss import mean_cross_entropy

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
TABLE_STEPS = (1, 5, 10, 20, 30, 40, 49, 50)  # report A's steps (1, 10, 30, 49) and a few more
# The published protocols (docs/reference.md). A run's own scaling wins over a preset's: the model
# only reads the encoding it was trained on.
PRESETS = {
    "tutt": dict(k=50, h=50, scaling="global", percentile=95.0, scale_target=10.0, decimals=2),
    "wang": dict(k=51, h=20, scaling="per-series", percentile=95.0, scale_target=1.0, decimals=2),
}
DEFAULTS = dict(model="Qwen/Qwen2.5-0.5B-Instruct", data=None, n_series=1000, seed=0, k=50, h=50, scaling="global",
                percentile=95.0, scale_target=10.0, decimals=2, context=512, lm_head_bias=False)
# What makes the test split and the encoding: a run's values of these cannot be overridden.
RUN_FIXED = ("data", "n_series", "seed", "scaling", "percentile", "scale_target", "decimals")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Forecasting evaluation of Qwen2.5 (+ LoRA) on Lotka-Volterra trajectories.")
    g = p.add_argument_group("model")
    g.add_argument("--run", help="a train.py run folder: its model, adapter (best/), data, split and scaling")
    g.add_argument("--model", help=f"checkpoint folder or hub id (default: the run's, else {DEFAULTS['model']})")
    g.add_argument("--adapter", help="LoRA adapter folder, ours or peft's (default: RUN/best, else RUN/adapter, else none)")
    g.add_argument("--no-adapter", action="store_true", help="evaluate the base model even with --run")
    g.add_argument("--lm-head-bias", action="store_true", default=None, help="the model has an lm_head bias (in the adapter)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g = p.add_argument_group("data (default: the run's, else the preset's, else the simulator)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="a published protocol: tutt (50 -> 50, global to 10) or wang (51 -> 20, per series to 1)")
    g.add_argument("--data", help="h5 file in the coursework layout")
    g.add_argument("--n-series", type=int, help="trajectories to simulate without --data")
    g.add_argument("--seed", type=int, help="split (and simulation) seed")
    g.add_argument("--scaling", choices=["global", "per-series"])
    g.add_argument("--percentile", type=float)
    g.add_argument("--scale-target", type=float)
    g.add_argument("--decimals", type=int, choices=[1, 2, 3])
    g.add_argument("--context", type=int, help="tokens per cross-entropy window")
    g.add_argument("--k", type=int, help="context steps in the prompt")
    g.add_argument("--h", type=int, help="steps to forecast")
    g.add_argument("--limit", type=int, help="evaluate only the first LIMIT test series")
    g = p.add_argument_group("decoding")
    g.add_argument("--samples", type=int, default=1, help="forecasts per series; > 1 samples and takes the median")
    g.add_argument("--temperature", type=float, default=None, help="default: 0 (greedy) for 1 sample, 0.7 for more")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--sample-seed", type=int, default=0)
    g.add_argument("--unrestricted", action="store_true", help="let the model emit any token (default: digits and separators)")
    g.add_argument("--batch", type=int, default=20, help="sequences decoded at once (series x samples)")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="folder for results.json and plots (default: RUN/eval, else evals/<time>)")
    g.add_argument("--label", help="name of this model in tables (default: the adapter's run, or 'base')")
    g.add_argument("--no-ce", action="store_true", help="skip the cross-entropy")
    g.add_argument("--no-baselines", action="store_true")
    g.add_argument("--lv-iterations", type=int, default=150, help="Nelder-Mead iterations of the LV baseline fit")
    g.add_argument("--plots", type=int, default=4, help="series in forecasts.png (0 = no plots)")
    g.add_argument("--compare", nargs="+", metavar="RESULTS", help="print two or more results.json side by side, then exit")
    args = p.parse_args(argv)
    if args.compare:
        if len(args.compare) < 2:
            p.error("--compare needs two or more results.json files")
        return args
    resolve(args, p)
    return args


def resolve(args, p):
    """Fills unset flags: explicit flag > the run's args.json > the preset > DEFAULTS. With --run, the
    flags that make its split and encoding (RUN_FIXED) cannot differ from the run's."""
    run_args = {}
    if args.run:
        run = Path(args.run)
        if not (run / "args.json").is_file():
            p.error(f"{run} holds no args.json; pass a train.py run folder to --run")
        try:
            run_args = json.loads((run / "args.json").read_text())
        except json.JSONDecodeError:
            p.error(f"{run}/args.json is not valid JSON; is {run} a train.py run folder?")
        changed = [k for k in RUN_FIXED if getattr(args, k) is not None and getattr(args, k) != run_args.get(k)]
        if changed:
            p.error(f"--{changed[0].replace('_', '-')} differs from the run's; its test split and encoding are fixed "
                    "by the run (train.py's args.json), so evaluate it without that flag")
        if args.adapter is None and not args.no_adapter:
            args.adapter = str(run / "best") if (run / "best").is_dir() else str(run / "adapter")
    preset = PRESETS.get(args.preset, {})
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            value = run_args.get(key, preset.get(key, default))
            setattr(args, key, value)
    if run_args and preset and any(run_args.get(key) != preset[key] for key in ("scaling", "scale_target", "decimals")):
        print(f"warning: the run's scaling ({run_args.get('scaling')} to {run_args.get('scale_target')}, {run_args.get('decimals')} decimals) "
              f"differs from preset {args.preset}'s; using the run's, which its model was trained on.", file=sys.stderr)
    if args.no_adapter:
        args.adapter = None
    if args.adapter and not Path(args.adapter).is_dir():
        p.error(f"adapter folder {args.adapter} does not exist")
    if args.temperature is None:
        args.temperature = 0.7 if args.samples > 1 else 0.0
    checks = [
        (args.k >= 1 and args.h >= 1, "--k and --h must be at least 1"),
        (args.samples >= 1 and args.batch >= 1, "--samples and --batch must be at least 1"),
        (args.temperature >= 0, "--temperature must be >= 0"),
        (args.samples == 1 or args.temperature > 0, "--samples > 1 needs --temperature > 0 (greedy samples are all equal)"),
        (args.top_p is None or 0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
        (args.top_k is None or args.top_k >= 1, "--top-k must be at least 1"),
        (args.limit is None or args.limit >= 1, "--limit must be at least 1"),
        (0 < args.percentile <= 100 and args.scale_target > 0, "need 0 < --percentile <= 100 and --scale-target > 0"),
        (args.seed >= 0 and args.n_series >= 1, "--seed must be >= 0 and --n-series >= 1"),
        (args.context >= 2, "--context must be at least 2 tokens"),
        (args.plots >= 0 and args.lv_iterations >= 0, "--plots and --lv-iterations must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.label = args.label or (Path(args.adapter).resolve().parent.name if args.adapter else "base")
    args.out = args.out or (str(Path(args.run) / "eval") if args.run else f"evals/{time.strftime('%Y%m%d-%H%M%S')}")


# ---------------------------------------------------------------- model and data

def load_model(args):
    """Base checkpoint, plus the adapter merged in (and its lm_head bias), ready for inference."""
    import lora
    from qwen_min.weights import hf_name

    dtype = getattr(torch, args.dtype)
    model = Qwen2.from_pretrained(args.model, dtype=dtype, device=args.device, lm_head_bias=bool(args.lm_head_bias))
    if args.adapter:
        extra = lora.load_adapter(model, args.adapter, module_name=hf_name)
        lora.merge_lora(model.to(dtype))
        if "lm_head_bias" in extra:
            with torch.no_grad():
                model.add_lm_head_bias().copy_(extra["lm_head_bias"])
    return model.to(args.device).eval()


def load_series(args):
    """Trajectories (N, T, 2), times (T,) and the test indices, exactly as train.py's build_data."""
    if args.data:
        traj, times = lotka_volterra.load(args.data)
    else:
        traj, times = lotka_volterra.simulate(args.n_series, seed=args.seed)
    if args.k + args.h > traj.shape[1]:
        raise SystemExit(f"error: --k {args.k} + --h {args.h} exceeds the {traj.shape[1]} steps of each trajectory.")
    split = splits.split(len(traj), seed=args.seed)
    test = split.test[: args.limit]
    if len(test) == 0:
        raise SystemExit("error: the test split is empty; use more trajectories.")
    return np.asarray(traj, dtype=np.float64), times, split, test


def scalers(args, traj, split, test):
    """(scaler for the forecast prompts, scaler for the cross-entropy windows) of the test series.

    Global: the run's scaler.json when evaluating a run, else fit on the train split, as in
    training (the two agree: a run's split and scaling flags cannot be overridden). Per series:
    prompts use scales fit on each context window only (the future stays unseen); the
    cross-entropy windows cover whole series, so their scales are fit on whole series, as
    train.py does for its validation windows.
    """
    fit = lambda data, per: llmtime.Scaler.fit(data, args.percentile, args.scale_target, per)
    if args.scaling == "per-series":
        return fit(traj[test, : args.k], True), fit(traj[test], True)
    saved = Path(args.run) / "scaler.json" if args.run else None
    if saved is not None and saved.is_file():
        scaler = llmtime.Scaler.from_dict(json.loads(saved.read_text()))
    else:
        scaler = fit(traj[split.train], False)
    return scaler, scaler


# ---------------------------------------------------------------- cross-entropy

@torch.no_grad()
def cross_entropy(model, tok, scaled, args):
    """Mean next-token cross-entropy over windows of the scaled test series (N, T, 2), full vocabulary."""
    w = windows.dataset_windows(scaled, tok, args.context, args.context, args.decimals, tok.pad_id)
    batches = [tuple(torch.from_numpy(a).to(args.device) for a in windows.batch(w, slice(start, start + args.batch)))
               for start in range(0, len(w.input_ids), args.batch)]
    mean, tokens = mean_cross_entropy(model, batches)
    spent = sum(flops.forward(model.config, ids.shape[0], ids.shape[1] - 1, lm_head_bias=model.lm_head_bias is not None).coursework
                for ids, _ in batches)  # the loss feeds T - 1 tokens
    return {"mean": mean, "tokens": tokens, "windows": len(w.input_ids), "flops": spent}


# ---------------------------------------------------------------- forecasting

def generate_forecasts(model, prompts, h, max_new_tokens, sep_id, n_samples=1, temperature=0.0, top_k=None,
                       top_p=None, seed=None, allowed_token_ids=None, stop_token_ids=(), pad_id=0):
    """Continues each prompt until it has written h steps (h separators), a stop token, or max_new_tokens.

    prompts: B token-id lists. One prefill per prompt, shared by its n_samples continuations.
    Returns new tokens (B, n_samples, n) int64, finished rows filled with pad_id.
    """
    out = generate(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                   allowed_token_ids=allowed_token_ids, stop_token_ids=stop_token_ids, stop_after=(sep_id, h),
                   num_samples=n_samples, pad_token_id=pad_id)  # (B * n_samples, T + n)
    new = out[:, max(len(p) for p in prompts):]
    return new.reshape(len(prompts), n_samples, -1).cpu()


def alphabet_ids(tok):
    """The token ids of the 13 LLMTIME characters (one by one: BPE would merge e.g. '.,')."""
    try:
        return tok.character_ids(llmtime.ALPHABET)
    except ValueError:
        raise SystemExit("error: this tokenizer does not give one token per digit and separator; pass --unrestricted.") from None


def token_budget(tasks, h):
    """max_new_tokens for h steps: the longest prompt step (in tokens) plus slack, times h."""
    per_step = max(len(t.prompt_ids) / len(t.context) for t in tasks)
    return int(np.ceil(h * (per_step + 2)))


def forecast(model, tok, tasks, scaler, args):
    """Tasks -> samples (N, S, h, 2) in original units, repair counts, generated tokens and their FLOPs."""
    sep_id = tok.encode(";")[0]
    allowed = None if args.unrestricted else alphabet_ids(tok)
    per_batch = max(1, args.batch // args.samples)
    longest = max(len(t.prompt_ids) for t in tasks)
    max_new = token_budget(tasks, args.h)
    if longest + max_new > model.config.max_seq_len:  # the RoPE tables end there
        raise SystemExit(f"error: prompts of {longest} tokens leave no room for {args.h} steps in the model's {model.config.max_seq_len} positions; lower --k or --h.")
    values = np.zeros((len(tasks), args.samples, args.h, 2))
    repairs, repaired, n_tokens, spent = Counter(), 0, 0, 0.0
    for start in range(0, len(tasks), per_batch):
        batch = tasks[start:start + per_batch]
        prompts = [t.prompt_ids.tolist() for t in batch]
        new = generate_forecasts(model, prompts, args.h, max_new, sep_id, args.samples,
                                 args.temperature, args.top_k, args.top_p, args.sample_seed + start, allowed,
                                 tok.stop_ids, tok.pad_id)  # (b, S, n)
        lengths = produced_lengths(new.flatten(0, 1), tok.stop_ids, (sep_id, args.h))  # rows leave when done
        n = new.shape[2]
        spent += flops.generate(model.config, len(batch), max(map(len, prompts)), n, None if allowed is None else len(allowed),
                                lm_head_bias=model.lm_head_bias is not None, samples=args.samples,
                                active=[sum(length > j for length in lengths) for j in range(n)]).coursework
        n_tokens += sum(lengths)
        for i, task in enumerate(batch):
            for s in range(args.samples):
                text = tok.decode(new[i, s].tolist())
                values[start + i, s], decoded = read_forecast(text, task, scaler, args.decimals)
                repairs.update(decoded.issues)
                repaired += decoded.n_repaired > 0
    return values, {"forecasts_repaired": repaired, "forecasts": len(tasks) * args.samples, "by_kind": dict(repairs)}, n_tokens, spent


# ---------------------------------------------------------------- metrics, tables, plots

def score(point, truth, samples=None):
    """All metrics of one forecaster: overall, per step, and (with samples) probabilistic."""
    result = {"overall": metrics.point_metrics(point, truth), "per_step": metrics.per_step(point, truth)}
    if samples is not None and samples.shape[1] > 1:
        result["probabilistic"] = metrics.sample_metrics(samples, truth)
    return result


def to_json(x):
    """numpy arrays and scalars -> lists and floats, NaN/inf -> None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {k: to_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_json(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_json(x.tolist())
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def fmt(x, digits=4):
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}g}"


OVERALL_ROWS = [("MSE", "mse"), ("RMSE", "rmse"), ("MAE", "mae"), ("R2", "r2"), ("NRMSE %", "nrmse"),
                ("MAPE %", "mape"), ("WAPE %", "wape")]
SAMPLE_ROWS = [("CRPS", "crps"), ("coverage 50%", "coverage_50"), ("coverage 90%", "coverage_90")]


def markdown(res):
    """The on-screen report: overall metrics per forecaster, then the model's per-step table."""
    c, models = res["config"], res["results"]
    names = list(models)
    decoding = "greedy" if c["samples"] == 1 else f"median of {c['samples']} samples (T {c['temperature']}, top-k {c['top_k']}, top-p {c['top_p']})"
    lines = [f"## {c['label']}: {c['n_test']} test series, {c['k']} -> {c['h']} steps, {decoding}", ""]
    if res.get("cross_entropy"):
        lines += [f"cross-entropy per token (test): {res['cross_entropy']['mean']:.4f} over {res['cross_entropy']['tokens']} tokens", ""]
    lines += ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for title, key in OVERALL_ROWS:
        lines.append(f"| {title} | " + " | ".join(fmt(models[n]["overall"][key]) for n in names) + " |")
    for title, key in SAMPLE_ROWS:
        if "probabilistic" in models[names[0]]:
            lines.append(f"| {title} | " + " | ".join(fmt(models[n].get("probabilistic", {}).get(key)) for n in names) + " |")
    r = res["repairs"]
    lines += ["", f"repaired forecasts: {r['forecasts_repaired']} of {r['forecasts']} {r['by_kind'] or ''}", ""]
    step = models[names[0]]["per_step"]
    lines += ["| step | prey MAE | predator MAE | prey MAPE % | predator MAPE % |", "|---|---|---|---|---|"]
    for s in sorted({t for t in TABLE_STEPS if t <= c["h"]} | {c["h"]}):
        cells = [f"{fmt(step[m][sp]['mean'][s - 1], 3)} ± {fmt(step[m][sp]['se'][s - 1], 2)}"
                 for m in ("mae", "mape") for sp in metrics.SPECIES]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    t = res["timing"]
    lines += ["", f"time: {t['total_s']:.1f} s (cross-entropy {t['cross_entropy_s']:.1f} s, forecasts {t['forecast_s']:.1f} s "
              f"for {res['tokens_generated']} tokens, baselines {t['baselines_s']:.1f} s)"]
    f = res.get("flops")
    if f:
        lines.append(f"FLOPs (flops.py, coursework convention): cross-entropy {f['cross_entropy']:.3g}, forecasts {f['generate']:.3g}")
    return "\n".join(lines)


def plot(res, out, n_series):
    """forecasts.png (a few series: context, truth, forecasts, sample bands) and error_vs_horizon.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, c = res["series"], res["config"]
    k, h = c["k"], c["h"]
    n = min(n_series, len(s["index"]))
    fig, axes = plt.subplots(n, 2, figsize=(11, 2.4 * n), squeeze=False)
    for i in range(n):
        for j, species in enumerate(metrics.SPECIES):
            ax = axes[i, j]
            ax.plot(range(k), np.array(s["context"][i])[:, j], color="k", lw=1)
            ax.plot(range(k, k + h), np.array(s["target"][i])[:, j], color="k", lw=1, ls=":", label="truth")
            if s.get("quantiles"):
                q = np.array(s["quantiles"]["values"])[:, i, :, j]  # (5, h)
                ax.fill_between(range(k, k + h), q[0], q[-1], alpha=0.2, color="C0", label="5-95%")
                ax.fill_between(range(k, k + h), q[1], q[-2], alpha=0.3, color="C0", label="25-75%")
            for m, (name, f) in enumerate(s["forecasts"].items()):
                ax.plot(range(k, k + h), np.array(f[i])[:, j], color=f"C{m}", lw=1.3 if m == 0 else 0.9,
                        ls="-" if m == 0 else "--", label=name)
            ax.set_title(f"series {s['index'][i]}, {species}", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "forecasts.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for j, species in enumerate(metrics.SPECIES):
        for name, r in res["results"].items():
            mae = r["per_step"]["mae"][species]
            mean = np.array(mae["mean"], dtype=float)
            se = np.array([np.nan if v is None else v for v in mae["se"]], dtype=float)
            steps = np.arange(1, len(mean) + 1)
            axes[j].plot(steps, mean, label=name)
            axes[j].fill_between(steps, mean - se, mean + se, alpha=0.2)
        axes[j].set(xlabel="forecast step", ylabel="MAE (original units)", title=species)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "error_vs_horizon.png", dpi=110)
    plt.close(fig)


def compare(paths):
    """Markdown: the model of each results.json side by side, % improvement over the first."""
    runs = []
    for path in paths:
        try:
            r = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError):
            r = None
        if not isinstance(r, dict) or "label" not in r.get("config", {}) or "model" not in r.get("results", {}):
            raise SystemExit(f"error: {path} is not a results.json written by evaluate.py.")
        runs.append(r)
    names = [r["config"]["label"] for r in runs]
    head = f"| metric | {names[0]} | " + " | ".join(f"{n} | vs {names[0]}" for n in names[1:]) + " |"
    lines = [head, "|---" * (2 * len(runs)) + "|"]

    def row(title, values, higher_is_better=False):
        cells = [fmt(values[0])]
        for v in values[1:]:
            change = "-"
            if None not in (v, values[0]) and values[0] != 0:
                gain = (v - values[0]) if higher_is_better else (values[0] - v)
                change = f"{100 * gain / abs(values[0]):+.1f}%"
            cells += [fmt(v), change]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")

    row("cross-entropy", [(r.get("cross_entropy") or {}).get("mean") for r in runs])
    for title, key in OVERALL_ROWS:
        row(title, [r["results"]["model"]["overall"][key] for r in runs], higher_is_better=key == "r2")
    for title, key in SAMPLE_ROWS[:1]:
        row(title, [r["results"]["model"].get("probabilistic", {}).get(key) for r in runs])
    h = min(r["config"]["h"] for r in runs)
    for s in sorted({t for t in TABLE_STEPS if t <= h} | {h}):
        for sp in metrics.SPECIES:
            row(f"step {s} {sp} MAE", [r["results"]["model"]["per_step"]["mae"][sp]["mean"][s - 1] for r in runs])
    protocol = lambda r: (json.dumps([r["config"].get(k) for k in ("k", "h", "scaling", "data", "seed", "n_series", "decimals")]),
                          json.dumps(r.get("series", {}).get("index")))
    if len({protocol(r) for r in runs}) > 1:
        lines.append("\nwarning: the files differ in k, h, data, split, test series or scaling; the numbers are not like for like.")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        print(compare(args.compare))
        return None
    t_start = time.perf_counter()
    torch.manual_seed(args.sample_seed)
    traj, times, split, test = load_series(args)
    prompt_scaler, ce_scaler = scalers(args, traj, split, test)
    tok = Tokenizer.from_pretrained(args.model)
    tasks = forecast_tasks(traj[test], args.k, args.h, prompt_scaler, args.decimals, tok)
    model = load_model(args)
    timing = {"load_s": time.perf_counter() - t_start}

    t0 = time.perf_counter()
    ce = None if args.no_ce else cross_entropy(model, tok, ce_scaler.transform(traj[test]), args)
    timing["cross_entropy_s"] = time.perf_counter() - t0
    if ce:
        print(f"cross-entropy {ce['mean']:.4f} ({timing['cross_entropy_s']:.1f} s); forecasting {len(tasks)} series...", file=sys.stderr)

    t0 = time.perf_counter()
    samples, repairs, n_tokens, generate_flops = forecast(model, tok, tasks, prompt_scaler, args)  # (N, S, h, 2)
    timing["forecast_s"] = time.perf_counter() - t0
    point = np.median(samples, axis=1)  # (N, h, 2); the sample itself when S = 1
    truth = np.stack([t.target for t in tasks])  # (N, h, 2)
    context = np.stack([t.context for t in tasks])  # (N, k, 2)

    t0 = time.perf_counter()
    forecasts = {"model": point}
    if not args.no_baselines:
        forecasts["persistence"] = baselines.persistence(context, args.h)
        forecasts["lotka_volterra"] = baselines.lotka_volterra(context, times, args.h, args.lv_iterations)
    timing["baselines_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - t_start

    config = {key: getattr(args, key) for key in vars(args) if key not in ("compare",)}
    config |= {"n_test": len(test), "max_new_tokens": token_budget(tasks, args.h),
               "torch_threads": torch.get_num_threads()}
    res = {
        "config": config,
        "cross_entropy": ce,
        "results": {name: score(f, truth, samples if name == "model" else None) for name, f in forecasts.items()},
        "repairs": repairs,
        "tokens_generated": n_tokens,
        "flops": {"cross_entropy": ce["flops"] if ce else 0.0, "generate": generate_flops},
        "timing": timing,
        "series": {"index": test, "context": context, "target": truth, "forecasts": forecasts,
                   "quantiles": {"levels": QUANTILES, "values": np.quantile(samples, QUANTILES, axis=1)} if args.samples > 1 else None},
    }
    res = to_json(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res))
    if args.run:  # the run's FLOP ledger gets what its evaluation spent, beside its training
        ledger = flops.Ledger(Path(args.run) / "ledger.jsonl")
        # step -1: not a training step, so a later --resume of the run keeps these lines
        ledger.add(f"{args.label} evaluation", "eval", res["flops"]["cross_entropy"], step=-1)
        ledger.add(f"{args.label} evaluation", "generate", res["flops"]["generate"], step=-1)
    print(markdown(res))
    if args.plots:
        plot(res, out, args.plots)
    print(f"\nwrote {out / 'results.json'}" + (f", {out / 'forecasts.png'}, {out / 'error_vs_horizon.png'}" if args.plots else ""))
    return res


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # bad paths, files or flags: one sentence, no traceback
        raise SystemExit(f"error: {e}") from None
