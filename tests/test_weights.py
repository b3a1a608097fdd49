"""qwen_min.weights: loading safetensors checkpoints, and every error a user can cause."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_model, tiny_config, write_checkpoint
from qwen_min import Qwen2, Qwen2Config
from qwen_min.errors import UserError
from qwen_min.weights import save_pretrained


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
    with pytest.raises(UserError, match="Could not find 'someone/not-there'"):
        Qwen2.from_pretrained("someone/not-there")


def corrupt(folder, edit):
    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"))


def nan_at(name, value):
    def edit(sd):
        sd[name] = sd[name].clone()
        sd[name].view(-1)[3] = value
    return edit


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}), "'model.layers.0.mlp.extra.weight', which the model does not have"),
    (lambda sd: sd.pop("model.layers.1.self_attn.q_proj.bias"), "lacks 1 tensor"),
    (lambda sd: sd.update({"model.norm.weight": torch.zeros(65)}), r"shape \(65,\).*\(64,\)"),
    # integer weights are refused, never cast: 1, 0, -1 as floats would load and compute garbage
    (lambda sd: sd.update({"model.norm.weight": torch.ones(64, dtype=torch.int64)}), "'model.norm.weight'.*holds I64 numbers"),
    (lambda sd: sd.update({"model.embed_tokens.weight": sd["model.embed_tokens.weight"].to(torch.int8)}), "holds I8 numbers"),
    (nan_at("model.layers.1.mlp.down_proj.weight", float("nan")), "'model.layers.1.mlp.down_proj.weight'.*NaN or infinite"),
    (nan_at("model.norm.weight", float("-inf")), "'model.norm.weight'.*NaN or infinite"),
])
def test_bad_tensors_are_refused_by_name(tiny, tmp_path, edit, match):
    folder = write_checkpoint(tiny, tmp_path / "ckpt")
    corrupt(folder, edit)
    with pytest.raises(UserError, match=match):
        Qwen2.from_pretrained(folder)


def test_bfloat16_and_float16_checkpoints_load(tiny, tmp_path):
    for dtype in (torch.bfloat16, torch.float16):
        folder = write_checkpoint(tiny.to(dtype), tmp_path / str(dtype))
        loaded = Qwen2.from_pretrained(folder)
        assert torch.equal(loaded.norm.weight, tiny.norm.weight.float())  # the file's values, cast up exactly
    tiny.float()


@pytest.mark.parametrize("damage, match", [
    (lambda b: b[: len(b) // 2], "incomplete metadata"),  # truncated: the header promises more data
    (lambda b: b[:-1], "incomplete metadata"),
    (lambda b: b"", "header too small"),
    (lambda b: b[:5], "header too small"),
    (lambda b: (10**12).to_bytes(8, "little") + b[8:], "header too large"),  # header length beyond the file
    (lambda b: b[:8] + b"{" * 20 + b[28:], "invalid JSON in header"),
    (lambda b: bytes(range(256)) * 8, "header too large"),
])
def test_damaged_safetensors_files_name_the_file(tiny, tmp_path, damage, match):
    folder = write_checkpoint(tiny, tmp_path / "ckpt")
    file = folder / "model.safetensors"
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(UserError, match=f"{file} is not a readable safetensors file.*{match}"):
        Qwen2.from_pretrained(folder)


def test_missing_folder_files_and_shards_are_refused(tiny, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Qwen2.from_pretrained(tmp_path / "nowhere")
    folder = write_checkpoint(tiny, tmp_path / "ckpt")
    with pytest.raises(UserError, match="is a file, not a checkpoint folder"):
        Qwen2.from_pretrained(folder / "config.json")
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match="No model.safetensors"):
        Qwen2.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match="No config.json"):
        Qwen2.from_pretrained(folder)
    sharded = write_checkpoint(tiny, tmp_path / "sharded", shards=2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors.index.json names shards that are missing"):
        Qwen2.from_pretrained(sharded)


@pytest.mark.parametrize("index", [
    "{not json", "[1, 2]", '"weight_map"', "{}", '{"weight_map": []}', '{"weight_map": {}}',
    '{"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}',
    '{"weight_map": {"model.norm.weight": "model.bin"}}',
    '{"weight_map": {"model.norm.weight": ["a.safetensors"]}}',
])
def test_an_invalid_shard_index_is_named(tiny, tmp_path, index):
    sharded = write_checkpoint(tiny, tmp_path / "sharded", shards=2)
    (sharded / "model.safetensors.index.json").write_text(index)
    with pytest.raises(UserError, match=f"{sharded / 'model.safetensors.index.json'} is not a safetensors index"):
        Qwen2.from_pretrained(sharded)


def test_a_tensor_in_two_shards_is_refused(tiny, tmp_path):
    sharded = write_checkpoint(tiny, tmp_path / "sharded", shards=2)
    first = sharded / "model-00001-of-00002.safetensors"
    sd = load_file(str(first))
    sd["model.norm.weight"] = tiny.norm.weight.detach().clone()  # also in shard 2
    save_file(sd, str(first))
    with pytest.raises(UserError, match="'model.norm.weight' appears in two"):
        Qwen2.from_pretrained(sharded)


def test_save_pretrained_swaps_the_folder_in_whole(tiny, tmp_path, monkeypatch):
    folder = save_pretrained(tiny.state_dict(), tiny.config, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .tmp, .old or .partial left
    assert same_logits(tiny, Qwen2.from_pretrained(folder))
    # a failure while writing the next version leaves the previous one whole
    import qwen_min.weights as weights

    def crash(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(weights, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(random_model(tiny.config, seed=1).state_dict(), tiny.config, folder)
    assert same_logits(tiny, Qwen2.from_pretrained(folder))


def test_bad_config_json_is_refused(tiny, tmp_path):
    folder = write_checkpoint(tiny, tmp_path / "ckpt")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        Qwen2.from_pretrained(folder)
    hf = tiny.config.to_hf_dict()
    del hf["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UserError, match="lacks the key 'num_hidden_layers'"):
        Qwen2.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(tiny.config.to_hf_dict() | {"use_sliding_window": True}))
    with pytest.raises(UserError, match="sliding-window"):
        Qwen2.from_pretrained(folder)


@pytest.mark.parametrize("change, match", [
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a whole number from 1 to 1024, not 0"),
    ({"num_key_value_heads": 3}, r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
    ({"vocab_size": -5}, "vocab_size must be a whole number from 1 to 4194304, not -5"),
    ({"hidden_size": "64"}, "hidden_size must be a whole number from 1 to 65536, not '64'"),
    ({"num_hidden_layers": 2.0}, "num_hidden_layers must be a whole number from 1 to 1024, not 2.0"),
    ({"num_hidden_layers": True}, "num_hidden_layers must be a whole number from 1 to 1024, not True"),
    ({"intermediate_size": None}, "intermediate_size must be a whole number"),
    ({"head_dim": None, "hidden_size": 66}, r"no head_dim and hidden_size \(66\) is not a multiple of num_attention_heads \(4\)"),
    ({"head_dim": 15}, "head_dim must be even"),
    ({"max_position_embeddings": 10**12}, "max_position_embeddings must be a whole number from 1 to 2097152"),
    ({"max_position_embeddings": 1 << 21, "head_dim": 512, "hidden_size": 2048}, "more than qwen-min's RoPE tables hold"),
    ({"vocab_size": 10**10}, "vocab_size must be a whole number from 1 to 4194304"),
    ({"rope_theta": -1.0}, "rope_theta must be a positive number"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a positive number"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ({"eos_token_id": "end"}, "eos_token_id must be a token id"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling"),
    ({"rope_scaling": [1, 2]}, "not JSON objects"),
    ({"model_type": "llama"}, "describes a 'llama' model"),
])
def test_config_json_with_wrong_types_or_impossible_values(tiny, tmp_path, change, match):
    folder = write_checkpoint(tiny, tmp_path / "ckpt")
    (folder / "config.json").write_text(json.dumps(tiny.config.to_hf_dict() | change))
    with pytest.raises(UserError, match=f"{folder / 'config.json'}: .*{match}"):
        Qwen2.from_pretrained(folder)


@pytest.mark.parametrize("text", ["[1, 2, 3]", "null", '"qwen2"', "42", "\ufeff{}"])
def test_config_json_that_is_not_an_object(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(UserError, match=str(tmp_path / "config.json")):
        Qwen2Config.from_json(tmp_path / "config.json")


def test_config_keeps_what_transformers_reads(tiny):
    """Qwen2.5-0.5B's config.json keys (eos as a list, head_dim absent) give the numbers transformers uses."""
    hf = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
          "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
          "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "max_position_embeddings": 32768, "tie_word_embeddings": True,
          "bos_token_id": 151643, "eos_token_id": [151645, 151643], "hidden_act": "silu", "use_sliding_window": False}
    cfg = Qwen2Config.from_hf_dict(hf)
    assert (cfg.head_dim, cfg.eos_token_id, cfg.n_kv_heads, cfg.max_seq_len) == (64, 151645, 2, 32768)
    assert cfg == Qwen2Config()  # the defaults are this model's


def test_a_hub_id_that_cannot_be_reached_offline_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="download it while online .* or pass a local checkpoint folder"):
        Qwen2.from_pretrained("someone/never-downloaded")
