"""The CUDA path: what the CPU tests claim, checked again on a GPU (skipped without one).

Run on a GPU machine with `python -m pytest -q tests/test_cuda.py tests/test_model.py tests/test_loss.py`.
Each test takes the device as an argument, so its body also runs on the CPU when called by hand
(`test_...(..., device="cpu")`): the GPU adds its own kernels (cuBLAS, fused attention, bf16
tensor cores), not new logic. Tolerances say where a GPU may round differently from the CPU.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import evaluate
import train
from conftest import hf_twin, random_model, tiny_config, write_checkpoint
from qwen_min.generate import generate, pad_left
from qwen_min.generation_config import GenerationConfig
from qwen_min.kv_cache import KVCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ROWS = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22], [30, 31, 32, 33, 34]]


def test_float32_logits_and_penalised_greedy_generation_equal_transformers_on_the_gpu(device="cuda"):
    """Our model and transformers' with the same weights, both on the GPU in float32: the same
    logits, and generate with a repetition penalty (ragged, left-padded batch) the same tokens."""
    model = random_model(tiny_config(eos_token_id=999)).to(device)
    hf = hf_twin(model).to(device)
    ids, mask = (t.to(device) for t in pad_left(ROWS, pad_id=0))
    with torch.no_grad():
        ours, theirs = model(ids, mask), hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4
    gc = GenerationConfig(do_sample=False, repetition_penalty=1.3, eos_token_id=(150,), pad_token_id=0)
    ours = generate(model, ids, 30, attention_mask=mask, generation_config=gc)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, repetition_penalty=1.3,
                         eos_token_id=[150], pad_token_id=0)
    assert ours.device.type == torch.device(device).type and ours.tolist() == theirs.tolist()
    assert (ours[:, ids.shape[1]:] != 0).sum() > 40  # tokens were produced, not padding


def test_bfloat16_cached_decoding_equals_full_recomputation_on_the_gpu(device="cuda"):
    """A bf16 model on the GPU keeps a bf16 cache, and the logits of each cached decode step equal
    those of one full bf16 pass over the same tokens (teacher-forced), to bf16 rounding."""
    model = random_model(tiny_config(eos_token_id=999), dtype=torch.bfloat16).to(device)
    ids, mask = (t.to(device) for t in pad_left(ROWS, pad_id=0))
    out = generate(model, ids, 12, attention_mask=mask, stop_token_ids=[], pad_token_id=0)  # (3, T + 12)
    T, n = ids.shape[1], 12
    cache = KVCache.for_model(model, 3, T + n)
    assert cache.k.dtype == torch.bfloat16 and cache.k.device.type == torch.device(device).type
    full_mask = torch.cat([mask, torch.ones(3, n, dtype=mask.dtype, device=device)], dim=1)
    with torch.no_grad():
        full = model(out[:, :-1], full_mask[:, :-1])[:, T - 1:].float()  # (3, n, V)
        steps = [model.head(model.body(ids, mask, cache))[:, -1]]
        for j in range(1, n):
            steps.append(model.head(model.body(out[:, T + j - 1:T + j], full_mask[:, :T + j], cache))[:, -1])
    cached = torch.stack(steps, 1).float()  # (3, n, V)
    assert (cached - full).abs().max().item() <= 0.1  # a few bf16 steps of logits of size ~4
    assert (cached.argmax(-1) == out[:, T:]).float().mean() == 1.0  # generate chose each step's argmax


def train_args(ckpt, out, device):
    return ["--model", str(ckpt), "--n-series", "12", "--context", "48", "--batch", "4", "--rank", "4",
            "--eval-every", "5", "--eval-batches", "2", "--out", str(out), "--no-progress", "--device", device,
            "--steps", "15", "--lr", "5e-3", "--dropout", "0.1", "--schedule", "cosine", "--warmup", "3", "--lm-head-bias"]


def test_train_py_on_the_gpu_trains_in_bfloat16_and_a_killed_run_resumes_to_the_same_adapter(tmp_path, monkeypatch,
                                                                                                   device="cuda"):
    """train.py on the GPU picks bf16 by default, saves the GPU's random state in its checkpoint and,
    killed at step 12 and resumed, ends with the adapter of the run never killed. Fused attention's
    backward may add in a different order from run to run on a GPU, so equality is to 1e-5, far
    below what one step changes (checked)."""
    ckpt = write_checkpoint(random_model(tiny_config()), tmp_path / "ckpt")
    whole = train.main(train_args(ckpt, tmp_path / "whole", device))
    args = json.loads((tmp_path / "whole" / "args.json").read_text())
    assert args["dtype"] == ("bfloat16" if device == "cuda" else "float32") and args["device"] == device

    def kill(step):
        if step == 12:
            raise KeyboardInterrupt
    monkeypatch.setattr(train, "on_step", kill)
    with pytest.raises(KeyboardInterrupt):
        train.main(train_args(ckpt, tmp_path / "killed", device))
    monkeypatch.setattr(train, "on_step", None)
    state = torch.load(tmp_path / "killed" / "state.pt", weights_only=True)
    assert state["step"] == 10 and (state["cuda_rng"] is not None) == (device == "cuda")
    resumed = train.main(["--out", str(tmp_path / "killed"), "--resume", "--no-progress"])
    a, b = (load_file(str(tmp_path / run / "adapter" / "adapter_model.safetensors")) for run in ("whole", "killed"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
    assert whole["steps"] == resumed["steps"] == 15
    assert abs(whole["best_val_loss"] - resumed["best_val_loss"]) <= 1e-4 * whole["best_val_loss"]
    lora_b = [k for k in a if "lora_B" in k]
    assert lora_b and all(a[k].abs().max() > 1e-4 for k in lora_b)  # trained: B moved away from its zero start


FAST = ["--n-series", "24", "--k", "8", "--h", "4", "--context", "48", "--lv-iterations", "5", "--plots", "0",
        "--dtype", "float32", "--no-baselines"]


def test_evaluate_py_on_the_gpu_gives_the_cpus_forecasts_and_metrics(tmp_path, device="cuda"):
    """evaluate.py in float32 on the GPU and on the CPU: the same forecasts (greedy, restricted to the
    13 LLMTIME tokens) and the same metrics, and a cross-entropy equal to float32 rounding."""
    ckpt = write_checkpoint(random_model(tiny_config()), tmp_path / "ckpt")
    evaluate.main(["--model", str(ckpt), *FAST, "--device", device, "--out", str(tmp_path / "gpu")])
    evaluate.main(["--model", str(ckpt), *FAST, "--device", "cpu", "--out", str(tmp_path / "cpu")])
    g, c = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("gpu", "cpu"))
    assert np.array_equal(np.array(g["series"]["forecasts"]["model"]), np.array(c["series"]["forecasts"]["model"]))
    assert g["results"]["model"]["overall"] == c["results"]["model"]["overall"]
    assert g["cross_entropy"]["mean"] == pytest.approx(c["cross_entropy"]["mean"], rel=1e-5)


def test_decoding_through_a_cuda_graph_gives_the_default_decoders_tokens(device="cuda"):
    """decoder="graph" records one decode step as a CUDA graph and replays it: in float32 the tokens
    of the default decoder (rows finishing at different steps), and in bf16 exactly the tokens of the
    same fixed-shape step run without the graph (the recording replays the same kernels)."""
    model = random_model(tiny_config(eos_token_id=999)).to(device)
    ids, mask = (t.to(device) for t in pad_left(ROWS, pad_id=0))
    free = generate(model, ids, 30, attention_mask=mask, stop_token_ids=[], pad_token_id=0)
    stop = (free[0, ids.shape[1]:].mode().values.item(), 2)  # row 0's commonest token, twice: rows end apart
    settings = dict(attention_mask=mask, stop_after=stop, stop_token_ids=[], pad_token_id=0, details=True)
    cached = generate(model, ids, 30, **settings)
    graphed = generate(model, ids, 30, decoder="graph", **settings)
    assert torch.equal(graphed.tokens, cached.tokens) and graphed.lengths == cached.lengths
    assert len(set(cached.lengths)) > 1
    half = random_model(tiny_config(eos_token_id=999), dtype=torch.bfloat16).to(device)
    static = generate(half, ids, 30, decoder="static", **settings)
    assert torch.equal(generate(half, ids, 30, decoder="graph", **settings).tokens, static.tokens)


def test_evaluate_py_with_cuda_graph_gives_the_same_forecasts(tmp_path, device="cuda"):
    ckpt = write_checkpoint(random_model(tiny_config()), tmp_path / "ckpt")
    for name, extra in (("eager", []), ("graph", ["--cuda-graph"])):
        evaluate.main(["--model", str(ckpt), *FAST, "--no-ce", "--device", device, "--out", str(tmp_path / name), *extra])
    g, e = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("graph", "eager"))
    assert g["series"]["forecasts"]["model"] == e["series"]["forecasts"]["model"] and g["tokens_generated"] > 0
