"""Benchmark: a LoRA training step in qwen-min against transformers + peft, measured in one run.

    python bench/train_step.py --model DIR --batch 4 --context 128
    python bench/train_step.py --model DIR --vocab numeric        # our loss over the 13 LLMTIME tokens

Both sides get the same weights, LoRA config (q, v; rank 8; B = 0 so the first losses agree),
dtype, AdamW and batches of LLMTIME windows. Steps alternate (ours, theirs, ours, ...) so
background load hits both alike; the median step time is reported as tokens/s, with the FLOP/s
it achieves (matmul view of flops.py) beside this machine's measured matmul peak.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flops  # noqa: E402
import lora  # noqa: E402
from data import llmtime, lotka_volterra, windows  # noqa: E402
from qwen_min import Qwen2, Tokenizer  # noqa: E402
from qwen_min.loss import causal_lm_loss, tokens_fed  # noqa: E402


def matmul_peak(dtype, device, n=2048, reps=10):
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def batches(tok, args):
    traj, _ = lotka_volterra.simulate(max(64, (args.warmup + args.steps) * args.batch), seed=0)  # >= 1 window each
    scaled = llmtime.Scaler.fit(traj).transform(traj)
    w = windows.dataset_windows(scaled, tok, args.context, args.context, 2, tok.pad_id)
    n = args.warmup + args.steps
    if len(w.input_ids) < n * args.batch:
        raise SystemExit(f"error: only {len(w.input_ids)} windows of {args.context} tokens for {n} steps of batch {args.batch}; lower --steps or --context.")
    ids = torch.from_numpy(w.input_ids[: n * args.batch]).view(n, args.batch, args.context)
    labels = torch.from_numpy(w.labels[: n * args.batch]).view(n, args.batch, args.context)  # -100 on padding
    return list(zip(ids.to(args.device), labels.to(args.device)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Qwen2.5 checkpoint folder")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--vocab", choices=["full", "numeric"], default="full")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=6, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args()
    import peft
    import transformers

    dtype = getattr(torch, args.dtype)
    tok = Tokenizer.from_pretrained(args.model)
    data = batches(tok, args)

    ours = Qwen2.from_pretrained(args.model, dtype=dtype, device=args.device)
    lora.inject_lora(ours, r=args.rank)
    ours_params = [ours.get_parameter(n) for n in lora.mark_only_lora_as_trainable(ours)]
    ours.train()
    vocab_ids = torch.tensor(tok.character_ids(llmtime.ALPHABET), device=args.device) if args.vocab == "numeric" else None

    ref = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device)
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=["q_proj", "v_proj"],
                                                   lora_dropout=0.0, init_lora_weights=True))
    ref.train()
    ref_params = [q for q in ref.parameters() if q.requires_grad]
    assert sum(q.numel() for q in ours_params) == sum(q.numel() for q in ref_params)

    def ours_step(ids, labels):
        loss = causal_lm_loss(ours, ids, labels, vocab_ids)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss.item()

    def ref_step(ids, labels):
        loss = ref(input_ids=ids, labels=labels).loss
        loss.backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)
        return loss.item()

    opt_ours = torch.optim.AdamW(ours_params, lr=1e-4)
    opt_ref = torch.optim.AdamW(ref_params, lr=1e-4)
    times = {"ours": [], "ref": []}
    losses = {"ours": [], "ref": []}
    for i, (ids, labels) in enumerate(data):
        for name, step in (("ours", ours_step), ("ref", ref_step)):
            sync(args.device)
            t = time.perf_counter()
            losses[name].append(step(ids, labels))
            sync(args.device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)

    tokens = args.batch * args.context
    counted = flops.Setup(ours.config, flops.lora_targets("q,v", args.rank))
    ours_flops = flops.train_step(counted.replace(head_rows=len(llmtime.ALPHABET) if args.vocab == "numeric" else None),
                                  args.batch, tokens_fed(args.context)).matmul
    ref_flops = flops.train_step(counted, args.batch, args.context).matmul
    peak = matmul_peak(dtype, args.device)
    t_ours, t_ref = statistics.median(times["ours"]), statistics.median(times["ref"])
    print(f"device {args.device}, {args.dtype}, batch {args.batch} x {args.context} tokens, LoRA q,v rank {args.rank}, "
          f"loss over {'13 LLMTIME tokens' if vocab_ids is not None else 'the full vocabulary'}; median of {args.steps} steps")
    print(f"first-step loss: ours {losses['ours'][0]:.4f}, transformers+peft {losses['ref'][0]:.4f}")
    print("| | step (s) | tokens/s | achieved GFLOP/s (matmul view) |")
    print("|---|---|---|---|")
    print(f"| qwen-min | {t_ours:.3f} | {tokens / t_ours:.1f} | {ours_flops / t_ours / 1e9:.1f} |")
    print(f"| transformers + peft | {t_ref:.3f} | {tokens / t_ref:.1f} | {ref_flops / t_ref / 1e9:.1f} |")
    print(f"speed-up (tokens/s, ours / reference): {t_ref / t_ours:.2f}x; measured matmul peak {peak / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
