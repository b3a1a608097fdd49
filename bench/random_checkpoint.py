"""A checkpoint with a real model's shapes, config and tokenizer but random weights, for timing.

    python bench/random_checkpoint.py --like DIR --out DIR [--dtype bfloat16]

Speed does not depend on the weights' values, so a machine that cannot reach the real weights
(a GPU box with no network, say) can still time a training step or a decode step of the real
architecture. Matrices are drawn as transformers initialises Qwen2 (normal, std
initializer_range = 0.02), norms are 1 and biases 0. What such a model generates is noise: a
forecast benchmark on it runs every row to its token budget and proves nothing about accuracy.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_min import Qwen2  # noqa: E402
from qwen_min.config import Qwen2Config  # noqa: E402
from qwen_min.errors import run_cli  # noqa: E402
from qwen_min.weights import resolve_checkpoint, save_pretrained  # noqa: E402


def random_weights(cfg: Qwen2Config, seed=0) -> Qwen2:
    torch.manual_seed(seed)
    model = Qwen2(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--like", required=True, help="checkpoint folder (or hub id) whose config.json and tokenizer to copy")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    like = resolve_checkpoint(args.like)
    model = random_weights(Qwen2Config.from_json(like / "config.json"), args.seed).to(getattr(torch, args.dtype))
    print(save_pretrained(model.state_dict(), model.config, args.out, copy_from=like))


if __name__ == "__main__":
    run_cli(main)
