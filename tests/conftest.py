"""Shared test helpers: tiny random Qwen2 configs and their transformers twins."""

import os
import sys
from pathlib import Path

import pytest
import torch

from qwen_min import Qwen2, Qwen2Config
from qwen_min.weights import hf_name

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**overrides) -> Qwen2Config:
    base = dict(vocab_size=160, dim=64, hidden_dim=112, n_layers=2, n_heads=4, n_kv_heads=2,
                head_dim=16, rope_theta=10000.0, max_seq_len=256, tie_embeddings=True,
                bos_token_id=0, eos_token_id=1)
    base.update(overrides)
    return Qwen2Config(**base)


def random_model(cfg: Qwen2Config, seed=0, lm_head_bias=False, dtype=torch.float32) -> Qwen2:
    """A Qwen2 with every parameter random (norm weights and biases too, so no term hides).

    Matrices get std 1/sqrt(fan_in), so activations and logits stay O(1) as in a trained model;
    larger weights would blow float32 rounding up to where no tolerance means anything.
    With dtype=bfloat16, `.to()` casts the RoPE tables too, which Qwen2.from_pretrained keeps in
    float32: a test about the tables' dtype must load the model with from_pretrained instead.
    """
    torch.manual_seed(seed)
    model = Qwen2(cfg, lm_head_bias=lm_head_bias)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.dim() == 2:  # (out, in) matrices, and the embedding, which is the tied head's (V, D)
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            else:  # biases
                p.copy_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


def random_lora(model, seed=1):
    """Every LoRA layer's A and B random (B is zero at injection, so an untouched adapter changes nothing)."""
    from lora import lora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) / m.in_features ** 0.5)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def hf_twin(model: Qwen2):
    """transformers' Qwen2ForCausalLM holding exactly `model`'s weights (and its lm_head bias)."""
    import transformers

    cfg = model.config
    hf_cfg = transformers.Qwen2Config(**cfg.to_hf_dict())
    hf = transformers.Qwen2ForCausalLM(hf_cfg).to(model.embed_tokens.weight.dtype)
    sd = {hf_name(n): p for n, p in model.state_dict().items() if n != "lm_head_bias"}
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = model.embed_tokens.weight
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    if model.lm_head_bias is not None:
        hf.lm_head.bias = torch.nn.Parameter(model.lm_head_bias.detach().clone())
    return hf.eval()


def process_globals():
    """The process-wide settings one test could leave changed for every later one (train.py's results depend on them)."""
    state = {"torch default dtype": torch.get_default_dtype(), "grad mode": torch.is_grad_enabled(),
             "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
             "anomaly mode": torch.is_anomaly_enabled(), "torch threads": torch.get_num_threads(),
             "working directory": os.getcwd()}
    train = sys.modules.get("train")
    if train is not None:  # its hooks: a test that sets one by hand, not with monkeypatch, changes every later run
        state |= {"train.on_step": train.on_step, "train.plot_losses": train.plot_losses}
    return state


@pytest.fixture(autouse=True)
def leaves_no_globals_changed():
    """Fails (at teardown, after monkeypatch has undone its changes) a test that leaks global state."""
    before = process_globals()
    yield
    after = process_globals()
    changed = {k: f"{before[k]!r} -> {after[k]!r}" for k in before.keys() & after.keys() if before[k] != after[k]}
    assert not changed, f"this test left global state changed (use the monkeypatch fixture, or restore it): {changed}"


@pytest.fixture(scope="session")
def checkpoint():
    """The real Qwen2.5 0.5B checkpoint folder named by QWEN_MIN_CHECKPOINT; skips without it."""
    path = os.environ.get("QWEN_MIN_CHECKPOINT")
    if not path:
        pytest.skip("QWEN_MIN_CHECKPOINT is not set (build one with ../shared/tools/qwen-checkpoint)")
    return Path(path)


def write_tokenizer(path: Path, vocab_size: int = 160):
    """A tiny character-level tokenizer.json with Qwen's special tokens, for offline tests."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = list("0123456789.,;: abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    tok.save(str(path))


def write_checkpoint(model: Qwen2, folder: Path, shards: int = 1, with_lm_head: bool = False,
                     tokenizer: bool = True) -> Path:
    """Saves `model` in the Hugging Face layout (config.json, safetensors, tokenizer.json)."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    sd = {hf_name(n): p.detach().contiguous() for n, p in model.state_dict().items() if n != "lm_head_bias"}
    if with_lm_head:
        sd["lm_head.weight"] = model.lm_head_weight.detach().clone()
    names = sorted(sd)
    if shards == 1:
        save_file(sd, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: sd[n] for n in names[s::shards]}
            save_file(part, str(folder / file))
            weight_map.update({n: file for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer:
        write_tokenizer(folder / "tokenizer.json", model.config.vocab_size)
    return folder


def fake_generation(prompts, new_rows, pad_id, details=False):
    """What qwen_min.generate returns when it continues prompts[i] with new_rows[i] (token-id lists):
    the left-padded prompts then the new tokens, padded after each row's end; with details, the
    Generation (tokens produced per row, rows still producing at each step). For tests whose
    stand-in for the model writes known continuations."""
    from qwen_min.generate import Generation

    T, n = max(map(len, prompts)), max(map(len, new_rows))
    tokens = torch.tensor([[pad_id] * (T - len(p)) + list(p) + list(r) + [pad_id] * (n - len(r)) for p, r in zip(prompts, new_rows)])
    lengths = [len(r) for r in new_rows]
    return Generation(tokens, lengths, [sum(k > j for k in lengths) for j in range(n)]) if details else tokens
