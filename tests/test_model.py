"""qwen_min.model against transformers' Qwen2ForCausalLM on tiny random configs."""

import pytest
import torch

from conftest import hf_twin, random_model, tiny_config, write_checkpoint
from qwen_min import KVCache, Qwen2, Qwen2Config
from qwen_min.generate import pad_left
from qwen_min.errors import UserError

CONFIGS = {
    "gqa": dict(),  # 4 query heads share 2 kv heads
    "odd_sizes": dict(vocab_size=157, dim=60, hidden_dim=97, n_heads=6, n_kv_heads=2, head_dim=10, n_layers=3),
    "mqa": dict(n_heads=4, n_kv_heads=1),
    "mha": dict(n_heads=4, n_kv_heads=4),
    "untied_head": dict(tie_embeddings=False),
    "eps_theta": dict(norm_eps=0.5, rope_theta=500.0),  # neither the defaults: every norm must be given its eps
}


def logits_pair(model, ids):
    with torch.no_grad():
        return model(ids), hf_twin(model)(ids).logits


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("lm_head_bias", [False, True])
def test_float32_logits_match_transformers(name, lm_head_bias):
    model = random_model(tiny_config(**CONFIGS[name]), lm_head_bias=lm_head_bias)
    ids = torch.randint(0, model.config.vocab_size, (3, 23), generator=torch.Generator().manual_seed(1))
    ours, ref = logits_pair(model, ids)
    assert ours.shape == (3, 23, model.config.vocab_size)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_lm_head_bias_is_used():
    model = random_model(tiny_config(), lm_head_bias=True)
    ids = torch.randint(0, 160, (1, 5))
    with torch.no_grad():
        with_bias = model(ids)
        model.lm_head_bias.zero_()
        assert not torch.allclose(with_bias, model(ids))


def test_bfloat16_is_as_accurate_as_transformers():
    """bf16 has an 8-bit mantissa (relative rounding 2^-9 ~ 0.2%), so bf16 logits differ from the
    float32 ones by far more than 1e-4, and two correct bf16 implementations round differently.
    The bound that means something: against the float32 logits, our bf16 error is no larger than
    transformers' own bf16 error (with 25% slack for rounding order), and both are small."""
    cfg = tiny_config(**CONFIGS["odd_sizes"])
    model32 = random_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = model32(ids)
        ours = random_model(cfg, dtype=torch.bfloat16)(ids).float()
        ref = hf_twin(random_model(cfg, dtype=torch.bfloat16))(ids).logits.float()
    scale = exact.abs().max().item()
    our_err, ref_err = (ours - exact).abs().max().item(), (ref - exact).abs().max().item()
    assert ours.dtype == torch.float32 and our_err > 0  # really computed in bf16
    assert our_err <= 1.25 * ref_err + 1e-3 * scale
    assert our_err <= 0.05 * scale


def test_left_padding_gives_each_row_its_unpadded_logits():
    model = random_model(tiny_config())
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20]]
    ids, mask = pad_left(rows, pad_id=0)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        for i, r in enumerate(rows):
            alone = model(torch.tensor([r]))
            assert (batched[i, -len(r):] - alone[0]).abs().max().item() <= 1e-5
        assert torch.isfinite(batched).all()  # padding queries stay finite too


def incremental_logits(model, ids, mask, chunks):
    """Feeds ids (B, T) through a KV cache in the given chunk sizes; returns logits (B, T, V)."""
    cache = KVCache.for_model(model, ids.shape[0], ids.shape[1])
    out, start = [], 0
    for n in chunks:
        m = None if mask is None else mask[:, :start + n]
        out.append(model(ids[:, start:start + n], attention_mask=m, cache=cache))
        start += n
    assert cache.length == ids.shape[1]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", ["gqa", "odd_sizes"])
def test_kv_cache_decoding_equals_full_forward_single_row(name):
    model = random_model(tiny_config(**CONFIGS[name]))
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        full = model(ids)
        step = incremental_logits(model, ids, None, [9] + [1] * 7)  # prefill 9, then decode 7 one by one
    assert (step - full).abs().max().item() <= 1e-5


def test_kv_cache_decoding_equals_full_forward_ragged_batch():
    model = random_model(tiny_config())
    rows = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [30, 31, 32, 33], [40, 41, 42, 43, 44, 45, 46]]
    ids, mask = pad_left(rows, pad_id=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        step = incremental_logits(model, ids, mask, [6, 1, 1, 1, 1])
    real = mask.bool()
    assert (step - full)[real].abs().max().item() <= 1e-5


def test_kv_cache_stores_only_kv_heads_and_refuses_overflow():
    model = random_model(tiny_config(n_heads=4, n_kv_heads=2))
    cache = KVCache.for_model(model, batch_size=2, max_seq_len=8)
    assert cache.k.shape == (2, 2, 2, 8, 16)  # (layers, batch, kv heads, slots, head_dim)
    with torch.no_grad():
        model(torch.zeros(2, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="KV cache is full"):
            model(torch.zeros(2, 3, dtype=torch.long), cache=cache)


def test_wrong_attention_mask_shape_is_refused():
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))


@pytest.mark.parametrize("bad, match", [
    (dict(n_heads=6, n_kv_heads=4), r"num_attention_heads \(6\) must be a multiple of num_key_value_heads \(4\)"),
    (dict(head_dim=15), "even"),
    (dict(n_kv_heads=0), "num_key_value_heads must be a whole number from 1"),
    (dict(vocab_size=-1), "vocab_size must be a whole number from 1"),
])
def test_impossible_configs_are_refused(bad, match):
    with pytest.raises(UserError, match=match):
        tiny_config(**bad)


@pytest.mark.parametrize("hf_update, match", [
    ({"use_sliding_window": True}, "sliding-window"),
    ({"hidden_act": "gelu"}, "silu"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling"),
    ({"model_type": "llama"}, "qwen2"),
])
def test_unsupported_hf_configs_are_refused(hf_update, match):
    hf = tiny_config().to_hf_dict() | hf_update
    with pytest.raises(UserError, match=match):
        Qwen2Config.from_hf_dict(hf)


def test_hf_config_roundtrip_and_nested_rope_parameters():
    cfg = tiny_config(rope_theta=1e6)
    assert Qwen2Config.from_hf_dict(cfg.to_hf_dict()) == cfg
    hf = cfg.to_hf_dict()
    del hf["rope_theta"]
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 12345.0}  # transformers >= 5 layout
    assert Qwen2Config.from_hf_dict(hf).rope_theta == 12345.0


def test_loading_builds_on_meta_and_runs_no_random_init(tmp_path, monkeypatch):
    """The tiny counterpart of test_real_weights.py's peak-memory test: from_pretrained never
    initialises a real tensor it would then overwrite (nn.init on a meta tensor allocates nothing),
    and every parameter ends up holding the checkpoint's values."""
    model = random_model(tiny_config())
    folder = write_checkpoint(model, tmp_path / "ckpt")
    ids = torch.randint(0, 160, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf_twin(model)(ids).logits  # (2, 9, 160), before init is refused (transformers initialises)

    def refuse_on_real_tensors(name):
        real = getattr(torch.nn.init, name)

        def init(tensor, *args, **kwargs):
            assert tensor.is_meta, f"from_pretrained ran torch.nn.init.{name} on a real {tuple(tensor.shape)} tensor"
            return real(tensor, *args, **kwargs)
        return init
    for name in ("kaiming_uniform_", "kaiming_normal_", "uniform_", "normal_", "trunc_normal_", "xavier_uniform_"):
        monkeypatch.setattr(torch.nn.init, name, refuse_on_real_tensors(name))
    loaded = Qwen2.from_pretrained(folder, lm_head_bias=True)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    saved = model.state_dict()
    for n, p in loaded.state_dict().items():
        assert torch.equal(p, torch.zeros(160) if n == "lm_head_bias" else saved[n]), n  # a fresh bias is zero
    with torch.no_grad():  # the RoPE tables, built after the meta model, are transformers'
        assert (loaded(ids) - expected).abs().max().item() <= 1e-4


# CUDA only: the GPU's bf16 kernels. The CPU counterparts are test_bfloat16_is_as_accurate_as_transformers
# (the forward) and test_generate.py's test_bfloat16_model_gets_a_bfloat16_cache_and_generates_as_full_recomputation.
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bfloat16_matches_cpu_float32():
    cfg = tiny_config()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        exact = random_model(cfg)(ids)
        gpu = random_model(cfg, dtype=torch.bfloat16).cuda()(ids.cuda()).float().cpu()
    assert (gpu - exact).abs().max().item() <= 0.05 * exact.abs().max().item()


def test_positions_and_mask_case_by_case():
    from qwen_min.model import positions_and_mask

    # no padding, nothing cached: 0..T-1 and no mask (SDPA's causal path)
    pos, mask = positions_and_mask(2, 3, 0, None, "cpu")
    assert pos.tolist() == [[0, 1, 2]] * 2 and mask is None
    # no padding, 4 cached: positions 4, 5; each new token sees the cache and the new keys up to itself
    pos, mask = positions_and_mask(1, 2, 4, None, "cpu")
    assert pos.tolist() == [[4, 5]]
    assert mask[0, 0].int().tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    # left padding: row 0 has 2 pads, then 3 real tokens; positions count real tokens only
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos, mask = positions_and_mask(2, 5, 0, am, "cpu")
    assert pos.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0],  # a padding query sees itself only
                                         [0, 1, 0, 0, 0],
                                         [0, 0, 1, 0, 0],  # the first real token: the pads are masked
                                         [0, 0, 1, 1, 0],
                                         [0, 0, 1, 1, 1]]
    # a decode step of that batch: mask over 5 cached + 1 new; row 0 is at its 4th real token
    pos, mask = positions_and_mask(2, 1, 5, torch.cat([am, torch.ones(2, 1, dtype=torch.long)], 1), "cpu")
    assert pos.tolist() == [[3], [5]] and mask[0, 0].int().tolist() == [[0, 0, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="cached \\+ new"):
        positions_and_mask(2, 1, 5, am, "cpu")


def test_the_cache_advances_once_per_forward_and_each_layer_writes_its_own_slots():
    cfg = tiny_config(n_layers=2)
    model = random_model(cfg)
    cache = KVCache.for_model(model, 1, 10)
    ids = torch.tensor([[5, 6, 7]])
    model.body(ids, cache=cache)
    assert (cache.length, cache.start) == (3, 0)
    model.body(torch.tensor([[8]]), cache=cache)
    assert (cache.length, cache.start) == (4, 3)
    assert not torch.equal(cache.k[0, :, :, :4], cache.k[1, :, :, :4])  # two layers, two sets of keys
    assert cache.k[:, :, :, 4:].abs().sum() == 0  # nothing written past the 4 tokens
    with pytest.raises(ValueError, match="KV cache is full"):
        model.body(torch.tensor([[1] * 7]), cache=cache)
