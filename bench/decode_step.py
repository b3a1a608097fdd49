"""Benchmark: one decoding step, eager and captured once as a CUDA graph, against transformers.

    python bench/decode_step.py --model DIR --batch 20 --past 600 --device cuda --dtype bfloat16

A decoding step feeds one new token per row through the model, attending to `past` cached
tokens, and picks the next token by argmax over the full vocabulary. At small batch it does
little arithmetic per weight read, so its floor is the time to stream the weights (and the
cache) from memory once: bytes / bandwidth, printed beside each time as a share of that floor.
On a GPU the eager step launches a few hundred small kernels from Python (24 layers of norms,
projections, RoPE, attention, MLP), and launching them can take longer than running them.
A CUDA graph records the kernels of one step once and replays them with one launch: the
shapes must then be static, so the step is timed at a fixed position (the replay rewrites the
same cache slot each time, which costs what writing the next slot would).

transformers runs the same step eagerly with its DynamicCache, cropped back to `past` after
each step. Both libraries get the same checkpoint, dtype, batch and cache length.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flops  # noqa: E402
from roofline import bandwidth, body_weight_bytes, head_bytes, seconds_per_call  # noqa: E402  (bench/roofline.py)
from roofline import cache_bytes as cache_bytes_of  # noqa: E402
from qwen_min import Qwen2  # noqa: E402
from qwen_min.kv_cache import KVCache  # noqa: E402


def ours_step(model, B, past, device):
    """-> a function doing one decode step at position `past` of a filled cache."""
    cache = KVCache.for_model(model, B, past + 1)
    token = torch.randint(0, model.config.vocab_size, (B, 1), device=device)

    def step():
        cache.length = past  # the same slot every call: a static shape
        return model.head(model.body(token, None, cache))[:, -1].argmax(-1)  # (B,) next tokens
    return step


def graphed(step):
    """The same step recorded once as a CUDA graph; each call replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs asks
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return lambda: (graph.replay(), out)[1]


def transformers_step(hf, B, past, device):
    import transformers

    cache = transformers.DynamicCache()
    hf(torch.randint(0, hf.config.vocab_size, (B, past), device=device), past_key_values=cache, use_cache=True)
    token = torch.randint(0, hf.config.vocab_size, (B, 1), device=device)

    def step():
        out = hf(token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
        cache.crop(-1)  # drop the token just added: the cache holds `past` again
        return out
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Qwen2.5 checkpoint folder")
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--past", type=int, default=600, help="tokens already in the cache")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--reps", type=int, default=20, help="steps per timing")
    args = p.parse_args(argv)
    import transformers

    dtype = getattr(torch, args.dtype)
    ours = Qwen2.from_pretrained(args.model, dtype=dtype, device=args.device)
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    B, past, dev = args.batch, args.past, args.device
    cfg = ours.config
    weight_bytes = body_weight_bytes(ours) + head_bytes(ours, None)  # the step computes every vocabulary row
    cache_bytes = cache_bytes_of(cfg, B, past + 1, ours.embed_tokens.weight.element_size())
    setup = flops.Setup(cfg)
    step_flops = flops.body(setup, B, 1, past + 1).matmul + flops.head(setup, B).matmul
    floor = (weight_bytes + cache_bytes) / bandwidth(dev)

    with torch.inference_mode():
        rows = [("qwen-min eager", seconds_per_call(ours_step(ours, B, past, dev), dev, args.reps))]
    if torch.device(dev).type == "cuda":
        try:
            with torch.no_grad():  # graph capture and inference-mode tensors do not mix in every torch version
                rows.append(("qwen-min CUDA graph", seconds_per_call(graphed(ours_step(ours, B, past, dev)), dev, args.reps)))
        except RuntimeError as e:  # a kernel that cannot be captured: say which, time the rest
            print(f"CUDA graph capture failed, so no graph row: {str(e).splitlines()[0]}")
    with torch.no_grad():
        t_ref = seconds_per_call(transformers_step(hf, B, past, dev), dev, args.reps)
    rows.append(("transformers eager", t_ref))

    print(f"{dev} ({torch.cuda.get_device_name(dev) if torch.device(dev).type == 'cuda' else 'CPU'}), {args.dtype}, "
          f"batch {B}, {past} cached tokens; step streams {weight_bytes / 1e9:.3f} GB of weights + {cache_bytes / 1e9:.3f} GB "
          f"of cache, {step_flops / 1e9:.1f} GFLOP (matmul view); memory floor {floor * 1e3:.3f} ms at the measured bandwidth")
    print("| | ms per step | tokens/s | share of the memory floor | speed-up vs transformers |\n|---|---|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t * 1e3:.3f} | {B / t:.0f} | {floor / t:.1%} | {t_ref / t:.2f}x |")


if __name__ == "__main__":
    main()
