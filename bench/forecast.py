"""Wall time to forecast test series: qwen-min (evaluate.py's decoder) against transformers' generate.

    python bench/forecast.py --model DIR --data FILE --n-series 20 --k 50 --h 20 --batch 20
    python bench/forecast.py --model DIR --quick          # 4 series, 20 -> 5 steps: a smoke test

Same checkpoint and dtype (float32 by default; --device cuda --dtype bfloat16 on a GPU), same prompts (test split, global scaling 95th percentile -> 10,
2 decimals), greedy, same token budget, and the same stopping rule for both: a row stops
after h step separators (transformers gets it as a StoppingCriteria). Restricted decoding
(digits and separators only) is given to transformers as a LogitsProcessor that masks every
other token, so restricted runs are compared like for like too. Prints each time, the
ratios, and whether both produced the same tokens (greedy modes). Beside them, the limit
(bench/roofline.py): this machine's measured copy bandwidth and matmul peak, the floor of each
mode's forecast (prefill at the matmul peak, each decode step at max(bytes / bandwidth, FLOPs /
peak), from the tokens qwen-min produced), and the share of that floor each library reaches.
The floor is one-token-a-step decoding's: qwen-min's greedy modes check a guess of the next
tokens in each pass (qwen_min/speculative.py; --plain also times them without), which can go
below it where a step is bound by streaming the weights.

Modes: free (any token), restricted (digits and separators), sampled (restricted, --samples
continuations per series at temperature 0.7: ours prefills each prompt once and copies its
cache, transformers' num_return_sequences prefills every copy). On a shared CPU, timings
drift with other load, so each mode runs both libraries back to back, --repeats times, and
the best time of each is kept.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evaluate  # noqa: E402
import roofline  # noqa: E402  (bench/roofline.py)
from data import llmtime, lotka_volterra, splits  # noqa: E402
from data.forecast import forecast_tasks  # noqa: E402
from qwen_min import Qwen2, Tokenizer  # noqa: E402
from qwen_min.generate import pad_left  # noqa: E402


NAMES = {"ours": "qwen-min", "hf": "transformers", "graph": "qwen-min (CUDA graph)", "plain": "qwen-min (no guesses)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Forecast wall time: qwen-min against transformers' generate.")
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="checkpoint folder or hub id")
    p.add_argument("--data", help="h5 file in the coursework layout (default: simulate 1000 series)")
    p.add_argument("--n-series", type=int, default=20)
    p.add_argument("--k", type=int, default=50, help="context steps")
    p.add_argument("--h", type=int, default=20, help="forecast steps")
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="4 series, 20 -> 5 steps")
    p.add_argument("--modes", default="free,restricted,sampled", help="comma list of free, restricted, sampled")
    p.add_argument("--samples", type=int, default=4, help="continuations per series in the sampled mode")
    p.add_argument("--repeats", type=int, default=1, help="runs per library and mode; the best time is kept")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both libraries run there)")
    p.add_argument("--cuda-graph", action="store_true", help="also time qwen-min with every decode step replayed from one CUDA graph")
    p.add_argument("--plain", action="store_true", help="also time qwen-min's greedy modes without checking guesses "
                   "(one token per forward pass, as before speculative verification)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16 is for GPUs (emulated, slow, on CPU); greedy tokens may then differ where two logits nearly tie")
    args = p.parse_args(argv)
    if args.quick:
        args.n_series, args.k, args.h = 4, 20, 5
    if args.plain and args.device != "cpu":
        p.error("--plain compares checking guesses with not checking them, which only CPUs do; drop it on a GPU")
    modes = args.modes.split(",")
    if not modes or not set(modes) <= {"free", "restricted", "sampled"}:
        p.error("--modes takes free, restricted and/or sampled")
    args.modes = modes
    return args


def test_prompts(args, tok):
    """Token-id prompts of the first n test series and the token budget evaluate.py would use."""
    traj, _ = lotka_volterra.load(args.data) if args.data else lotka_volterra.simulate(1000, seed=0)
    split = splits.split(len(traj), seed=0)
    scaler = llmtime.Scaler.fit(traj[split.train], 95, 10)
    tasks = forecast_tasks(traj[split.test[: args.n_series]], args.k, args.h, scaler, 2, tok)
    return [t.prompt_ids.tolist() for t in tasks], evaluate.token_budget(tasks, args.h)


def run_ours(model, tok, prompts, args, max_new, mode, decoder="cache", guesses=True):
    allowed = None if mode == "free" else evaluate.alphabet_ids(tok)
    draft = evaluate.draft_of(argparse.Namespace(no_draft=not guesses, device=args.device), tok)  # greedy, on a CPU
    samples, temperature = (args.samples, 0.7) if mode == "sampled" else (1, 0.0)
    rows = []
    for start in range(0, len(prompts), args.batch):
        new = evaluate.generate_forecasts(model, prompts[start:start + args.batch], args.h, max_new, tok.encode(";")[0],
                                          samples, temperature, seed=0, allowed_token_ids=allowed,
                                          stop_token_ids=tok.stop_ids, pad_id=tok.pad_id, decoder=decoder, draft=draft)
        rows += [[t for t in r if t != tok.pad_id] for r in new.flatten(0, 1).tolist()]
    return rows


def run_transformers(hf, tok, prompts, args, max_new, mode):
    import transformers

    sep = tok.encode(";")[0]
    allowed = torch.tensor(evaluate.alphabet_ids(tok))

    class StepsDone(transformers.StoppingCriteria):  # a row is done after h separators, as in evaluate.py
        def __init__(self, prompt_len):
            self.prompt_len = prompt_len

        def __call__(self, input_ids, scores, **kwargs):
            return (input_ids[:, self.prompt_len:] == sep).sum(1) >= args.h

    class OnlyAllowed(transformers.LogitsProcessor):  # restricted decoding: every other token gets -inf
        def __call__(self, input_ids, scores):
            keep = torch.full_like(scores, float("-inf"))
            keep[:, allowed.to(scores.device)] = 0
            return scores + keep

    rows = []
    for start in range(0, len(prompts), args.batch):
        ids, mask = pad_left(prompts[start:start + args.batch], tok.pad_id)
        ids, mask = ids.to(args.device), mask.to(args.device)
        if mode == "sampled":  # top_k 0 / top_p 1 switch off the checkpoint's generation_config defaults
            decoding = dict(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, num_return_sequences=args.samples)
        else:
            decoding = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new, repetition_penalty=1.0, **decoding,
                          pad_token_id=tok.pad_id, eos_token_id=tok.stop_ids,
                          stopping_criteria=transformers.StoppingCriteriaList([StepsDone(ids.shape[1])]),
                          logits_processor=transformers.LogitsProcessorList([] if mode == "free" else [OnlyAllowed()]))
        rows += [[t for t in r if t != tok.pad_id] for r in out[:, ids.shape[1]:].tolist()]
    return rows


def floor_seconds(model, tok, prompts, rows, args, mode, bw, peak):
    """The roofline floor of a mode's whole forecast, batch by batch: (prefill s, decode s). Rows are
    the new tokens without padding, so a row that ended on an end-of-text token that is also the pad
    id counts one token short (its floor one step low, in free decoding only)."""
    head_rows = None if mode == "free" else len(evaluate.alphabet_ids(tok))
    samples = args.samples if mode == "sampled" else 1
    prefill = decode = 0.0
    for start in range(0, len(prompts), args.batch):
        batch = prompts[start:start + args.batch]
        new = [len(r) for r in rows[start * samples:(start + len(batch)) * samples]]
        p, d = roofline.forecast_floor(model, max(map(len, batch)), new, head_rows, bw, peak, samples)
        prefill, decode = prefill + p, decode + d
    return prefill, decode


def timed(fn, *a):
    t0 = time.perf_counter()
    rows = fn(*a)  # lists of token ids: the GPU has finished when they exist
    return time.perf_counter() - t0, rows


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = Tokenizer.from_pretrained(args.model)
    prompts, max_new = test_prompts(args, tok)
    print(f"{len(prompts)} series, {args.k} -> {args.h} steps, prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"budget {max_new} new tokens, batch {args.batch}, {args.dtype} on {args.device}, {torch.get_num_threads()} CPU threads")
    times, outputs = {}, {}
    import transformers

    dtype = getattr(torch, args.dtype)
    ours = Qwen2.from_pretrained(args.model, dtype=dtype, device=args.device)
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    run_ours(ours, tok, prompts[:1], args, 2, "free")  # warm-up
    run_transformers(hf, tok, prompts[:1], args, 2, "free")
    libs = [("ours", run_ours, ours), ("hf", run_transformers, hf)]
    if args.cuda_graph:
        libs.append(("graph", lambda *a: run_ours(*a, decoder="graph"), ours))
    if args.plain:
        libs.append(("plain", lambda *a: run_ours(*a, guesses=False), ours))
    for mode in args.modes:
        for _ in range(args.repeats):
            for lib, fn, model in libs:
                t, outputs[lib, mode] = timed(fn, model, tok, prompts, args, max_new, mode)
                times[lib, mode] = min(t, times.get((lib, mode), float("inf")))
                print(f"{NAMES[lib]} {mode}: {t:.1f} s", flush=True)

    print("\n| decoding | qwen-min s | transformers s | speed-up | same tokens | new tokens (ours) |\n|---|---|---|---|---|---|")
    for mode in args.modes:
        mine, ref = outputs["ours", mode], outputs["hf", mode]
        same = "-" if mode == "sampled" else f"{sum(a == b for a, b in zip(mine, ref))}/{len(mine)} rows"
        print(f"| {mode} | {times['ours', mode]:.1f} | {times['hf', mode]:.1f} | {times['hf', mode] / times['ours', mode]:.2f}x "
              f"| {same} | {sum(map(len, mine))} |")
    for mode in args.modes if args.cuda_graph else ():
        same = "-" if mode == "sampled" else f"{sum(a == b for a, b in zip(outputs['graph', mode], outputs['ours', mode]))}/{len(prompts)} rows"
        print(f"qwen-min with a CUDA graph, {mode}: {times['graph', mode]:.1f} s, {times['hf', mode] / times['graph', mode]:.2f}x "
              f"transformers, {times['ours', mode] / times['graph', mode]:.2f}x qwen-min eager; same tokens as eager: {same}")
    for mode in args.modes if args.plain else ():
        same = "-" if mode == "sampled" else f"{sum(a == b for a, b in zip(outputs['plain', mode], outputs['ours', mode]))}/{len(prompts)} rows"
        print(f"qwen-min without guesses, {mode}: {times['plain', mode]:.1f} s, {times['hf', mode] / times['plain', mode]:.2f}x "
              f"transformers; with them {times['plain', mode] / times['ours', mode]:.2f}x faster; same tokens: {same}")
    bw, peak = roofline.bandwidth(args.device), roofline.matmul_peak(args.device, dtype)
    print(f"\nThe limit: this machine copies {bw / 1e9:.1f} GB/s and multiplies {args.dtype} matrices at {peak / 1e9:.0f} "
          f"GFLOP/s (bench/roofline.py; both measured now)")
    print("| decoding | floor s (prefill + decode) | qwen-min share of the floor | transformers share |\n|---|---|---|---|")
    for mode in args.modes:
        p, d = floor_seconds(ours, tok, prompts, outputs["ours", mode], args, mode, bw, peak)
        print(f"| {mode} | {p + d:.1f} ({p:.1f} + {d:.1f}) | {(p + d) / times['ours', mode]:.0%} | {(p + d) / times['hf', mode]:.0%} |")
    if "free" in args.modes and "restricted" in args.modes:
        print(f"\nqwen-min restricted vs transformers free: {times['hf', 'free'] / times['ours', 'restricted']:.2f}x")
    return times


if __name__ == "__main__":
    main()
