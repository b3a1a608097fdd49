"""Fine-tune Qwen2.5 with LoRA to forecast Lotka-Volterra trajectories written as LLMTIME text.

    python train.py --rank 8                       # defaults of the best published run
    python train.py --model DIR --context 128 --steps 30 --out runs/short
    python train.py --out runs/short --resume      # continue a killed run exactly
    python train.py --config runs/short/args.json --out runs/again   # the same run again (flags override the file)

The recipe: load the model, inject LoRA, turn trajectories into token windows, then loop
(batch -> loss -> backward -> AdamW step), validating every --eval-every steps, keeping the best
adapter, stopping early or before the FLOP budget runs out. Everything a run makes lands in its
folder (--out): args.json, scaler.json, metrics.jsonl, ledger.jsonl (FLOPs planned and spent),
state.pt (for --resume), adapter/ and best/ (peft format), loss.png, summary.json, with
--export-merged merged/ (a checkpoint transformers loads), with --log tensorboard tensorboard/,
and later evaluate.py's eval/<protocol>-<adapter>/.

The run folder survives a kill at any instant (qwen_min/run_folder.py says how); state.pt is the
commit point of a checkpoint (qwen_min/checkpoint.py). This file is the recipe and the loop:
flags, data, model, the FLOP budget, then `train()`, which reads top to bottom like nanoGPT's.
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
from data import llmtime, splits, windows
from data.recipe import Recipe
from qwen_min import Qwen2, Qwen2Config, Tokenizer
from qwen_min.cli import HelpFormatter, parse_with_config, renamed
from qwen_min.errors import UserError, run_cli
from qwen_min.files import FolderLock, append_jsonl, atomic_write, atomic_write_json, read_json_object
from qwen_min.loss import causal_lm_loss, mean_cross_entropy, tokens_fed
from qwen_min import checkpoint, distributed, run_folder
from qwen_min.progress import progress
from qwen_min.scalars import Scalars, require_tensorboard
from qwen_min.weights import resolve_checkpoint, save_pretrained

on_step = None  # called with the step number after every step; tests use it to kill a run midway
# Flags a --resume may change; every other flag is the saved run's.
OLD_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}  # --precision's values, before it became --dtype
RESUMABLE = ("steps", "lr", "patience", "flops_budget", "device", "no_progress", "export_merged", "log", "micro_batch")
# Training calls scaled_dot_product_attention with is_causal=True, which runs PyTorch's fused
# flash kernels on CPU and, in bf16, on CUDA; flops.py counts their backward accordingly. (fp32 on
# CUDA with grouped kv heads may fall back to the math kernel, which flops.py counts as
# kernel="math": about 1% fewer FLOPs per step at 512 tokens. Not yet checked on a GPU.)
ATTENTION_KERNEL = "fused"


def build_parser():
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, description="LoRA fine-tuning of Qwen2.5 on Lotka-Volterra trajectories (LLMTIME text).")
    g = p.add_argument_group("model and LoRA")
    g.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="checkpoint folder or hub id")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank r (0: no LoRA, only the lm_head bias; needs --lm-head-bias)")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: = rank, scale 1)")
    g.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    g.add_argument("--targets", default="q,v", help="layers LoRA adapts: a comma list of q,k,v,o,gate,up,down, "
                   "peft's names (q_proj,v_proj), or all-linear")
    g.add_argument("--lm-head-bias", action="store_true", help="also train a bias on the output layer (the coursework's)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="h5 file in the coursework layout (default: simulate)")
    g.add_argument("--n-series", type=int, default=1000, help="trajectories to simulate when no --data")
    g.add_argument("--decimals", type=int, default=2, choices=[1, 2, 3], help="decimals per value in the LLMTIME text")
    g.add_argument("--scaling", default="global", choices=["global", "per-series"], help="one scale for all series (fit on the training split) or one per series")
    g.add_argument("--percentile", type=float, default=95.0, help="percentile of the values that maps to --scale-target")
    g.add_argument("--scale-target", type=float, default=10.0, help="the percentile maps to this value")
    g.add_argument("--context", type=int, default=512, help="tokens per training window (at most the model's positions)")
    g.add_argument("--stride", type=int, default=None, help="window stride (default: context / 2)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    g.add_argument("--batch", type=int, default=4, help="windows per optimiser step (the global batch)")
    g.add_argument("--micro-batch", type=int, default=None, help="windows through the model at once; --batch is reached by "
                   "accumulating gradients (default: --batch; same result to float rounding, less memory)")
    g.add_argument("--steps", type=int, default=2000, help="optimizer steps in all (raise it with --resume to train on)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on the LoRA weights")
    g.add_argument("--schedule", default="constant", choices=["constant", "cosine"], help="cosine: linear warm-up then cosine decay to 10%%")
    g.add_argument("--warmup", type=int, default=0, help="warm-up steps")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    g.add_argument("--vocab", default="full", choices=["full", "numeric"], help="numeric: softmax over the 13 LLMTIME tokens only")
    g = p.add_argument_group("validation, budget and run")
    g.add_argument("--eval-every", type=int, default=100, help="steps between validation losses (and at the last step)")
    g.add_argument("--eval-batches", type=int, default=10, help="validation batches, a fixed subset")
    g.add_argument("--patience", type=int, default=5, help="evaluations without improvement before stopping (0 = never)")
    g.add_argument("--flops-budget", type=float, default=1e17, help="stop before spending more FLOPs than this (coursework convention)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="the base model's weights and activations; LoRA stays float32 (default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--seed", type=int, default=0, help="seed for data, split, initialisation and batch order")
    g.add_argument("--split", default="ours", choices=["ours", *splits.REPORT_SPLITS],
                   help="ours: 70/15/15 by --seed; report-a / report-b: that report's split of the coursework file, "
                        "so evaluate.py --preset of the same name tests on series the run never saw")
    g.add_argument("--out", default=None, help="run folder (default: runs/<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--log", choices=["none", "tensorboard"], default="none",
                   help="tensorboard: also write loss, lr, tokens/s, FLOPs and validation to <out>/tensorboard "
                        "(metrics.jsonl is always written and stays the record)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar: plain log lines (step, loss, lr, tokens/s, FLOPs) every 30 s, as when output is not a terminal")
    g.add_argument("--export-merged", action="store_true",
                   help="at the end, also write the best adapter merged into a full checkpoint (<out>/merged) that transformers loads")
    renamed(p, "--precision", "--dtype", OLD_DTYPE_NAMES)
    p.add_argument("--config", metavar="FILE", help="flag values from a TOML, YAML or JSON file (a run's args.json "
                   "relaunches it); flags given here override the file's")
    return p


def flag_problem(args):
    """The first flag whose value makes no sense, as a sentence; None when all are sound."""
    finite = math.isfinite
    try:
        bad = not lora.parse_targets(args.targets) and "--targets names no layer; give some of q,k,v,o,gate,up,down or all-linear"
    except ValueError as e:
        bad = f"--targets: {e}"
    checks = [
        (args.rank >= 1 or (args.rank == 0 and args.lm_head_bias),
         "--rank must be at least 1, or 0 with --lm-head-bias (LoRA off: only the lm_head bias trained)"),
        (args.alpha is None or (args.alpha > 0 and finite(args.alpha)), "--alpha must be a positive number (the LoRA scale is alpha / rank)"),
        (0 <= args.dropout < 1, "--dropout must be in [0, 1)"),
        (not bad, bad),
        (args.n_series >= 4, "--n-series must be at least 4 (train, validation and test need trajectories)"),
        (0 < args.percentile <= 100 and 0 < args.scale_target and finite(args.scale_target),
         "need 0 < --percentile <= 100 and a positive, finite --scale-target"),
        (args.context >= 8, "--context must be at least 8 tokens"),
        (args.stride is None or 1 <= args.stride <= args.context, "--stride must be in 1..--context"),
        (0 < args.lr <= 1, "--lr must be a positive number up to 1 (AdamW's steps are about --lr in size)"),
        (args.batch >= 1, "--batch must be at least 1"),
        (args.micro_batch is None or 1 <= args.micro_batch <= args.batch, "--micro-batch must be in 1..--batch"),
        (args.steps >= 1, "--steps must be at least 1"),
        (args.weight_decay >= 0 and finite(args.weight_decay), "--weight-decay must be a number >= 0"),
        (args.warmup >= 0, "--warmup must be 0 or more steps (a negative warm-up would make the learning rate negative)"),
        (args.grad_clip >= 0 and finite(args.grad_clip), "--grad-clip must be a number >= 0 (0 = off)"),
        (args.eval_every >= 1 and args.eval_batches >= 1, "--eval-every and --eval-batches must be at least 1"),
        (args.patience >= 0, "--patience must be 0 (never stop early) or a number of evaluations"),
        (args.flops_budget > 0, "--flops-budget must be positive"),
        (args.seed >= 0, "--seed must be 0 or more"),
    ]
    return next((message for ok, message in checks if not ok), None)


def parse_args(argv=None):
    p = build_parser()
    args = parse_with_config(p, argv, skip=("resume", "given", "world_size"))
    for action in p._actions:  # parse again with no defaults: which flags did the user give?
        action.default = argparse.SUPPRESS
    args.given = sorted(vars(p.parse_args(argv)))
    problem = flag_problem(args)
    if problem:
        p.error(problem)
    if args.resume and not args.out:
        p.error("--resume needs --out, the folder of the run to continue")
    if args.log == "tensorboard":
        require_tensorboard()
    args.stride = args.stride or max(1, args.context // 2)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"unknown --device '{args.device}'; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for, but this PyTorch sees no CUDA GPU")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.out = args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    args.world_size = 1  # processes training together (torchrun sets it in main); recorded in args.json
    return args


# ---------------------------------------------------------------- data

def build_data(args, tok, cfg):
    """Trajectories -> split -> scaler (fit on train) -> token windows for train and validation."""
    if args.context > cfg.max_seq_len:
        raise UserError(f"--context {args.context} is longer than the {cfg.max_seq_len} positions of --model {args.model}; "
                        f"use --context {cfg.max_seq_len} or less.")
    recipe = Recipe.of(args)  # evaluate.py reads the same recipe from args.json: its test split is this split's
    traj, _ = recipe.trajectories()
    split = recipe.split_of(len(traj))
    need = (len(split.train) + len(split.val)) * args.context * 3 * 8  # at least one window of 3 int64 rows per series
    if need > physical_memory() / 2:
        raise UserError(f"token windows of --context {args.context} for {len(split.train) + len(split.val)} trajectories "
                        f"would take over {need / 2**30:.0f} GiB of memory; use a shorter --context or less data.")
    per_series = args.scaling == "per-series"

    def scaled(rows):  # per-series scales are fit on each series itself; global on the train split
        scaler = recipe.scaler(traj[rows] if per_series else traj[split.train])
        return scaler.transform(traj[rows]), scaler

    train_scaled, scaler = scaled(split.train)
    val_scaled, _ = scaled(split.val)
    train = windows.dataset_windows(train_scaled, tok, args.context, args.stride, args.decimals, tok.pad_id)
    val = windows.dataset_windows(val_scaled, tok, args.context, args.context, args.decimals, tok.pad_id)
    source = f"--data {args.data}" if args.data else f"--n-series {args.n_series}"
    if len(val.input_ids) == 0:
        raise UserError(f"{source} gives {len(traj)} trajectories, too few for a validation split; use at least 4.")
    if len(train.input_ids) < args.batch:
        raise UserError(f"{source} gives only {len(train.input_ids)} training windows for --batch {args.batch}; "
                        "use more data or a smaller batch.")
    return train, val, scaler, split


def physical_memory():
    """This machine's memory in bytes (infinite where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return math.inf


def batch_indices(step, n_windows, batch, seed):
    """The windows of a step: a fresh seeded permutation each epoch, so any step can be recomputed."""
    per_epoch = n_windows // batch
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_windows)
    return order[i * batch:(i + 1) * batch]


def to_batch(w, idx, device):
    """Windows rows idx -> (input_ids, labels) tensors on the device, trailing all-padding columns cut."""
    return tuple(torch.from_numpy(a).to(device) for a in windows.batch(w, idx))


def micro_slices(idx, micro):
    """Window indices idx in chunks of `micro` rows (the last may be shorter)."""
    return [idx[i:i + micro] for i in range(0, len(idx), micro)]


def micro_batches(w, idx, micro, device):
    """A step's windows idx in chunks of `micro` rows, each cut to its own longest row."""
    return [to_batch(w, part, device) for part in micro_slices(idx, micro)]


def every_ranks_micro_slices(idx, micro, world_size):
    """The micro-batches of every rank, in rank order: each rank's slice of idx in chunks of `micro`."""
    return [part for r in range(world_size) for part in micro_slices(distributed.World(r, world_size).shard(idx), micro)]


def step_shapes(w, idx, micro, world_size):
    """(B, T) of every micro-batch that every rank runs in the step of windows idx: its FLOPs in all."""
    return [windows.batch(w, part)[0].shape for part in every_ranks_micro_slices(idx, micro, world_size)]


def accumulate(model, chunks, vocab_ids, autocast, scored_in_batch=None):
    """Forward and backward over micro-batches of a global batch; their part of the batch's mean loss
    per scored token. Each micro-batch's mean is weighted by its share of the batch's scored tokens
    (scored_in_batch: all ranks' together; default: these chunks'), so the gradients add up, over
    the chunks and then over the ranks, to those of the whole batch at once (to float rounding)."""
    if len(chunks) == 1 and scored_in_batch is None:  # no accumulation: exactly the plain step
        ids, labels = chunks[0]
        with autocast():
            loss = causal_lm_loss(model, ids, labels, vocab_ids)
        loss.backward()
        return loss.item()
    scored = [int((labels[:, 1:] != windows.IGNORE_INDEX).sum()) for _, labels in chunks]
    total, whole = 0.0, scored_in_batch or sum(scored)
    for (ids, labels), n in zip(chunks, scored):
        with autocast():
            loss = causal_lm_loss(model, ids, labels, vocab_ids) * (n / whole)
        loss.backward()
        total += loss.item()
    return total


# ---------------------------------------------------------------- schedule, evaluation, checks

def learning_rate(step, args):
    if args.schedule == "constant":
        return args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def eval_indices(val, args):
    """The fixed validation subset, the first --eval-batches x --batch validation windows, in chunks
    of --micro-batch (the subset is the same whatever the chunks; its mean loss is per token)."""
    n, size = min(len(val.input_ids), args.eval_batches * args.batch), args.micro_batch or args.batch
    return [np.arange(start, min(n, start + size)) for start in range(0, n, size)]


def evaluate(model, val, args, vocab_ids, autocast, world=distributed.World()):
    """Mean token cross-entropy over the first --eval-batches batches of validation windows. Under
    torchrun each rank scores its slice of the batches and the ranks add up losses and tokens."""
    batches = (to_batch(val, idx, args.device) for idx in world.shard(eval_indices(val, args)))
    mean, tokens = mean_cross_entropy(model, batches, vocab_ids, autocast)
    if world.size == 1:
        return mean
    total, tokens = distributed.sum_over_ranks([mean * tokens, tokens], world, args.device)
    return total / tokens


def cpu_matmul_rate(n=1024, reps=8):
    """This CPU's float32 matmul rate in FLOP/s (a fraction of a second to measure)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def nonfinite(model, trained):
    """Names of the model's trained (or frozen) parameters holding NaN or inf."""
    return [n for n, p in model.named_parameters() if p.requires_grad == trained and not torch.isfinite(p).all()]


def why_not_finite(model, what, step, args):
    """One sentence on why `what` (a loss) is NaN or inf: damaged base weights, or the learning rate."""
    frozen, trained = nonfinite(model, False), nonfinite(model, True)
    if frozen:
        return f"{what} at step {step}: the base weights of --model {args.model} hold NaN or inf (e.g. {frozen[0]}); repair or replace the checkpoint."
    resume = "--resume with a lower --lr continues from the last checkpoint"
    if trained:
        return f"{what} at step {step}: the LoRA weights hold NaN or inf (e.g. {trained[0]}) after too large updates; {resume}."
    if step == 0:
        return f"{what} before any update, with finite weights: the model overflows on this data; try --dtype float32."
    return f"{what} at step {step} with finite weights: the updates have grown too large; {resume}."


# ---------------------------------------------------------------- the run folder

def open_run(args, run, world=distributed.World()):
    """The flags of the run in `run` (its lock held, its leftovers tidied), and whether it resumes from state.pt.
    Under torchrun rank 0 tidies, then every rank reads, and only then does rank 0 write again."""
    if world.main:
        run_folder.tidy(run)
    distributed.barrier(world)
    if args.resume:  # without state.pt (killed before its first checkpoint) the run starts over from args.json
        from_state = run_folder.check_resumable(run)
        opened = resumed_args(args, run), from_state
    else:
        run_folder.check_fresh(run)
        opened = args, False
    distributed.barrier(world)
    return opened


def saved_flag_problem(saved, parser):
    """What is wrong with a saved args.json's flags (a missing key, a wrong type); None when sound."""
    for a in parser._actions:
        if a.dest in ("help", "resume", "config"):
            continue
        if a.dest not in saved:
            return f"lacks the flag '{a.dest}'"
        v, want = saved[a.dest], a.type or str
        if a.nargs == 0:  # a switch
            ok = isinstance(v, bool)
        elif v is None:
            ok = a.default is None
        else:
            ok = (type(v) is int if want is int else type(v) in (int, float) if want is float else type(v) is str) \
                and (a.choices is None or v in a.choices)
        if not ok:
            return f"gives '{a.dest}' the value {v!r}, which train.py never writes"
    return flag_problem(argparse.Namespace(**saved))


def resumed_args(args, run):
    """The saved flags of the run in `run`, with the few a resume may change taken from `args`."""
    fix = "restore it or start a new run in another folder"
    saved = read_json_object(run / "args.json", fix)
    saved.setdefault("split", "ours")  # runs made before --split existed
    saved.setdefault("log", "none")  # runs made before --log existed
    saved.setdefault("micro_batch", None)  # runs made before --micro-batch existed
    saved.setdefault("world_size", 1)  # runs made before torchrun: one process
    if "precision" in saved:  # runs made before --precision fp32|bf16 became --dtype float32|bfloat16
        saved.setdefault("dtype", OLD_DTYPE_NAMES.get(saved.pop("precision")))
    problem = saved_flag_problem(saved, build_parser())
    if problem:
        raise UserError(f"{run / 'args.json'}: {problem}; {fix}.")
    changed = [k for k in args.given if k not in ("out", "resume", "config") and getattr(args, k) != saved.get(k)]
    refused = [k for k in changed if k not in RESUMABLE]
    if refused:
        raise UserError(f"--resume continues the saved run, so --{refused[0].replace('_', '-')} cannot change; "
                        f"only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} can.")
    return argparse.Namespace(**(saved | {k: getattr(args, k) for k in changed} | {"out": args.out, "resume": True, "given": args.given}))


def plot_losses(run, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    rows = [json.loads(line) for line in lines if run_folder.logged_step(line) < math.inf]
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
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def export_merged(run, args):
    """The best adapter folded into the base weights, written as a Hugging Face checkpoint."""
    if args.lm_head_bias:
        print("note: --export-merged skipped: transformers' Qwen2 has no lm_head bias; use the adapter in best/.", file=sys.stderr)
        return
    if not (run / "best").is_dir():
        print("note: --export-merged skipped: no validation finished, so there is no best adapter.", file=sys.stderr)
        return
    model = Qwen2.from_pretrained(args.model, dtype=torch.float32, device="cpu")
    lora.load_adapter(model, run / "best")
    save_pretrained(lora.merged_state_dict(model), model.config, run / "merged", copy_from=resolve_checkpoint(args.model))
    print(f"merged checkpoint written to {run / 'merged'}")


# ---------------------------------------------------------------- the pieces of a run

def build_model(args):
    """The base checkpoint with LoRA injected; only LoRA (and the coursework's lm_head bias) is trained."""
    dtype = getattr(torch, args.dtype)
    model = Qwen2.from_pretrained(args.model, dtype=dtype, device=args.device, lm_head_bias=args.lm_head_bias)
    if args.rank:  # rank 0: report A's ablation, LoRA off and only the lm_head bias trained
        lora.inject_lora(model, r=args.rank, alpha=args.alpha, dropout=args.dropout, targets=lora.parse_targets(args.targets))
    lora.mark_only_lora_as_trainable(model, also=("lm_head_bias",))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # trained parameters stay float32 (bf16 runs compute in bf16 under autocast)
        p.data = p.data.float()
    return model.train(), params


class Budget:
    """The run's FLOP budget, coursework convention. A step costs what flops.py counts for the batch
    shape really run (trailing padding is cut off, so shapes vary); a validation, the forward passes
    of its fixed batches. A window of T tokens feeds the model tokens_fed(T) = T - 1 (qwen_min/loss.py)."""

    def __init__(self, args, cfg, eval_shapes):
        self.limit = args.flops_budget
        self.setup = flops.Setup(cfg, flops.lora_targets(args.targets, args.rank), args.lm_head_bias,
                                 len(llmtime.ALPHABET) if args.vocab == "numeric" else None, ATTENTION_KERNEL)
        self.n_eval_batches = -(-sum(B for B, _ in eval_shapes) // args.batch)  # of --batch windows, however chunked
        self.eval = sum(flops.forward_with_loss(self.setup, B, tokens_fed(T)).coursework for B, T in eval_shapes)
        self.replicas = args.world_size  # processes each taking an optimizer step
        self._steps = {}

    def step(self, shapes) -> flops.Cost:
        """One training step on micro-batches of (B, T) windows (one of them without accumulation), all ranks' together."""
        shapes = tuple(shapes)
        if shapes not in self._steps:
            self._steps[shapes] = flops.train_step_accumulated(self.setup, [(B, tokens_fed(T)) for B, T in shapes], self.replicas)
        return self._steps[shapes]

    def full_step(self, args) -> flops.Cost:
        """A step of full windows: --batch of them, sliced over the ranks, each slice in chunks of --micro-batch."""
        parts = every_ranks_micro_slices(np.arange(args.batch), args.micro_batch or args.batch, args.world_size)
        return self.step([(len(part), args.context) for part in parts])

    def affords(self, spent, step, with_eval) -> bool:
        """Whether a step of `step` FLOPs (and its validation) still fits after `spent`."""
        return spent + step + (self.eval if with_eval else 0) <= self.limit

    def first_step(self, args):
        """The least a run spends: one full step, with its validation when step 1 has one."""
        return self.full_step(args).coursework + (self.eval if args.eval_every == 1 or args.steps == 1 else 0)

    def record_plan(self, ledger, name, args):
        """The whole run's FLOPs as planned, into the ledger beside what is spent."""
        plan = flops.plan_run(self.setup, args.steps, args.batch, args.context, args.eval_every, self.n_eval_batches)
        ledger.add(name, "train", args.steps * self.full_step(args), source="plan", step=0)
        ledger.add(name, "eval", plan["eval"].coursework + self.eval, source="plan", step=0)  # + the step-0 baseline


class Log:
    """Where the loop's numbers go: metrics.jsonl (the record), the FLOP ledger, TensorBoard, the progress bar."""

    def __init__(self, run, ledger, args, step, resuming):
        self.run, self.ledger = run, ledger
        self.bar = progress(args.steps, "train", "step", initial=step, bar=False if args.no_progress else None)
        # a resume drops the events a killed run wrote after its checkpoint, as metrics.jsonl drops its lines
        self.scalars = Scalars(run / "tensorboard", args.log == "tensorboard", purge_step=step + 1 if resuming else None)

    def step(self, step, loss, lr, tokens_per_s, spent, cost):
        append_jsonl(self.run / "metrics.jsonl", {"kind": "train", "step": step, "loss": loss, "lr": lr,
                                                  "tokens_per_s": tokens_per_s, "flops": spent})
        self.ledger.add(self.run.name, "train", cost, step=step)
        for tag, value in (("train/loss", loss), ("train/lr", lr), ("train/tokens_per_s", tokens_per_s), ("flops/spent", spent)):
            self.scalars.add(tag, value, step)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", flops=f"{spent:.2e}")
        self.bar.update(1)

    def validation(self, step, val_loss, improved, spent, cost):
        append_jsonl(self.run / "metrics.jsonl", {"kind": "val", "step": step, "val_loss": val_loss, "best": improved, "flops": spent})
        self.scalars.add("val/loss", val_loss, step)
        self.scalars.add("flops/spent", spent, step)
        self.ledger.add(self.run.name, "eval", cost, step=step)
        self.bar.write(f"step {step}: validation loss {val_loss:.4f}{' (best)' if improved else ''}")

    def close(self):
        self.bar.close()
        self.scalars.close()


class SilentLog:
    """The log of torchrun's ranks other than 0: they compute what rank 0 logs, and write nothing."""

    def step(self, *numbers):
        pass

    def validation(self, *numbers):
        pass

    def close(self):
        pass


def start_or_resume(args, run, resuming, model, optimizer, scaler, budget, world=distributed.World()):
    """The loop's state, restored exactly from the last checkpoint or fresh (and then the folder is the
    new run's), and the run's FLOP ledger. Writes args.json; a fresh start also scaler.json and the plan.
    Under torchrun every rank restores the same state; only rank 0 writes (the others' ledger is kept in memory)."""
    if resuming:
        state = checkpoint.load_state(run, model)
        checkpoint.restore(state, model, optimizer, run)
        loop = checkpoint.LoopState.of(state)
        if world.main:
            run_folder.drop_lines_after(run, state["step"])
            checkpoint.write_adapters(model, run, state, args.model)  # a kill may have left them behind or ahead of state.pt
            print(f"resuming {run} at step {loop.step} (best validation loss {loop.best_val:.4f})")
    else:
        least = budget.first_step(args)
        if args.flops_budget < least:
            raise UserError(f"--flops-budget {args.flops_budget:.3g} is smaller than one training step ({least:.3g} FLOPs at "
                            f"--batch {args.batch} --context {args.context}, {args.flops_budget / least:.2g} of it); "
                            f"raise it to at least {least:.3g}.")
        if world.main:
            run_folder.clear(run)
        loop = checkpoint.LoopState()
    if not world.main:
        return loop, flops.Ledger(None, budget=args.flops_budget)
    # every flag's value, a resume's changes included: `train.py --config RUN/args.json --out NEW` runs it again
    atomic_write_json(run / "args.json", {k: v for k, v in vars(args).items() if k not in ("resume", "given", "config")})
    ledger = flops.Ledger(run / "ledger.jsonl", budget=args.flops_budget)  # on resume: the spending so far
    if not resuming:
        atomic_write_json(run / "scaler.json", scaler.to_dict() | {"decimals": args.decimals, "split_seed": args.seed})
        budget.record_plan(ledger, run.name, args)
    return loop, ledger


def announce(args, cfg, params, train_w, val_w, budget, step):
    """What is about to run, and on a CPU how long it will take at least."""
    full_step = budget.full_step(args).coursework
    print(f"{len(params)} trainable tensors, {sum(p.numel() for p in params):,} parameters; {len(train_w.input_ids)} training "
          f"windows of {args.context} tokens, {len(val_w.input_ids)} validation; {full_step:.3g} FLOPs per full step, "
          f"budget {args.flops_budget:.3g}")
    if args.device == "cpu" and cfg.n_layers >= 12:
        est = full_step / cpu_matmul_rate()
        print(f"warning: training on CPU: at least {est:.0f} s per step at this CPU's matmul rate (measured runs take about 1.5x "
              f"that), {est * (args.steps - step) / 3600:.1f} h or more for the run; use a CUDA GPU for real runs.", file=sys.stderr)


def validate(loop, model, val_loss, budget, log, args):
    """The validation loss (from `val_loss()`), the best adapter kept, the FLOPs counted and logged.
    Returns the loss, and True when --patience validations have passed without improvement: stop early."""
    v = val_loss()
    if not math.isfinite(v):
        raise UserError(why_not_finite(model, f"the validation loss became {v}", loop.step, args))
    loop.spent += budget.eval
    improved = v < loop.best_val
    loop.best_val, loop.bad_evals = (v, 0) if improved else (loop.best_val, loop.bad_evals + 1)
    if improved:
        loop.best = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    log.validation(loop.step, v, improved, loop.spent, budget.eval)
    return v, bool(args.patience) and loop.bad_evals >= args.patience


def finish(run, args, loop, stop_reason, t_start, world=distributed.World()):
    """The run's end: loss.png, the merged checkpoint if asked for, summary.json and a last line (rank 0's)."""
    summary = {"steps": loop.step, "stop_reason": stop_reason, "best_val_loss": loop.best_val, "flops_spent": loop.spent,
               "flops_budget": args.flops_budget, "budget_used": loop.spent / args.flops_budget, "run": str(run),
               "wall_s": time.perf_counter() - t_start, "provenance": run_folder.provenance(args.device),
               "world_size": world.size}
    if not world.main:
        return summary
    plot_losses(run, run / "loss.png")
    if args.export_merged:
        export_merged(run, args)
    atomic_write_json(run / "summary.json", summary)
    print(f"done after {loop.step} steps ({stop_reason}): best validation loss {loop.best_val:.4f}, "
          f"{loop.spent:.3g} FLOPs ({100 * loop.spent / args.flops_budget:.2f}% of the budget); adapter in {run / 'best'}")
    return summary


# ---------------------------------------------------------------- the loop

def train(args, run, on_validation=None, world=distributed.World()):
    """The run in `run`, whose lock the caller holds: build, restore or start, loop, report.
    `on_validation(step, val_loss, flops_spent)` is called after each validation's checkpoint;
    returning True stops the run there (stop reason "pruned": study.py stops trials that fall behind).
    Under torchrun (`world`) every rank runs this same function on its slice of each batch."""
    t_start = time.perf_counter()  # this invocation's wall time, for summary.json
    args, resuming = open_run(args, run, world)
    args.world_size = world.size  # a resume may use another: each step's global batch stays the same
    distributed.require_gpus(args.device, world)
    if args.batch < world.size:
        raise UserError(f"--batch {args.batch} gives some of the {world.size} processes no window to train on; "
                        f"use --batch {world.size} or more.")
    torch.manual_seed(args.seed)
    cfg = Qwen2Config.from_json(resolve_checkpoint(args.model) / "config.json")
    tok = Tokenizer.from_pretrained(args.model)
    train_w, val_w, scaler, _ = build_data(args, tok, cfg)
    model, params = build_model(args)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    vocab_ids = torch.tensor(tok.character_ids(llmtime.ALPHABET), device=args.device) if args.vocab == "numeric" else None
    autocast = functools.partial(torch.autocast, device_type=torch.device(args.device).type, dtype=torch.bfloat16,
                                 enabled=args.dtype == "bfloat16")
    budget = Budget(args, cfg, [to_batch(val_w, idx, "cpu")[0].shape for idx in eval_indices(val_w, args)])
    loop, ledger = start_or_resume(args, run, resuming, model, optimizer, scaler, budget, world)
    if world.main:
        announce(args, cfg, params, train_w, val_w, budget, loop.step)
    log = Log(run, ledger, args, loop.step, resuming) if world.main else SilentLog()

    def val_loss():
        return evaluate(model, val_w, args, vocab_ids, autocast, world)

    def save():  # a checkpoint: state.pt committed, then adapter/ and best/ written from it (by rank 0)
        if world.main:
            checkpoint.save(run, model, optimizer, loop, args.model)
        return loop.step

    saved = loop.step if resuming else None
    if loop.step == 0 and not resuming and budget.eval + budget.first_step(args) <= args.flops_budget:
        v, _ = validate(loop, model, val_loss, budget, log, args)  # the base model's loss: the baseline every later one must beat
        saved = save()
        if on_validation is not None:
            on_validation(0, v, loop.spent)  # reported, never a reason to stop: nothing has been trained yet
    stop_reason, step_limit = "steps", args.steps
    if args.patience and loop.bad_evals >= args.patience:  # a resumed run that had already stopped early
        stop_reason, step_limit = "early stopping", loop.step
    t_last = time.perf_counter()
    while loop.step < step_limit:
        is_eval = (loop.step + 1) % args.eval_every == 0 or loop.step + 1 == args.steps
        idx = batch_indices(loop.step, len(train_w.input_ids), args.batch, args.seed)  # the global batch
        chunks = micro_batches(train_w, world.shard(idx), args.micro_batch or args.batch, args.device)  # this rank's part
        cost = budget.step(step_shapes(train_w, idx, args.micro_batch or args.batch, world.size))  # all ranks' FLOPs
        if not budget.affords(loop.spent, cost.coursework, is_eval):
            stop_reason = "flops budget"
            break
        lr = learning_rate(loop.step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        if world.size == 1:
            loss = accumulate(model, chunks, vocab_ids, autocast)
        else:  # dropout draws from (seed, step, rank): a resume needs no rank's RNG state
            torch.manual_seed(distributed.step_seed(args.seed, loop.step, world))
            scored = int((train_w.labels[idx, 1:] != windows.IGNORE_INDEX).sum())  # the global batch's
            loss = accumulate(model, chunks, vocab_ids, autocast, scored)
            distributed.sum_gradients(params, world)
            loss = distributed.sum_over_ranks([loss], world, args.device)[0]
        if not math.isfinite(loss):
            raise UserError(why_not_finite(model, f"the loss became {loss}", loop.step, args))
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        loop.step += 1
        loop.spent += cost.coursework
        now = time.perf_counter()
        tokens_per_s = int((train_w.labels[idx] != windows.IGNORE_INDEX).sum()) / (now - t_last)  # all ranks' tokens
        t_last = now
        log.step(loop.step, loss, lr, tokens_per_s, loop.spent, cost)
        if on_step is not None:
            on_step(loop.step)
        if is_eval:
            v, stop = validate(loop, model, val_loss, budget, log, args)
            saved = save()
            t_last = time.perf_counter()
            if stop:
                stop_reason = "early stopping"
                break
            pruned = on_validation is not None and on_validation(loop.step, v, loop.spent) if world.main else None
            if distributed.same_everywhere(pruned, world):  # rank 0's answer, so that all ranks stop together
                stop_reason = "pruned"
                break
    log.close()
    if saved != loop.step:
        save()
    return finish(run, args, loop, stop_reason, t_start, world)


# ---------------------------------------------------------------- main

def main(argv=None, on_validation=None):
    args = parse_args(argv)
    world = distributed.join()  # a world of one, unless torchrun started this process
    try:
        args.out = distributed.same_everywhere(args.out, world)  # rank 0's default folder name, not each clock's
        run = Path(args.out)
        if not world.main:  # rank 0 holds the folder's lock for all
            return train(args, run, on_validation, world)
        created = run_folder.create(run)
        with FolderLock(run):
            try:
                return train(args, run, on_validation, world)
            except BaseException:
                if created and not (run / "args.json").exists():  # a start that failed before writing anything leaves no folder
                    shutil.rmtree(run, ignore_errors=True)
                raise
    finally:
        distributed.leave(world)


if __name__ == "__main__":
    run_cli(main)
