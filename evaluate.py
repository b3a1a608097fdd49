"""Evaluate a (fine-tuned) Qwen2.5 as a forecaster of Lotka-Volterra trajectories, under our protocol
or a published one, or score forecasts made elsewhere under the same protocols.

    python evaluate.py --run runs/x                         # the run's model, adapter (best/), data, split, scaling
    python evaluate.py --model DIR --data FILE --preset report-a      # report A's protocol, as its code ran it
    python evaluate.py --run runs/x --samples 20 --temperature 0.7 --top-p 0.9
    python evaluate.py --preset report-b --data FILE --score forecasts.npz   # no model: someone else's forecasts
    python evaluate.py --compare evals/base-ours/results.json runs/x/eval/ours-best/results.json

The recipe: load the model (+ adapter, merged), rebuild the protocol's split and encoding, then
  1. cross-entropy on the test split, in the protocol's convention (ours: per token, padding masked);
  2. forecasts: ours prompts k whole steps and decodes digits and separators only, with no
     generation config; the report presets prompt, decode and read output as their code did
     (data/protocols.py);
  3. metrics in the protocol's units (data/metrics.py) for the model and the baselines
     (data/baselines.py), plus the report's own published metrics under a preset;
  4. results.json, a markdown table on screen, forecasts.png and error_vs_horizon.png in --out.
docs/evaluate.md defines every metric and JSON key and lists how the three protocols differ.
"""

import argparse
import contextlib
import datetime
import hashlib
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from data import baselines, llmtime, metrics, protocols, splits, windows
from data.draft import LLMTimeDraft
from data.forecast import forecast_tasks, new_token_budget, read_forecast
from data.recipe import Recipe
import flops
from qwen_min import GenerationConfig, Qwen2Config, Tokenizer, generate
from qwen_min.cli import HelpFormatter, parse_with_config
from qwen_min.errors import UserError, run_cli
from qwen_min.files import FolderLock, Journal, atomic_write_json
from qwen_min.loss import mean_cross_entropy, mean_of_batch_means, tokens_fed
from qwen_min import distributed, run_folder
from qwen_min.progress import progress, tracked
from qwen_min.scalars import Scalars, require_tensorboard
from qwen_min.weights import resolve_checkpoint

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
TABLE_STEPS = (1, 5, 10, 20, 30, 40, 49, 50)  # steps 1..h (1-based) of our per-step table
REPORT_A_STEPS = (1, 5, 10, 20, 30, 40, 49)  # report A's tables: horizon indices, 0-based, as it printed them
DEFAULTS = dict(model="Qwen/Qwen2.5-0.5B-Instruct", data=None, n_series=1000, seed=0, k=50, h=50, scaling="global",
                percentile=95.0, scale_target=10.0, decimals=2, context=512, lm_head_bias=False, split="ours")
# What makes the test split and the encoding: a run's values of these cannot be overridden.
RUN_FIXED = ("data", "n_series", "seed", "split", "scaling", "percentile", "scale_target", "decimals")
# What a report preset fixes (flag -> value); the encoding it names is the report's own.
REPORT_FIXED = {
    "report-a": dict(k=49, h=50, scaling="global", percentile=90.0, scale_target=10.0, decimals=2, seed=42, context=768, split="report-a"),
    "report-b": dict(k=51, h=20, scaling="per-series", percentile=95.0, scale_target=1.0, decimals=2, seed=42, context=512, split="report-b"),
}
PRESETS = sorted(protocols.PROTOCOLS.keys() - {"ours"}) + sorted(protocols.ALIASES)
# An evaluation writes each finished decode batch (and its cross-entropy) to OUT/journal.jsonl, so that
# rerunning a killed evaluation continues from there. These flags only name or present the results:
# they may differ in the rerun.
JOURNAL = "journal.jsonl"
PRESENTATION_FLAGS = ("out", "label", "log", "plots", "config", "compare", "no_baselines", "lv_iterations")


def build_parser():
    presets_help = "; ".join(f"{p.name}: {p.summary}" for p in protocols.PROTOCOLS.values() if p.name != "ours")
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, description="Forecasting evaluation of Qwen2.5 (+ LoRA) on Lotka-Volterra trajectories.")
    g = p.add_argument_group("model")
    g.add_argument("--run", help="a train.py run folder: its model, adapter (best/), data, split and scaling")
    g.add_argument("--model", help=f"checkpoint folder or hub id (default: the run's, else {DEFAULTS['model']})")
    g.add_argument("--adapter", help="LoRA adapter folder, ours or peft's (default: RUN/best, else RUN/adapter, else none)")
    g.add_argument("--no-adapter", action="store_true", help="evaluate the base model even with --run")
    g.add_argument("--lm-head-bias", action="store_true", default=None, help="the model has an lm_head bias (in the adapter)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and activations (bfloat16 is for GPUs)")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g = p.add_argument_group("protocol and data (default: ours, with the run's data, else the simulator)")
    g.add_argument("--preset", choices=PRESETS, help=f"a published protocol as its authors' code ran it, quirks included "
                   f"(tutt and wang are the old names of report-a and report-b). {presets_help}. Without --preset: "
                   f"{protocols.OURS.summary}")
    g.add_argument("--score", metavar="FILE", help="score forecasts made elsewhere, without a model: .json or .npz with "
                   "`forecast` (N, h, 2) [prey, predator] in the protocol's units, optional `truth` (N, h, 2) and "
                   "`series` (row indices into the data file)")
    g.add_argument("--data", help="h5 file in the coursework layout")
    g.add_argument("--n-series", type=int, help="trajectories to simulate without --data")
    g.add_argument("--seed", type=int, help="split (and simulation) seed")
    g.add_argument("--split", choices=["ours", *splits.REPORT_SPLITS],
                   help="which split's test series the default protocol scores (default: the run's, else ours; a preset uses its report's)")
    g.add_argument("--scaling", choices=["global", "per-series"], help="(default: the run's, else global; a preset uses its report's)")
    g.add_argument("--percentile", type=float, help="(default: the run's, else 95; a preset uses its report's)")
    g.add_argument("--scale-target", type=float, help="(default: the run's, else 10; a preset uses its report's)")
    g.add_argument("--decimals", type=int, choices=[1, 2, 3], help="(default: the run's, else 2; a preset uses its report's)")
    g.add_argument("--context", type=int, help="tokens per cross-entropy window")
    g.add_argument("--k", type=int, help="context steps in the prompt")
    g.add_argument("--h", type=int, help="steps to forecast")
    g.add_argument("--limit", type=int, help="evaluate only the first LIMIT test series")
    g = p.add_argument_group("decoding (the report presets decode with the checkpoint's generation_config.json)")
    g.add_argument("--samples", type=int, default=1, help="forecasts per series; > 1 samples and takes the median "
                   "(report-b: the mean, as it did)")
    g.add_argument("--temperature", type=float, default=None, help="default: 0 (greedy) for 1 sample, 0.7 for more")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens (default: none; a preset: the generation config's)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling in (0, 1] (default: none; a preset: the generation config's)")
    g.add_argument("--sample-seed", type=int, default=0, help="seed of the sampled forecasts")
    g.add_argument("--unrestricted", action="store_true", help="let the model emit any token (default: digits and separators)")
    g.add_argument("--batch", type=int, default=20, help="sequences decoded at once (series x samples)")
    g.add_argument("--no-draft", action="store_true", help="on a CPU, greedy forecasts without checking a guess of the "
                   "next tokens in each forward pass (speculative verification: the same tokens, in fewer passes; "
                   "GPUs never check guesses)")
    g.add_argument("--cuda-graph", action="store_true", help="on a GPU, replay every decode step from one recorded CUDA graph "
                   "(about 5x faster steps; the same tokens but where rounding breaks a near-tie)")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="a new folder for results.json and plots (default: RUN/eval/<protocol>-<adapter>, else evals/<label>-<protocol>; time-stamped when taken)")
    g.add_argument("--label", help="name of this model in tables (default: the adapter's run, or 'base')")
    g.add_argument("--no-ce", action="store_true", help="skip the cross-entropy")
    g.add_argument("--no-baselines", action="store_true", help="skip the persistence and fitted-LV baselines")
    g.add_argument("--lv-iterations", type=int, default=150, help="Nelder-Mead iterations of the LV baseline fit")
    g.add_argument("--plots", type=int, default=4, help="series in forecasts.png (0 = no plots)")
    g.add_argument("--compare", nargs="+", metavar="RESULTS", help="print two or more results.json side by side, then exit")
    g.add_argument("--log", choices=["none", "tensorboard"], default="none",
                   help="tensorboard: also write the overall metrics as TensorBoard scalars (RUN/tensorboard with --run, "
                        "else OUT/tensorboard), at the run's last step")
    g.add_argument("--config", metavar="FILE", help="flag values from a TOML, YAML or JSON file; flags given here override the file's")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = parse_with_config(p, argv)
    if args.compare:
        if len(args.compare) < 2:
            p.error("--compare needs two or more results.json files")
        return args
    resolve(args, p)
    return args


def resolve(args, p):
    """Fills unset flags: explicit flag > the run's args.json > the preset > DEFAULTS. With --run, the
    flags that make its split and encoding (RUN_FIXED) cannot differ from the run's; with a report
    preset, the flags its protocol fixes (REPORT_FIXED) cannot be given at all."""
    args.protocol = protocols.ALIASES.get(args.preset, args.preset) or "ours"
    fixed = REPORT_FIXED.get(args.protocol, {})
    given = [k for k in fixed if getattr(args, k) is not None]
    if given:
        p.error(f"--{given[0].replace('_', '-')} is fixed by --preset {args.protocol}, which runs its report's protocol as it "
                f"was run ({given[0]} {fixed[given[0]]}); leave it out, or evaluate without --preset")
    decoding = [k for k in ("temperature", "top_k", "top_p") if fixed and getattr(args, k) is not None]
    if decoding:
        p.error(f"--{decoding[0].replace('_', '-')} is fixed by --preset {args.protocol}: it decodes with the checkpoint's "
                "generation_config.json, as its report did; leave it out")
    if fixed and args.unrestricted:
        p.error(f"--preset {args.protocol} already decodes over the full vocabulary; leave out --unrestricted")
    if args.protocol == "report-a" and args.samples != 1:
        p.error("--preset report-a decodes greedily (its tables are greedy); leave out --samples")
    if args.score and (args.run or args.adapter):
        p.error("--score scores forecasts from a file and loads no model; leave out --run and --adapter")
    run_args = {}
    if args.run:
        try:
            run_args = run_folder.read_args(args.run)
        except UserError as e:
            p.error(str(e).rstrip("."))
        run = Path(args.run)
        changed = [k for k in RUN_FIXED if k not in fixed and getattr(args, k) is not None and getattr(args, k) != run_args.get(k)]
        if changed:
            p.error(f"--{changed[0].replace('_', '-')} differs from the run's; its test split and encoding are fixed "
                    "by the run (train.py's args.json), so evaluate it without that flag")
        args.trained_on = (run_args.get("split", "ours"), run_args.get("seed", 0))  # to find test series it trained on
        if args.adapter is None and not args.no_adapter:
            args.adapter = str(run_folder.adapter_of(run))
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, fixed[key] if key in fixed else run_args.get(key, default))
    if run_args and fixed and any(run_args.get(key) != fixed[key] for key in ("scaling", "percentile", "scale_target", "decimals")):
        print(f"warning: the run was trained on {run_args.get('scaling')} scaling (P{run_args.get('percentile')} -> "
              f"{run_args.get('scale_target')}, {run_args.get('decimals')} decimals), but --preset {args.protocol} encodes as its "
              "report did; its model reads an encoding it was not trained on.", file=sys.stderr)
    if args.no_adapter:
        args.adapter = None
    if args.adapter and not Path(args.adapter).is_dir():
        p.error(f"adapter folder {args.adapter} does not exist")
    if args.temperature is None and not fixed:
        args.temperature = 0.7 if args.samples > 1 else 0.0
    checks = [
        (args.k >= 1 and args.h >= 1, "--k and --h must be at least 1"),
        (args.samples >= 1 and args.batch >= 1, "--samples and --batch must be at least 1"),
        (fixed or args.temperature >= 0, "--temperature must be >= 0"),
        (fixed or args.samples == 1 or args.temperature > 0, "--samples > 1 needs --temperature > 0 (greedy samples are all equal)"),
        (args.top_p is None or 0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
        (args.top_k is None or args.top_k >= 1, "--top-k must be at least 1"),
        (args.limit is None or args.limit >= 1, "--limit must be at least 1"),
        (0 < args.percentile <= 100 and args.scale_target > 0, "need 0 < --percentile <= 100 and --scale-target > 0"),
        (args.seed >= 0 and args.n_series >= 1, "--seed must be >= 0 and --n-series >= 1"),
        (args.context >= 2, "--context must be at least 2 tokens"),
        (args.plots >= 0 and args.lv_iterations >= 0, "--plots and --lv-iterations must be >= 0"),
        (args.sample_seed >= 0, "--sample-seed must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)
    if args.log == "tensorboard":
        require_tensorboard()
    if args.protocol == "report-b":
        args.no_ce = True  # report B published no test cross-entropy
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.cuda_graph and not args.device.startswith("cuda"):
        p.error(f"--cuda-graph needs a GPU (--device cuda), not --device {args.device}")
    args.label = args.label or (Path(args.score).stem if args.score else Path(args.adapter).resolve().parent.name if args.adapter else "base")
    if args.out and (Path(args.out) / "results.json").exists():
        p.error(f"--out {args.out} already holds an evaluation's results.json; choose a new folder (or leave out --out: "
                "each evaluation then gets its own)")
    args.settings = None if args.score else journal_settings(args)  # --score decodes nothing: no journal
    args.out = args.out or default_out(args)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file, not a folder; choose a folder for results.json")


def journal_settings(args):
    """What decides an evaluation's forecasts and cross-entropy: its flags (less those that only name or
    present the results), the adapter's bytes and the code's commit. A killed evaluation resumes only
    under the same settings."""
    settings = {k: v for k, v in vars(args).items() if k not in PRESENTATION_FLAGS}
    settings["adapter_sha256"] = folder_sha256(args.adapter) if args.adapter else None
    settings["commit"] = run_folder.provenance(args.device)["commit"]
    return json.loads(json.dumps(settings))


def folder_sha256(folder):
    digest = hashlib.sha256()
    for path in sorted(Path(folder).iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def default_out(args):
    """Each evaluation its own folder, never on top of another: RUN/eval/<protocol>-<adapter or base>, else
    evals/<label>-<protocol>; a time stamp (and a count) is added when that folder is taken. An
    unfinished evaluation there with the same settings (killed before its results.json) is resumed."""
    which = Path(args.adapter).name if args.adapter else "base"
    out = Path(args.run) / "eval" / f"{args.protocol}-{which}" if args.run else Path("evals") / f"{args.label}-{args.protocol}"
    unfinished = [f for f in [out, *sorted(out.parent.glob(out.name + "-*"))]
                  if args.settings is not None and (f / JOURNAL).is_file() and not (f / "results.json").exists()
                  and Journal.settings_of(f / JOURNAL) == args.settings]
    if unfinished:
        return str(unfinished[-1])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):  # claimed by creating it, so two evaluations started together never share one
        candidate = out if n == 0 else out.with_name(f"{out.name}-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            candidate.mkdir(parents=True)
            return str(candidate)
        except FileExistsError:
            if n == 0 and not any(out.iterdir()):  # an empty folder (a failed start): use it
                return str(out)
        except OSError as e:
            raise UserError(f"cannot create the results folder {candidate} ({e.strerror}); give --out.") from None
    raise UserError(f"{out} and 999 stamped folders beside it exist; give --out.")


# ---------------------------------------------------------------- model and data

def load_model(args):
    """Base checkpoint, plus the adapter merged in (and its lm_head bias), ready for inference."""
    return run_folder.load_model(args.model, args.adapter, getattr(torch, args.dtype), args.device, bool(args.lm_head_bias))


def seen_in_training(args, n, test):
    """How many of the scored test series the evaluated run trained or validated on (0 without --run)."""
    if not getattr(args, "trained_on", None) or args.no_adapter:
        return 0
    name, seed = args.trained_on
    trained = Recipe(split=name, seed=seed).split_of(n)
    return int(np.isin(test, np.concatenate([trained.train, trained.val])).sum())


def load_series(args):
    """Trajectories (N, T, 2), times (T,), the protocol's split and the test rows it scores."""
    traj, times = Recipe.of(args).trajectories()
    steps = args.k + args.h + (1 if args.protocol == "report-a" else 0)  # report A's truth drops the last step
    if steps > traj.shape[1]:
        raise UserError(f"--k {args.k} + --h {args.h} exceeds the {traj.shape[1]} steps of each trajectory; lower --k or --h.")
    split = Recipe.of(args).split_of(len(traj))  # a preset fixes args.split (and seed) to its report's
    test = split.test[: protocols.PROTOCOLS[args.protocol].n_scored][: args.limit]
    if len(test) == 0:
        raise UserError("the test split is empty; use more trajectories (--n-series or --data).")
    seen = seen_in_training(args, len(traj), test)
    if seen:
        print(f"warning: the run trained or validated on {seen} of these {len(test)} test series (it used --split "
              f"{args.trained_on[0]}); train with --split {args.split} to evaluate under this protocol fairly.", file=sys.stderr)
    args.seen_in_training = seen
    return np.asarray(traj, dtype=np.float64), times, split, test


class Series:
    """The scored rows of the data under a protocol: truth and context in the protocol's units, and the
    map from original units to them (report A: its scale alpha; the others: none)."""

    def __init__(self, args, traj, rows):
        self.rows, self.k, self.h = np.asarray(rows, dtype=np.int64), args.k, args.h
        self.unit = 1.0
        if args.protocol == "report-a":
            scaled, alpha = protocols.report_a_scaled(traj)
            self.unit = 1.0 / float(alpha)
            self.texts = [protocols.report_a_text(scaled[i]) for i in self.rows]
            self.truth = np.stack([protocols.report_a_truth(t, self.h) for t in self.texts]).astype(np.float64)
        else:
            self.truth = traj[self.rows, self.k : self.k + self.h]
        self.context_original = traj[self.rows, : self.k]  # (N, k, 2), for the baselines
        self.context = self.context_original * self.unit


def scalers(args, traj, split, test):
    """(scaler for the forecast prompts, scaler for the cross-entropy windows) of the test series.

    Our protocol. Global: the run's scaler.json when evaluating a run, else fit on the train split,
    as in training (the two agree: a run's split and scaling flags cannot be overridden). Per series:
    prompts use scales fit on each context window only (the future stays unseen); the
    cross-entropy windows cover whole series, so their scales are fit on whole series, as
    train.py does for its validation windows.
    """
    def fit(data):
        try:
            return Recipe.of(args).scaler(data)
        except ValueError as e:  # an all-zero or non-finite series in the user's data
            raise UserError(f"--data {args.data or '(simulated)'}: {e}") from None

    if args.scaling == "per-series":
        return fit(traj[test, : args.k]), fit(traj[test])
    saved = Path(args.run) / "scaler.json" if args.run else None
    if saved is not None and saved.is_file():  # absent (or a folder): refit, which gives the same scale
        scaler = run_folder.read_scaler(saved)
    else:
        scaler = fit(traj[split.train])
    return scaler, scaler


# ---------------------------------------------------------------- cross-entropy

@torch.no_grad()
def cross_entropy(model, tok, scaled, args):
    """Our convention: next-token cross-entropy per token over windows of the scaled test series
    (N, T, 2), padding masked, full vocabulary."""
    w = windows.dataset_windows(scaled, tok, args.context, args.context, args.decimals, tok.pad_id)
    batches = [tuple(torch.from_numpy(a).to(args.device) for a in windows.batch(w, slice(start, start + args.batch)))
               for start in range(0, len(w.input_ids), args.batch)]
    mean, tokens = mean_cross_entropy(model, tracked(batches, "cross-entropy", "batch"))
    counted = flops.Setup(model.config, lm_head_bias=model.lm_head_bias is not None)  # the adapter is merged
    spent = sum(flops.forward_with_loss(counted, ids.shape[0], tokens_fed(ids.shape[1])).coursework for ids, _ in batches)
    return {"mean": mean, "tokens": tokens, "windows": len(w.input_ids), "flops": spent, "convention": "per token, padding masked"}


@torch.no_grad()
def cross_entropy_report_a(model, tok, texts, args):
    """Report A's convention: 768-token windows every 768 tokens, right-padded, one per batch, the
    padding scored (labels = input_ids), and the plain mean of the windows' means."""
    rows = [windows.fixed_windows(tok.encode(t), args.context, args.context, tok.pad_id) for t in texts]
    w = np.concatenate(rows)  # (W, L)
    batches = [(torch.from_numpy(w[i : i + 1]).to(args.device),) * 2 for i in range(len(w))]
    mean = mean_of_batch_means(model, tracked(batches, "cross-entropy", "window"))
    spent = len(w) * flops.forward_with_loss(flops.Setup(model.config, lm_head_bias=model.lm_head_bias is not None), 1,
                                             tokens_fed(args.context)).coursework
    return {"mean": mean, "tokens": int(w.size - len(w)), "windows": len(w), "flops": spent,
            "convention": "report A: padding counted, mean of per-window means"}


# ---------------------------------------------------------------- forecasting

def generate_forecasts(model, prompts, h, max_new_tokens, sep_id, n_samples=1, temperature=0.0, top_k=None,
                       top_p=None, seed=None, allowed_token_ids=None, stop_token_ids=(), pad_id=0, details=False,
                       decoder="cache", draft=None):
    """Our protocol's decoding: continues each prompt until it has written h steps (h separators), a
    stop token, or max_new_tokens, with no generation config and no repetition penalty.

    prompts: B token-id lists. One prefill per prompt, shared by its n_samples continuations.
    draft: a guess of the next tokens (data/draft.py) that greedy decoding checks as it goes
    (qwen_min/speculative.py: the same tokens in fewer forward passes); ignored when sampling.
    Returns new tokens (B, n_samples, n) int64, finished rows filled with pad_id; with details=True,
    also the Generation (tokens produced per row, rows active per step).
    """
    gen = generate(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                   allowed_token_ids=allowed_token_ids, stop_token_ids=stop_token_ids, stop_after=(sep_id, h),
                   num_samples=n_samples, pad_token_id=pad_id, use_generation_config=False, repetition_penalty=1.0,
                   details=True, decoder=decoder, draft=draft)
    new = gen.tokens[:, max(len(p) for p in prompts):].reshape(len(prompts), n_samples, -1).cpu()  # (B, S, n)
    return (new, gen) if details else new


def decoder_of(args):
    """generate's decoder: one recorded CUDA graph with --cuda-graph, else the default (qwen_min/generate.py)."""
    return "graph" if getattr(args, "cuda_graph", False) else "cache"


def alphabet_ids(tok):
    """The token ids of the 13 LLMTIME characters (one by one: BPE would merge e.g. '.,')."""
    try:
        return tok.character_ids(llmtime.ALPHABET)
    except UserError:
        raise UserError("this tokenizer does not give one token per digit and separator; pass --unrestricted.") from None


def draft_of(args, tok):
    """The guess of the next LLMTIME characters that greedy decoding checks (data/draft.py), or None:
    with --no-draft, on a GPU (on an H100 a pass with guesses cost more than the steps it saved:
    docs/evaluate.md, "The limit"), or for a tokenizer without one token per character."""
    if args.no_draft or args.device != "cpu":
        return None
    try:
        return LLMTimeDraft(dict(zip(llmtime.ALPHABET, tok.character_ids(llmtime.ALPHABET))))
    except UserError:
        return None


def token_budget(tasks, h):
    """max_new_tokens for h steps: the longest prompt step (in tokens) plus slack, times h."""
    return new_token_budget(max(len(t.prompt_ids) / len(t.context) for t in tasks), h)


def check_positions(model, longest, max_new):
    if longest + max_new > model.config.max_seq_len:  # the RoPE tables end there
        raise UserError(f"prompts of {longest} tokens plus {max_new} new tokens exceed the model's {model.config.max_seq_len} "
                        "positions; use a model with more positions (under our protocol: or lower --k or --h).")


def generation_flops(model, prompts, gen, samples, allowed):
    """FLOPs of one generate call (flops.py), counting only the rows still generating at each step."""
    counted = flops.Setup(model.config, lm_head_bias=model.lm_head_bias is not None, head_rows=None if allowed is None else len(allowed))
    return flops.generate(counted, len(prompts), max(map(len, prompts)), len(gen.active), samples=samples,
                          active=gen.active, fed=gen.fed, keys=gen.keys).coursework


def decode_batches(n, per_batch, decode, journal=None, world=distributed.World()):
    """decode(rows) -> record, for each batch of `per_batch` consecutive rows of n; a batch the journal
    already holds (from a run that was killed) is taken from it, and each new one is added to it.
    Batches are fixed by --batch and sampling is seeded per batch, so a resumed evaluation ends
    with the same records as an uninterrupted one, and under torchrun with the same records as one
    process: the batches still to do are dealt out in rounds, one per rank, and after each round
    every rank receives every record (rank 0 journals them). Returns the records in order."""
    pieces = [range(start, min(start + per_batch, n)) for start in range(0, n, per_batch)]
    name = {rows: f"forecast rows {rows[0]}-{rows[-1]}" for rows in pieces}
    done = dict(distributed.same_everywhere(journal.done if journal else {}, world))  # piece name -> record
    todo = [rows for rows in pieces if name[rows] not in done]
    bar = progress(n, "forecast", "series", initial=n - sum(map(len, todo)), silent=not world.main)
    for first in range(0, len(todo), world.size):
        deal = todo[first:first + world.size]  # this round: rank r decodes deal[r]
        mine = decode(deal[world.rank]) if world.rank < len(deal) else None
        for rows, record in zip(deal, distributed.everyones(mine, world)):
            done[name[rows]] = journal.add(name[rows], record) if journal else record
            bar.update(len(rows))
    bar.close()
    return [done[name[rows]] for rows in pieces if name[rows] in done]


def gathered(records):
    """The batches' records as one: values (N, S, h, 2), tokens, FLOPs, repaired forecasts, repairs by kind."""
    repairs = Counter()
    for r in records:
        repairs.update(r["repairs"])
    return (np.concatenate([np.asarray(r["values"], dtype=np.float64) for r in records]), sum(r["tokens"] for r in records),
            sum(r["flops"] for r in records), sum(r["repaired"] for r in records), dict(repairs))


def forecast(model, tok, tasks, scaler, args, journal=None, world=distributed.World()):
    """Our protocol: tasks -> samples (N, S, h, 2) in original units, repair counts, generated tokens, FLOPs."""
    sep_id = tok.encode(";")[0]
    allowed = None if args.unrestricted else alphabet_ids(tok)
    draft = draft_of(args, tok)
    max_new = token_budget(tasks, args.h)
    check_positions(model, max(len(t.prompt_ids) for t in tasks), max_new)

    def decode(rows):
        prompts = [tasks[i].prompt_ids.tolist() for i in rows]
        new, gen = generate_forecasts(model, prompts, args.h, max_new, sep_id, args.samples, args.temperature, args.top_k,
                                      args.top_p, args.sample_seed + rows[0], allowed, tok.stop_ids, tok.pad_id, details=True,
                                      decoder=decoder_of(args), draft=draft)
        cost, lengths = generation_flops(model, prompts, gen, args.samples, allowed), gen.lengths  # new: (b, S, n)
        values, repairs, repaired = np.zeros((len(rows), args.samples, args.h, 2)), Counter(), 0
        for j, i in enumerate(rows):
            for s in range(args.samples):
                values[j, s], decoded = read_forecast(tok.decode(new[j, s].tolist()), tasks[i], scaler, args.decimals)
                repairs.update(decoded.issues)
                repaired += int(decoded.n_repaired > 0)
        return {"values": values.tolist(), "tokens": int(sum(lengths)), "flops": float(cost), "repaired": repaired,
                "repairs": dict(repairs)}

    records = decode_batches(len(tasks), max(1, args.batch // args.samples), decode, journal, world)
    values, n_tokens, spent, repaired, repairs = gathered(records)
    return values, {"forecasts_repaired": repaired, "forecasts": len(tasks) * args.samples, "by_kind": repairs}, n_tokens, spent


def generate_as_transformers(model, prompts, max_new, gc, tok, n_samples=1, seed=None, decoder="cache", draft=None):
    """The reports' decoding: transformers' generate with the checkpoint's generation config (greedy
    unless sampling), over the full vocabulary, stopping only at its eos tokens or max_new; greedy
    decoding checks draft's guesses when given. Returns new tokens (B, S, n) and the FLOPs spent."""
    stop_ids = list(gc.eos_token_id or tok.stop_ids)
    gen = generate(model, prompts, max_new, do_sample=n_samples > 1, generation_config=gc, stop_token_ids=stop_ids,
                   num_samples=n_samples, seed=seed, pad_token_id=tok.pad_id, details=True, decoder=decoder, draft=draft)
    new = gen.tokens[:, max(len(p) for p in prompts):].reshape(len(prompts), n_samples, -1).cpu()
    return new, generation_flops(model, prompts, gen, n_samples, None), sum(gen.lengths)


def forecast_report_a(model, tok, texts, args, gc, journal=None, world=distributed.World()):
    """Report A's forecasts: the first half of each series' tokens as the prompt, greedy with the
    generation config, prompt + output read by its decoder. -> values (N, 1, h, 2) scaled units,
    kept (N,) bool (False: its code lost the series), repairs, tokens, FLOPs."""
    ids = [tok.encode(t) for t in texts]
    prompts = [x[: protocols.report_a_prompt_length(len(x))] for x in ids]
    budgets = [protocols.report_a_max_new_tokens(len(x)) for x in ids]
    n_truth = [len(protocols.report_a_decode(t)) for t in texts]
    check_positions(model, max(map(len, prompts)), max(budgets))
    draft = draft_of(args, tok)

    def decode(rows):
        new, cost, produced = generate_as_transformers(model, [prompts[i] for i in rows], max(budgets[i] for i in rows), gc, tok,
                                                       decoder=decoder_of(args), draft=draft)
        values, kept = np.zeros((len(rows), 1, args.h, 2)), [False] * len(rows)
        for j, i in enumerate(rows):
            full = tok.decode(prompts[i] + new[j, 0, : budgets[i]].tolist())  # its own budget: rows are independent
            read = protocols.report_a_read(full, n_truth[i], args.h)
            if read is not None and np.isfinite(read).all():
                values[j, 0], kept[j] = read, True
        lost = kept.count(False)
        return {"values": values.tolist(), "kept": kept, "tokens": int(produced), "flops": float(cost), "repaired": lost,
                "repairs": {"lost_series": lost} if lost else {}}

    records = decode_batches(len(texts), args.batch, decode, journal, world)
    values, n_tokens, spent, lost, repairs = gathered(records)
    kept = np.array([k for r in records for k in r["kept"]], dtype=bool)
    return values, kept, {"forecasts_repaired": lost, "forecasts": len(texts), "by_kind": repairs}, n_tokens, spent


def forecast_report_b(model, tok, contexts, args, gc, journal=None, world=distributed.World()):
    """Report B's forecasts: each context scaled on its own, prompt cut at 512 tokens, 300 new tokens
    with the generation config (greedy, or sampling for --samples > 1), regex pairs, zero padding.
    -> values (N, S, h, 2) original units, repairs, tokens, FLOPs."""
    scaled = [protocols.report_b_prompt(c.astype(np.float32)) for c in contexts]  # its h5 data was float32
    prompts = [tok.encode(text)[: protocols.B_MAX_PROMPT_TOKENS] for text, _ in scaled]
    max_new = protocols.report_b_max_new_tokens(args.h)
    check_positions(model, max(map(len, prompts)), max_new)
    draft = draft_of(args, tok)

    def decode(rows):
        new, cost, produced = generate_as_transformers(model, [prompts[i] for i in rows], max_new, gc, tok,
                                                       args.samples, args.sample_seed + rows[0], decoder_of(args), draft)
        values, padded, zero_steps = np.zeros((len(rows), args.samples, args.h, 2)), 0, 0
        for j, i in enumerate(rows):
            for s in range(args.samples):
                values[j, s], found = protocols.report_b_read(tok.decode(new[j, s].tolist()), scaled[i][1], args.h)
                padded += int(found < args.h)
                zero_steps += int(args.h - found)
        return {"values": values.tolist(), "tokens": int(produced), "flops": float(cost), "repaired": padded,
                "repairs": {"zero_padded_steps": zero_steps} if zero_steps else {}}

    records = decode_batches(len(contexts), max(1, args.batch // args.samples), decode, journal, world)
    values, n_tokens, spent, padded, by_kind = gathered(records)
    return values, {"forecasts_repaired": padded, "forecasts": len(contexts) * args.samples, "by_kind": by_kind}, n_tokens, spent


# ---------------------------------------------------------------- metrics, tables, plots

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
REPORT_B_ROWS = [("MSE", "mse"), ("RMSE", "rmse"), ("MAE", "mae"), ("R2", "r2"), ("NRMSE %", "nrmse"), ("MAPE %", "mape"),
                 ("Avg. Unc.", "avg_uncertainty")]


def results(args, series, forecasts, samples=None, kept=None):
    """results.json's scores and series: every forecaster scored under the protocol, in its units."""
    protocol = protocols.PROTOCOLS[args.protocol]
    keep = slice(None) if kept is None else kept
    truth = series.truth[keep]
    scores = {name: protocols.score(protocol, f[keep], truth, None if samples is None or name != "model" else samples[keep])
              for name, f in forecasts.items()}
    quantiles = None
    if samples is not None and samples.shape[1] > 1:
        quantiles = {"levels": QUANTILES, "values": np.quantile(samples[keep], QUANTILES, axis=1)}
    rows = series.rows[keep]
    return scores, {"index": rows, "context": series.context[keep], "target": truth,
                    "forecasts": {name: f[keep] for name, f in forecasts.items()}, "quantiles": quantiles,
                    "lost": series.rows[~kept] if kept is not None else []}


def baseline_forecasts(args, series, times):
    """Persistence and the fitted LV equations from each context, in the protocol's units."""
    if args.no_baselines:
        return {}
    return {"persistence": baselines.persistence(series.context_original, args.h) * series.unit,
            "lotka_volterra": baselines.lotka_volterra(series.context_original, times, args.h, args.lv_iterations) * series.unit}


def markdown(res):
    """The on-screen report: overall metrics per forecaster, then the model's per-step table; under a
    report preset, the report's own metrics in its layout first."""
    c, models = res["config"], res["results"]
    names = list(models)
    decoding = "greedy" if c["samples"] == 1 else f"{c['samples']} samples"
    lines = [f"## {c['label']}: protocol {c['protocol']}, {c['n_test']} test series, {c['k']} -> {c['h']} steps, {decoding}, "
             f"{protocols.PROTOCOLS[c['protocol']].units} units", ""]
    ce = res.get("cross_entropy")
    if ce:
        lines += [f"cross-entropy (test, {ce['convention']}): {ce['mean']:.4f} over {ce['windows']} windows", ""]
    if c["protocol"] == "report-b":
        lines += ["report B's metrics (scikit-learn, original units):", "",
                  "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for title, key in REPORT_B_ROWS:
            if any(key in models[n]["published"]["overall"] for n in names):
                lines.append(f"| {title} | " + " | ".join(fmt(models[n]["published"]["overall"].get(key)) for n in names) + " |")
        lines.append("")
    if c["protocol"] == "report-a":
        step = models[names[0]]["published"]["per_step"]
        lines += ["report A's table (scaled units; step = horizon index, 0-based; mean ± standard error):", "",
                  "| step | prey MAE | predator MAE | prey MAPE % | predator MAPE % |", "|---|---|---|---|---|"]
        for s in REPORT_A_STEPS:
            fixed3 = lambda x: "-" if x is None else f"{x:.3f}"  # as its notebooks printed them; se is None for one series
            cells = [f"{fixed3(step[m][sp]['mean'][s])} ± {fixed3(step[m][sp]['se'][s])}" for m in ("mae", "mape") for sp in metrics.SPECIES]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for title, key in OVERALL_ROWS:
        lines.append(f"| {title} | " + " | ".join(fmt(models[n]["overall"][key]) for n in names) + " |")
    for title, key in SAMPLE_ROWS:
        if "probabilistic" in models[names[0]]:
            lines.append(f"| {title} | " + " | ".join(fmt(models[n].get("probabilistic", {}).get(key)) for n in names) + " |")
    r = res["repairs"]
    lines += ["", f"repaired forecasts: {r['forecasts_repaired']} of {r['forecasts']} {r['by_kind'] or ''}", ""]
    if c["protocol"] != "report-a":
        step = models[names[0]]["per_step"]
        lines += ["| step | prey MAE | predator MAE | prey MAPE % | predator MAPE % |", "|---|---|---|---|---|"]
        for s in sorted({t for t in TABLE_STEPS if t <= c["h"]} | {c["h"]}):
            cells = [f"{fmt(step[m][sp]['mean'][s - 1], 3)} ± {fmt(step[m][sp]['se'][s - 1], 2)}"
                     for m in ("mae", "mape") for sp in metrics.SPECIES]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    if res.get("truth_check"):
        lines += ["", res["truth_check"]["summary"]]
    t = res["timing"]
    lines += ["", f"time: {t['total_s']:.1f} s (cross-entropy {t.get('cross_entropy_s', 0):.1f} s, forecasts {t.get('forecast_s', 0):.1f} s "
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
        axes[j].set(xlabel="forecast step", ylabel=f"MAE ({protocols.PROTOCOLS[c['protocol']].units} units)", title=species)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "error_vs_horizon.png", dpi=110)
    plt.close(fig)


def compare(paths):
    """Markdown: the model of each results.json side by side, % improvement over the first."""
    runs = [read_results(path) for path in paths]
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
        row(title, [r["results"]["model"]["overall"].get(key) for r in runs], higher_is_better=key == "r2")
    for title, key in SAMPLE_ROWS[:1]:
        row(title, [r["results"]["model"].get("probabilistic", {}).get(key) for r in runs])
    h = min(r["config"]["h"] for r in runs)
    for s in sorted({t for t in TABLE_STEPS if t <= h} | {h}):
        for sp in metrics.SPECIES:
            row(f"step {s} {sp} MAE", [r["results"]["model"]["per_step"]["mae"][sp]["mean"][s - 1] for r in runs])
    protocol = lambda r: (json.dumps([r["config"].get(k) for k in ("protocol", "k", "h", "scaling", "data", "seed", "n_series", "decimals")]),
                          json.dumps(r.get("series", {}).get("index")))
    if len({protocol(r) for r in runs}) > 1:
        lines.append("\nwarning: the files differ in protocol, k, h, data, split, test series or scaling; the numbers are not like for like.")
    return "\n".join(lines)


def read_results(path):
    """A results.json written by evaluate.py, checked for everything compare() reads."""
    try:
        r = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        r = None
    try:
        c, model = r["config"], r["results"]["model"]
        ok = isinstance(c["label"], str) and isinstance(c["h"], int) and c["h"] >= 1 and isinstance(model["overall"], dict)
        ok = ok and all(len(model["per_step"]["mae"][sp]["mean"]) >= c["h"] for sp in metrics.SPECIES)
        ok = ok and isinstance(r.get("cross_entropy") or {}, dict) and isinstance(model.get("probabilistic", {}), dict)
    except (KeyError, TypeError, IndexError):
        ok = False
    if not ok:
        raise UserError(f"--compare {path} is not a results.json written by evaluate.py (unreadable, or missing its config, "
                        "label or model results); pass the results.json of an evaluation.")
    return r


def write_results(args, res):
    res = to_json(res)
    out = Path(args.out)  # made by main
    atomic_write_json(out / "results.json", res)
    if args.log == "tensorboard":
        log_scalars(args, res)
    print(markdown(res))
    if args.plots:
        plot(res, out, args.plots)
    print(f"\nwrote {out / 'results.json'}" + (f", {out / 'forecasts.png'}, {out / 'error_vs_horizon.png'}" if args.plots else ""))
    return res


def log_scalars(args, res):
    """The overall metrics (and cross-entropy) as TensorBoard scalars, tagged eval/<protocol>-<adapter>/<forecaster>/<metric>,
    at the run's last training step, so they sit on the run's own curves."""
    step = 0  # the run's last step, when its summary.json says so (a run still training has none yet)
    try:
        step = int(json.loads((Path(args.run) / "summary.json").read_text())["steps"]) if args.run else 0
    except (OSError, ValueError, KeyError, TypeError):
        pass
    where = Path(args.run) / "tensorboard" if args.run else Path(args.out) / "tensorboard"
    name = f"eval/{args.protocol}-{Path(args.adapter).name if args.adapter else 'base'}"
    scalars = Scalars(where)
    for forecaster, scores in res["results"].items():
        for metric, value in scores["overall"].items():
            if isinstance(value, (int, float)):
                scalars.add(f"{name}/{forecaster}/{metric}", value, step)
    if res["cross_entropy"]:
        scalars.add(f"{name}/cross_entropy", res["cross_entropy"]["mean"], step)
    scalars.close()


def config_of(args, n_test):
    return {key: getattr(args, key) for key in vars(args) if key not in ("compare", "settings")} | {
        "n_test": n_test, "units": protocols.PROTOCOLS[args.protocol].units, "torch_threads": torch.get_num_threads()}


def score_main(args):
    """--score: forecasts from a file, scored under the protocol on the data's series, no model."""
    t_start = time.perf_counter()
    traj, times, split, test = load_series(args)
    forecast, truth, rows = protocols.read_score_file(args.score, args.h, len(traj))
    if rows is None:
        if len(forecast) != len(test):
            raise UserError(f"--score {args.score} holds {len(forecast)} forecasts but protocol {args.protocol} scores {len(test)} "
                            "test series; add `series` (the data rows forecast) or forecast exactly those series, in order.")
        rows = test
    series = Series(args, traj, rows)
    same_rows = np.array_equal(rows, test)
    summary = (f"series: {'the' if same_rows else 'NOT the'} protocol's test series ({int(np.isin(rows, test).sum())} of {len(rows)} in it) "
               f"of {args.data or f'{len(traj)} simulated trajectories (no --data)'}")
    check = {"same_series": bool(same_rows), "in_test_split": int(np.isin(rows, test).sum())}
    if truth is not None:
        gap = float(np.abs(truth - series.truth).max())
        check |= {"truth_given": True, "truth_matches_protocol": gap <= 1e-6 * max(1.0, float(np.abs(series.truth).max())),
                  "truth_max_abs_difference": gap}
        summary += (f"; scored against the file's truth, which {'matches' if check['truth_matches_protocol'] else 'does NOT match'} "
                    f"the protocol's truth for those rows (largest difference {gap:.3g})")
        series.truth = truth
    t0 = time.perf_counter()
    forecasts = {"model": forecast} | baseline_forecasts(args, series, times)
    scores, series_json = results(args, series, forecasts)
    timing = {"baselines_s": time.perf_counter() - t0, "total_s": time.perf_counter() - t_start}
    res = {"config": config_of(args, len(rows)), "cross_entropy": None, "results": scores,
           "repairs": {"forecasts_repaired": 0, "forecasts": len(rows), "by_kind": {}}, "tokens_generated": 0,
           "flops": None, "timing": timing, "truth_check": check | {"summary": summary}, "series": series_json}
    return write_results(args, res)


# ---------------------------------------------------------------- main

def main(argv=None):
    # Under torchrun the ranks share the decode batches (decode_batches). They exchange only Python
    # objects (the args, finished batches), so gloo serves on GPUs too; rank 0 alone parses the flags
    # (which may claim a results folder) and writes.
    # The other ranks wait in a collective while rank 0 alone computes the cross-entropy: a long timeout.
    world = distributed.join(gpus=False, timeout=datetime.timedelta(hours=24))
    try:
        args = distributed.same_everywhere(parse_args(argv) if world.main else None, world)
        if world.size > 1 and (args.compare or args.score):
            raise UserError("--compare and --score run no model; run them as one process, without torchrun.")
        distributed.require_gpus(args.device, world)
        if not world.main:
            return evaluate(args, None, world)
        return evaluate_in_folder(args, world)
    finally:
        distributed.leave(world)


def evaluate_in_folder(args, world=distributed.World()):
    """Rank 0's part of main: --compare, --score, or the evaluation in its locked folder with its journal."""
    if args.compare:
        print(compare(args.compare))
        return None
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out} ({e.strerror}); choose another folder.") from None
    if args.score:
        return score_main(args)
    # the run's eval/ and ledger.jsonl: never while train.py (or another evaluation) writes there; OUT: one evaluation's
    with FolderLock(args.run) if args.run else contextlib.nullcontext(), FolderLock(out):
        journal = Journal(out / JOURNAL, args.settings)
        if journal.done:
            print(f"resuming the evaluation killed in {out}: {len(journal.done)} finished pieces read from {JOURNAL}", file=sys.stderr)
        return evaluate(args, journal, world)


def evaluate(args, journal=None, world=distributed.World()):
    """The model (+ adapter) on the protocol's test series: cross-entropy, forecasts, metrics, results.json.
    With a journal, pieces it holds are read from it, and each new piece is added to it when done.
    Under torchrun every rank forecasts its share of the series; rank 0 alone scores and writes."""
    t_start = time.perf_counter()
    torch.manual_seed(args.sample_seed)
    cfg = Qwen2Config.from_json(resolve_checkpoint(args.model) / "config.json")
    if not args.no_ce and args.context > cfg.max_seq_len:  # refused before any window is allocated
        raise UserError(f"--context {args.context} is longer than the {cfg.max_seq_len} positions of --model {args.model}; lower --context.")
    traj, times, split, test = load_series(args)
    series = Series(args, traj, test)
    tok = Tokenizer.from_pretrained(args.model)
    if args.protocol == "ours":
        prompt_scaler, ce_scaler = scalers(args, traj, split, test)
        tasks = forecast_tasks(traj[test], args.k, args.h, prompt_scaler, args.decimals, tok)
    else:
        gc = GenerationConfig.from_pretrained(args.model)
    model = load_model(args)
    timing = {"load_s": time.perf_counter() - t_start}

    t0 = time.perf_counter()
    ce = journal.done.get("cross-entropy") if journal else None
    if ce is None and not args.no_ce and world.main:  # rank 0's alone: the other ranks wait for the forecasts
        if args.protocol == "report-a":  # every test series, the 150th too, as its test loss did
            scaled, _ = protocols.report_a_scaled(traj)
            ce = cross_entropy_report_a(model, tok, [protocols.report_a_text(scaled[i]) for i in split.test[: args.limit]], args)
        else:
            ce = cross_entropy(model, tok, ce_scaler.transform(traj[test]), args)
        ce = journal.add("cross-entropy", to_json(ce)) if journal else ce
    timing["cross_entropy_s"] = time.perf_counter() - t0
    if ce:
        print(f"cross-entropy {ce['mean']:.4f} ({timing['cross_entropy_s']:.1f} s); forecasting {len(test)} series...", file=sys.stderr)

    t0 = time.perf_counter()
    kept = None
    if args.protocol == "report-a":
        samples, kept, repairs, n_tokens, generate_flops = forecast_report_a(model, tok, series.texts, args, gc, journal, world)
    elif args.protocol == "report-b":
        samples, repairs, n_tokens, generate_flops = forecast_report_b(model, tok, series.context_original, args, gc, journal, world)
    else:
        samples, repairs, n_tokens, generate_flops = forecast(model, tok, tasks, prompt_scaler, args, journal, world)  # (N, S, h, 2)
    if not world.main:
        return None
    timing["forecast_s"] = time.perf_counter() - t0
    if kept is not None and not kept.any():
        raise UserError(f"report A's decoder rejected the output for all {len(kept)} series, so there is nothing to score.")

    t0 = time.perf_counter()
    point = protocols.point_forecast(protocols.PROTOCOLS[args.protocol], samples)  # (N, h, 2); the sample itself when S = 1
    forecasts = {"model": point} | baseline_forecasts(args, series, times)
    timing["baselines_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - t_start
    scores, series_json = results(args, series, forecasts, samples, kept)

    config = config_of(args, len(series_json["index"])) | {"max_new_tokens": token_budget(tasks, args.h) if args.protocol == "ours" else None}
    res = {"config": config, "cross_entropy": ce, "results": scores, "repairs": repairs, "tokens_generated": n_tokens,
           "flops": {"cross_entropy": ce["flops"] if ce else 0.0, "generate": generate_flops}, "timing": timing,
           "series": series_json, "provenance": run_folder.provenance(args.device)}
    if args.run:  # the run's FLOP ledger gets what its evaluation spent, beside its training
        ledger = flops.Ledger(Path(args.run) / "ledger.jsonl")
        # step -1: not a training step, so a later --resume of the run keeps these lines
        ledger.add(f"{args.label} evaluation", "eval", res["flops"]["cross_entropy"], step=-1)
        ledger.add(f"{args.label} evaluation", "generate", res["flops"]["generate"], step=-1)
    return write_results(args, res)


if __name__ == "__main__":
    run_cli(main)
