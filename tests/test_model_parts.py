"""qwen_min.model's parts and qwen_min.kv_cache one by one: RMSNorm and the RoPE tables by hand
(numpy, float64), `linear` against F.linear, the head's restricted columns and bias, loading options, and the cache's slots.

Devices: the `device=` arguments are checked on PyTorch's "meta" device (shapes only, no data),
so a tensor made on the default device instead of the one asked for fails here without a GPU.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, tiny_config, write_checkpoint
from qwen_min import KVCache, Qwen2
from qwen_min import model as qwen_model
from qwen_min.model import RMSNorm, RotaryEmbedding, linear, positions_and_mask


def test_rmsnorm_by_hand_with_its_default_eps():
    x = np.array([[3e-4, -4e-4, 0.0, 1e-3], [1.0, 2.0, -2.0, 4.0]])  # row 0: mean(x^2) ~ 3e-7, so eps = 1e-6 matters
    w = np.array([0.5, 1.5, -1.0, 2.0])
    norm = RMSNorm(4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor(w))
    expected = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * w
    got = norm(torch.tensor(x, dtype=torch.float32)).detach().double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    expected_eps = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 0.25) * w
    norm.eps = 0.25
    np.testing.assert_allclose(norm(torch.tensor(x, dtype=torch.float32)).detach().double().numpy(), expected_eps, rtol=1e-5)


def test_rmsnorm_of_bfloat16_normalises_in_float32_and_returns_bfloat16():
    """transformers' Qwen2RMSNorm: normalise in float32, cast back, then scale: bit-identical in bf16."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    x = (torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)) * 40).bfloat16()
    ours, ref = RMSNorm(64, eps=1e-5), Qwen2RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        w = 1 + 0.2 * torch.randn(64, generator=torch.Generator().manual_seed(1))
        ours.weight.copy_(w), ref.weight.copy_(w)
    ours, ref = ours.bfloat16(), ref.bfloat16()
    y = ours(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, ref(x))


def test_rope_tables_by_hand():
    hd, n, theta = 6, 11, 500.0
    rope = RotaryEmbedding(hd, n, theta)
    i = np.arange(hd // 2)
    angle = np.arange(n)[:, None] * theta ** (-2.0 * i / hd)  # (n, hd/2): position t, pair i
    angle = np.concatenate([angle, angle], -1)  # half-split layout: pair i is dims i and i + hd/2
    assert rope.cos.shape == rope.sin.shape == (n, hd) and rope.cos.dtype == torch.float32
    np.testing.assert_allclose(rope.cos.double().numpy(), np.cos(angle), atol=2e-6)
    np.testing.assert_allclose(rope.sin.double().numpy(), np.sin(angle), atol=2e-6)
    assert "cos" not in rope.state_dict() and "sin" not in rope.state_dict()  # rebuilt, never saved
    pos = torch.tensor([[3, 0], [10, 7]])
    cos, sin = rope(pos, torch.bfloat16)
    assert cos.shape == sin.shape == (2, 1, 2, hd) and cos.dtype == sin.dtype == torch.bfloat16
    assert torch.equal(cos[1, 0, 0], torch.tensor(np.cos(angle[10]), dtype=torch.float32).bfloat16())
    assert torch.equal(sin[0, 0, 0], torch.tensor(np.sin(angle[3]), dtype=torch.float32).bfloat16())


def test_rope_tables_are_made_on_the_device_asked_for():
    rope = RotaryEmbedding(8, 16, 10000.0, device="meta")
    assert rope.cos.is_meta and rope.sin.is_meta and rope.cos.shape == (16, 8)


def test_restricted_head_is_those_columns_of_the_full_head_with_their_bias():
    for tie in (True, False):
        model = random_model(tiny_config(tie_embeddings=tie), lm_head_bias=True)
        h = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(4))
        ids = torch.tensor([7, 2, 150, 2])
        w = model.embed_tokens.weight if tie else model.lm_head.weight
        with torch.no_grad():
            expected = h @ w[ids].T + model.lm_head_bias[ids]  # (2, 3, 4), by hand
            assert (model.head(h, ids) - expected).abs().max().item() <= 1e-5
            assert (model.head(h) - (h @ w.T + model.lm_head_bias)).abs().max().item() <= 1e-5
        model.lm_head_bias = None
        with torch.no_grad():
            assert (model.head(h, ids) - h @ w[ids].T).abs().max().item() <= 1e-5


def test_a_float32_bias_on_a_bfloat16_model_gives_bfloat16_logits():
    model = random_model(tiny_config(), dtype=torch.bfloat16)
    bias = model.add_lm_head_bias()
    assert bias.dtype == torch.bfloat16  # made in the model's dtype
    model.lm_head_bias = torch.nn.Parameter(torch.linspace(-1, 1, 160))  # trained in float32 (as train.py may)
    h = torch.randn(1, 2, 64).bfloat16()
    with torch.no_grad():
        out = model.head(h, torch.tensor([3, 159]))
    assert out.dtype == torch.bfloat16
    expected = h.float() @ model.embed_tokens.weight[[3, 159]].float().T + torch.tensor([-1 + 6 / 159, 1.0])
    assert (out.float() - expected).abs().max().item() <= 0.05


def test_add_lm_head_bias_adds_one_zero_trainable_bias_once():
    model = random_model(tiny_config())
    assert model.lm_head_bias is None and "lm_head_bias" not in dict(model.named_parameters())
    bias = model.add_lm_head_bias()
    assert isinstance(bias, torch.nn.Parameter) and bias.requires_grad
    assert bias.shape == (160,) and bias.dtype == torch.float32 and torch.equal(bias, torch.zeros(160))
    assert dict(model.named_parameters())["lm_head_bias"] is bias
    with torch.no_grad():
        bias.fill_(0.5)
    assert model.add_lm_head_bias() is bias and bias[0].item() == 0.5  # a second call keeps the trained one
    with torch.device("meta"):
        meta = Qwen2(tiny_config())
    assert meta.add_lm_head_bias().is_meta  # on the model's device


def test_constructor_bias_flag_and_untied_head():
    assert torch.equal(Qwen2(tiny_config(), lm_head_bias=True).lm_head_bias, torch.zeros(160))
    assert Qwen2(tiny_config()).lm_head is None
    untied = Qwen2(tiny_config(tie_embeddings=False))
    assert untied.lm_head.weight.shape == (160, 64) and untied.lm_head.bias is None
    assert untied.lm_head_weight is untied.lm_head.weight and Qwen2(tiny_config()).lm_head_weight.shape == (160, 64)


def test_checkpoint_names_are_transformers():
    assert Qwen2.checkpoint_name("layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"
    assert Qwen2.checkpoint_name("embed_tokens.weight") == "model.embed_tokens.weight"
    assert Qwen2.checkpoint_name("lm_head.weight") == "lm_head.weight"


def test_from_pretrained_passes_dtype_device_and_bias_on(tmp_path):
    model = random_model(tiny_config())
    folder = write_checkpoint(model, tmp_path / "ckpt")  # float32 on disk
    plain = Qwen2.from_pretrained(folder)
    assert plain.embed_tokens.weight.dtype == torch.float32 and plain.lm_head_bias is None
    assert torch.equal(plain.embed_tokens.weight, model.embed_tokens.weight)
    bf16 = Qwen2.from_pretrained(folder, dtype=torch.bfloat16, lm_head_bias=True)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert torch.equal(bf16.embed_tokens.weight, model.embed_tokens.weight.bfloat16())
    assert bf16.lm_head_bias.shape == (160,) and not bf16.lm_head_bias.any()
    meta = Qwen2.from_pretrained(folder, device="meta")
    assert all(p.is_meta for p in meta.parameters()) and meta.rope.cos.is_meta
    half_folder = write_checkpoint(random_model(tiny_config(), dtype=torch.bfloat16), tmp_path / "bf16")
    assert Qwen2.from_pretrained(half_folder).embed_tokens.weight.dtype == torch.float32  # float32 by default


def test_positions_and_mask_are_made_on_the_inputs_device():
    for past, am in ((0, None), (4, None), (4, torch.ones(2, 7, dtype=torch.long, device="meta"))):
        pos, mask = positions_and_mask(2, 3, past, am, "meta")
        assert pos.is_meta and pos.shape == (2, 3)
        assert mask is None if (past, am) == (0, None) else (mask.is_meta and mask.shape == (2, 1, 3, past + 3))


def test_positions_and_mask_of_padding_after_a_cache_by_hand():
    # row 0: 1 pad, 2 real cached, then 2 new real; row 1: 3 real cached, a pad-free decode of 2
    am = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos, mask = positions_and_mask(2, 2, 3, am, "cpu")
    assert pos.tolist() == [[2, 3], [3, 4]]
    assert mask.dtype == torch.bool and mask.shape == (2, 1, 2, 5)
    assert mask[0, 0].int().tolist() == [[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert mask[1, 0].int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    pos, mask = positions_and_mask(1, 3, 0, torch.tensor([[0, 0, 1]]), "cpu")  # two padding queries first
    assert pos.tolist() == [[0, 0, 0]] and mask[0, 0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    with pytest.raises(ValueError) as e:
        positions_and_mask(2, 2, 3, am[:, 1:], "cpu")
    assert str(e.value) == "attention_mask must have shape (2, 5) (cached + new tokens), got (2, 4)."


def test_kv_cache_layout_defaults_and_device():
    cache = KVCache(3, 2, 5, 7, 4)  # layers, batch, kv heads, slots, head_dim
    assert cache.k.shape == cache.v.shape == (3, 2, 5, 7, 4)
    assert cache.k.dtype == torch.float32 and cache.k.device.type == "cpu" and not cache.k.any()
    assert (cache.max_seq_len, cache.length, cache.start) == (7, 0, 0)
    assert cache.k is not cache.v
    bf16 = random_model(tiny_config(n_layers=3, n_kv_heads=1), dtype=torch.bfloat16)
    c = KVCache.for_model(bf16, batch_size=4, max_seq_len=9)
    assert c.k.shape == c.v.shape == (3, 4, 1, 9, 16) and c.k.dtype == c.v.dtype == torch.bfloat16
    with torch.device("meta"):
        meta = Qwen2(tiny_config())
    c = KVCache.for_model(meta, 1, 5)
    assert c.k.is_meta and c.v.is_meta


def test_kv_cache_append_reserves_slots_up_to_exactly_full():
    cache = KVCache(1, 1, 1, 6, 2)
    assert cache.append(4) == 0 and (cache.start, cache.length) == (0, 4)
    assert cache.append(2) == 4 and (cache.start, cache.length) == (4, 6)  # exactly full is fine
    with pytest.raises(ValueError) as e:
        cache.append(1)
    assert str(e.value) == "KV cache is full: 7 tokens do not fit in its 6 slots."
    assert (cache.start, cache.length) == (4, 6)  # a refused append moves nothing


def test_layer_views_write_their_reserved_slots_and_read_all_so_far():
    cache = KVCache(2, 1, 1, 5, 2)
    cache.append(2)
    k0, v0 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), torch.tensor([[[[5.0, 6.0], [7.0, 8.0]]]])  # (1, 1, 2, 2)
    k, v = cache.layer(1).update(k0, v0)
    assert k.tolist() == k0.tolist() and v.tolist() == v0.tolist()
    assert not cache.k[0].any() and not cache.v[0].any()  # layer 0 untouched
    cache.append(1)
    k, v = cache.layer(1).update(torch.full((1, 1, 1, 2), 9.0), torch.full((1, 1, 1, 2), -9.0))
    assert k[0, 0].tolist() == [[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]
    assert v[0, 0].tolist() == [[5.0, 6.0], [7.0, 8.0], [-9.0, -9.0]]
    assert not cache.k[1, :, :, 3:].any() and not cache.v[1, :, :, 3:].any()


def test_select_keeps_the_given_rows_of_keys_and_values():
    cache = KVCache(2, 3, 1, 4, 2)
    cache.k[:] = torch.arange(3.0)[None, :, None, None, None]  # row r holds r
    cache.v[:] = -torch.arange(3.0)[None, :, None, None, None]
    cache.length = 2
    assert cache.select(torch.tensor([2, 2, 0, 1])) is cache
    assert cache.k.shape == (2, 4, 1, 4, 2) and cache.v.shape == (2, 4, 1, 4, 2)
    assert cache.k[1, :, 0, 3, 1].tolist() == [2.0, 2.0, 0.0, 1.0]
    assert cache.v[0, :, 0, 0, 0].tolist() == [-2.0, -2.0, 0.0, -1.0]
    assert cache.length == 2


def test_the_cache_drops_only_slots_it_has():
    cache = KVCache(1, 2, 1, 6, 2)
    cache.append(4)
    cache.drop(3)
    assert cache.length == 1 and cache.append(2) == 1  # the next pass writes over the dropped slots
    for n in (-1, 4):
        with pytest.raises(ValueError, match=f"cannot drop {n} of the cache's 3 filled slots"):
            cache.drop(n)
    cache.drop(0)  # every guess kept: nothing to forget
    assert cache.length == 3
    cache.drop(3)
    assert cache.length == 0


def test_a_row_view_is_an_empty_cache_over_that_rows_memory():
    cache = KVCache(2, 3, 2, 5, 4)
    cache.append(1)
    view = cache.row(1)
    assert (view.length, view.start, view.k.shape, view.v.shape) == (0, 0, (2, 1, 2, 5, 4), (2, 1, 2, 5, 4))
    assert view.append(3) == 0 and cache.length == 1  # the view keeps its own position
    k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    view.layer(1).update(k, v)
    assert torch.equal(cache.k[1, 1, :, :3], k[0]) and torch.equal(cache.v[1, 1, :, :3], v[0])  # landed in row 1
    assert not cache.k[0].any() and not cache.k[1, [0, 2]].any() and not cache.v[1, [0, 2]].any()


def test_compact_moves_each_rows_kept_slots_to_its_front_in_every_layer_and_head():
    cache = KVCache(4, 2, 3, 6, 2)  # layers, rows, kv heads, slots, head_dim: all but slots distinct
    cache.k[:] = torch.arange(4 * 2 * 3 * 6 * 2, dtype=torch.float32).view(4, 2, 3, 6, 2)
    cache.v[:] = -cache.k
    before_k, before_v = cache.k.clone(), cache.v.clone()
    cache.length = 5
    slots = torch.tensor([[0, 2, 4], [1, 3, 4]])  # (B, n) the slots each row keeps, in order
    cache.compact(slots)
    assert cache.length == 3
    for r in range(2):
        for j, slot in enumerate(slots[r].tolist()):
            assert torch.equal(cache.k[:, r, :, j], before_k[:, r, :, slot])  # (L, K, hd) at once
            assert torch.equal(cache.v[:, r, :, j], before_v[:, r, :, slot])


def test_a_forward_pass_makes_positions_and_mask_on_the_models_device():
    with torch.device("meta"):
        model = Qwen2(tiny_config())
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")
    cache = KVCache.for_model(model, 2, 8)
    assert model(ids, cache=cache).shape == (2, 5, 160)
    out = model(ids[:, :1], attention_mask=torch.ones(2, 6, dtype=torch.long, device="meta"), cache=cache)
    assert out.is_meta and out.shape == (2, 1, 160) and cache.length == 6
    assert model(ids[:, :2], cache=cache).is_meta  # a decode step without a mask: the causal mask over the cache


def test_bfloat16_activations_get_bfloat16_rotary_tables(tmp_path):
    """transformers casts cos and sin to the activations' dtype before rotating (so q, k stay bf16).
    Loaded, the tables stay float32 (model.to(bfloat16) would cast them too, hiding the cast)."""
    folder = write_checkpoint(random_model(tiny_config()), tmp_path / "ckpt")
    model = Qwen2.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.rope.cos.dtype == torch.float32 and model.embed_tokens.weight.dtype == torch.bfloat16
    seen = []
    model.layers[1].self_attn.register_forward_pre_hook(lambda m, args: seen.append([a.dtype for a in args[:3]]))
    with torch.no_grad():
        assert model(torch.tensor([[3, 4, 5]])).dtype == torch.bfloat16
    assert seen == [[torch.bfloat16] * 3]  # x, cos, sin


@pytest.mark.parametrize("rows, out, bias", [(1, 512, True), (20, 512, False), (5, 516, False), (5, 513, True), (5, 64, True),
                                             (300, 512, True)],
                         ids=["one-row", "blocked", "blocked-no-bias", "out-not-a-multiple", "out-too-small", "many-rows"])
def test_linear_is_f_linear_in_every_case_forward_and_backward(rows, out, bias):
    """qwen-min's linear (blocks of output features as one batched product for few CPU rows, else
    F.linear): the same values and gradients as F.linear, on (2, rows, in) inputs, bias or not."""
    torch.manual_seed(0)
    x = torch.randn(2, rows, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(out, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out, dtype=torch.float64, requires_grad=True) if bias else None
    y = linear(x, w, b)
    ref = F.linear(x, w, b)
    assert y.shape == (2, rows, out) and torch.allclose(y, ref, rtol=0, atol=1e-12)
    grads = torch.autograd.grad((y * ref.detach()).sum(), [x, w] + ([b] if bias else []))
    grads_ref = torch.autograd.grad((ref * ref.detach()).sum(), [x, w] + ([b] if bias else []))
    assert all(torch.allclose(g, r, rtol=0, atol=1e-10) for g, r in zip(grads, grads_ref))


def test_linear_takes_the_blocked_path_for_few_rows_only(monkeypatch):
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(a[0].shape) or real_bmm(*a))
    w = torch.randn(512, 16)
    linear(torch.randn(3, 16), w)
    assert calls == [(qwen_model.BLOCKS, 3, 16)]  # one batched product of BLOCKS blocks
    linear(torch.randn(qwen_model.FEW_ROWS, 16), w)  # FEW_ROWS rows exactly: still blocked
    assert calls[-1] == (qwen_model.BLOCKS, qwen_model.FEW_ROWS, 16)
    calls.clear()
    linear(torch.randn(qwen_model.FEW_ROWS + 1, 16), w)  # many rows: F.linear
    linear(torch.randn(3, 16), torch.randn(16, 512).t())  # a transposed (non-contiguous) weight: F.linear
    linear(torch.randn(3, 16), torch.randn(508, 16))  # blocks of 127 output features: F.linear
    assert calls == []
    layer = qwen_model.Linear(16, 64)
    assert isinstance(layer, torch.nn.Linear) and torch.allclose(layer(torch.ones(2, 16)), F.linear(torch.ones(2, 16), layer.weight, layer.bias))


def test_a_model_with_wide_layers_takes_the_blocked_path_and_agrees(monkeypatch):
    """Tiny configs keep every layer under 512 outputs, so their models never cut products in
    blocks; here gate_proj, up_proj and the head have 512 and do. Same logits as F.linear throughout."""
    m = random_model(tiny_config(hidden_dim=512, vocab_size=512), dtype=torch.float64)
    ids = torch.randint(0, 512, (2, 5))
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(a[1].shape) or real_bmm(*a))
    blocked = m(ids)
    assert len(calls) == 2 * 2 + 1  # gate and up in each of the 2 layers, and the head
    monkeypatch.setattr(qwen_model, "FEW_ROWS", 0)  # every product through F.linear
    assert torch.allclose(blocked, m(ids), rtol=0, atol=1e-12) and len(calls) == 5


@pytest.mark.parametrize("T", [1, 2, 3, 8, 9])
def test_attention_of_a_few_queries_after_a_cache_by_hand(T, monkeypatch):
    """Decode and verify passes on a CPU (at most FEW_QUERIES new tokens a row, with a mask) take the
    grouped-query path: the result is attention worked out head by head in float64, each query head
    reading kv head h // (H / K), with left padding, a masked new token (speculative.py's hole: it
    sees itself only) and a cache; more new tokens take enable_gqa, the same result."""
    cfg = tiny_config(n_heads=6, n_kv_heads=2)
    layer = random_model(cfg, dtype=torch.float64).layers[0].self_attn
    B, past, H, K, hd = 3, 4, 6, 2, cfg.head_dim
    am = torch.ones(B, past + T, dtype=torch.long)
    am[0, :2], am[1, :3], am[2, -1] = 0, 0, 0  # rows 0 and 1 start with padding; row 2's last new token is a hole
    cache = KVCache(1, B, K, past + T, hd, dtype=torch.float64)
    torch.manual_seed(1)
    x_past, x = torch.randn(B, past, cfg.dim, dtype=torch.float64), torch.randn(B, T, cfg.dim, dtype=torch.float64)
    rope = RotaryEmbedding(hd, 64, cfg.rope_theta)
    pos, mask = positions_and_mask(B, past, 0, am[:, :past], "cpu")
    cache.append(past)
    layer(x_past, *rope(pos, torch.float64), mask, cache.layer(0))
    pos, mask = positions_and_mask(B, T, past, am, "cpu")
    cos, sin = rope(pos, torch.float64)
    cache.append(T)
    heads = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **kw: heads.append(q.shape[1]) or real(q, *a, **kw))
    y = layer(x, cos, sin, mask, cache.layer(0))
    assert heads == [K if T <= qwen_model.FEW_QUERIES else H]
    k, v = cache.k[0, :, :, :past + T], cache.v[0, :, :, :past + T]  # (B, K, S, hd), RoPE applied
    q = qwen_model.apply_rotary(layer.q_proj(x).view(B, T, H, hd).transpose(1, 2), cos, sin)  # (B, H, T, hd)
    out = torch.zeros(B, T, H, hd, dtype=torch.float64)
    for h in range(H):
        scores = q[:, h] @ k[:, h // (H // K)].transpose(1, 2) / math.sqrt(hd)  # (B, T, S)
        scores = scores.masked_fill(~mask[:, 0], float("-inf"))
        out[:, :, h] = scores.softmax(-1) @ v[:, h // (H // K)]
    torch.testing.assert_close(y, layer.o_proj(out.reshape(B, T, H * hd)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T", [1, 2, 3])
def test_a_short_unpadded_prompt_is_causal_by_hand(T, monkeypatch):
    """No mask and no cache (a prompt of equal rows): query t sees keys 0..t only. One token takes the
    grouped path (one key: nothing to hide); more take enable_gqa's causal path."""
    cfg = tiny_config(n_heads=6, n_kv_heads=2)
    layer = random_model(cfg, dtype=torch.float64).layers[0].self_attn
    B, H, K, hd = 2, 6, 2, cfg.head_dim
    torch.manual_seed(2)
    x = torch.randn(B, T, cfg.dim, dtype=torch.float64)
    pos, mask = positions_and_mask(B, T, 0, None, "cpu")
    assert mask is None
    cos, sin = RotaryEmbedding(hd, 64, cfg.rope_theta)(pos, torch.float64)
    heads = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **kw: heads.append(q.shape[1]) or real(q, *a, **kw))
    y = layer(x, cos, sin, mask)
    assert heads == [K if T == 1 else H]
    q = qwen_model.apply_rotary(layer.q_proj(x).view(B, T, H, hd).transpose(1, 2), cos, sin)
    k = qwen_model.apply_rotary(layer.k_proj(x).view(B, T, K, hd).transpose(1, 2), cos, sin)
    v = layer.v_proj(x).view(B, T, K, hd).transpose(1, 2)
    out = torch.zeros(B, T, H, hd, dtype=torch.float64)
    for h in range(H):
        scores = q[:, h] @ k[:, h // (H // K)].transpose(1, 2) / math.sqrt(hd)  # (B, T, T)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        out[:, :, h] = scores.softmax(-1) @ v[:, h // (H // K)]
    torch.testing.assert_close(y, layer.o_proj(out.reshape(B, T, H * hd)), rtol=1e-10, atol=1e-10)
