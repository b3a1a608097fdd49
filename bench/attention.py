"""Benchmark: one decode step's or verify pass's attention in one layer, three ways, on Qwen2.5-0.5B's shapes.

    python bench/attention.py --batch 20 --past 600
    python bench/attention.py --batch 20 --past 600 --queries 4    # a verify pass: 4 new tokens a row

- qwen-min: the 7 query heads that share a kv head go in as 7 queries of that head, 7 x T with T
  new tokens a row (qwen_min/model.py's decode and verify path: one attention per row and kv head);
- enable_gqa: scaled_dot_product_attention(..., enable_gqa=True), qwen-min's path before;
- transformers: its sdpa attention when a padding mask is given (a batch of prompts of different
  lengths): it copies each kv head out to its 7 query heads (repeat_kv), then runs plain
  multi-head attention (transformers 5's use_gqa_in_sdpa keeps enable_gqa only without a mask).
All read the keys and values as views of a larger preallocated cache, with a padding mask (causal
among the new tokens), as a decode step or a verify pass does. Prints the median time of each and
the speed-up of qwen-min's over the others.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from roofline import seconds_per_call  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--past", type=int, default=600, help="cached tokens attended to")
    p.add_argument("--queries", type=int, default=1, help="new tokens a row (1: a decode step; more: a verify pass)")
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="bfloat16 is for GPUs")
    p.add_argument("--reps", type=int, default=24, help="calls per timing (24: one per layer)")
    args = p.parse_args(argv)
    if min(args.batch, args.past, args.queries, args.heads, args.kv_heads, args.head_dim, args.reps) < 1 or args.heads % args.kv_heads:
        p.error("sizes must be positive, and --heads a multiple of --kv-heads")
    B, H, K, hd, T, dev = args.batch, args.heads, args.kv_heads, args.head_dim, args.queries, args.device
    S = args.past + T
    dtype = getattr(torch, args.dtype)
    q = torch.randn(B, H, T, hd, device=dev, dtype=dtype)
    k_cache = torch.randn(B, K, 2 * S, hd, device=dev, dtype=dtype)  # slots beyond S stay unused, as in a real cache
    v_cache = torch.randn(B, K, 2 * S, hd, device=dev, dtype=dtype)
    k, v = k_cache[:, :, :S], v_cache[:, :, :S]
    mask = torch.ones(T, S, dtype=torch.bool, device=dev).tril(S - T).expand(B, 1, T, S).clone()  # causal among the new
    mask[: B // 4, :, :, : S // 10] = False  # a quarter of the rows start with left padding

    def ours():
        # as qwen_min/model.py: with T > 1 query (g, t) gets row t of the mask, (B, 1, 7T, S), copied at every call
        m = mask if T == 1 else mask[:, :, None].expand(-1, -1, H // K, -1, -1).flatten(2, 3)
        return F.scaled_dot_product_attention(q.reshape(B, K, H // K * T, hd), k, v, attn_mask=m).reshape(B, H, T, hd)

    def gqa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def transformers_way():
        return F.scaled_dot_product_attention(q, k.repeat_interleave(H // K, 1), v.repeat_interleave(H // K, 1), attn_mask=mask)

    with torch.inference_mode():
        out = ours()
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # the same arithmetic, in another order
        assert (out - gqa()).abs().max() < tol and (out - transformers_way()).abs().max() < tol
        times = {name: seconds_per_call(fn, dev, args.reps) for name, fn in
                 [("qwen-min (grouped queries)", ours), ("enable_gqa", gqa), ("transformers (repeat_kv)", transformers_way)]}
    print(f"{dev}, {args.dtype}, batch {B}, {T} new tokens a row, {H} query heads on {K} kv heads of {hd}, {S} keys, {torch.get_num_threads()} threads")
    print("| attention of one pass | ms per layer | qwen-min's speed-up |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t * 1e3:.3f} | {t / times['qwen-min (grouped queries)']:.2f}x |")


if __name__ == "__main__":
    main()
