"""Fine-tune Qwen2.5 with LoRA to forecast Lotka-Volterra trajectories written as LLMTIME text.

    python train.py --rank 8                       # defaults of the best published run
    python train.py --model DIR --context 128 --steps 30 --out runs/short
    python train.py --out runs/short --resume      # continue a killed run exactly

The recipe: load the model, inject LoRA, turn trajectories into token windows, then loop
(batch -> loss -> backward -> AdamW step), validating every --eval-every steps, keeping the best
adapter, stopping early or before the FLOP budget runs out. Everything a run makes lands in its
folder (--out): args.json, scaler.json, metrics.jsonl, ledger.jsonl (FLOPs planned and spent),
state.pt (for --resume), adapter/ and best/ (peft format), loss.png, summary.json, and with
--export-merged merged/ (a checkpoint transformers loads).
"""

import argparse
import functools
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import flops
import lora
from data import llmtime, lotka_volterra, splits, windows
from qwen_min import Qwen2, Tokenizer
from qwen_min.loss import causal_lm_loss, mean_cross_entropy
from qwen_min.weights import hf_name, resolve_checkpoint, save_pretrained

on_step = None  # called with the step number after every step; tests use it to kill a run midway
# Flags a --resume may change; every other flag is the saved run's.
RESUMABLE = ("steps", "lr", "patience", "flops_budget", "device", "no_progress", "export_merged")
# Training calls scaled_dot_product_attention with is_causal=True, which runs PyTorch's fused
# flash kernels on CPU and, in bf16, on CUDA; flops.py counts their backward accordingly. (fp32 on
# CUDA with grouped kv heads may fall back to the math kernel, which flops.py counts as
# kernel="math": about 1% fewer FLOPs per step at 512 tokens. Not yet checked on a GPU.)
ATTENTION_KERNEL = "fused"
TARGET_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="LoRA fine-tuning of Qwen2.5 on Lotka-Volterra trajectories (LLMTIME text).")
    g = p.add_argument_group("model and LoRA")
    g.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="checkpoint folder or hub id")
    g.add_argument("--rank", type=int, default=8)
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: = rank, scale 1)")
    g.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    g.add_argument("--targets", default="q,v", help=f"comma list of {','.join(TARGET_NAMES)}")
    g.add_argument("--lm-head-bias", action="store_true", help="also train a bias on the output layer (the coursework's)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="h5 file in the coursework layout (default: simulate)")
    g.add_argument("--n-series", type=int, default=1000, help="trajectories to simulate when no --data")
    g.add_argument("--decimals", type=int, default=2, choices=[1, 2, 3])
    g.add_argument("--scaling", default="global", choices=["global", "per-series"])
    g.add_argument("--percentile", type=float, default=95.0)
    g.add_argument("--scale-target", type=float, default=10.0, help="the percentile maps to this value")
    g.add_argument("--context", type=int, default=512, help="tokens per training window")
    g.add_argument("--stride", type=int, default=None, help="window stride (default: context / 2)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--batch", type=int, default=4)
    g.add_argument("--steps", type=int, default=2000)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--schedule", default="constant", choices=["constant", "cosine"], help="cosine: linear warm-up then cosine decay to 10%%")
    g.add_argument("--warmup", type=int, default=0, help="warm-up steps")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    g.add_argument("--vocab", default="full", choices=["full", "numeric"], help="numeric: softmax over the 13 LLMTIME tokens only")
    g = p.add_argument_group("validation, budget and run")
    g.add_argument("--eval-every", type=int, default=100)
    g.add_argument("--eval-batches", type=int, default=10)
    g.add_argument("--patience", type=int, default=5, help="evaluations without improvement before stopping (0 = never)")
    g.add_argument("--flops-budget", type=float, default=1e17)
    g.add_argument("--precision", default=None, choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=None, help="run folder (default: runs/<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    g.add_argument("--export-merged", action="store_true",
                   help="at the end, also write the best adapter merged into a full checkpoint (<out>/merged) that transformers loads")
    args = p.parse_args(argv)
    for action in p._actions:  # parse again with no defaults: which flags did the user give?
        action.default = argparse.SUPPRESS
    args.given = sorted(vars(p.parse_args(argv)))

    bad = [t for t in args.targets.split(",") if t not in TARGET_NAMES]
    checks = [
        (args.rank >= 1, "--rank must be at least 1"),
        (args.lr > 0 and math.isfinite(args.lr), "--lr must be a positive number"),
        (args.batch >= 1 and args.steps >= 1, "--batch and --steps must be at least 1"),
        (args.context >= 8, "--context must be at least 8 tokens"),
        (args.stride is None or 1 <= args.stride <= args.context, "--stride must be in 1..--context"),
        (not bad, f"unknown --targets {bad}; choose from {','.join(TARGET_NAMES)}"),
        (args.eval_every >= 1 and args.eval_batches >= 1, "--eval-every and --eval-batches must be at least 1"),
        (args.flops_budget > 0, "--flops-budget must be positive"),
        (0 <= args.dropout < 1, "--dropout must be in [0, 1)"),
        (0 < args.percentile <= 100 and args.scale_target > 0, "need 0 < --percentile <= 100 and --scale-target > 0"),
        (args.n_series >= 4, "--n-series must be at least 4 (train, validation and test need trajectories)"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)
    if args.resume and not args.out:
        p.error("--resume needs --out, the folder of the run to continue")
    args.stride = args.stride or max(1, args.context // 2)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"unknown --device '{args.device}'; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for, but this PyTorch sees no CUDA GPU")
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.out = args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    return args


# ---------------------------------------------------------------- data

def build_data(args, tok):
    """Trajectories -> split -> scaler (fit on train) -> token windows for train and validation."""
    if args.data:
        traj, _ = lotka_volterra.load(args.data)
    else:
        traj, _ = lotka_volterra.simulate(args.n_series, seed=args.seed)
    split = splits.split(len(traj), seed=args.seed)
    per_series = args.scaling == "per-series"

    def scaled(rows):  # per-series scales are fit on each series itself; global on the train split
        scaler = llmtime.Scaler.fit(traj[rows] if per_series else traj[split.train], args.percentile, args.scale_target, per_series)
        return scaler.transform(traj[rows]), scaler

    train_scaled, scaler = scaled(split.train)
    val_scaled, _ = scaled(split.val)
    train = windows.dataset_windows(train_scaled, tok, args.context, args.stride, args.decimals, tok.pad_id)
    val = windows.dataset_windows(val_scaled, tok, args.context, args.context, args.decimals, tok.pad_id)
    if len(val.input_ids) == 0:
        raise SystemExit(f"error: the data hold {len(traj)} trajectories, too few for a validation split; use at least 4.")
    if len(train.input_ids) < args.batch:
        raise SystemExit(f"error: only {len(train.input_ids)} training windows for --batch {args.batch}; use more data or a smaller batch.")
    return train, val, scaler, split


def batch_indices(step, n_windows, batch, seed):
    """The windows of a step: a fresh seeded permutation each epoch, so any step can be recomputed."""
    per_epoch = n_windows // batch
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_windows)
    return order[i * batch:(i + 1) * batch]


def to_batch(w, idx, device):
    """Windows rows idx -> (input_ids, labels) tensors on the device, trailing all-padding columns cut."""
    return tuple(torch.from_numpy(a).to(device) for a in windows.batch(w, idx))


# ---------------------------------------------------------------- schedule, evaluation, checkpoints

def learning_rate(step, args):
    if args.schedule == "constant":
        return args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def eval_indices(val, args):
    """The fixed validation subset: the first --eval-batches batches of validation windows."""
    n = min(len(val.input_ids), args.eval_batches * args.batch)
    return [np.arange(start, min(n, start + args.batch)) for start in range(0, n, args.batch)]


def evaluate(model, val, args, vocab_ids, autocast):
    """Mean token cross-entropy over the first --eval-batches batches of validation windows."""
    batches = (to_batch(val, idx, args.device) for idx in eval_indices(val, args))
    return mean_cross_entropy(model, batches, vocab_ids, autocast)[0]


def cpu_matmul_rate(n=1024, reps=8):
    """This CPU's float32 matmul rate in FLOP/s (a fraction of a second to measure)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def atomic_torch_save(obj, path):
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_adapter(model, folder, args):
    extra = {"lm_head_bias": model.lm_head_bias} if model.lm_head_bias is not None else None
    tmp, old = Path(str(folder) + ".tmp"), Path(str(folder) + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    lora.save_adapter(model, tmp, module_name=hf_name, base_model_name_or_path=args.model, extra=extra)
    if Path(folder).exists():
        os.replace(folder, old)  # a crash from here on leaves the previous adapter in .old
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def export_merged(run, args):
    """The best adapter folded into the base weights, written as a Hugging Face checkpoint."""
    if args.lm_head_bias:
        print("note: --export-merged skipped: transformers' Qwen2 has no lm_head bias; use the adapter in best/.", file=sys.stderr)
        return
    if not (run / "best").is_dir():
        print("note: --export-merged skipped: no validation finished, so there is no best adapter.", file=sys.stderr)
        return
    model = Qwen2.from_pretrained(args.model, dtype=torch.float32, device="cpu")
    lora.load_adapter(model, run / "best", module_name=hf_name)
    save_pretrained(lora.merged_state_dict(model), model.config, run / "merged", copy_from=resolve_checkpoint(args.model))
    print(f"merged checkpoint written to {run / 'merged'}")


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_losses(run, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    train = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    val = [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "val"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.7, label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy per token", title=run.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def resumed_args(args, run):
    """The saved flags of the run in `run`, with the few a resume may change taken from `args`."""
    try:
        saved = json.loads((run / "args.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise SystemExit(f"error: {run}/args.json is missing or unreadable, so the run cannot be resumed; start a new run.") from None
    changed = [k for k in args.given if k not in ("out", "resume") and getattr(args, k) != saved.get(k)]
    refused = [k for k in changed if k not in RESUMABLE]
    if refused:
        raise SystemExit(f"error: --resume continues the saved run, so --{refused[0].replace('_', '-')} cannot change; "
                         f"only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} can.")
    merged = argparse.Namespace(**(saved | {k: getattr(args, k) for k in changed} | {"resume": True, "given": args.given}))
    (run / "args.json").write_text(json.dumps({k: v for k, v in vars(merged).items() if k not in ("resume", "given")}, indent=2))
    return merged


def restore(state_file, model, optimizer, run):
    """Loads the last checkpoint into model and optimizer; drops log lines written after it."""
    state = torch.load(state_file, map_location="cpu", weights_only=False)  # RNG states must stay on the CPU
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in state["trainable"]:
                p.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])  # moves its tensors to the parameters' device
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    for path in (run / "metrics.jsonl", run / "ledger.jsonl"):
        keep = []
        for line in path.read_text().splitlines() if path.exists() else []:
            try:
                if json.loads(line)["step"] <= state["step"]:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError):
                pass  # a line half-written when the run was killed
        path.write_text("".join(line + "\n" for line in keep))
    return state


# ---------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    run = Path(args.out)
    state_file = run / "state.pt"
    if args.resume:
        if not state_file.is_file():
            raise SystemExit(f"error: {run} holds no state.pt to resume from; start the run without --resume.")
        args = resumed_args(args, run)
    elif state_file.exists():
        raise SystemExit(f"error: {run} already holds a run; pass --resume to continue it or choose another --out.")
    else:  # a fresh start: logs of a run killed before its first checkpoint go
        for name in ("metrics.jsonl", "ledger.jsonl"):
            (run / name).unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    # Build: tokenizer, data, model with LoRA.
    tok = Tokenizer.from_pretrained(args.model)
    train_w, val_w, scaler, split = build_data(args, tok)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    model = Qwen2.from_pretrained(args.model, dtype=dtype, device=args.device, lm_head_bias=args.lm_head_bias)
    targets = [TARGET_NAMES[t] for t in args.targets.split(",")]
    lora.inject_lora(model, r=args.rank, alpha=args.alpha, dropout=args.dropout, targets=targets)
    trainable = lora.mark_only_lora_as_trainable(model, also=("lm_head_bias",))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # trained parameters stay float32 (bf16 runs compute in bf16 under autocast)
        p.data = p.data.float()
    model.train()
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    vocab_ids = torch.tensor(tok.character_ids(llmtime.ALPHABET), device=args.device) if args.vocab == "numeric" else None

    def autocast():
        return torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    # FLOPs from the FLOP model, for the batch shapes really run (trailing padding is cut off).
    cfg = model.config
    lora_ranks = flops.lora_targets(args.targets, args.rank)
    head_rows = len(llmtime.ALPHABET) if args.vocab == "numeric" else None

    @functools.lru_cache(maxsize=None)
    def step_cost(B, T):  # the loss feeds T - 1 tokens and scores T - 1 labels
        return flops.train_step(cfg, B, T - 1, lora_ranks, args.lm_head_bias, head_rows, kernel=ATTENTION_KERNEL)

    eval_batches = [to_batch(val_w, idx, "cpu")[0].shape for idx in eval_indices(val_w, args)]
    eval_flops = sum(flops.forward(cfg, B, T - 1, lora_ranks, args.lm_head_bias, head_rows).coursework for B, T in eval_batches)

    # State: fresh, or restored exactly from the last checkpoint.
    step, best_val, bad_evals, spent = 0, float("inf"), 0, 0.0
    if args.resume:
        state = restore(state_file, model, optimizer, run)
        step, best_val, bad_evals, spent = state["step"], state["best_val"], state["bad_evals"], state["spent"]
        print(f"resuming {run} at step {step} (best validation loss {best_val:.4f})")
    ledger = flops.Ledger(run / "ledger.jsonl", budget=args.flops_budget)  # on resume: the spending so far
    if not args.resume:
        (run / "args.json").write_text(json.dumps({k: v for k, v in vars(args).items() if k not in ("resume", "given")}, indent=2))
        (run / "scaler.json").write_text(json.dumps(scaler.to_dict() | {"decimals": args.decimals, "split_seed": args.seed}))
        plan = flops.plan_run(cfg, args.steps, args.batch, args.context, lora_ranks, args.lm_head_bias, head_rows,
                              ATTENTION_KERNEL, val_every=args.eval_every, val_batches=len(eval_batches))
        ledger.add(run.name, "train", plan["train"], source="plan", step=0)
        ledger.add(run.name, "eval", plan["eval"].coursework + eval_flops, source="plan", step=0)  # + the step-0 baseline

    def checkpoint():
        atomic_torch_save({"trainable": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                           "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "step": step,
                           "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                           "best_val": best_val, "bad_evals": bad_evals, "spent": spent}, state_file)
        save_adapter(model, run / "adapter", args)

    n_params = sum(p.numel() for p in params)
    full_step = step_cost(args.batch, args.context).coursework
    print(f"{len(trainable)} trainable tensors, {n_params:,} parameters; {len(train_w.input_ids)} training windows of "
          f"{args.context} tokens, {len(val_w.input_ids)} validation; {full_step:.3g} FLOPs per full step, budget {args.flops_budget:.3g}")
    if args.device == "cpu" and cfg.n_layers >= 12:
        est = full_step / cpu_matmul_rate()
        print(f"warning: training on CPU: at least {est:.0f} s per step at this CPU's matmul rate (measured runs take about 1.5x "
              f"that), {est * (args.steps - step) / 3600:.1f} h or more for the run; use a CUDA GPU for real runs.", file=sys.stderr)

    from tqdm import tqdm

    def validate():
        """Validation loss on the fixed subset; keeps the best adapter and checkpoints. True = stop early."""
        nonlocal spent, best_val, bad_evals
        val_loss = evaluate(model, val_w, args, vocab_ids, autocast)
        spent += eval_flops
        improved = val_loss < best_val
        best_val, bad_evals = (val_loss, 0) if improved else (best_val, bad_evals + 1)
        append_jsonl(run / "metrics.jsonl", {"kind": "val", "step": step, "val_loss": val_loss, "best": improved, "flops": spent})
        ledger.add(run.name, "eval", eval_flops, step=step)
        bar.write(f"step {step}: validation loss {val_loss:.4f}{' (best)' if improved else ''}")
        if improved:
            save_adapter(model, run / "best", args)
        checkpoint()
        return bool(args.patience) and bad_evals >= args.patience

    bar = tqdm(total=args.steps, initial=step, disable=args.no_progress, dynamic_ncols=True)
    if step == 0 and not args.resume and eval_flops <= args.flops_budget:
        validate()  # the base model's loss: the baseline every later evaluation must beat
    stop_reason = "steps"
    if args.patience and bad_evals >= args.patience:  # a resumed run that had already stopped early
        stop_reason, step_limit = "early stopping", step
    else:
        step_limit = args.steps
    t_last = time.perf_counter()
    while step < step_limit:
        is_eval = (step + 1) % args.eval_every == 0 or step + 1 == args.steps
        ids, labels = to_batch(train_w, batch_indices(step, len(train_w.input_ids), args.batch, args.seed), args.device)
        cost = step_cost(*ids.shape)
        if spent + cost.coursework + (eval_flops if is_eval else 0) > args.flops_budget:
            stop_reason = "flops budget"
            break
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast():
            loss = causal_lm_loss(model, ids, labels, vocab_ids)
        if not torch.isfinite(loss):
            checkpoint()
            raise SystemExit(f"error: the loss became {loss.item()} at step {step}; lower --lr (the last good state is saved in {run}).")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        step += 1
        spent += cost.coursework
        now = time.perf_counter()
        tokens_per_s = int((labels != -100).sum()) / (now - t_last)
        t_last = now
        append_jsonl(run / "metrics.jsonl", {"kind": "train", "step": step, "loss": loss.item(), "lr": lr,
                                             "tokens_per_s": tokens_per_s, "flops": spent})
        ledger.add(run.name, "train", cost, step=step)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", flops=f"{spent:.2e}")
        bar.update(1)

        if on_step is not None:
            on_step(step)
        if is_eval:
            stop = validate()
            t_last = time.perf_counter()
            if stop:
                stop_reason = "early stopping"
                break
    bar.close()
    checkpoint()
    plot_losses(run, run / "loss.png")
    if args.export_merged:
        export_merged(run, args)
    summary = {"steps": step, "stop_reason": stop_reason, "best_val_loss": best_val, "flops_spent": spent,
               "flops_budget": args.flops_budget, "budget_used": spent / args.flops_budget, "run": str(run)}
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"done after {step} steps ({stop_reason}): best validation loss {best_val:.4f}, "
          f"{spent:.3g} FLOPs ({100 * spent / args.flops_budget:.2f}% of the budget); adapter in {run / 'best'}")
    return summary


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # bad paths, files or flags: one sentence, no traceback
        raise SystemExit(f"error: {e}") from None
