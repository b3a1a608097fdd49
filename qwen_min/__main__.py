"""Try the model from the shell:

    python -m qwen_min --model DIR_OR_HUB_ID --prompt "What is 2+2?" --chat
    python -m qwen_min --model DIR --prompt "2.73,2.99;2.13,2.24;1.96,1.62;" --max-new-tokens 20 --temperature 0

Decoding follows the checkpoint's generation_config.json, as transformers' generate does (for
Qwen2.5-Instruct: sampling at temperature 0.7, top-k 20, top-p 0.8, repetition penalty 1.1);
each flag given overrides its field, and --no-generation-config ignores the file (greedy, no
penalty, unless flags say otherwise). --temperature 0 is greedy.
"""

import argparse

import torch

from .cli import HelpFormatter
from .config import Qwen2Config
from .errors import UserError, run_cli
from .generate import generate
from .generation_config import GenerationConfig
from .model import Qwen2
from .tokenizer import Tokenizer
from .weights import resolve_checkpoint


def build_parser():
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, description="Generate text with qwen-min's Qwen2.5, decoding as the checkpoint's "
                                            "generation_config.json says unless flags override it.")
    p.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="checkpoint folder or hub id")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in Qwen's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy, > 0 samples (default: the generation config)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens; 0 = all (default: the generation config)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]; 1 = off (default: the generation config)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 0; 1 = none (default: the generation config)")
    p.add_argument("--no-generation-config", action="store_true", help="ignore generation_config.json: greedy, no penalty, unless flags say otherwise")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: unseeded)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and activations (bfloat16 is for GPUs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda if available, else cpu")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if args.temperature is not None and not args.temperature >= 0:  # `not >=` also refuses nan
        p.error("--temperature must be >= 0 (0 is greedy)")
    if args.top_k is not None and args.top_k < 0:
        p.error("--top-k must be >= 0 (0 keeps every token)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    if args.repetition_penalty is not None and not 0 < args.repetition_penalty < float("inf"):
        p.error("--repetition-penalty must be a number > 0 (1 is no penalty)")
    if args.seed is not None and not 0 <= args.seed < 2 ** 63:
        p.error("--seed must be between 0 and 2**63 - 1")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a torch device; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device!r}: qwen-min runs on cpu or cuda")
    return args


def main(argv=None):
    args = parse_args(argv)
    gen_config = GenerationConfig() if args.no_generation_config else GenerationConfig.from_pretrained(args.model)
    tok = Tokenizer.from_pretrained(args.model)
    prompt = tok.chat_prompt(args.prompt) if args.chat else args.prompt
    ids = tok.encode(prompt)
    positions = Qwen2Config.from_json(resolve_checkpoint(args.model) / "config.json").max_seq_len  # checked before loading the weights
    if not ids:
        raise UserError("--prompt is empty; give the model some text to continue.")
    if len(ids) + args.max_new_tokens > positions:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} after a {len(ids)}-token prompt runs past the model's "
                        f"{positions} positions; ask for at most {max(positions - len(ids), 0)} new tokens or shorten --prompt.")
    model = Qwen2.from_pretrained(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    # The tokenizer's stop ids and padding unless the generation config names its own (Qwen's names the same two).
    out = generate(model, [ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, seed=args.seed, generation_config=gen_config,
                   stop_token_ids=None if gen_config.eos_token_id else tok.stop_ids,
                   pad_token_id=None if gen_config.pad_token_id is not None else tok.pad_id)
    print(tok.decode(out[0, len(ids):].tolist()))


if __name__ == "__main__":
    run_cli(main)
