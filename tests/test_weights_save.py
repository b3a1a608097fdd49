"""qwen_min.weights.save_pretrained's files, read back byte by byte and key by key (test_weights
checks only that its checkpoints load), and read_safetensors' refusals in whole sentences."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import random_model, tiny_config, write_checkpoint
from qwen_min import Qwen2
from qwen_min.errors import UserError
from qwen_min.weights import save_pretrained


@pytest.fixture
def tiny():
    return random_model(tiny_config(n_layers=1))


@pytest.mark.parametrize("dtype, name", [(torch.float32, "float32"), (torch.bfloat16, "bfloat16")])
def test_config_json_names_the_dtype_as_transformers_does_and_is_indented_by_two(tiny, tmp_path, dtype, name):
    sd = {n: t.to(dtype) for n, t in tiny.state_dict().items()}
    folder = save_pretrained(sd, tiny.config, tmp_path / "out")
    text = (folder / "config.json").read_text()
    assert json.loads(text)["torch_dtype"] == name
    assert json.loads(text)["num_hidden_layers"] == 1
    assert text.startswith('{\n  "') and "\n   " not in text.split("[")[0]  # two spaces a level, before any list


def test_model_safetensors_carries_the_pt_format_metadata_transformers_checks(tiny, tmp_path):
    folder = save_pretrained(tiny.state_dict(), tiny.config, tmp_path / "out")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "model.norm.weight" in f.keys()


def test_tokenizer_files_are_copied_when_asked_and_absent_ones_skipped(tiny, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("T")
    (src / "generation_config.json").write_text("G")  # no tokenizer_config.json: skipped, not an error
    (src / "vocab.json").write_text("V")  # not one of the three: not copied
    folder = save_pretrained(tiny.state_dict(), tiny.config, tmp_path / "out", copy_from=src)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert (folder / "tokenizer.json").read_text() == "T" and (folder / "generation_config.json").read_text() == "G"
    (src / "tokenizer_config.json").write_text("C")
    folder = save_pretrained(tiny.state_dict(), tiny.config, tmp_path / "out", copy_from=str(src))
    assert (folder / "tokenizer_config.json").read_text() == "C"
    bare = save_pretrained(tiny.state_dict(), tiny.config, tmp_path / "bare")
    assert sorted(p.name for p in bare.iterdir()) == ["config.json", "model.safetensors"]


def test_a_model_with_an_lm_head_bias_is_not_exported(tmp_path):
    model = random_model(tiny_config(n_layers=1), lm_head_bias=True)
    with pytest.raises(UserError) as e:
        save_pretrained(model.state_dict(), model.config, tmp_path / "out")
    assert str(e.value) == ("transformers' Qwen2 has no lm_head bias, so a model trained with one cannot be exported "
                            "in its layout; keep the adapter instead.")
    assert not (tmp_path / "out").exists()


def test_an_integer_tensor_is_refused_in_one_whole_sentence(tiny, tmp_path):
    folder = write_checkpoint(tiny, tmp_path / "ckpt")
    file = folder / "model.safetensors"
    sd = load_file(str(file))
    sd["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    save_file(sd, str(file))
    with pytest.raises(UserError) as e:
        Qwen2.from_pretrained(folder)
    assert str(e.value) == (f"Tensor 'model.norm.weight' in {file} holds I32 numbers, not floating-point weights; "
                            "pass the file of a trained model.")


def test_a_float64_checkpoint_loads_cast_to_the_asked_dtype(tiny, tmp_path):
    folder = write_checkpoint(tiny.double(), tmp_path / "ckpt")
    tiny.float()
    loaded = Qwen2.from_pretrained(folder)
    assert loaded.norm.weight.dtype == torch.float32 and torch.equal(loaded.norm.weight, tiny.norm.weight)
