"""lora/: the layer, injection, training masks, merge, and peft-format interop."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import hf_twin, random_model, tiny_config
from lora import (LoRALinear, inject_lora, load_adapter, lora_layers, mark_only_lora_as_trainable, merge_lora,
                  merged_state_dict, save_adapter, unmerge_lora)
from qwen_min.errors import UserError
from qwen_min.weights import hf_name, save_pretrained

IDS = torch.randint(0, 160, (2, 11), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids)


def randomise_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def test_fresh_lora_leaves_logits_unchanged_and_counts_parameters():
    model = random_model(tiny_config())
    before = logits(model)
    names = inject_lora(model, r=4)
    assert names == ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj",
                     "layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"]
    assert torch.equal(logits(model), before)
    trainable = mark_only_lora_as_trainable(model)
    q, v = 4 * (64 + 64), 4 * (64 + 32)  # r * (in + out): q is 64 -> 4*16, v is 64 -> 2*16
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == 2 * (q + v)
    assert len(trainable) == 8


def test_layer_formula_and_inits():
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base, r=2, alpha=6)
    assert layer.scaling == 3.0 and not base.weight.requires_grad and not base.bias.requires_grad
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 6)
    assert torch.allclose(layer(x), base(x) + (x @ layer.lora_A.T) @ layer.lora_B.T * 3.0, atol=1e-6)
    normal = LoRALinear(torch.nn.Linear(4096, 8), r=8).lora_A
    uniform = LoRALinear(torch.nn.Linear(4096, 8), r=8, init="kaiming_uniform").lora_A
    assert abs(normal.std().item() - 4096 ** -0.5) < 0.1 * 4096 ** -0.5  # kaiming normal, linear gain
    assert uniform.abs().max().item() <= 4096 ** -0.5 + 1e-6  # kaiming uniform with a = sqrt(5): bound 1/sqrt(in)
    with pytest.raises(ValueError, match="rank must be at least 1"):
        LoRALinear(torch.nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="Unknown LoRA init"):
        LoRALinear(torch.nn.Linear(4, 4), r=1, init="xavier")


def test_merge_and_unmerge_are_exact_and_idempotent():
    model = random_model(tiny_config())
    inject_lora(model, r=4, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    randomise_lora(model)
    base_before = {n: m.base.weight.clone() for n, m in lora_layers(model).items()}
    unmerged = logits(model)
    merge_lora(model)
    merged = logits(model)
    merge_lora(model)  # twice is once
    assert torch.equal(logits(model), merged)
    assert (merged - unmerged).abs().max().item() <= 1e-5
    unmerge_lora(model)
    unmerge_lora(model)
    assert (logits(model) - unmerged).abs().max().item() <= 1e-5
    for n, m in lora_layers(model).items():
        assert (m.base.weight - base_before[n]).abs().max().item() <= 1e-6


def test_only_lora_and_bias_train_and_base_weights_stay_bit_identical():
    model = random_model(tiny_config(), lm_head_bias=True)
    inject_lora(model, r=2)
    trainable = mark_only_lora_as_trainable(model, also=("lm_head_bias",))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(IDS[:, :-1]).flatten(0, 1), IDS[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
        opt.step()
    assert "lm_head_bias" in trainable and len(trainable) == 9
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert model.lm_head_bias.abs().sum() > 0 and all(m.lora_B.abs().sum() > 0 for m in lora_layers(model).values())


def test_tied_head_is_refused():
    with pytest.raises(UserError, match="tied to the token embedding"):
        inject_lora(random_model(tiny_config()), r=2, targets=("q_proj", "lm_head"))
    with pytest.raises(UserError, match="no nn.Linear named"):
        inject_lora(random_model(tiny_config()), r=2, targets=("qkv",))


def test_adapter_roundtrip_through_peft_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    model = random_model(tiny_config())
    hf = hf_twin(model)
    inject_lora(model, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    randomise_lora(model)
    save_adapter(model, tmp_path / "ours", module_name=hf_name, extra={"lm_head_bias": torch.ones(3)})
    # ours -> peft
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    with torch.no_grad():
        assert (peft_model(IDS).logits - logits(model)).abs().max().item() <= 1e-5
    # peft -> ours (change the weights first, so nothing passes by accident)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.add_(0.05)
    peft_model.save_pretrained(tmp_path / "theirs")
    fresh = random_model(tiny_config())
    extra = load_adapter(fresh, tmp_path / "theirs", module_name=hf_name)
    with torch.no_grad():
        ref = peft_model(IDS).logits
    assert extra == {} and (logits(fresh) - ref).abs().max().item() <= 1e-5
    assert not torch.allclose(logits(fresh), logits(model), atol=1e-3)
    assert torch.equal(load_adapter(random_model(tiny_config()), tmp_path / "ours", module_name=hf_name)["lm_head_bias"], torch.ones(3))


def test_bad_adapters_are_refused(tmp_path):
    model = random_model(tiny_config())
    with pytest.raises(UserError, match="not a LoRA adapter folder"):
        load_adapter(model, tmp_path)
    inject_lora(model, r=4)
    save_adapter(model, tmp_path / "a", module_name=lambda name: name)  # our names, not transformers'
    with pytest.raises(UserError, match="does not fit this model"):
        load_adapter(random_model(tiny_config()), tmp_path / "a")  # read under transformers' names


def test_merged_export_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = random_model(tiny_config())
    inject_lora(model, r=4)
    randomise_lora(model)
    folder = save_pretrained(merged_state_dict(model), model.config, tmp_path / "merged")
    assert not any(m.merged for m in lora_layers(model).values())  # exporting left the model unmerged
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (hf(IDS).logits - logits(model)).abs().max().item() <= 1e-5
    with pytest.raises(UserError, match="no lm_head bias"):
        save_pretrained({"lm_head_bias": torch.zeros(1)}, model.config, tmp_path / "x")


def test_float32_lora_on_bfloat16_base_with_and_without_autocast():
    """Mixed precision as train.py runs it: bf16 base, float32 LoRA matrices (and head bias).

    The reference is a float32 copy holding the same bf16-rounded base weights: both paths must lie
    within bf16 rounding of it, and the LoRA update must be far larger than that rounding, so a
    skipped LoRA path cannot pass."""
    model = random_model(tiny_config(), lm_head_bias=True, dtype=torch.bfloat16)
    inject_lora(model, r=4)
    model.lm_head_bias.data = model.lm_head_bias.data.float()
    for m in lora_layers(model).values():
        m.lora_A.data, m.lora_B.data = m.lora_A.data.float(), m.lora_B.data.float()
    randomise_lora(model)
    exact = logits(copy.deepcopy(model).float())
    without_lora = copy.deepcopy(model).float()
    for m in lora_layers(without_lora).values():
        m.lora_B.data.zero_()
    plain = logits(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = logits(model)
    tol = 0.04 * exact.abs().max().item()  # bf16 rounding through 2 layers measured at 1.5-1.7% of the max logit
    assert plain.dtype == torch.bfloat16
    assert (plain.float() - exact).abs().max().item() <= tol
    assert (auto.float() - exact).abs().max().item() <= tol
    assert (logits(without_lora) - exact).abs().max().item() > 5 * tol  # the LoRA update is visible

    # The branch itself computes in float32: on a zero bf16 base the output is the float32 update
    # (alpha/r) B A x rounded once to bf16 (relative error <= 2^-8); a bf16 branch is off by up to ~50%.
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(64, 32).to(torch.bfloat16)
    with torch.no_grad():
        base.weight.zero_()
        base.bias.zero_()
    layer = LoRALinear(base, r=4, alpha=8)
    layer.lora_A.data, layer.lora_B.data = torch.randn(4, 64, generator=g) / 8, torch.randn(32, 4, generator=g)
    x = torch.randn(16, 64, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
    expected = (x.double() @ layer.lora_A.double().T) @ layer.lora_B.double().T * 2.0  # (16, 32), alpha / r = 2
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=2 ** -8, atol=1e-6)


def test_bfloat16_merge_then_unmerge_restores_the_base_exactly():
    model = random_model(tiny_config(), dtype=torch.bfloat16)
    inject_lora(model, r=4)
    randomise_lora(model)
    before = {n: m.base.weight.clone() for n, m in lora_layers(model).items()}
    merged = merged_state_dict(model)  # out of place: the model is not touched
    assert all(torch.equal(m.base.weight, before[n]) for n, m in lora_layers(model).items())
    assert not torch.equal(merged["layers.0.self_attn.q_proj.weight"], before["layers.0.self_attn.q_proj"])
    merge_lora(model)
    assert torch.equal(merged["layers.0.self_attn.q_proj.weight"], lora_layers(model)["layers.0.self_attn.q_proj"].base.weight)
    unmerge_lora(model)
    assert all(torch.equal(m.base.weight, before[n]) for n, m in lora_layers(model).items())


def test_injected_layers_follow_the_model_mode():
    """Injected into an eval-mode model, LoRA layers are in eval mode: dropout 0.5 is off, so the
    logits equal the merged model's (the merge is pinned by hand and by peft); model.train() turns
    it on and model.eval() off again."""
    model = random_model(tiny_config()).eval()
    inject_lora(model, r=2, dropout=0.5)
    randomise_lora(model)
    assert not any(m.training for m in lora_layers(model).values())
    merged = logits(merge_lora(copy.deepcopy(model)))
    assert (logits(model) - merged).abs().max().item() <= 1e-5
    model.train()
    assert all(m.training for m in lora_layers(model).values())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        assert (logits(model) - merged).abs().max().item() > 1e-3  # dropout acts in train mode
    model.eval()
    assert (logits(model) - merged).abs().max().item() <= 1e-5


def test_a_target_the_model_lacks_is_refused_even_beside_one_it_has():
    model = random_model(tiny_config())
    with pytest.raises(UserError, match="no nn.Linear named qkv; choose LoRA targets from down_proj, gate_proj, k_proj"):
        inject_lora(model, r=2, targets=("q_proj", "qkv"))
    assert not lora_layers(model)  # refused before anything was wrapped


def test_save_adapter_swaps_the_folder_and_leaves_no_stale_extras(tmp_path):
    model = random_model(tiny_config())
    inject_lora(model, r=4)
    save_adapter(model, tmp_path / "a", module_name=hf_name, extra={"lm_head_bias": torch.ones(160)})
    assert (tmp_path / "a" / "extra_parameters.safetensors").is_file()
    save_adapter(model, tmp_path / "a", module_name=hf_name)  # the next save has no extras
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no .tmp or .old beside it
    assert load_adapter(random_model(tiny_config()), tmp_path / "a", module_name=hf_name) == {}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="holds files that are not an adapter's \\(metrics.jsonl\\)"):
        save_adapter(model, tmp_path / "run")  # would have deleted the run's logs
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "{}\n"


def test_a_kill_while_saving_keeps_the_previous_adapter(tmp_path, monkeypatch):
    import lora.peft_format as peft_format

    model = random_model(tiny_config())
    inject_lora(model, r=4)
    randomise_lora(model)
    save_adapter(model, tmp_path / "a", module_name=hf_name)
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(peft_format, "save_file", killed)
    randomise_lora(model, seed=2)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, tmp_path / "a", module_name=hf_name)
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before


def _adapter(tmp_path, r=4, extra=None):
    model = random_model(tiny_config())
    inject_lora(model, r=r, targets=("q_proj", "v_proj"))
    randomise_lora(model)
    return save_adapter(model, tmp_path / "adapter", module_name=hf_name, extra=extra)


def _edit_config(change):
    def edit(folder):
        path = folder / "adapter_config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | change))
    return edit


def _edit_tensors(edit_dict, name="adapter_model.safetensors"):
    def edit(folder):
        sd = load_file(str(folder / name))
        edit_dict(sd)
        save_file(sd, str(folder / name))
    return edit


def _write(name, data):
    return lambda folder: (folder / name).write_bytes(data(folder / name) if callable(data) else data)


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("damage, match", [
    (_write("adapter_config.json", b""), "adapter_config.json is not valid JSON"),
    (_write("adapter_config.json", lambda p: p.read_bytes()[:40]), "adapter_config.json is not valid JSON"),
    (_write("adapter_config.json", bytes(range(256))), "adapter_config.json is not valid JSON"),
    (_write("adapter_config.json", b"[4, 8]"), "holds a JSON list, not an object; save the adapter again."),
    (_edit_config({"r": 0}), "rank r = 0"),
    (_edit_config({"r": "4"}), "rank r = '4'"),
    (_edit_config({"r": 10**9}), "rank r = 1000000000"),
    (_edit_config({"r": None}), "rank r = None"),
    (_edit_config({"lora_alpha": "8"}), "lora_alpha = '8'"),
    (_edit_config({"lora_alpha": -1}), "lora_alpha = -1"),
    (_edit_config({"target_modules": []}), "no target_modules"),
    (_edit_config({"target_modules": None}), "no target_modules"),
    (_edit_config({"target_modules": [1, 2]}), "no target_modules"),
    (_edit_config({"target_modules": ["q_proj", "qkv_proj"]}), "targets qkv_proj, which this model does not have"),
    (_edit_config({"target_modules": ["lm_head"]}), "targets lm_head, which this model does not have"),
    (_edit_config({"peft_type": "PREFIX_TUNING"}), "PREFIX_TUNING adapter"),
    (_edit_config({"use_dora": True}), "use_dora"),
    (_edit_config({"r": 2}), rf"{Q0}.lora_A.weight in .* has shape \(4, 64\), but rank 2 on this model needs \(2, 64\)"),
    (_write("adapter_model.safetensors", b""), "adapter_model.safetensors is not a readable safetensors file"),
    (_write("adapter_model.safetensors", lambda p: p.read_bytes()[:-7]), "adapter_model.safetensors is not a readable safetensors file"),
    (_write("adapter_model.safetensors", bytes(range(256)) * 4), "adapter_model.safetensors is not a readable safetensors file"),
    (_edit_tensors(lambda sd: sd.pop(f"{Q0}.lora_B.weight")), r"1 LoRA tensor\(s\) missing"),
    (_edit_tensors(lambda sd: sd.update({f"{Q0}.lora_B.weight": torch.ones(64, 4, dtype=torch.int32)})), "holds I32 numbers"),
    (_edit_tensors(lambda sd: sd.update({f"{Q0}.lora_A.weight": sd[f"{Q0}.lora_A.weight"] * float("nan")})), "NaN or infinite"),
    (_edit_tensors(lambda sd: sd.update({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)})),
     r"1 unknown \(e.g. \['base_model.model.model.layers.0.mlp.up_proj"),
    (_write("extra_parameters.safetensors", b"garbage!"), "extra_parameters.safetensors is not a readable safetensors file"),
    (lambda folder: (folder / "adapter_model.safetensors").unlink(), "not a LoRA adapter folder"),
])
def test_bad_adapter_folders_name_the_file(tmp_path, damage, match):
    folder = _adapter(tmp_path, extra={"lm_head_bias": torch.zeros(160)})
    damage(folder)
    with pytest.raises(UserError, match=match):
        load_adapter(random_model(tiny_config()), folder, module_name=hf_name)


# ---------------------------------------------------------------- issue 11: alpha != r, dropout, stale extras

def _known_layer(r=4, alpha=16, dropout=0.0, d_in=6, d_out=5):
    """A LoRALinear over a seeded base, with A and B set to known random values (B nonzero)."""
    g = torch.Generator().manual_seed(7)
    base = torch.nn.Linear(d_in, d_out)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d_out, d_in, generator=g))
        base.bias.copy_(torch.randn(d_out, generator=g))
    layer = LoRALinear(base, r=r, alpha=alpha, dropout=dropout)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(r, d_in, generator=g))
        layer.lora_B.copy_(torch.randn(d_out, r, generator=g))
    return layer


def test_merge_with_alpha_not_equal_to_rank_adds_alpha_over_r_times_b_a():
    """r = 4, alpha = 16: the update is 4 B A, written out element by element, not B A."""
    layer = _known_layer(r=4, alpha=16)
    W, A, B = layer.base.weight.detach().clone(), layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    expected = W.clone()
    for i in range(5):
        for j in range(6):
            expected[i, j] += 4.0 * sum(B[i, k] * A[k, j] for k in range(4))  # alpha / r = 16 / 4
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        unmerged = layer(x)
        assert torch.allclose(unmerged, x @ expected.T + layer.base.bias, atol=1e-5)  # the unmerged path scales too
        layer.merge()
        assert torch.allclose(layer.base.weight, expected, atol=1e-5)
        assert torch.allclose(layer(x), unmerged, atol=1e-5)
        layer.unmerge()
    assert torch.allclose(layer.base.weight, W, atol=1e-6)  # unmerge takes out the same scaled update


def test_merge_with_alpha_not_equal_to_rank_matches_peft(tmp_path):
    """Our merge of an r = 4, alpha = 16 adapter gives the weights peft's merge_and_unload gives."""
    peft = pytest.importorskip("peft")
    model = random_model(tiny_config())
    inject_lora(model, r=4, alpha=16, targets=("q_proj", "v_proj"))
    randomise_lora(model)
    assert all(m.scaling == 4.0 for m in lora_layers(model).values())
    unmerged = logits(model)
    save_adapter(model, tmp_path / "a", module_name=hf_name)
    merged_hf = peft.PeftModel.from_pretrained(hf_twin(random_model(tiny_config())), tmp_path / "a").merge_and_unload()
    theirs = merged_hf.state_dict()
    ours = merged_state_dict(model)
    for name in ("layers.0.self_attn.q_proj.weight", "layers.1.self_attn.v_proj.weight"):
        assert (ours[name] - theirs[hf_name(name)]).abs().max().item() <= 1e-6, name
    merge_lora(model)
    for name, m in lora_layers(model).items():
        assert (m.base.weight - theirs[hf_name(name) + ".weight"]).abs().max().item() <= 1e-6, name
    assert (logits(model) - unmerged).abs().max().item() <= 1e-5
    with torch.no_grad():
        assert (merged_hf(IDS).logits - unmerged).abs().max().item() <= 1e-5
        # and the update is not negligible: dropping alpha/r would have been visible
        assert (merged_hf(IDS).logits - logits(random_model(tiny_config()))).abs().max().item() > 1e-2


def test_dropout_touches_the_lora_path_only():
    """In train mode with dropout 0.5, W x + b is computed from the undropped input."""
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    layer = _known_layer(r=2, alpha=4, dropout=0.5).train()
    with torch.random.fork_rng(), torch.no_grad():  # the dropout masks draw from the global generator
        torch.manual_seed(0)
        expected_frozen = x @ layer.base.weight.T + layer.base.bias
        y = layer(x)
        eval_y = layer.eval()(x)
        layer.train()
        # the LoRA part B h lies in the span of B's 2 columns; a dropped frozen input would not (5 outputs)
        residual = y - expected_frozen  # (64, 5)
        B = layer.lora_B
        coeffs = torch.linalg.lstsq(B, residual.T).solution  # (2, 64)
        assert (B @ coeffs - residual.T).abs().max().item() <= 1e-4
        # dropout did act on the LoRA path in train mode, and not at eval
        assert (y - eval_y).abs().max().item() > 1e-2
        assert torch.allclose(eval_y, expected_frozen + 2.0 * (x @ layer.lora_A.T) @ B.T, atol=1e-5)
        # with B = 0 the output is the frozen layer, bit for bit, dropout or not
        layer.lora_B.zero_()
        assert torch.equal(layer(x), layer.base(x))
        assert torch.allclose(layer(x), expected_frozen, atol=1e-6)


def test_a_save_without_extras_loads_none_from_an_earlier_save(tmp_path):
    """An earlier save left extra_parameters.safetensors; a later save without extras must not load it back."""
    first = random_model(tiny_config())
    inject_lora(first, r=4)
    randomise_lora(first, seed=1)
    save_adapter(first, tmp_path / "a", module_name=hf_name, extra={"lm_head_bias": torch.full((160,), 7.0)})
    second = random_model(tiny_config())
    inject_lora(second, r=4)
    randomise_lora(second, seed=2)
    save_adapter(second, tmp_path / "a", module_name=hf_name)
    loaded = random_model(tiny_config())
    assert load_adapter(loaded, tmp_path / "a", module_name=hf_name) == {}
    assert not (tmp_path / "a" / "extra_parameters.safetensors").exists()
    assert torch.equal(logits(loaded), logits(second)) and not torch.allclose(logits(loaded), logits(first), atol=1e-4)
    # and a later save with other extras replaces them whole
    save_adapter(second, tmp_path / "a", module_name=hf_name, extra={"other": torch.ones(2)})
    extra = load_adapter(random_model(tiny_config()), tmp_path / "a", module_name=hf_name)
    assert list(extra) == ["other"] and torch.equal(extra["other"], torch.ones(2))
