"""lora/inject.py: which layers get LoRA and under what names, what trains, and the merged export.

Expected names are written out by hand for a toy model with a LoRA target at its top level and one
nested below it; merged weights are W + (alpha/r) B A computed in the test in float64.
"""

import pytest
import torch
import torch.nn as nn

from conftest import random_lora as randomise, random_model, tiny_config
from lora import (LoRALinear, inject_lora, lora_layers, mark_only_lora_as_trainable, merge_lora, merged_state_dict,
                  parse_targets)
from lora.inject import linear_names
from qwen_min.errors import UserError

IDS = torch.randint(0, 160, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS)


def toy():
    """q_proj at the top level (its dotted name has no dot) and again inside `block`, beside a k_proj."""
    model = nn.Module()
    model.q_proj = nn.Linear(4, 3)
    model.block = nn.Module()
    model.block.q_proj = nn.Linear(3, 2)
    model.block.k_proj = nn.Linear(3, 2)
    return model


@pytest.mark.parametrize("text, names", [
    ("", ()), ("   ", ()), ("none", ()), (" none ", ()),
    ("all-linear", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    (" all-linear ", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    ("q,v", ("q_proj", "v_proj")),
    ("q_proj,v_proj", ("q_proj", "v_proj")),
    (" v , q_proj ,, gate,", ("v_proj", "q_proj", "gate_proj")),  # order kept, blanks and spaces dropped
    ("q,q_proj,v,q", ("q_proj", "v_proj")),  # each once
    ("down", ("down_proj",)),
])
def test_parse_targets_reads_short_peft_and_all_linear_names(text, names):
    assert parse_targets(text) == names


@pytest.mark.parametrize("text, bad", [("qkv", "qkv"), ("q,v w", "v w"), ("q;v", "q;v"), ("NONE", "NONE"),
                                       ("q,lm_head", "lm_head"), ("q_proj_proj", "q_proj_proj")])
def test_parse_targets_refuses_other_names_with_the_choices(text, bad):
    with pytest.raises(ValueError) as e:
        parse_targets(text)
    assert str(e.value) == (f"unknown LoRA target '{bad}'; use some of q,k,v,o,gate,up,down (or peft's q_proj, ...), "
                            "all-linear, or none")


def test_wrapped_names_are_the_module_paths_top_level_included():
    model = toy()
    assert linear_names(model) == {"q_proj", "k_proj"}
    assert inject_lora(model, r=1, targets=("q_proj",)) == ["q_proj", "block.q_proj"]
    assert sorted(lora_layers(model)) == ["block.q_proj", "q_proj"]
    assert linear_names(model) == {"k_proj"}
    trainable = mark_only_lora_as_trainable(model)
    assert trainable == ["q_proj.lora_A", "q_proj.lora_B", "block.q_proj.lora_A", "block.q_proj.lora_B"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable


def test_linear_names_after_injection_leave_out_the_wrapped_layers():
    """The frozen `.base` inside each LoRA layer is no target: a second injection can take the other
    layers, and neither q_proj (already wrapped) nor `base` is offered or accepted."""
    model = random_model(tiny_config())
    assert linear_names(model) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    inject_lora(model, r=2)
    assert linear_names(model) == {"k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for target in ("base", "q_proj"):
        with pytest.raises(UserError) as e:
            inject_lora(model, r=2, targets=(target,))
        assert str(e.value) == (f"The model has no nn.Linear named {target}; choose LoRA targets from "
                                "down_proj, gate_proj, k_proj, o_proj, up_proj.")
    assert inject_lora(model, r=2, targets=("k_proj",)) == ["layers.0.self_attn.k_proj", "layers.1.self_attn.k_proj"]
    assert linear_names(model) == {"o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(lora_layers(model)) == 6


def test_default_dropout_is_zero_so_a_training_model_is_deterministic():
    model = random_model(tiny_config())
    inject_lora(model, r=4, alpha=8)
    randomise(model)
    assert all(type(m.dropout) is nn.Identity for m in lora_layers(model).values())
    evaluated = logits(model)
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        first = logits(model)
        second = logits(model)
    assert torch.equal(first, second) and torch.equal(first, evaluated)
    assert (evaluated - logits(random_model(tiny_config()))).abs().max().item() > 1e-2  # the LoRA path is live


def test_init_is_passed_to_every_layer():
    """init="kaiming_uniform": the first wrapped layer's A is nn.Linear(64, 4)'s default weight from
    the same seed; the default init is a normal of std 1/sqrt(in) from the same seed; an unknown
    init is refused."""
    with torch.random.fork_rng():
        model = random_model(tiny_config())
        torch.manual_seed(5)
        inject_lora(model, r=4, init="kaiming_uniform")
        torch.manual_seed(5)
        uniform = nn.Linear(64, 4).weight.detach()
        default = random_model(tiny_config())
        torch.manual_seed(5)
        inject_lora(default, r=4)
        torch.manual_seed(5)
        normal = torch.empty(4, 64).normal_(0.0, 1 / 8)
    assert torch.allclose(lora_layers(model)["layers.0.self_attn.q_proj"].lora_A, uniform, rtol=0, atol=1e-7)
    assert torch.allclose(lora_layers(default)["layers.0.self_attn.q_proj"].lora_A, normal, rtol=0, atol=1e-7)
    with pytest.raises(ValueError) as e:
        inject_lora(random_model(tiny_config()), r=4, init="xavier")
    assert str(e.value) == "Unknown LoRA init 'xavier'; use 'kaiming_normal' or 'kaiming_uniform'."


def test_refusals_are_whole_sentences():
    with pytest.raises(UserError) as e:
        inject_lora(random_model(tiny_config()), r=2, targets=("q_proj", "lm_head"))
    assert str(e.value) == ("LoRA on lm_head is refused: Qwen2.5's output head is tied to the token embedding, "
                            "so adapting it would also change the input embedding (and merging would clobber it).")
    model = random_model(tiny_config())
    with pytest.raises(UserError) as e:
        inject_lora(model, r=2, targets=("qkv", "q_proj", "foo"))
    assert str(e.value) == ("The model has no nn.Linear named foo, qkv; choose LoRA targets from "
                            "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj.")
    assert not lora_layers(model)


def test_merged_state_dict_is_the_base_state_dict_with_w_plus_alpha_over_r_b_a():
    """Exactly the base model's keys (no lora_A/lora_B, no `.base.`), every untouched tensor as it
    was, and each adapted weight W + (alpha/r) B A, here with alpha/r = 12/4 = 3."""
    base = random_model(tiny_config()).state_dict()
    model = random_model(tiny_config())
    inject_lora(model, r=4, alpha=12, targets=("q_proj", "v_proj", "down_proj"))
    randomise(model)
    merged = merged_state_dict(model)
    assert set(merged) == set(base)
    adapted = {name + ".weight": m for name, m in lora_layers(model).items()}
    assert len(adapted) == 6
    for key, tensor in merged.items():
        assert tensor.dtype == base[key].dtype and tensor.shape == base[key].shape, key
        if key in adapted:
            m = adapted[key]
            expected = base[key].double() + 3.0 * m.lora_B.double() @ m.lora_A.double()
            assert (tensor.double() - expected).abs().max().item() <= 1e-6, key
            assert (tensor - base[key]).abs().max().item() > 1e-3, key  # the update is not negligible
        else:
            assert torch.equal(tensor, base[key]), key
    assert all(not m.merged for m in lora_layers(model).values())
    # a merged model's export holds the same weights (the update is not added twice)
    merge_lora(model)
    again = merged_state_dict(model)
    assert set(again) == set(base)
    assert all((again[k] - merged[k]).abs().max().item() <= 1e-6 for k in base)


def test_merged_state_dict_of_float32_lora_on_a_bfloat16_base_stays_bfloat16():
    """Mixed precision as train.py runs it (bf16 base, float32 A and B): the export keeps the base's
    dtype for every tensor, and the adapted weights are W + (alpha/r) B A to bf16 rounding."""
    base = random_model(tiny_config(), dtype=torch.bfloat16).state_dict()
    model = random_model(tiny_config(), dtype=torch.bfloat16)
    inject_lora(model, r=4, alpha=8)
    for m in lora_layers(model).values():
        m.lora_A.data, m.lora_B.data = m.lora_A.data.float(), m.lora_B.data.float()
    randomise(model)
    merged = merged_state_dict(model)
    assert set(merged) == set(base)
    assert {k: t.dtype for k, t in merged.items()} == {k: torch.bfloat16 for k in base}
    m = lora_layers(model)["layers.1.self_attn.v_proj"]
    expected = base["layers.1.self_attn.v_proj.weight"].double() + 2.0 * m.lora_B.double() @ m.lora_A.double()
    got = merged["layers.1.self_attn.v_proj.weight"].double()
    assert (got - expected).abs().max().item() <= 2 ** -7 * expected.abs().max().item()
    assert (got - base["layers.1.self_attn.v_proj.weight"].double()).abs().max().item() > 1e-2


def test_merged_state_dict_keeps_the_names_of_modules_called_base():
    """A model with its own submodule named `base` keeps that name; only LoRA's `.base` goes. Not hit
    by Qwen2 (no module of its is called base)."""
    model = nn.Module()
    model.enc = nn.Module()
    model.enc.base = nn.Module()
    model.enc.base.q_proj = nn.Linear(3, 2)
    model.enc.base.k_proj = nn.Linear(3, 2)
    keys = set(model.state_dict())
    inject_lora(model, r=1, alpha=2, targets=("q_proj",))
    layer = lora_layers(model)["enc.base.q_proj"]
    with torch.no_grad():
        layer.lora_B.fill_(1.0)
    merged = merged_state_dict(model)
    assert set(merged) == keys == {"enc.base.q_proj.weight", "enc.base.q_proj.bias", "enc.base.k_proj.weight", "enc.base.k_proj.bias"}
    expected = layer.base.weight + 2.0 * torch.ones(2, 1) @ layer.lora_A
    assert torch.allclose(merged["enc.base.q_proj.weight"], expected, atol=1e-6)


def test_merged_state_dict_of_a_bare_lora_layer_is_its_merged_linear():
    layer = LoRALinear(nn.Linear(3, 2), r=1, alpha=2)
    with torch.no_grad():
        layer.lora_B.fill_(1.0)
    merged = merged_state_dict(layer)
    assert set(merged) == {"weight", "bias"}
    assert torch.allclose(merged["weight"], layer.base.weight + 2.0 * torch.ones(2, 1) @ layer.lora_A, atol=1e-6)
