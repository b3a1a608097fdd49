"""lora/peft_format.py: the adapter_config.json peft reads, what an adapter folder may hold, the
config's boundaries, and loading what peft writes (rsLoRA, `.default` names, dotted targets).

Expected configs are written out key by key from peft's LoraConfig fields; loaded adapters are
checked against peft's own model on the same weights (logits), and refusals against their whole
sentence, since the words are what a user reads.
"""

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from conftest import random_lora as randomise, hf_twin, random_model, tiny_config
from lora import inject_lora, load_adapter, lora_layers, save_adapter
from lora.peft_format import MAX_RANK, read_adapter_config
from qwen_min.errors import UserError

IDS = torch.randint(0, 160, (2, 9), generator=torch.Generator().manual_seed(0))
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
Q1 = "base_model.model.model.layers.1.self_attn.q_proj"
REFUSAL = "; pass an adapter saved by qwen-min or peft's LoRA."


def logits(model):
    with torch.no_grad():
        out = model(IDS)
    return getattr(out, "logits", out)


def saved(folder, r=4, alpha=8, targets=("q_proj", "v_proj"), **kw):
    """A Qwen2 adapter saved under transformers' names (the model's checkpoint_name); returns (model, folder)."""
    model = random_model(tiny_config())
    inject_lora(model, r=r, alpha=alpha, targets=targets, **kw)
    randomise(model)
    return model, save_adapter(model, folder)


def edit_config(folder, drop=(), **change):
    path = folder / "adapter_config.json"
    config = {k: v for k, v in json.loads(path.read_text()).items() if k not in drop} | change
    path.write_text(json.dumps(config))
    return path


def message(call, exc=UserError):
    with pytest.raises(exc) as e:
        call()
    return str(e.value)


# ---------------------------------------------------------------- save_adapter

def test_adapter_config_holds_every_key_peft_reads(tmp_path):
    peft = pytest.importorskip("peft")
    model, folder = saved(tmp_path / "a", r=4, alpha=12, targets=("q_proj", "v_proj", "down_proj"), dropout=0.1)
    save_adapter(model, folder, base_model_name_or_path="Qwen/Qwen2.5-0.5B-Instruct")
    text = (folder / "adapter_config.json").read_text()
    assert json.loads(text) == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct",
        "r": 4, "lora_alpha": 12, "lora_dropout": 0.1, "target_modules": ["down_proj", "q_proj", "v_proj"],
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "inference_mode": True}
    # peft reads the same values back
    config = peft.LoraConfig.from_pretrained(folder)
    assert (config.peft_type, config.task_type, config.r, config.lora_alpha, config.lora_dropout) == ("LORA", "CAUSAL_LM", 4, 12, 0.1)
    assert set(config.target_modules) == {"down_proj", "q_proj", "v_proj"} and config.inference_mode is True
    assert config.base_model_name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    # laid out for people as peft lays out its own: one key a line, indented by two spaces
    peft.get_peft_model(hf_twin(random_model(tiny_config())), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "peft")
    theirs = (tmp_path / "peft" / "adapter_config.json").read_text().splitlines()
    ours = text.splitlines()
    assert len(ours) >= 15 and ours[0] == "{" and ours[-1] == "}"
    assert ours[1][:3] == theirs[1][:3] == '  "'


def test_adapter_config_of_a_layer_without_dropout_says_zero(tmp_path):
    _, folder = saved(tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.0 and config["base_model_name_or_path"] is None
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8, ["q_proj", "v_proj"])


def test_target_modules_are_the_layers_own_names_top_level_included(tmp_path):
    model = nn.Module()
    model.q_proj = nn.Linear(4, 3)
    model.block = nn.Module()
    model.block.q_proj = nn.Linear(3, 2)
    model.block.k_proj = nn.Linear(3, 2)
    inject_lora(model, r=1, targets=("q_proj", "k_proj"))
    save_adapter(model, tmp_path / "toy")
    assert json.loads((tmp_path / "toy" / "adapter_config.json").read_text())["target_modules"] == ["k_proj", "q_proj"]
    assert sorted(load_file(str(tmp_path / "toy" / "adapter_model.safetensors"))) == [
        "base_model.model.block.k_proj.lora_A.weight", "base_model.model.block.k_proj.lora_B.weight",
        "base_model.model.block.q_proj.lora_A.weight", "base_model.model.block.q_proj.lora_B.weight",
        "base_model.model.q_proj.lora_A.weight", "base_model.model.q_proj.lora_B.weight"]


def test_save_refusals_are_whole_sentences(tmp_path):
    assert message(lambda: save_adapter(random_model(tiny_config()), tmp_path / "x"), ValueError) == \
        "The model has no LoRA layers to save."
    mixed = random_model(tiny_config())
    inject_lora(mixed, r=2, targets=("q_proj",))
    inject_lora(mixed, r=4, targets=("v_proj",))
    assert message(lambda: save_adapter(mixed, tmp_path / "x"), ValueError) == \
        "peft's format needs one rank and alpha for all LoRA layers."
    assert not (tmp_path / "x").exists()
    run = tmp_path / "run"
    run.mkdir()
    for name in ("d.txt", "c.txt", "adapter_config.json", "b.txt", "a.txt"):
        (run / name).write_text(name)
    model = random_model(tiny_config())
    inject_lora(model, r=2)
    assert message(lambda: save_adapter(model, run)) == (
        f"{run} holds files that are not an adapter's (a.txt, b.txt, c.txt), which saving an adapter "
        "there would delete; choose a new or adapter-only folder.")
    assert sorted(p.name for p in run.iterdir()) == ["a.txt", "adapter_config.json", "b.txt", "c.txt", "d.txt"]


def test_an_adapter_folder_with_peft_s_readme_may_be_saved_over(tmp_path):
    """peft's save_pretrained writes a README.md beside the adapter: saving there again is no loss."""
    model, folder = saved(tmp_path / "a")
    (folder / "README.md").write_text("# model card\n")
    save_adapter(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


# ---------------------------------------------------------------- read_adapter_config

@pytest.mark.parametrize("r", [1, 2, MAX_RANK])
def test_rank_from_one_to_max_rank_is_accepted(tmp_path, r):
    _, folder = saved(tmp_path / "a")
    edit_config(folder, r=r)
    assert read_adapter_config(folder)["r"] == r


@pytest.mark.parametrize("r", [0, MAX_RANK + 1])
def test_rank_outside_one_to_max_rank_is_refused(tmp_path, r):
    _, folder = saved(tmp_path / "a")
    path = edit_config(folder, r=r)
    assert MAX_RANK == 4096
    assert message(lambda: read_adapter_config(folder)) == f"{path} gives the rank r = {r}, not a whole number from 1 to 4096" + REFUSAL


@pytest.mark.parametrize("alpha", [1e-6, 0.5, 1])
def test_any_positive_alpha_is_accepted(tmp_path, alpha):
    _, folder = saved(tmp_path / "a")
    edit_config(folder, lora_alpha=alpha)
    assert read_adapter_config(folder)["lora_alpha"] == alpha


def test_alpha_zero_is_refused(tmp_path):
    _, folder = saved(tmp_path / "a")
    path = edit_config(folder, lora_alpha=0)
    assert message(lambda: read_adapter_config(folder)) == f"{path} gives lora_alpha = 0, not a positive number" + REFUSAL


def test_missing_alpha_defaults_to_the_rank_and_scales_by_one(tmp_path):
    source, folder = saved(tmp_path / "a", r=4, alpha=8)
    edit_config(folder, drop=("lora_alpha",))
    assert read_adapter_config(folder)["lora_alpha"] == 4
    model = random_model(tiny_config())
    load_adapter(model, folder)
    assert all(m.alpha == 4 and m.scaling == 1.0 for m in lora_layers(model).values())
    for name, m in lora_layers(model).items():
        assert torch.equal(m.lora_B, lora_layers(source)[name].lora_B)


def test_a_single_target_module_string_reads_as_a_one_name_list(tmp_path):
    """qwen-min's reading: "q_proj" is the module name q_proj (peft would read a string as a regex
    over full module paths, which matches no Qwen2 layer for "q_proj")."""
    source, folder = saved(tmp_path / "a", targets=("q_proj",))
    edit_config(folder, target_modules="q_proj")
    assert read_adapter_config(folder)["target_modules"] == ["q_proj"]
    model = random_model(tiny_config())
    load_adapter(model, folder)
    assert sorted(lora_layers(model)) == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]
    assert torch.equal(logits(model), logits(source))


def test_missing_peft_type_is_read_as_lora(tmp_path):
    _, folder = saved(tmp_path / "a")
    edit_config(folder, drop=("peft_type",))
    assert read_adapter_config(folder)["r"] == 4
    load_adapter(random_model(tiny_config()), folder)


@pytest.mark.parametrize("pattern", ["rank_pattern", "alpha_pattern"])
def test_a_per_module_rank_or_alpha_alone_is_refused(tmp_path, pattern):
    _, folder = saved(tmp_path / "a")
    edit_config(folder, rank_pattern={}, alpha_pattern={})  # empty, as peft writes them: accepted
    assert read_adapter_config(folder)["r"] == 4
    path = edit_config(folder, drop=("rank_pattern", "alpha_pattern"), **{pattern: {"model.layers.0.self_attn.q_proj": 8}})
    assert message(lambda: read_adapter_config(folder)) == \
        f"{path} gives per-module ranks or alphas, and qwen-min needs one rank and alpha" + REFUSAL


@pytest.mark.parametrize("flag", ["use_dora", "fan_in_fan_out"])
def test_dora_and_fan_in_fan_out_are_refused(tmp_path, flag):
    _, folder = saved(tmp_path / "a")
    edit_config(folder, use_dora=False, fan_in_fan_out=False)
    assert read_adapter_config(folder)["r"] == 4
    path = edit_config(folder, **{flag: True})
    assert message(lambda: read_adapter_config(folder)) == f"{path} sets {flag}, which qwen-min's LoRA does not implement" + REFUSAL


def test_config_refusals_are_whole_sentences(tmp_path):
    assert message(lambda: read_adapter_config(tmp_path)) == \
        f"{tmp_path} is not a LoRA adapter folder: it needs adapter_config.json and adapter_model.safetensors."
    _, folder = saved(tmp_path / "a")
    path = folder / "adapter_config.json"
    path.write_text("")
    assert message(lambda: read_adapter_config(folder)) == \
        f"{path} is not valid JSON (Expecting value: line 1 column 1 (char 0)); save the adapter again."
    path.write_text("{" + "\n" * 100000 + " 1}")  # json's message is 85 characters here; the first 80 are quoted
    assert message(lambda: read_adapter_config(folder)) == (
        f"{path} is not valid JSON (Expecting property name enclosed in double quotes: line 100001 column 2 (char 10); "
        "save the adapter again.")
    path.write_text("[4, 8]")
    assert message(lambda: read_adapter_config(folder)) == f"{path} holds a JSON list, not an object; save the adapter again."
    path.write_text(json.dumps({"peft_type": "PREFIX_TUNING", "r": 4}))
    assert message(lambda: read_adapter_config(folder)) == \
        f"{path} describes a PREFIX_TUNING adapter, and qwen-min loads LoRA only" + REFUSAL
    path.write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": []}))
    assert message(lambda: read_adapter_config(folder)) == f"{path} has no target_modules list of module names" + REFUSAL


# ---------------------------------------------------------------- load_adapter

def test_a_rank_one_adapter_loads(tmp_path):
    source, folder = saved(tmp_path / "a", r=1, alpha=3)
    model = random_model(tiny_config())
    load_adapter(model, folder)
    assert all(m.r == 1 and m.scaling == 3.0 for m in lora_layers(model).values())
    assert torch.equal(logits(model), logits(source))
    assert (logits(model) - logits(random_model(tiny_config()))).abs().max().item() > 1e-3


def test_rslora_scales_by_alpha_over_sqrt_r(tmp_path):
    """r = 16, alpha = 8: rsLoRA's scale is 8 / sqrt(16) = 2 (not 8 / 16), and the logits are peft's."""
    peft = pytest.importorskip("peft")
    model = random_model(tiny_config())
    cfg = peft.LoraConfig(r=16, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True, init_lora_weights=False)
    peft_model = peft.get_peft_model(hf_twin(model), cfg).eval()
    peft_model.save_pretrained(tmp_path / "rs")
    load_adapter(model, tmp_path / "rs")
    assert all(m.scaling == pytest.approx(2.0) for m in lora_layers(model).values())
    assert (logits(peft_model) - logits(model)).abs().max().item() <= 1e-5


def test_tensor_names_with_peft_s_adapter_name_load(tmp_path):
    """A file written from a PeftModel's state_dict keeps peft's adapter name: `lora_A.default.weight`."""
    peft = pytest.importorskip("peft")
    model = random_model(tiny_config())
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(hf_twin(model), cfg).eval()
    peft_model.save_pretrained(tmp_path / "a")
    raw = {k: v.contiguous() for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert f"{Q0}.lora_A.default.weight" in raw and len(raw) == 8
    save_file(raw, str(tmp_path / "a" / "adapter_model.safetensors"))
    load_adapter(model, tmp_path / "a")
    assert torch.equal(lora_layers(model)["layers.0.self_attn.q_proj"].lora_A, raw[f"{Q0}.lora_A.default.weight"])
    assert (logits(peft_model) - logits(model)).abs().max().item() <= 1e-5


def test_full_dotted_target_modules_from_peft_load(tmp_path):
    peft = pytest.importorskip("peft")
    model = random_model(tiny_config())
    targets = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft_model = peft.get_peft_model(hf_twin(model), cfg).eval()
    peft_model.save_pretrained(tmp_path / "a")
    assert sorted(json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]) == targets
    load_adapter(model, tmp_path / "a")
    assert sorted(lora_layers(model)) == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]
    assert (logits(peft_model) - logits(model)).abs().max().item() <= 1e-5


def test_module_name_given_to_load_is_the_one_used(tmp_path):
    """An adapter saved under our own module names (module_name = identity) loads when the same
    module_name is given, and not under the model's default (transformers') names."""
    source = random_model(tiny_config())
    inject_lora(source, r=4, alpha=8)
    randomise(source)
    save_adapter(source, tmp_path / "a", module_name=lambda name: name)
    assert "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" in load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    model = random_model(tiny_config())
    load_adapter(model, tmp_path / "a", module_name=lambda name: name)
    assert torch.equal(logits(model), logits(source))
    with pytest.raises(UserError):
        load_adapter(random_model(tiny_config()), tmp_path / "a")


def test_load_refusals_are_whole_sentences(tmp_path):
    _, folder = saved(tmp_path / "a")
    path = edit_config(folder, target_modules=["q_proj", "zz_proj", "qkv_proj"])
    assert message(lambda: load_adapter(random_model(tiny_config()), folder)) == \
        f"{path} targets qkv_proj, zz_proj, which this model does not have; was it trained on another model?"
    edit_config(folder, target_modules=["q_proj", "v_proj"])
    weights = folder / "adapter_model.safetensors"
    sd = load_file(str(weights))
    del sd[f"{Q1}.lora_B.weight"], sd[f"{Q0}.lora_B.weight"]
    sd["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 64)
    sd["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(sd, str(weights))
    assert message(lambda: load_adapter(random_model(tiny_config()), folder)) == (
        f"Adapter in {folder} does not fit this model: 2 LoRA tensor(s) missing (e.g. ['{Q0}.lora_B.weight']), "
        "2 unknown (e.g. ['base_model.model.model.layers.0.mlp.up_proj.lora_A.weight']); was it trained on another model?")
    _, folder = saved(tmp_path / "b")
    edit_config(folder, r=2)
    assert message(lambda: load_adapter(random_model(tiny_config()), folder)) == (
        f"Adapter tensor {Q0}.lora_A.weight in {folder} has shape (4, 64), but rank 2 on this model "
        "needs (2, 64); was it trained on another model?")
