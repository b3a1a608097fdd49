"""Benchmark: one linear layer of Qwen2.5-0.5B at decode-step sizes, qwen-min's `linear` against
F.linear (what nn.Linear, and so transformers, runs).

    python bench/linear.py                      # 1, 4, 20, 80, 320 rows; every weight's shape

With few rows (a decode step feeds one token per sequence) a CPU matrix product is short of work
to share out, and F.linear on this 2-core machine kept one core mostly idle. qwen_min/model.py's
`linear` cuts the output features into blocks and runs them as one batched product, a block per
core. Prints GFLOP/s of each and the speed-up, per shape and row count.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_min.config import Qwen2Config  # noqa: E402
from qwen_min.model import linear  # noqa: E402
from roofline import seconds_per_call  # noqa: E402  (bench/roofline.py)


def shapes(cfg):
    """(name, out, in) of every weight a decode step multiplies by."""
    D, F_, q, kv = cfg.dim, cfg.hidden_dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return [("q_proj", q, D), ("k_proj, v_proj", kv, D), ("o_proj", D, q), ("gate_proj, up_proj", F_, D),
            ("down_proj", D, F_), ("lm_head", cfg.vocab_size, D)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,4,20,80,320", help="comma list of row counts (tokens in the batch)")
    p.add_argument("--reps", type=int, default=20, help="calls per timing (fewer for the largest products)")
    args = p.parse_args(argv)
    try:
        rows = [int(r) for r in args.rows.split(",")]
    except ValueError:
        p.error("--rows takes a comma list of whole numbers, e.g. 1,4,20")
    if min(rows) < 1 or args.reps < 1:
        p.error("--rows and --reps must be positive")
    print(f"float32 on cpu, {torch.get_num_threads()} threads; GFLOP/s (2 x rows x in x out per call)")
    print("| weight (out x in) | rows | F.linear | qwen-min linear | speed-up |\n|---|---|---|---|---|")
    with torch.inference_mode():
        for name, out, inp in shapes(Qwen2Config()):
            w = torch.randn(out, inp) / inp ** 0.5
            for n in rows:
                x = torch.randn(n, inp)
                flops = 2 * n * inp * out
                reps = max(3, min(args.reps, int(4e9 / flops)))  # about 4 GFLOP a timing at most
                ref = seconds_per_call(lambda: F.linear(x, w), "cpu", reps)
                ours = seconds_per_call(lambda: linear(x, w), "cpu", reps)
                print(f"| {name} ({out} x {inp}) | {n} | {flops / ref / 1e9:.0f} | {flops / ours / 1e9:.0f} | {ref / ours:.2f}x |",
                      flush=True)


if __name__ == "__main__":
    main()
