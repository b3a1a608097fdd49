"""qwen_min.weights: loading safetensors checkpoints, and every error a user can cause."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_model, tiny_config, write_checkpoint
from qwen_min import Qwen2


@pytest.fixture
def tiny():
    return random_model(tiny_config(n_layers=2))


def same_logits(a, b):
    ids = torch.arange(20).view(2, 10)
    with torch.no_grad():
        return torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("shards, with_lm_head", [(1, False), (1, True), (3, False)])
def test_roundtrip_single_sharded_and_with_stored_tied_head(tiny, tmp_path, shards, with_lm_head):
    folder = write_checkpoint(tiny, tmp_path / "ckpt", shards=shards, with_lm_head=with_lm_head)
    loaded = Qwen2.from_pretrained(folder)
    assert same_logits(tiny, loaded)
    assert loaded.embed_tokens.weight.device.type == "cpu" and not loaded.rope.cos.is_meta
    assert loaded.lm_head is None  # the tied head stays tied: one (V, D) matrix, not two


def test_untied_head_loads_its_own_matrix(tmp_path):
    model = random_model(tiny_config(tie_embeddings=False))
    loaded = Qwen2.from_pretrained(write_checkpoint(model, tmp_path / "ckpt"))
    assert same_logits(model, loaded)
    assert not torch.equal(loaded.lm_head.weight, loaded.embed_tokens.weight)


def test_dtype_and_lm_head_bias_options(tiny, tmp_path):
    loaded = Qwen2.from_pretrained(write_checkpoint(tiny, tmp_path / "ckpt"), dtype=torch.bfloat16, lm_head_bias=True)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert loaded.lm_head_bias.shape == (160,) and loaded.lm_head_bias.abs().sum() == 0


def test_hub_id_loads_from_the_cache_offline(tiny, tmp_path, monkeypatch):
    """A hub id that is already in the Hugging Face cache loads without the network."""
    repo = tmp_path / "hub" / "models--someone--tiny-qwen"
    commit = "0123456789abcdef0123456789abcdef01234567"
    write_checkpoint(tiny, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert same_logits(tiny, Qwen2.from_pretrained("someone/tiny-qwen"))
    with pytest.raises(FileNotFoundError, match="Could not find 'someone/not-there'"):
        Qwen2.from_pretrained("someone/not-there")


def corrupt(folder, edit):
    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"))


@pytest.mark.parametrize("edit, error, match", [
    (lambda sd: sd.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}), ValueError, "does not have"),
    (lambda sd: sd.pop("model.layers.1.self_attn.q_proj.bias"), ValueError, "lacks 1 tensor"),
    (lambda sd: sd.update({"model.norm.weight": torch.zeros(65)}), ValueError, r"shape \(65,\).*\(64,\)"),
])
def test_bad_tensors_are_refused_by_name(tiny, tmp_path, edit, error, match):
    folder = write_checkpoint(tiny, tmp_path / "ckpt")
    corrupt(folder, edit)
    with pytest.raises(error, match=match):
        Qwen2.from_pretrained(folder)


def test_missing_folder_files_and_shards_are_refused(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Qwen2.from_pretrained(tmp_path / "nowhere")
    folder = write_checkpoint(tiny, tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="No model.safetensors"):
        Qwen2.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="No config.json"):
        Qwen2.from_pretrained(folder)
    sharded = write_checkpoint(tiny, tmp_path / "sharded", shards=2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shards that are missing"):
        Qwen2.from_pretrained(sharded)


def test_bad_config_json_is_refused(tiny, tmp_path):
    folder = write_checkpoint(tiny, tmp_path / "ckpt")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Qwen2.from_pretrained(folder)
    hf = tiny.config.to_hf_dict()
    del hf["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="lacks the key 'num_hidden_layers'"):
        Qwen2.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(tiny.config.to_hf_dict() | {"use_sliding_window": True}))
    with pytest.raises(ValueError, match="sliding-window"):
        Qwen2.from_pretrained(folder)
