"""Try the model, or a fine-tune, from the shell:

    python -m qwen_min --model DIR_OR_HUB_ID --prompt "What is 2+2?" --chat     # one chat turn
    python -m qwen_min --model DIR --prompt "2.73,2.99;2.13,2.24;" --max-new-tokens 20 --temperature 0
    python -m qwen_min --run runs/cpu512 --chat                                # talk to a fine-tune (Ctrl-D ends)
    python -m qwen_min --run runs/cpu512 --forecast "2.1,1.0; 2.5,0.9; 2.9,0.9" --h 10

--run takes a train.py run folder (its model, its best adapter, its scale); --adapter takes any
adapter folder, ours or peft's. Text decoding follows the checkpoint's generation_config.json,
as transformers' generate does (for Qwen2.5-Instruct: sampling at temperature 0.7, top-k 20,
top-p 0.8, repetition penalty 1.1); each flag given overrides its field, and
--no-generation-config ignores the file. --temperature 0 is greedy.

--forecast continues a series of prey,predator pairs (original units, steps separated by ';') for --h steps
the way evaluate.py forecasts: scaled (the run's scale, else one fit on the series itself),
written as LLMTIME text, decoded greedily over digits and separators only, read back and
unscaled.
"""

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from data import llmtime
from data.forecast import new_token_budget

from . import run_folder
from .cli import HelpFormatter, renamed
from .config import Qwen2Config
from .errors import UserError, run_cli
from .generate import generate
from .generation_config import GenerationConfig
from .tokenizer import Tokenizer
from .weights import resolve_checkpoint


def build_parser():
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, description="Generate text with qwen-min's Qwen2.5, decoding as the checkpoint's "
                                            "generation_config.json says unless flags override it.")
    p.add_argument("--model", help="checkpoint folder or hub id (default: the run's, else Qwen/Qwen2.5-0.5B-Instruct)")
    p.add_argument("--run", help="a train.py run folder: its model, its adapter (best/, else adapter/) and its scale")
    p.add_argument("--adapter", help="a LoRA adapter folder, ours or peft's (default: the run's)")
    p.add_argument("--prompt", help="text to continue (with --chat: one user message)")
    p.add_argument("--chat", action="store_true", help="Qwen's chat template; without --prompt, an interactive chat on stdin")
    p.add_argument("--forecast", metavar="SERIES", help="prey,predator pairs separated by ';' to continue for --h steps")
    p.add_argument("--h", type=int, default=10, help="time steps to forecast with --forecast, as evaluate.py's --h")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most per reply")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy, > 0 samples (default: the generation config)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens; 0 = all (default: the generation config)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]; 1 = off (default: the generation config)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 0; 1 = none (default: the generation config)")
    p.add_argument("--no-generation-config", action="store_true", help="ignore generation_config.json: greedy, no penalty, unless flags say otherwise")
    p.add_argument("--sample-seed", type=int, default=None, help="seed for sampling, as evaluate.py's (default: unseeded)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights and activations (bfloat16 is for GPUs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda if available, else cpu")
    renamed(p, "--steps", "--h")
    renamed(p, "--seed", "--sample-seed")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if (args.prompt is None) == (args.forecast is None) and not (args.chat and args.forecast is None):
        p.error("give --prompt TEXT, --chat (interactive), or --forecast SERIES: one of them")
    if args.forecast is not None and args.chat:
        p.error("--forecast continues numbers; leave out --chat")
    if args.h < 1:
        p.error("--h must be at least 1")
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
    if args.sample_seed is not None and not 0 <= args.sample_seed < 2 ** 63:
        p.error("--sample-seed must be between 0 and 2**63 - 1")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a torch device; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device!r}: qwen-min runs on cpu or cuda")
    return args


def from_run(args):
    """Fills --model and --adapter from --run; returns the run's args.json ({} without --run)."""
    run = run_folder.read_args(args.run) if args.run else {}
    args.model = args.model or run.get("model") or "Qwen/Qwen2.5-0.5B-Instruct"
    if args.run and args.adapter is None:
        args.adapter = str(run_folder.adapter_of(args.run))
        if not Path(args.adapter).is_dir():
            raise UserError(f"{args.run} holds no adapter yet (no best/ or adapter/): the run stopped before its first "
                            "checkpoint; resume it with train.py --resume, or use --model for the base model.")
    if args.adapter and not Path(args.adapter).is_dir():
        raise UserError(f"--adapter {args.adapter} is not a folder; give a LoRA adapter folder (ours or peft's).")
    return run


def read_series(text):
    """'2.1,1.0; 2.5,0.9' -> (k, 2) float64 prey, predator in original units."""
    steps = [step for step in text.replace("\n", ";").split(";") if step.strip()]
    values = []
    for n, step in enumerate(steps, 1):
        try:
            pair = [float(x) for x in step.split(",")]
        except ValueError:
            pair = []
        if len(pair) != 2 or not all(math.isfinite(x) and x >= 0 for x in pair):
            raise UserError(f"--forecast: step {n} ({step.strip()!r}) is not a pair 'prey,predator' of numbers >= 0; "
                            "separate steps with ';', e.g. --forecast \"2.1,1.0; 2.5,0.9\".")
        values.append(pair)
    if not values:
        raise UserError("--forecast is empty; give the series so far, e.g. --forecast \"2.1,1.0; 2.5,0.9\".")
    return np.array(values)


def forecast(model, tok, context, h, run, run_args):
    """Continue `context` (k, 2) for h steps as evaluate.py's protocol does -> (values (h, 2), llmtime.Decoded).
    run: the run folder (None without --run); run_args: its args.json."""
    decimals = run_args.get("decimals", 2)
    saved = Path(run) / "scaler.json" if run else None
    if run_args.get("scaling", "global") == "global" and saved is not None:
        if not saved.is_file():
            raise UserError(f"{saved} is missing, so the scale the run was trained on is unknown; evaluate.py --run refits "
                            "it from the run's data, or restore the file.")
        scaler = run_folder.read_scaler(saved)  # the scale the model was trained on
    else:  # no run, or per-series scaling: scale the series by itself, as LLMTIME does
        scaler = fit_scale(context, run_args.get("percentile", 95.0), run_args.get("scale_target", 10.0))
    prompt = llmtime.encode(scaler.transform(context, rows=0), decimals, trailing_sep=True)
    ids = tok.encode(prompt)
    sep_id = tok.encode(";")[0]
    max_new = new_token_budget(len(ids) / len(context), h)  # as evaluate.py budgets its forecasts
    check_length(model, len(ids), max_new, "--forecast with --h")
    try:
        allowed = tok.character_ids(llmtime.ALPHABET)
    except ValueError:
        raise UserError("this tokenizer does not give one token per digit and separator, so --forecast cannot "
                        "restrict decoding to them; use --prompt with the LLMTIME text instead.") from None
    out = generate(model, [ids], max_new, temperature=0.0, allowed_token_ids=allowed,
                   stop_token_ids=tok.stop_ids, stop_after=(sep_id, h), pad_token_id=tok.pad_id,
                   use_generation_config=False, repetition_penalty=1.0)
    decoded = llmtime.decode(tok.decode(out[0, len(ids):].tolist()), n_steps=h, decimals=decimals)
    return scaler.inverse(decoded.values, rows=0), decoded


def fit_scale(context, percentile, target):
    try:
        return llmtime.Scaler.fit(context[None], percentile, target, per_series=True)
    except ValueError:
        raise UserError("--forecast: the series is all zeros, so it has no scale to write it at; give a series with some "
                        "population.") from None


def check_length(model, n_prompt, n_new, what):
    positions = model.config.max_seq_len
    if n_prompt + n_new > positions:
        raise UserError(f"{what}: {n_prompt} prompt tokens and up to {n_new} new ones run past the model's {positions} "
                        "positions; shorten the input or ask for less.")


def chat(model, tok, reply, max_new, read=None, write=print):
    """An interactive chat on stdin: each line is a user message, the whole conversation is the prompt.
    The oldest exchanges are forgotten when it outgrows the model's positions. Ctrl-D (EOF) ends it."""
    read = read or input  # looked up now, so a test (or a GUI) can stand in for the terminal
    history = []
    write("chat with qwen-min (Ctrl-D to end)")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write("")
            return history
        if not line.strip():
            continue
        kept = history + [{"role": "user", "content": line}]
        ids = tok.encode(tok.chat_prompt(kept))
        while len(ids) + max_new > model.config.max_seq_len and len(kept) > 1:
            kept = kept[2:]  # forget the oldest user message and its answer
            ids = tok.encode(tok.chat_prompt(kept))
        if len(ids) + max_new > model.config.max_seq_len:  # the message alone is too long: keep the conversation
            write(f"(that message is too long for the model's {model.config.max_seq_len} positions; try a shorter one)")
            continue
        answer = reply(ids).strip()
        write(answer)
        history = kept + [{"role": "assistant", "content": answer}]


def main(argv=None):
    args = parse_args(argv)
    run_args = from_run(args)
    context = read_series(args.forecast) if args.forecast is not None else None  # checked before loading weights
    tok = Tokenizer.from_pretrained(args.model)
    positions = Qwen2Config.from_json(resolve_checkpoint(args.model) / "config.json").max_seq_len  # lengths checked before loading the weights
    ids = None
    if args.prompt is not None:
        ids = tok.encode(tok.chat_prompt(args.prompt) if args.chat else args.prompt)
        if not ids:
            raise UserError("--prompt is empty; give the model some text to continue.")
        if len(ids) + args.max_new_tokens > positions:
            raise UserError(f"--max-new-tokens {args.max_new_tokens} after a {len(ids)}-token prompt runs past the model's "
                            f"{positions} positions; ask for at most {max(positions - len(ids), 0)} new tokens or shorten --prompt.")
    elif args.forecast is None and args.max_new_tokens >= positions:  # the chat: every reply needs room for them
        raise UserError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a message in the model's {positions} "
                        "positions; ask for fewer.")
    dtype = getattr(torch, args.dtype)
    model = run_folder.load_model(args.model, args.adapter, dtype, args.device, lm_head_bias=False)
    if context is not None:
        values, decoded = forecast(model, tok, context, args.h, args.run, run_args)
        print("; ".join(f"{prey:.4g},{predator:.4g}" for prey, predator in values))
        if decoded.n_repaired:
            kinds = ", ".join(f"{kind} x{n}" for kind, n in decoded.issues.items())
            print(f"note: the model's text needed repairs to give {args.h} steps ({kinds}; docs/data.md lists the repair rules).", file=sys.stderr)
        return values
    gen_config = GenerationConfig() if args.no_generation_config else GenerationConfig.from_pretrained(args.model)

    def reply(ids):
        # The tokenizer's stop ids and padding unless the generation config names its own (Qwen's names the same two).
        out = generate(model, [ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       repetition_penalty=args.repetition_penalty, seed=args.sample_seed, generation_config=gen_config,
                       stop_token_ids=None if gen_config.eos_token_id else tok.stop_ids,
                       pad_token_id=None if gen_config.pad_token_id is not None else tok.pad_id)
        return tok.decode(out[0, len(ids):].tolist())

    if ids is None:
        return chat(model, tok, reply, args.max_new_tokens)
    print(reply(ids))


if __name__ == "__main__":
    run_cli(main)
