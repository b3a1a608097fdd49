"""The limit of a forecast on this machine: how fast it could run if every byte it must move and
every FLOP it must do went at the machine's measured peak (the roofline model, Williams et al. 2009).

Generation has two phases with different limits:
- the prefill pushes every prompt token through the model at once: many rows per weight read,
  so it is bound by matmul throughput (FLOPs / peak FLOP/s);
- each decode step feeds one token per row: the weights are read once for only a few rows, so
  it is bound by memory (bytes streamed / bandwidth) unless the batch is large; a step takes
  max(bytes / bandwidth, FLOPs / peak).
A step's bytes: every body weight once, the head rows it computes (13 for restricted decoding,
the whole vocabulary for free decoding), and the key/value cache of every active row. Its FLOPs
come from flops.py (the matmul view: what the peak below measures). The floor of a forecast is the
sum over its phases; a library's measured time divided into it is the share of the limit it reaches.
"""

import statistics
import time

import torch

import flops


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fn, device, reps):
    """Median of 5 timings of `reps` calls of fn, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        times.append((time.perf_counter() - t) / reps)
    return statistics.median(times)


def bandwidth(device, n_bytes=1 << 30):
    """Bytes read plus written per second by one large device copy."""
    a = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * n_bytes / seconds_per_call(lambda: b.copy_(a), device, 5)


def matmul_peak(device, dtype=torch.float32, n=None):
    """FLOP/s of one large square matmul (n x n @ n x n: 2 n^3 FLOPs; n 2048 on a CPU, 8192 on a
    GPU, where a smaller one is dominated by the cost of launching it)."""
    n = n or (8192 if torch.device(device).type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / seconds_per_call(lambda: a @ b, device, 3)


def body_weight_bytes(model):
    """Bytes of every weight the body reads per step: all parameters but the embedding table (a
    decode step looks up one row per token) and the head (head_bytes counts the rows it computes)."""
    size = lambda w: w.numel() * w.element_size()
    head = 0 if model.lm_head is None else size(model.lm_head.weight)  # an untied head
    bias = 0 if model.lm_head_bias is None else size(model.lm_head_bias)
    return sum(size(p) for p in model.parameters()) - size(model.embed_tokens.weight) - head - bias


def head_bytes(model, head_rows):
    """Bytes of the head rows a step computes (head_rows None: the whole vocabulary)."""
    w = model.lm_head_weight
    return (head_rows or w.shape[0]) * w.shape[1] * w.element_size()


def cache_bytes(cfg, rows, slots, element_size):
    """Keys and values of `rows` rows over `slots` positions, all layers: what attention reads."""
    return 2 * cfg.n_layers * rows * cfg.n_kv_heads * slots * cfg.head_dim * element_size


def forecast_floor(model, prompt_len, new_tokens_per_row, head_rows, bw, peak, samples=1):
    """Seconds the forecast of one batch needs at least: prompt_len (padded) prompt tokens for each
    of its prompts, then new_tokens_per_row[i] tokens for row i (samples rows per prompt, all from
    one prefill; a row leaves the batch once it has all of its tokens, as qwen-min's decoder does).
    -> (prefill s, decode s)."""
    cfg, B = model.config, len(new_tokens_per_row) // samples
    setup = flops.Setup(cfg, head_rows=head_rows)
    size = model.embed_tokens.weight.element_size()
    weights = body_weight_bytes(model) + head_bytes(model, head_rows)
    prefill_flops = flops.body(setup, B, prompt_len, prompt_len).matmul + flops.head(setup, B).matmul
    prefill = max(prefill_flops / peak, (weights + cache_bytes(cfg, B, prompt_len, size)) / bw)
    decode = 0.0
    for i in range(1, max(new_tokens_per_row, default=0)):  # token i goes in; the first came from the prefill
        rows = sum(n > i for n in new_tokens_per_row)
        slots = prompt_len + i
        step_flops = flops.body(setup, rows, 1, slots).matmul + flops.head(setup, rows).matmul
        decode += max(step_flops / peak, (weights + cache_bytes(cfg, rows, slots, size)) / bw)
    return prefill, decode
