"""Try the model from the shell:

    python -m qwen_min --model DIR_OR_HUB_ID --prompt "What is 2+2?" --chat
    python -m qwen_min --model DIR --prompt "2.73,2.99;2.13,2.24;1.96,1.62;" --max-new-tokens 20
"""

import argparse

import torch

from .generate import generate
from .model import Qwen2
from .tokenizer import Tokenizer


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate text with qwen-min's Qwen2.5.")
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="checkpoint folder or hub id")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in Qwen's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if args.temperature < 0 or (args.top_p is not None and not 0 < args.top_p <= 1) or (args.top_k is not None and args.top_k < 1):
        p.error("need --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 1")

    tok = Tokenizer.from_pretrained(args.model)
    model = Qwen2.from_pretrained(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    prompt = tok.chat_prompt(args.prompt) if args.chat else args.prompt
    ids = tok.encode(prompt)
    out = generate(model, [ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed, stop_token_ids=tok.stop_ids, pad_token_id=tok.pad_id)
    print(tok.decode(out[0, len(ids):].tolist()))


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # a bad path or file: one sentence, no traceback
        raise SystemExit(f"error: {e}") from None
