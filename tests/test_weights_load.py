"""qwen_min.weights' loading edges that test_weights leaves open: load_pretrained's own defaults,
and the shard-index and missing-tensor refusals in whole sentences, lists of names included."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import random_model, tiny_config, write_checkpoint
from qwen_min import Qwen2
from qwen_min.errors import UserError
from qwen_min.weights import load_pretrained


@pytest.fixture
def tiny():
    return random_model(tiny_config(n_layers=1))


def test_load_pretrained_defaults_to_float32_on_the_cpu_without_a_head_bias(tiny, tmp_path):
    loaded = load_pretrained(Qwen2, write_checkpoint(tiny.to(torch.bfloat16), tmp_path / "ckpt"))
    tiny.float()
    assert {(p.dtype, p.device.type) for p in loaded.parameters()} == {(torch.float32, "cpu")}
    assert loaded.lm_head_bias is None and not loaded.training
    assert torch.equal(loaded.norm.weight, tiny.norm.weight.to(torch.bfloat16).float())


def test_an_index_that_is_no_safetensors_index_is_refused_in_one_whole_sentence(tiny, tmp_path):
    sharded = write_checkpoint(tiny, tmp_path / "sharded", shards=2)
    index = sharded / "model.safetensors.index.json"
    index.write_text("{}")
    with pytest.raises(UserError) as e:
        Qwen2.from_pretrained(sharded)
    assert str(e.value) == (f"{index} is not a safetensors index (a JSON object whose 'weight_map' maps tensors to .safetensors "
                            "files in the same folder); restore it, or delete it if model.safetensors holds every weight.")


def test_every_missing_shard_is_named(tiny, tmp_path):
    sharded = write_checkpoint(tiny, tmp_path / "sharded", shards=3)
    for s in (1, 3):
        (sharded / f"model-0000{s}-of-00003.safetensors").unlink()
    with pytest.raises(UserError) as e:
        Qwen2.from_pretrained(sharded)
    assert str(e.value) == (f"{sharded / 'model.safetensors.index.json'} names shards that are missing from {sharded}: "
                            "model-00001-of-00003.safetensors, model-00003-of-00003.safetensors; download them again.")


def test_missing_tensors_are_counted_and_the_first_three_named_in_order(tiny, tmp_path):
    folder = write_checkpoint(tiny, tmp_path / "ckpt")
    file = folder / "model.safetensors"
    sd = load_file(str(file))
    for name in ("model.norm.weight", "model.layers.0.self_attn.k_proj.bias", "model.layers.0.mlp.up_proj.weight",
                 "model.embed_tokens.weight"):
        del sd[name]
    save_file(sd, str(file))
    with pytest.raises(UserError) as e:
        Qwen2.from_pretrained(folder)
    assert str(e.value) == (f"The checkpoint in {folder} lacks 4 tensor(s) the model needs, e.g. model.embed_tokens.weight, "
                            "model.layers.0.mlp.up_proj.weight, model.layers.0.self_attn.k_proj.bias; "
                            "is its config.json from another model?")


def test_hf_name_prefixes_all_but_the_head():
    from qwen_min.weights import hf_name

    assert hf_name("lm_head.weight") == "lm_head.weight"
    assert hf_name("norm.weight") == "model.norm.weight"
    assert hf_name("layers.0.lm_head.x") == "model.layers.0.lm_head.x"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """snapshot_download replaced by a recorder: no network, and each call's arguments kept."""
    import huggingface_hub

    calls, answers = [], []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls, answers


FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
         "generation_config.json"]


def test_a_hub_id_is_looked_up_in_the_cache_first_then_downloaded(offline_hub, tmp_path):
    from qwen_min.weights import resolve_checkpoint

    calls, answers = offline_hub
    answers += [str(tmp_path)]
    assert resolve_checkpoint("owner/name") == tmp_path
    assert calls == [("owner/name", {"allow_patterns": FILES, "local_files_only": True})]
    calls.clear()
    answers += [FileNotFoundError("not cached"), str(tmp_path / "fresh")]
    assert resolve_checkpoint("owner/name") == tmp_path / "fresh"
    assert calls == [("owner/name", {"allow_patterns": FILES, "local_files_only": True}),
                     ("owner/name", {"allow_patterns": FILES})]


def test_a_hub_id_that_cannot_be_had_names_the_hubs_error_type(offline_hub):
    from qwen_min.weights import resolve_checkpoint

    class RepositoryNotFound(Exception):
        pass
    calls, answers = offline_hub
    answers += [RepositoryNotFound(), RepositoryNotFound()]
    with pytest.raises(UserError) as e:
        resolve_checkpoint("owner/name")
    assert str(e.value) == ("Could not find 'owner/name' in the Hugging Face cache or download it (RepositoryNotFound); "
                            "download it while online (huggingface-cli download owner/name) or pass a local checkpoint folder.")


@pytest.mark.parametrize("text", ["owner/name/extra", "./here", "/abs", "~/home", "plain"])
def test_paths_not_shaped_like_a_hub_id_never_reach_the_hub(offline_hub, tmp_path, text):
    from qwen_min.weights import resolve_checkpoint

    calls, _ = offline_hub
    with pytest.raises(UserError, match=f"^Checkpoint folder {text} does not exist; "):
        resolve_checkpoint(text)
    assert calls == []
