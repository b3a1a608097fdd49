"""flops.py against FlopCounterMode on the real modules (matmul view), and against hand counts (primitives).

The model is built on the meta device: shapes only, no weights, so even the 0.5B config costs
nothing to "run". On meta, scaled_dot_product_attention runs PyTorch's math path, whose batched
products FlopCounterMode sees (on CPU the fused kernel is invisible to it: it counts 0).
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import flops
from flops import Cost, Ledger, Setup
from lora.inject import inject_lora, mark_only_lora_as_trainable
from lora.layer import LoRALinear
from qwen_min import Qwen2, Qwen2Config, generate
from qwen_min.errors import run_cli
from qwen_min.loss import causal_lm_loss
from tests.conftest import random_model, tiny_config

REAL = Qwen2Config()  # Qwen2.5-0.5B's shapes


def meta_model(cfg, lora=None, lm_head_bias=False):
    with torch.device("meta"):
        model = Qwen2(cfg, lm_head_bias=lm_head_bias)
    if lora:
        for r in set(lora.values()):
            inject_lora(model, r, targets=[m for m, rr in lora.items() if rr == r])
    mark_only_lora_as_trainable(model, also=("lm_head_bias",) if lm_head_bias else ())
    return model


class Run(torch.nn.Module):
    """Calls fn as the forward of a module that owns the model, so that FlopCounterMode (which
    names modules from the first one called) names them as model.named_modules() does."""

    def __init__(self, model, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self):
        return self.fn()


def counted(model, fn):
    """(total, {module name as in model.named_modules(): flops}) that FlopCounterMode saw while fn ran."""
    with FlopCounterMode(display=False) as fc:
        Run(model, fn)()
    per_module = {k.removeprefix("Run.model."): sum(v.values()) for k, v in fc.get_flop_counts().items()
                  if k.startswith("Run.model.")}
    return fc.get_total_flops(), per_module


def forward_pass(model, B, T, head_rows=None):
    ids = torch.zeros(B, T, dtype=torch.long, device="meta")
    token_ids = None if head_rows is None else torch.arange(head_rows, device="meta")
    return lambda: model.head(model.body(ids), token_ids)


def training_step(model, B, T, head_rows=None):
    """Forward, next-token loss, backward, as qwen_min/loss.py runs them: a window of T + 1 tokens,
    the first T fed, the last T scored (flops counts T tokens)."""
    ids = torch.zeros(B, T + 1, dtype=torch.long, device="meta")
    token_ids = None if head_rows is None else torch.arange(head_rows, device="meta")

    def run():
        if token_ids is None:  # the real loss (its restricted-vocabulary check needs real tensors)
            loss = causal_lm_loss(model, ids, ids)
        else:
            logits = model.head(model.body(ids[:, :-1]), token_ids)  # (B, T, rows)
            loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
    return run


def fused_sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
    """The memory-efficient kernel, which has a meta implementation, in place of the math path.
    It needs as many kv heads as query heads, so grouped kv heads are copied out (free)."""
    assert attn_mask is None
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, is_causal=is_causal)[0]


# ---------------------------------------------------------------- matmul view == FlopCounterMode


@pytest.mark.parametrize("cfg_kw,B,T,lm_head_bias,head_rows", [
    ({}, 2, 12, False, None),
    ({}, 1, 33, True, None),
    ({"n_kv_heads": 4}, 3, 7, True, 13),  # plain multi-head attention
    ({"n_heads": 6, "n_kv_heads": 1, "tie_embeddings": False}, 2, 20, False, 13),
])
def test_forward_matmul_view_equals_flop_counter_per_module(cfg_kw, B, T, lm_head_bias, head_rows):
    cfg = tiny_config(**cfg_kw)
    model = meta_model(cfg, lm_head_bias=lm_head_bias)
    total, per_module = counted(model, forward_pass(model, B, T, head_rows))
    cost = flops.qwen2(Setup(cfg, lm_head_bias=lm_head_bias, head_rows=head_rows), B, T)
    assert cost.matmul == total
    # The ModuleList runs no forward of its own; an untied lm_head module only holds the weight
    # that Qwen2.head applies with F.linear, so FlopCounterMode books the head to Qwen2 itself.
    names = [n for n, _ in model.named_modules() if n and n not in ("layers", "lm_head")]
    assert {n for n in per_module if n} <= set(names)
    assert total - sum(per_module[f"layers.{i}"] for i in range(cfg.n_layers)) == cost["lm_head"].matmul
    for name in names:  # every module: counted ones agree, and modules FlopCounterMode saw nothing in cost nothing
        assert cost[name].matmul == per_module.get(name, 0), name


@pytest.mark.parametrize("T", [1, 16, 512])
def test_forward_matmul_view_real_config(T):
    model = meta_model(REAL)
    total, per_module = counted(model, forward_pass(model, 1, T))
    cost = flops.qwen2(Setup(REAL), 1, T)
    assert cost.matmul == total
    for name in ("layers.0", "layers.23.self_attn", "layers.5.self_attn.q_proj", "layers.9.mlp.down_proj"):
        assert cost[name].matmul == per_module[name], name


def test_lora_forward_per_module():
    cfg, lora = tiny_config(), {"q_proj": 4, "v_proj": 4, "down_proj": 2}
    model = meta_model(cfg, lora)
    total, per_module = counted(model, forward_pass(model, 2, 9))
    cost = flops.qwen2(Setup(cfg, lora), 2, 9)
    assert cost.matmul == total
    for name in ("layers.1.self_attn.q_proj", "layers.1.self_attn.q_proj.base", "layers.0.mlp.down_proj",
                 "layers.0.mlp.down_proj.base", "layers.1.self_attn.v_proj"):
        assert cost[name].matmul == per_module[name], name


# FlopCounterMode attributes forward flops to modules exactly, but its backward attribution leaks
# between sibling leaves (a LoRA layer's backward lands partly in its dropout or a neighbour). So
# the training step is checked in total and per decoder block, attention and MLP; the leaves'
# backward is checked one module at a time below.
TRAIN_CASES = [
    (tiny_config(), {"q_proj": 4, "v_proj": 4}, False, None, 2, 12),
    (tiny_config(), {"q_proj": 1, "v_proj": 1}, True, None, 1, 30),
    (tiny_config(), {"k_proj": 2, "o_proj": 2, "up_proj": 3}, False, 13, 2, 8),
    (tiny_config(n_layers=3), {"down_proj": 8}, True, 13, 2, 5),  # layer 0's attention gets no backward
    (tiny_config(), {"gate_proj": 2}, False, None, 3, 6),
    (tiny_config(), {}, True, None, 2, 6),  # only the head bias trains
]


@pytest.mark.parametrize("cfg,lora,lm_head_bias,head_rows,B,T", TRAIN_CASES)
def test_training_step_matmul_view_equals_flop_counter(cfg, lora, lm_head_bias, head_rows, B, T):
    model = meta_model(cfg, lora, lm_head_bias)
    total, per_module = counted(model, training_step(model, B, T, head_rows))
    s = Setup(cfg, lora, lm_head_bias, head_rows, kernel="math")
    cost = flops.forward_backward(s, B, T)
    assert cost.matmul == total
    for i in range(cfg.n_layers):
        for name in (f"layers.{i}", f"layers.{i}.self_attn", f"layers.{i}.mlp"):
            assert cost[name].matmul == per_module.get(name, 0), name
    step = flops.train_step(s, B, T)
    assert step.matmul == total and step["backward"].matmul == total - flops.qwen2(s, B, T).matmul


@pytest.mark.parametrize("T,r,targets,bias", [(64, 8, ("q_proj", "v_proj"), False), (128, 2, ("q_proj", "v_proj"), True),
                                             (32, 4, ("k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), False)])
def test_training_step_real_config(T, r, targets, bias):
    lora = dict.fromkeys(targets, r)
    model = meta_model(REAL, lora, bias)
    total, per_module = counted(model, training_step(model, 1, T))
    cost = flops.forward_backward(Setup(REAL, lora, bias, kernel="math"), 1, T)
    assert cost.matmul == total
    for name in ("layers.0", "layers.0.self_attn", "layers.1.self_attn", "layers.23.mlp"):
        assert cost[name].matmul == per_module[name], name


@pytest.mark.parametrize("r,grad_input", [(0, True), (3, True), (3, False)])
def test_linear_backward_one_module(r, grad_input):
    n, d_in, d_out = 10, 12, 7
    layer = torch.nn.Linear(d_in, d_out, bias=True, device="meta")
    layer.requires_grad_(False)
    if r:
        layer = LoRALinear(layer, r)
    x = torch.empty(2, n // 2, d_in, device="meta", requires_grad=grad_input)
    with FlopCounterMode(display=False) as fc:
        y = layer(x)
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        y.sum().backward()
    assert fwd == flops.projection(Setup(tiny_config(), {"q_proj": r}), "q_proj", n, d_in, d_out, bias=True).matmul
    assert fc.get_total_flops() == flops.linear_backward(n, d_in, d_out, r, grad_input).matmul


@pytest.mark.parametrize("need", [(True, True, True), (True, False, True), (False, False, True), (False, True, False)])
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_backward_math_kernel(need, masked):
    B, H, T, S, hd = 2, 3, 5, 9, 4
    q, k, v = (torch.empty(B, H, L, hd, device="meta", requires_grad=g) for L, g in zip((T, S, S), need))
    mask = torch.ones(B, 1, T, S, dtype=torch.bool, device="meta") if masked else None
    with FlopCounterMode(display=False) as fc:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        y.sum().backward()
    expected = (flops.scaled_dot_product_attention(B, H, T, S, hd)
                + flops.scaled_dot_product_attention_backward(B, H, T, S, hd, *need, kernel="math"))
    assert fc.get_total_flops() == expected.matmul


def test_sdpa_fused_kernel_counts():
    """The flash / memory-efficient kernels: FlopCounterMode's formula, all three gradients, scores recomputed."""
    B, H, T, hd = 2, 3, 8, 16
    q, k, v = (torch.empty(B, H, T, hd, device="meta", requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as fc:
        out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, is_causal=True)
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        out[0].sum().backward()
    assert fwd == flops.scaled_dot_product_attention(B, H, T, T, hd).matmul
    bwd = flops.scaled_dot_product_attention_backward(B, H, T, T, hd, False, False, True, kernel="fused")
    assert fc.get_total_flops() == bwd.matmul == 5 * 2 * B * H * T * T * hd


@pytest.mark.parametrize("cfg,lora,T", [(tiny_config(), {"q_proj": 4, "v_proj": 4}, 10), (REAL, {"q_proj": 8, "v_proj": 8}, 64)])
def test_training_step_with_fused_attention(monkeypatch, cfg, lora, T):
    """kernel="fused" (the default) against the whole model with the memory-efficient kernel."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", fused_sdpa)
    model = meta_model(cfg, lora, lm_head_bias=True)
    total, per_module = counted(model, training_step(model, 2, T))
    cost = flops.forward_backward(Setup(cfg, lora, lm_head_bias=True), 2, T)
    assert cost.matmul == total
    assert cost["layers.0.self_attn"].matmul == per_module["layers.0.self_attn"]
    assert cost.matmul > flops.forward_backward(Setup(cfg, lora, lm_head_bias=True, kernel="math"), 2, T).matmul


def test_generation_with_samples_and_finished_rows_equals_flop_counter():
    """One prefill shared by 3 samples per prompt; rows leave the batch at their 2nd token 7."""
    cfg = tiny_config()
    model = random_model(cfg)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    kw = dict(max_new_tokens=10, temperature=1.5, seed=0, num_samples=3, stop_token_ids=[], stop_after=(7, 2),
              allowed_token_ids=[7, 8, 9])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        gen = generate(model, prompts, details=True, **kw)
    n = gen.tokens.shape[1] - 7
    active = [sum(length > j for length in gen.lengths) for j in range(n)]  # rows still going at step j, from lengths
    assert gen.active == active and len(set(gen.lengths)) > 1 and active[-1] < 6  # rows finished at different steps
    assert fc.get_total_flops() == flops.generate(Setup(cfg, head_rows=3), 2, 7, n, samples=3, active=active).matmul


def test_generation_with_kv_cache_equals_flop_counter():
    """qwen_min.generate on a tiny real model, math attention so FlopCounterMode sees it; padded prompts."""
    cfg = tiny_config()
    model = random_model(cfg)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    allowed = list(range(20, 33))
    for head_rows, kw in [(None, {}), (13, {"allowed_token_ids": allowed})]:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            out = generate(model, prompts, max_new_tokens=6, stop_token_ids=[-1], **kw)
        assert out.shape == (2, 7 + 6)
        assert fc.get_total_flops() == flops.generate(Setup(cfg, head_rows=head_rows), 2, 7, 6).matmul


def test_generation_without_cache_equals_flop_counter():
    cfg = tiny_config()
    model = random_model(cfg)
    ids = torch.randint(2, cfg.vocab_size, (3, 5))
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        for _ in range(4):  # the whole sequence again for every new token
            logits = model.head(model.body(ids)[:, -1:])
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    cost = flops.generate(Setup(cfg), 3, 5, 4, kv_cache=False)
    assert fc.get_total_flops() == cost.matmul
    assert cost.matmul > flops.generate(Setup(cfg), 3, 5, 4).matmul


# ---------------------------------------------------------------- primitive view, counted by hand


def test_primitives_by_hand():
    assert flops.matmul(2, 3, 4).coursework == 2 * 4 * (2 * 3 - 1) == 40
    assert flops.matmul(2, 3, 4).ops == {"mul": 24, "add": 16}
    assert flops.linear(2, 3, 4, bias=True).coursework == 40 + 8
    # RMSNorm, 2 rows of 3: x^2 6 mul; mean 2x2 add + 2 div; +eps 2 add; rsqrt 2 sqrt + 2 div; x*r 6 mul; w* 6 mul
    assert flops.rms_norm(2, 3).ops == {"mul": 18, "add": 6, "div": 4, "sqrt": 2}
    assert flops.rms_norm(2, 3).coursework == 18 + 6 + 4 + 20
    # softmax of one row of 3: max 2 cmp, subtract 3, exp 3 (x10), sum 2, divide 3
    assert flops.softmax(1, 3).coursework == 2 + 3 + 30 + 2 + 3
    assert flops.silu(1).coursework == 1 + 10 + 1 + 1  # negate, exp, + 1, divide
    # q k^T (2x2)(2x2) = 12, scale 4, mask 4, softmax of 2 rows of 2 = 2 + 4 + 40 + 2 + 4, p v 12
    assert flops.scaled_dot_product_attention(1, 1, 2, 2, 2).coursework == 12 + 4 + 4 + 52 + 12
    assert flops.scaled_dot_product_attention(3, 5, 2, 2, 2).coursework == 15 * 84
    # rotary on 1 vector of 4: x*cos 4, negate 2, *sin 4, + 4
    assert flops.apply_rotary(1, 4).ops == {"mul": 8, "add": 6}
    # cross-entropy, 1 row of 3: max 2 cmp, -max 3, exp 3, sum 2, log 1, z - lse 3, negate 1, mean 1 div
    assert flops.cross_entropy(1, 3).coursework == 2 + 3 + 30 + 2 + 10 + 3 + 1 + 1
    # AdamW per number: mul 7, add 4, div 2, sqrt 1
    assert flops.adamw(5).ops == {"mul": 35, "add": 20, "div": 10, "sqrt": 5}
    # LoRA on 2 rows, 3 -> 4, r 1: base 40, x A^T (2x3)(3x1) 10, scale 2, h B^T (2x1)(1x4) 8, add 8
    assert flops.lora_linear(2, 3, 4, 1).coursework == 40 + 10 + 2 + 8 + 8


def test_decoder_block_by_hand():
    cfg = Qwen2Config(vocab_size=10, dim=4, hidden_dim=6, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=2)
    c = flops.decoder_block(Setup(cfg), 1, 2)  # 2 tokens
    by_hand = {
        "input_layernorm": 24 + 8 + 4 + 20,  # 3 n D mul, n D add, 2 n div, n sqrt (x10)
        "self_attn": (2 * 4 * 7 + 8)  # q_proj (2x4)(4x4) + bias
        + 2 * (2 * 2 * 7 + 4)  # k_proj, v_proj (2x4)(4x2) + bias
        + 28 + 14  # rotary: 4 query vectors and 2 key vectors of 2 numbers, 7 ops per number
        + 2 * 84  # attention, 2 heads of 2 x 2 (see test_primitives_by_hand)
        + 2 * 4 * 7,  # o_proj
        "residual_attn": 8,
        "post_attention_layernorm": 56,
        "mlp": 2 * (2 * 6 * 7) + 12 * 13 + 12 + 2 * 4 * 11,  # gate, up, silu (13 each), product, down
        "residual_mlp": 8,
    }
    assert {k: p.coursework for k, p in c.parts.items() if p.ops} == by_hand
    assert c.coursework == sum(by_hand.values()) == 946
    assert c.matmul == 64 + 32 + 32 + 2 * 32 + 64 + 3 * 96


def test_backward_by_hand():
    # frozen linear, input grad only: dx = dy W, (2x4)(4x3)
    assert flops.linear_backward(2, 3, 4, 0, grad_input=True).coursework == 2 * 3 * 7
    assert flops.linear_backward(2, 3, 4, 0, grad_input=False) == Cost()
    # LoRA r=1, no input grad: dB (4x2)(2x1) 12, dh (2x4)(4x1) 14, scale 2, dA (1x2)(2x3) 9
    assert flops.linear_backward(2, 3, 4, 1, grad_input=False).coursework == 12 + 14 + 2 + 9
    # ... with input grad: + dy W 42, dh A (2x1)(1x3) 6, sum 6
    assert flops.linear_backward(2, 3, 4, 1, grad_input=True).coursework == 37 + 42 + 6 + 6
    # softmax backward, 1 row of 3: dp*p 3, sum 2, subtract 3, * p 3
    assert flops.softmax_backward(1, 3).coursework == 11
    assert flops.silu_backward(1).coursework == 4 + 10 + 1 + 3


def test_backward_follows_requires_grad():
    cfg = tiny_config()
    qv = {"q_proj": 4, "v_proj": 4}
    block0 = flops.decoder_block_backward(Setup(cfg, qv), 1, 8, grad_input=False)
    block1 = flops.decoder_block_backward(Setup(cfg, qv), 1, 8, grad_input=True)
    assert flops.block_needs_grad(Setup(cfg, qv), False) and flops.block_needs_grad(Setup(cfg, qv), True)
    assert block0["self_attn.k_proj"] == Cost() and block1["self_attn.k_proj"].matmul > 0
    assert block0["input_layernorm"] == Cost() and block1["input_layernorm"].coursework > 0
    assert block0.matmul < block1.matmul
    only_mlp = flops.decoder_block_backward(Setup(cfg, {"down_proj": 2}), 1, 8, grad_input=False)
    assert flops.block_needs_grad(Setup(cfg, {"down_proj": 2}), False) and only_mlp["self_attn"] == Cost() and only_mlp["mlp.down_proj"].matmul > 0
    assert flops.backward(Setup(cfg), 1, 8) == Cost()


# ---------------------------------------------------------------- every term, forward and backward, by hand (issue #11)
# SMALL has sizes that differ from each other (D 6, H 3, K 1, hd 4 so H hd = 12 != D, F 9, V 17) and a
# batch of B 2 x T 5 (n = 10 rows), LoRA rank 2. Each expected count below is worked out by hand from
# the coursework's rules (add, subtract, negate, multiply, divide 1; exp, log, sqrt 10; an (m x n)(n x p)
# product m n p multiplies and m p (n - 1) adds) and from what autograd computes for each op; the
# comments give the arithmetic. Every primitive is pinned separately (not only the weighted total), so
# dropping a term, changing its coefficient or booking it as another primitive changes a tested number.

SMALL = Qwen2Config(vocab_size=17, dim=6, hidden_dim=9, n_layers=2, n_heads=3, n_kv_heads=1, head_dim=4, max_seq_len=64)
QV2 = {"q_proj": 2, "v_proj": 2}


def prims(cost):
    """The primitive counts of a Cost, zero entries dropped."""
    return {k: v for k, v in cost.ops.items() if v}


def plus(*counts):
    """Primitive counts (dicts) added up."""
    out = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return {k: v for k, v in out.items() if v}


def part_prims(cost):
    """{part name: primitive counts} of a Cost's named parts."""
    return {name: prims(p) for name, p in cost.parts.items()}


# RMSNorm on 10 rows of 6 (SMALL's n, D).
#   forward: x^2 60 mul; mean 10 x 5 add + 10 div; + eps 10 add; rsqrt 10 sqrt + 10 div; x * r 60 mul; weight * 60 mul
RMS_FWD = {"mul": 60 + 60 + 60, "add": 50 + 10, "div": 10 + 10, "sqrt": 10}
#   backward, the weight frozen (dx only), the forward in reverse:
#     weight * x^:  dx^ = dy * weight                                    60 mul
#     x * r:        dx = dx^ r (60 mul); dr = sum_j dx^ x: 60 mul + 10 x 5 add
#     rsqrt(u):     du = dr * (-1/2) r^3: r^3 2 mul, * -1/2 1, * dr 1 -> 4 x 10 = 40 mul
#     + eps: free;  mean: dm / 6, once per row, then broadcast           10 div
#                   (autograd's mean backward divides after broadcasting, 60 div; flops.py counts the
#                   10 the math needs, and so does this test)
#     x^2:          2 x * dm                                             2 x 60 = 120 mul
#     x feeds x^2 and x * r: the two gradients summed                    60 add
RMS_BWD = {"mul": 60 + 60 + 60 + 40 + 120, "add": 50 + 60, "div": 10}

# Cross-entropy, 10 rows of 17 logits, mean over the 10.
#   forward: max 10 x 16 cmp; - max 170 add; exp 170; sum 10 x 16 add; log 10; z - logsumexp 170 add;
#            -logp[target] 10 add; mean: 9 add + 1 div
CE_FWD = {"cmp": 160, "add": 170 + 160 + 170 + 10 + 9, "exp": 170, "log": 10, "div": 1}
#   backward: d logp = -1/10 at each target: 1 div, 10 negations; log_softmax: sum of d logp per row 10 x 16
#             add, exp(logp) 170 exp, * that sum 170 mul, d logp - ... 170 add
CE_BWD = {"div": 1, "add": 10 + 160 + 170, "exp": 170, "mul": 170}


def test_rms_norm_forward_and_backward_by_hand():
    assert prims(flops.rms_norm(10, 6)) == RMS_FWD == {"mul": 180, "add": 60, "div": 20, "sqrt": 10}
    assert flops.rms_norm(10, 6).coursework == 180 + 60 + 20 + 10 * 10
    assert prims(flops.rms_norm_backward(10, 6)) == RMS_BWD == {"mul": 340, "add": 110, "div": 10}
    assert flops.rms_norm_backward(10, 6).coursework == 460
    assert flops.rms_norm(10, 6).matmul == flops.rms_norm_backward(10, 6).matmul == 0  # no products


def test_rotary_forward_and_backward_by_hand():
    # 30 vectors of head_dim 4 (SMALL's queries: 2 x 3 heads x 5 tokens)
    assert prims(flops.rotate_half(30, 4)) == {"add": 60}  # negate one half: 30 x 2
    # x * cos 120 mul; rotate_half 60 negations; * sin 120 mul; + 120 add
    assert prims(flops.apply_rotary(30, 4)) == {"mul": 240, "add": 180}
    # backward (cos, sin need no gradient): dy * cos 120 mul; dy * sin 120 mul; rotate_half^T negates one
    # half 60 add; the two paths into x summed 120 add
    assert prims(flops.apply_rotary_backward(30, 4)) == {"mul": 240, "add": 180}
    assert prims(flops.apply_rotary_backward(10, 8)) == {"mul": 160, "add": 40 + 80}
    assert flops.rotary_embedding(10, 6) == Cost()  # the tables are looked up: free


def test_softmax_silu_cross_entropy_by_hand():
    # softmax, 6 rows of 7: max 6 x 6 cmp; subtract 42; exp 42; sum 6 x 6; divide 42
    assert prims(flops.softmax(6, 7)) == {"cmp": 36, "add": 42 + 36, "exp": 42, "div": 42}
    # backward p * (dp - sum(dp * p)): dp * p 42 mul; sum 6 x 6 add; subtract 42 add; * p 42 mul
    assert prims(flops.softmax_backward(6, 7)) == {"mul": 84, "add": 36 + 42}
    # silu x / (1 + exp(-x)) on 7 numbers: negate 7, exp 7, + 1 7, divide 7
    assert prims(flops.silu(7)) == {"add": 14, "exp": 7, "div": 7}
    # backward dy * s (1 + x (1 - s)), s recomputed (negate, exp, + 1, divide): then 1 - s 7 add,
    # x (1 - s) 7 mul, 1 + 7 add, s * 7 mul, dy * 7 mul
    assert prims(flops.silu_backward(7)) == {"add": 14 + 7 + 7, "exp": 7, "div": 7, "mul": 21}
    assert prims(flops.cross_entropy(10, 17)) == CE_FWD == {"cmp": 160, "add": 519, "exp": 170, "log": 10, "div": 1}
    assert prims(flops.cross_entropy_backward(10, 17)) == CE_BWD == {"div": 1, "add": 340, "exp": 170, "mul": 170}


def test_sdpa_forward_and_backward_by_hand():
    """B 2, H 3 (6 heads in all), T 5 queries, S 7 keys, head_dim 4."""
    fwd = flops.scaled_dot_product_attention(2, 3, 5, 7, 4)
    assert part_prims(fwd) == {
        # q k^T (5x4)(4x7) per head: 140 mul + 5 x 7 x 3 add, x 6; * scale 6 x 35 = 210 mul
        "scores": {"mul": 840 + 210, "add": 630},
        "mask": {"add": 210},  # + attn_bias on every score
        "softmax": {"cmp": 30 * 6, "add": 210 + 30 * 6, "exp": 210, "div": 210},  # 30 rows of 7
        "weighted_sum": {"mul": 840, "add": 6 * 5 * 4 * 6},  # p v (5x7)(7x4) per head
    }
    assert fwd.matmul == 2 * 840 + 2 * 840
    dq_dv_dk = {  # math kernel, every gradient
        "recompute": {},
        # dp = dy v^T (5x4)(4x7): 840 mul, 630 add; dv = p^T dy (7x5)(5x4): 840 mul, 6 x 7 x 4 x 4 = 672 add
        "weighted_sum": {"mul": 1680, "add": 630 + 672},
        "softmax": {"mul": 420, "add": 30 * 6 + 210},  # backward of 30 rows of 7
        "mask": {},  # the additive mask needs no gradient
        # dz * scale 210 mul; dq = dz k (5x7)(7x4): 840 mul, 6 x 5 x 4 x 6 = 720 add; dk = dz^T q (7x5)(5x4): 840, 672
        "scores": {"mul": 210 + 840 + 840, "add": 720 + 672},
    }
    math = flops.scaled_dot_product_attention_backward(2, 3, 5, 7, 4, kernel="math")
    assert part_prims(math) == dq_dv_dk
    assert math.matmul == 2 * 4 * 840
    # only the gradients asked for: dq needs dp, the softmax and the scale; dv needs neither
    assert part_prims(flops.scaled_dot_product_attention_backward(2, 3, 5, 7, 4, True, False, False, kernel="math")) == {
        "recompute": {}, "weighted_sum": {"mul": 840, "add": 630}, "softmax": dq_dv_dk["softmax"], "mask": {},
        "scores": {"mul": 210 + 840, "add": 720}}
    assert part_prims(flops.scaled_dot_product_attention_backward(2, 3, 5, 7, 4, False, True, False, kernel="math")) == {
        "recompute": {}, "weighted_sum": {"mul": 840, "add": 630}, "softmax": dq_dv_dk["softmax"], "mask": {},
        "scores": {"mul": 210 + 840, "add": 672}}
    assert part_prims(flops.scaled_dot_product_attention_backward(2, 3, 5, 7, 4, False, False, True, kernel="math")) == {
        "recompute": {}, "weighted_sum": {"mul": 840, "add": 672}, "softmax": {}, "mask": {}, "scores": {}}
    # fused: the scores recomputed (q k^T, scale, mask, softmax) and dq, dk, dv always
    fused = flops.scaled_dot_product_attention_backward(2, 3, 5, 7, 4, False, False, True, kernel="fused")
    assert part_prims(fused) == {**dq_dv_dk, "recompute": {"mul": 840 + 210, "add": 630 + 210 + 30 * 6 + 210,
                                                           "cmp": 180, "exp": 210, "div": 210}}
    assert fused.matmul == 2 * 5 * 840


# Attention of SMALL on 2 x 5 tokens (n = 10), LoRA rank 2 on q_proj and v_proj, forward.
ATTN_FWD = {
    # q_proj 6 -> 12: (10x6)(6x12) 720 mul + 10 x 12 x 5 = 600 add, bias 120 add; x A^T (10x6)(6x2) 120 mul
    # + 100 add; * alpha/r 20 mul; . B^T (10x2)(2x12) 240 mul + 120 add; + 120 add
    "q_proj": {"mul": 720 + 120 + 20 + 240, "add": 600 + 120 + 100 + 120 + 120},
    "k_proj": {"mul": 240, "add": 200 + 40},  # (10x6)(6x4) + bias
    # v_proj 6 -> 4: base 240 mul, 240 add; x A^T 120, 100; * alpha/r 20; . B^T (10x2)(2x4) 80 mul + 40 add; + 40
    "v_proj": {"mul": 240 + 120 + 20 + 80, "add": 240 + 100 + 40 + 40},
    "rotary": {"mul": 320, "add": 240},  # 30 query vectors and 10 key vectors of 4: 8 mul and 6 add each
    # 6 heads of 5 x 5: q k^T 600 mul + 450 add, scale 150 mul, mask 150 add, softmax of 30 rows of 5
    # (120 cmp, 150 + 120 add, 150 exp, 150 div), p v 600 mul + 6 x 5 x 4 x 4 = 480 add
    "sdpa": {"mul": 600 + 150 + 600, "add": 450 + 150 + 270 + 480, "cmp": 120, "exp": 150, "div": 150},
    "o_proj": {"mul": 720, "add": 10 * 6 * 11},  # (10x12)(12x6), no bias
}
# ... backward, layer 1 (its input needs a gradient), math kernel
ATTN_BWD = {
    # dx = dy W (10x12)(12x6) 720 mul, 660 add; dB = dy^T h (12x10)(10x2) 240 mul, 216 add; dh = dy B
    # (10x12)(12x2) 240 mul, 220 add; * alpha/r 20 mul; dA = dh^T x (2x10)(10x6) 120 mul, 108 add;
    # dx += dh A (10x2)(2x6) 120 mul, 60 add, + 60 add
    "q_proj": {"mul": 720 + 480 + 20 + 240, "add": 660 + 436 + 108 + 60 + 60},
    "k_proj": {"mul": 240, "add": 10 * 6 * 3},  # dx = dy W (10x4)(4x6)
    # base (10x4)(4x6) 240, 180; dB (4x10)(10x2) 80, 72; dh (10x4)(4x2) 80, 60; 20; dA 120, 108; dh A 120, 60 + 60
    "v_proj": {"mul": 240 + 160 + 20 + 240, "add": 180 + 132 + 108 + 60 + 60},
    "inputs": {"add": 2 * 60},  # dx of q, k and v summed
    "rotary": {"mul": 320, "add": 240},  # backward of the 30 query and 10 key rotations
    "gqa_sum": {"add": 80 + 80},  # 3 query heads per kv head: 2 adds for each of the 40 numbers of dk, of dv
    # dp 600, 450; dv 600, 480; softmax 300 mul, 120 + 150 add; scale 150; dq 600, 480; dk 600, 480
    "sdpa": {"mul": 1200 + 300 + 150 + 1200, "add": 930 + 270 + 960},
    "o_proj": {"mul": 720, "add": 10 * 12 * 5},  # dx = dy W (10x6)(6x12)
}
# ... backward, layer 0 (its input needs none): LoRA gradients only, no dk
ATTN_BWD_FIRST = {
    "q_proj": {"mul": 480 + 20 + 120, "add": 436 + 108},  # dB, dh, * alpha/r, dA
    "k_proj": {},
    "v_proj": {"mul": 160 + 20 + 120, "add": 132 + 108},
    "inputs": {},
    "rotary": {"mul": 240, "add": 180},  # the queries only
    "gqa_sum": {"add": 80},  # dv only
    "sdpa": {"mul": 1200 + 300 + 150 + 600, "add": 930 + 270 + 480},  # dp, dv, softmax, scale, dq
    "o_proj": {"mul": 720, "add": 600},
}


def test_attention_forward_by_hand():
    cost = flops.attention(Setup(SMALL, QV2), 2, 5)
    assert part_prims(cost) == ATTN_FWD
    assert cost.matmul == 2 * (720 + 120 + 240 + 240 + 240 + 120 + 80 + 600 + 600 + 720)


def test_attention_backward_by_hand():
    top = flops.attention_backward(Setup(SMALL, QV2, kernel="math"), 2, 5, grad_input=True)
    assert part_prims(top) == ATTN_BWD
    assert prims(top) == plus(*ATTN_BWD.values())
    first = flops.attention_backward(Setup(SMALL, QV2, kernel="math"), 2, 5, grad_input=False)
    assert part_prims(first) == ATTN_BWD_FIRST
    # fused kernel: dk too, and the scores recomputed (q k^T 600, 450; scale 150; mask 150; softmax)
    fused = flops.attention_backward(Setup(SMALL, QV2, kernel="fused"), 2, 5, grad_input=False)
    assert part_prims(fused) == {**ATTN_BWD_FIRST, "sdpa": plus(ATTN_BWD["sdpa"], {
        "mul": 600 + 150, "add": 450 + 150 + 270, "cmp": 120, "exp": 150, "div": 150})}
    # LoRA on o_proj only, input needing no gradient: o_proj's LoRA gradients and nothing under them:
    # dB = dy^T h (6x10)(10x2) 120 mul, 108 add; dh = dy B (10x6)(6x2) 120, 100; * alpha/r 20; dA = dh^T y
    # (2x10)(10x12) 240 mul, 216 add; no dy of the attention output, so no SDPA, RoPE or q, k, v backward
    o_only = flops.attention_backward(Setup(SMALL, {"o_proj": 2}), 2, 5, grad_input=False)
    assert {k: v for k, v in part_prims(o_only).items() if v} == {"o_proj": {"mul": 120 + 120 + 20 + 240,
                                                                              "add": 108 + 100 + 216}}
    # nothing trainable in or under it: no backward at all
    assert flops.attention_backward(Setup(SMALL, {"down_proj": 2}), 2, 5, grad_input=False) == Cost()


def test_gqa_backward_sums_each_kv_heads_queries():
    """6 query heads on 2 kv heads (3 per kv head), B 3 x T 5, head_dim 4: dk and dv are summed over the
    3 query heads that read each kv head, 2 adds for each of their 3 x 2 x 5 x 4 = 120 numbers."""
    cfg = Qwen2Config(vocab_size=17, dim=6, hidden_dim=9, n_layers=1, n_heads=6, n_kv_heads=2, head_dim=4)
    c = flops.attention_backward(Setup(cfg, {"k_proj": 2}, kernel="math"), 3, 5, grad_input=False)
    assert prims(c["gqa_sum"]) == {"add": 240}  # dk only: v needs no gradient
    assert prims(c["rotary"]) == {"mul": 240, "add": 180}  # the 30 key vectors' rotation only
    c = flops.attention_backward(Setup(cfg, {"k_proj": 2}, kernel="math"), 3, 5, grad_input=True)
    assert prims(c["gqa_sum"]) == {"add": 480}
    # 90 query vectors and 30 key vectors of 4: 8 mul and 6 add each
    assert prims(c["rotary"]) == {"mul": 8 * 120, "add": 6 * 120}


# MLP of SMALL on 10 rows (D 6, F 9), no LoRA.
MLP_FWD = {
    "gate_proj": {"mul": 540, "add": 10 * 9 * 5},  # (10x6)(6x9)
    "silu": {"add": 180, "exp": 90, "div": 90},  # 90 numbers: negate, exp, + 1, divide
    "up_proj": {"mul": 540, "add": 450},
    "product": {"mul": 90},
    "down_proj": {"mul": 540, "add": 10 * 6 * 8},  # (10x9)(9x6)
}
MLP_BWD = {
    "gate_proj": {"mul": 540, "add": 10 * 6 * 8},  # dx = dy W (10x9)(9x6)
    "silu": {"add": 360, "mul": 270, "exp": 90, "div": 90},  # 90 numbers, 4 add 3 mul 1 exp 1 div each
    "up_proj": {"mul": 540, "add": 480},
    "product": {"mul": 180},  # d silu = dy * up, d up = dy * silu
    "inputs": {"add": 60},  # dx of gate and up summed
    "down_proj": {"mul": 540, "add": 10 * 9 * 5},  # dx = dy W (10x6)(6x9)
}


def test_mlp_forward_and_backward_by_hand():
    assert part_prims(flops.mlp(Setup(SMALL), 10)) == MLP_FWD
    assert part_prims(flops.mlp_backward(Setup(SMALL), 10, grad_input=True)) == MLP_BWD
    # LoRA on down_proj, input needing no gradient: x A^T (10x9)(9x2) 180 mul, 160 add; * alpha/r 20;
    # . B^T (10x2)(2x6) 120 mul, 60 add; + 60 add
    assert prims(flops.mlp(Setup(SMALL, {"down_proj": 2}), 10)["down_proj"]) == {"mul": 540 + 180 + 20 + 120,
                                                                         "add": 480 + 160 + 60 + 60}
    # backward: dB = dy^T h (6x10)(10x2) 120 mul, 108 add; dh = dy B (10x6)(6x2) 120, 100; * alpha/r 20;
    # dA = dh^T x (2x10)(10x9) 180 mul, 162 add; nothing below it needs a gradient
    down = flops.mlp_backward(Setup(SMALL, {"down_proj": 2}), 10, grad_input=False)
    assert part_prims(down) == {"gate_proj": {}, "silu": {}, "up_proj": {}, "product": {}, "inputs": {},
                                "down_proj": {"mul": 240 + 20 + 180, "add": 208 + 162}}
    # LoRA on gate_proj: down's dx, d silu (not d up), silu's backward, gate's dB, dh, scale, dA:
    # dB (9x10)(10x2) 180, 162; dh (10x9)(9x2) 180, 160; 20; dA (2x10)(10x6) 120, 108
    lora_gate = {"mul": 360 + 20 + 120, "add": 322 + 108}
    gate = flops.mlp_backward(Setup(SMALL, {"gate_proj": 2}), 10, grad_input=False)
    assert part_prims(gate) == {**MLP_BWD, "gate_proj": lora_gate, "up_proj": {}, "product": {"mul": 90}, "inputs": {}}
    up = flops.mlp_backward(Setup(SMALL, {"up_proj": 2}), 10, grad_input=False)
    assert part_prims(up) == {**MLP_BWD, "gate_proj": {}, "silu": {}, "up_proj": lora_gate, "product": {"mul": 90},
                              "inputs": {}}
    assert flops.mlp_backward(Setup(SMALL, {"q_proj": 2}), 10, grad_input=False) == Cost()


def test_lora_forward_and_backward_by_hand():
    """LoRALinear on 10 rows, 6 -> 12, rank 2, with a (frozen) bias."""
    fwd = flops.lora_linear(10, 6, 12, 2, bias=True)
    assert part_prims(fwd) == {
        "base": {"mul": 720, "add": 600 + 120},  # (10x6)(6x12) + bias
        "lora_A": {"mul": 120, "add": 100},  # x A^T (10x6)(6x2)
        "scaling": {"mul": 20},  # * alpha/r on the 10 x 2 numbers
        "lora_B": {"mul": 240, "add": 120},  # h B^T (10x2)(2x12)
        "add": {"add": 120},  # y + ...
    }
    assert fwd.matmul == 2 * (720 + 120 + 240)
    bwd = flops.linear_backward(10, 6, 12, 2, grad_input=True)
    assert part_prims(bwd) == {
        "base": {"mul": 720, "add": 660},  # dx = dy W (10x12)(12x6); W and bias frozen
        "add": {},  # dy goes to both branches as it is
        "lora_B": {"mul": 240 + 240, "add": 12 * 2 * 9 + 10 * 2 * 11},  # dB = dy^T h (12x10)(10x2); dh = dy B (10x12)(12x2)
        "scaling": {"mul": 20},
        "lora_A": {"mul": 120 + 120, "add": 2 * 6 * 9 + 60 + 60},  # dA = dh^T x (2x10)(10x6); dx += dh A (10x2)(2x6)
    }
    assert bwd.matmul == 2 * (720 + 480 + 240)
    no_dx = flops.linear_backward(10, 6, 12, 2, grad_input=False)
    assert part_prims(no_dx) == {**part_prims(bwd), "base": {}, "lora_A": {"mul": 120, "add": 108}}
    assert prims(flops.linear_backward(10, 6, 12, 0, grad_input=True)) == {"mul": 720, "add": 660}


def test_decoder_block_backward_by_hand():
    layer1 = flops.decoder_block_backward(Setup(SMALL, QV2, kernel="math"), 2, 5, grad_input=True)
    assert flops.block_needs_grad(Setup(SMALL, QV2), True)
    assert part_prims(layer1) == {
        "input_layernorm": RMS_BWD, "self_attn": plus(*ATTN_BWD.values()),
        "residual_attn": {"add": 60},  # dx = dx1 + the attention branch's dx
        "post_attention_layernorm": RMS_BWD, "mlp": plus(*MLP_BWD.values()),
        "residual_mlp": {"add": 60},  # dx1 = dx2 + the MLP branch's dx
    }
    layer0 = flops.decoder_block_backward(Setup(SMALL, QV2, kernel="math"), 2, 5, grad_input=False)
    assert flops.block_needs_grad(Setup(SMALL, QV2), False)
    assert part_prims(layer0) == {
        "input_layernorm": {}, "self_attn": plus(*ATTN_BWD_FIRST.values()), "residual_attn": {},
        "post_attention_layernorm": RMS_BWD, "mlp": plus(*MLP_BWD.values()), "residual_mlp": {"add": 60}}
    # LoRA on down_proj only, in a layer whose input needs no gradient: the MLP's LoRA gradients, nothing else
    down = flops.decoder_block_backward(Setup(SMALL, {"down_proj": 2}), 2, 5, grad_input=False)
    assert flops.block_needs_grad(Setup(SMALL, {"down_proj": 2}), False) and {k for k, v in part_prims(down).items() if v} == {"mlp"}
    assert prims(down) == {"mul": 440, "add": 370}
    nothing = flops.decoder_block_backward(Setup(SMALL), 2, 5, grad_input=False)
    assert not flops.block_needs_grad(Setup(SMALL), False) and nothing.matmul == 0 and prims(nothing) == {}


def test_lm_head_and_loss_backward_by_hand():
    # forward head on 10 positions, 6 -> 17, with the bias: (10x6)(6x17) 1020 mul, 850 add, + 170 add
    assert prims(flops.head(Setup(SMALL, lm_head_bias=True), 10)) == {"mul": 1020, "add": 850 + 170}
    assert prims(flops.head(Setup(SMALL, lm_head_bias=True, head_rows=13), 10)) == {"mul": 780, "add": 650 + 130}
    # only the head bias trains: its gradient is the column sum of d logits (9 x 17 adds) after the loss's
    # backward; nothing in the body
    only_bias = flops.backward(Setup(SMALL, lm_head_bias=True), 2, 5)
    assert part_prims(only_bias) == {"embed_tokens": {}, "rope": {}, "layers": {}, "norm": {},
                                     "lm_head": {"add": 9 * 17}, "loss": CE_BWD}
    # with LoRA below it: dh = d logits W (10x17)(17x6) 1020 mul, 10 x 6 x 16 add, and the bias's sum
    bwd = flops.backward(Setup(SMALL, QV2, lm_head_bias=True, kernel="math"), 2, 5)
    assert prims(bwd["lm_head"]) == {"mul": 1020, "add": 960 + 153}
    assert prims(bwd["norm"]) == RMS_BWD
    assert bwd["lm_head"].matmul == 2 * 1020
    no_bias = flops.backward(Setup(SMALL, QV2, kernel="math"), 2, 5)
    assert prims(no_bias["lm_head"]) == {"mul": 1020, "add": 960}
    # a 13-row head: (10x13)(13x6) 780 mul, 10 x 6 x 12 add; bias sum 9 x 13; loss over 13 classes:
    # 1 div, 10 + 10 x 12 + 130 add, 130 exp, 130 mul
    rows13 = flops.backward(Setup(SMALL, QV2, lm_head_bias=True, head_rows=13, kernel="math"), 2, 5)
    assert prims(rows13["lm_head"]) == {"mul": 780, "add": 720 + 117}
    assert prims(rows13["loss"]) == {"div": 1, "add": 10 + 120 + 130, "exp": 130, "mul": 130}


def test_training_step_by_hand():
    """SMALL, 2 x 5 tokens, LoRA rank 2 on q, v, the head bias trained, math attention: every primitive of
    forward, backward and AdamW, summed from the hand counts above; under "ours" named three ways."""
    layer_fwd = plus(RMS_FWD, *ATTN_FWD.values(), {"add": 60}, RMS_FWD, *MLP_FWD.values(), {"add": 60})
    forward = plus(layer_fwd, layer_fwd, RMS_FWD, {"mul": 1020, "add": 1020}, CE_FWD)  # 2 layers, norm, head + bias, loss
    layer0 = plus(*ATTN_BWD_FIRST.values(), RMS_BWD, *MLP_BWD.values(), {"add": 60})
    layer1 = plus(RMS_BWD, *ATTN_BWD.values(), {"add": 60}, RMS_BWD, *MLP_BWD.values(), {"add": 60})
    backward = plus(layer0, layer1, RMS_BWD, {"mul": 1020, "add": 1113}, CE_BWD)
    # AdamW on 2 layers x (q: 2 x (6 + 12), v: 2 x (6 + 4)) + 17 bias = 129 numbers: 7 mul, 4 add, 2 div, 1 sqrt each
    assert flops.trainable_parameters(Setup(SMALL, QV2, lm_head_bias=True)) == 129
    optimizer = {"mul": 7 * 129, "add": 4 * 129, "div": 2 * 129, "sqrt": 129}
    for convention in ({}, {"convention": "ours"}, {"convention": flops.CONVENTIONS["ours"]}):
        step = flops.train_step(Setup(SMALL, QV2, lm_head_bias=True, kernel="math", **convention), 2, 5)
        assert prims(step["forward"]) == forward, convention
        assert prims(step["backward"]) == backward, convention
        assert prims(step["optimizer"]) == optimizer, convention
        assert prims(step) == plus(forward, backward, optimizer)
    total = plus(forward, backward, optimizer)
    assert step.coursework == sum(total.values()) + 9 * (total["exp"] + total["log"] + total["sqrt"])


# ---------------------------------------------------------------- training, generation, the plan


def test_train_step_parts_and_the_coursework_estimate():
    lora = {"q_proj": 8, "v_proj": 8}
    step = flops.train_step(Setup(REAL, lora), 4, 512)
    assert step.coursework == sum(step[p].coursework for p in ("forward", "backward", "optimizer"))
    assert step["optimizer"] == flops.adamw(24 * 8 * ((896 + 896) + (896 + 128)))
    ratio = step.coursework / flops.coursework_estimate(step).coursework
    assert 0.6 < ratio < 0.75  # LoRA's backward skips every frozen weight's gradient: far below 2 x forward
    assert flops.trainable_parameters(Setup(REAL, lora, lm_head_bias=True)) == 540_672 + 151_936


def test_generation_cache_saves_work_and_numeric_head_is_cheaper():
    cfg = tiny_config()
    s = Setup(cfg, head_rows=13)
    cached, plain = flops.forecast(s, 4, 5, 3), flops.forecast(s, 4, 5, 3, kv_cache=False)
    assert plain.coursework > cached.coursework
    assert cached["lm_head"] == 30 * flops.head(s, 4)
    assert flops.forecast(Setup(cfg), 4, 5, 3).coursework > cached.coursework
    # one new token: the prefill alone, either way
    assert flops.generate(Setup(cfg), 2, 9, 1).matmul == flops.generate(Setup(cfg), 2, 9, 1, kv_cache=False).matmul


def test_plan_run_adds_up():
    cfg = tiny_config()
    s = Setup(cfg, {"q_proj": 2})
    plan = flops.plan_run(s, steps=10, batch=2, context=16, eval_every=5, eval_batches=3,
                          forecasts=flops.Forecasts(series=5, batch=2, k=2, h=2))
    # windows of 16 tokens: the model reads 15 (qwen_min/loss.py)
    assert plan["train"] == 10 * flops.train_step(s, 2, 15)
    assert plan["eval"] == 6 * flops.forward_with_loss(s, 2, 15)
    # forecasts run the merged model (no LoRA branch) with the 13-row head
    merged = Setup(cfg, head_rows=13)
    assert plan["generate"] == 2 * flops.forecast(merged, 2, 2, 2) + flops.forecast(merged, 1, 2, 2)


# ---------------------------------------------------------------- Cost, Ledger, command line


def test_cost_algebra():
    a = flops.group(x=flops.ops(add=2), y=flops.matmul(1, 2, 3))
    b = flops.group(x=flops.ops(exp=1), z=flops.ops(sqrt=1))
    s = a + b
    assert s["x"].ops == {"add": 2, "exp": 1} and set(s.parts) == {"x", "y", "z"}
    assert s.coursework == 2 + (6 + 3) + 10 + 10 and s.matmul == 12
    assert (3 * a).coursework == 3 * a.coursework and (3 * a)["y"].matmul == 36
    assert sum([a, a], Cost()) == 2 * a
    with pytest.raises(ValueError, match="would lose the names"):  # the sum's pieces would no longer add up
        a + flops.ops(add=1)
    with pytest.raises(ValueError, match="would lose the names"):
        flops.ops(add=1) + a
    assert a + Cost() == a == Cost() + a and a + 3 * Cost() == a  # nothing is free to add
    w = a.extended(w=flops.ops(add=1))  # a new name beside a's own
    assert set(w.parts) == {"x", "y", "w"} and w.coursework == a.coursework + 1 and w.matmul == a.matmul
    with pytest.raises(ValueError, match="extended"):
        a.extended(x=flops.ops(add=1))  # x is a's already
    assert dict(a.flat()).keys() == {"x", "y"}
    with pytest.raises(ValueError, match="unknown primitive"):
        flops.ops(sin=1)


def test_ledger_roundtrip_and_table(tmp_path):
    path = tmp_path / "runs" / "ledger.jsonl"
    ledger = Ledger(path, budget=1e17)
    ledger.add("lr 1e-4", "train", flops.matmul(10, 10, 10), source="plan")
    ledger.add("lr 1e-4", "train", 2e15)
    ledger.add("lr 1e-4", "eval", 1e15)
    ledger.add("final", "generate", 5e14, steps=1150)
    again = Ledger(path)  # reads what add() appended
    assert again.entries == ledger.entries and again.entries[-1]["steps"] == 1150
    assert again.total("spent") == 3.5e15 and again.total("plan") == 1900
    assert again.totals()[("lr 1e-4", "spent")] == {"train": 2e15, "eval": 1e15, "generate": 0.0, "total": 3e15}
    table = again.markdown()
    assert "| lr 1e-4 | spent | 2e+15 | 1e+15 | 3e+15 | 3.00% |" in table
    assert "| **total** | spent | 2e+15 | 1.5e+15 | 3.5e+15 | 3.50% |" in table
    other = tmp_path / "copy.jsonl"
    again.write(other)
    assert Ledger.read(other).entries == again.entries
    with pytest.raises(ValueError, match="kind must be"):
        ledger.add("x", "training", 1)
    other.write_text('{"stage": "x"}\n')
    with pytest.raises(ValueError, match="line 1: not a ledger entry"):
        Ledger.read(other)


def test_cli_json(capsys):
    flops.main(["--context", "128", "--batch", "2", "--rank", "4", "--steps", "10", "--json",
                "--eval-every", "5", "--eval-batches", "1", "--forecast-series", "2", "--h", "2"])
    out = json.loads(capsys.readouterr().out)
    lora = {"q_proj": 4, "v_proj": 4}
    assert out["forward"]["matmul_view"] == flops.qwen2(Setup(REAL, lora), 2, 128).matmul
    assert out["forward"]["coursework"]["total"] == flops.qwen2(Setup(REAL, lora), 2, 128).coursework
    assert set(out["forward"]["coursework"]) == {"total", *flops.PRIMITIVES}
    assert out["forward"]["modules"]["layers.*.self_attn.sdpa"]["matmul_view"] == 24 * 4 * 2 * 14 * 128 * 128 * 64
    step = flops.train_step(Setup(REAL, lora), 2, 127)  # windows of 128 tokens: the model reads 127
    assert out["train_step"]["matmul_view"] == step.matmul
    assert set(out["train_step"]) >= {"forward", "backward", "optimizer", "coursework_estimate", "executed_over_estimate"}
    assert out["run"]["train"]["coursework"]["total"] == 10 * step.coursework
    assert out["run"]["budget_share"] == pytest.approx(out["run"]["coursework"]["total"] / 1e17)


def test_cli_text_numeric_vocab_config_and_errors(tmp_path, capsys):
    cfg = tiny_config()
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    flops.main(["--model", str(tmp_path / "config.json"), "--context", "16", "--vocab", "numeric",
                "--lm-head-bias", "--steps", "3", "--ledger", str(tmp_path / "l.jsonl")])
    text = capsys.readouterr().out
    assert "layers.*.mlp.silu" in text and "3 x forward" in text and "| run | plan |" in text
    fwd = flops.qwen2(Setup(cfg, {"q_proj": 8, "v_proj": 8}, True, 13), 4, 16)
    assert f"{fwd.matmul:.4g}" in text
    assert Ledger.read(tmp_path / "l.jsonl").total("plan") > 0
    for bad, says in ((["--targets", "q,zz"], "unknown LoRA target 'zz'"),
                      (["--model", str(tmp_path / "none.json")], "No config.json at"),
                      (["--context", "1"], "--context must be from 2 to 32768")):
        with pytest.raises(SystemExit):
            run_cli(flops.main, bad)
        assert says in capsys.readouterr().err.strip().splitlines()[-1]


def test_docs_numbers_are_current():
    """docs/flops.md quotes the 0.5B forward at 512 tokens and the step ratio; they must follow the code."""
    from tests.conftest import REPO

    doc = (REPO / "docs" / "flops.md").read_text()
    lora = {"q_proj": 8, "v_proj": 8}
    fwd = flops.qwen2(Setup(REAL, lora), 1, 512)
    assert f"| **total** | {fwd.matmul:.4g} |" in doc and f"**{fwd.coursework:.4g}** |" in doc
    step = flops.train_step(Setup(REAL, lora), 4, 511)
    ratio = step.coursework / flops.coursework_estimate(step).coursework
    assert f"| {step.coursework:.4g} | {flops.coursework_estimate(step).coursework:.4g} | **{ratio:.3f}** |" in doc


# ---------------------------------------------------------------- each report's own convention
# Expected values are typed from the reports' text (../shared/reports/: 000_* is report A, 001_* is
# report B) at the precision they print, and from hand counts on a tiny config.

TINY = Qwen2Config(vocab_size=10, dim=4, hidden_dim=6, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=2, max_seq_len=64)


def printed(x, digits):
    """x rounded as a table prints it with `digits` significant digits."""
    return float(f"{x:.{digits}g}")


def test_report_a_table_3():
    """Report A, section 4.4.1, Table 3 "FLOPs for forward pass: LoRA Rank 4" (512 tokens); Exp and
    Sqrt columns are weighted x 10, as its code returns them."""
    t = flops.report_a_tables(REAL, 4, 512, 13800, {"q_proj": 4, "v_proj": 4})["table3"]
    table3 = {  # Add., Mult., Div., Exp., Sqrt, Total
        "Single Attention Block": (2.93e9, 2.94e9, 7.34e6, 3.67e7, 10, 5.91e9),
        "Single MLP Block": (6.69e9, 6.7e9, 2.49e6, 2.49e7, 0, 1.34e10),
        "RMS, Residual etc": (1.83e6, 1.84e6, 9.19e5, 0, 1.02e4, 4.6e6),
        "Single Transformer Layer": (9.63e9, 9.64e9, 1.07e7, 6.16e7, 1.02e4, 1.93e10),
        "LoRA Cost in this Layer": (7.34e6, 8.26e6, 0, 0, 0, 1.56e7),
        "Full Forward Pass": (3.01e11, 3.01e11, 2.58e8, 1.48e9, 2.51e5, 6.04e11),
    }
    for row, want in table3.items():
        c = t[row]
        got = (c.ops.get("add", 0), c.ops.get("mul", 0), c.ops.get("div", 0), 10 * c.ops.get("exp", 0),
               10 * c.ops.get("sqrt", 0), c.coursework)
        assert tuple(printed(x, 3) for x in got) == want, row
        assert not c.ops.get("cmp") and not c.ops.get("log")  # its table has no such columns
    # "Percentage of Budget: 0.000604%"
    assert printed(100 * t["Full Forward Pass"].coursework / 1e17, 3) == 0.000604


def test_report_a_table_4():
    """Report A, section 4.5.1, Table 4 "FLOPs cost of training using LoRA rank 4"."""
    t = flops.report_a_tables(REAL, 4, 512, 13800, {"q_proj": 4, "v_proj": 4})["table4"]
    one, limit = t["Single Step (N = 1, B = 4)"], t["Training Limit (N = 13800, B = 4)"]
    assert (printed(one["total"], 5), printed(one["lora"], 5)) == (7.2455e12, 4.4909e9)
    assert f"{100 * one['budget_share']:.4f}%" == "0.0072%"
    assert (printed(limit["total"], 5), printed(limit["lora"], 5)) == (9.9988e16, 6.1975e13)
    assert f"{100 * limit['budget_share']:.3f}%" == "99.988%"
    # the step is 3 x forward x batch (its model_training_flops), the forward its Table 3's
    assert one["total"] == 3 * 4 * flops.qwen2(Setup(REAL, {"q_proj": 4, "v_proj": 4}, convention="report-a"), 1, 512).coursework


def test_report_b_table_3_and_its_formula():
    """Report B, section 3.3.5-3.3.6, Table 3: batch 4 x 512 tokens, forward and forward + backward."""
    t = flops.report_b_tables(REAL, 4, 512, 2000)["table3"]
    assert (printed(t["forward"], 4), f"{math.log10(t['forward']):.3f}") == (2.252e12, "12.353")
    assert (printed(t["forward_backward"], 4), f"{math.log10(t['forward_backward']):.3f}") == (6.757e12, "12.830")
    # its formula, written out: B L d + (B L)(4d + 11) + 2 B L d V + N [2 (B L)(4d + 11) + 8 B L d^2 + 4 B L^2 d
    # + 6 B L d d_ff + 14 B L d_ff]
    B, L, d, dff, V, N = 4, 512, 896, 4864, 151936, 24
    formula = (B * L * d + B * L * (4 * d + 11) + 2 * B * L * d * V
               + N * (2 * B * L * (4 * d + 11) + 8 * B * L * d**2 + 4 * B * L**2 * d + 6 * B * L * d * dff + 14 * B * L * dff))
    assert t["forward"] == formula and t["forward_backward"] == 3 * formula


def test_report_b_calflops_figure():
    """Report B, section 3.3.7, Table 4 (calflops): 2.02e12 and 6.07e12 FLOPs; its logs (12.305, 12.783)
    are of the figures as calflops prints them, to 3 digits."""
    t = flops.report_b_tables(REAL, 4, 512, 2000)["table4_calflops"]
    fwd, both = printed(t["forward"], 3), printed(t["forward_backward"], 3)
    assert (fwd, both) == (2.02e12, 6.07e12)
    assert (f"{math.log10(fwd):.3f}", f"{math.log10(both):.3f}") == ("12.305", "12.783")
    # counted by hand on TINY (1 x 2 tokens): per row q 16 + k 8 + v 8 + o 16 + MLP 3 x 24 + head 40 = 160
    # multiply-adds, 2 FLOPs each, 2 rows: 640; silu: 2 rows x 6 = 12
    assert flops.calflops(TINY, 1, 2) == 652
    # measured with the calflops 0.3.2 package on transformers' Qwen2ForCausalLM (sdpa): (vocab, hidden,
    # intermediate, layers, heads, kv heads, head_dim), (batch, tokens)
    for (V, D, d_ff, n, H, K, hd), (B, T), measured in (((160, 64, 112, 2, 4, 2, 16), (2, 8), 2_493_952),
                                                     ((301, 96, 200, 3, 6, 2, 16), (4, 17), 37_498_464)):
        cfg = Qwen2Config(vocab_size=V, dim=D, hidden_dim=d_ff, n_layers=n, n_heads=H, n_kv_heads=K, head_dim=hd)
        assert flops.calflops(cfg, B, T) == measured


def test_report_b_table_13_and_total():
    """Report B, section 4.8, Table 13: log10 FLOPs of its nine runs (batch 4, LoRA on q and v), and
    "log10(Total FLOPs) ~ 16.9995"."""
    table13 = [  # steps, L, r, log10 LoRA, log10 Qwen, log10 total
        (2000, 512, 4, "12.822", "16.131", "16.131"),  # basic setting; learning rates 5e-5 and 1e-4 alike
        (2000, 512, 4, "12.822", "16.131", "16.131"),
        (2000, 512, 4, "12.822", "16.131", "16.131"),
        (2000, 512, 2, "12.521", "16.131", "16.131"),
        (2000, 512, 8, "13.123", "16.131", "16.131"),
        (1000, 128, 8, "12.220", "15.214", "15.215"),
        (1000, 512, 8, "12.822", "15.830", "15.830"),
        (1000, 768, 8, "12.999", "16.014", "16.015"),
        (2000, 512, 8, "13.123", "16.131", "16.131"),  # best setting
    ]
    grand = 0
    for steps, L, r, lora, qwen, total in table13:
        row = flops.report_b_tables(REAL, 4, L, steps, {"q_proj": r, "v_proj": r})["table13"]
        assert tuple(f"{math.log10(row[k]):.3f}" for k in ("lora", "qwen", "total")) == (lora, qwen, total)
        assert row["total"] == row["lora"] + row["qwen"]
        grand += row["total"]
    assert f"{math.log10(grand):.4f}" == "16.9995"


def test_report_b_lora_uses_the_real_widths():
    """Section 4.7: 2 (B L) r (d_in + d_out) per adapter; its code gives v_proj d_out = 128 (GQA)."""
    one = {"q_proj": 4, "v_proj": 4}
    fwd = flops.qwen2(Setup(REAL, one, convention="report-b"), 4, 512)
    assert flops.lora_share(fwd).coursework == 24 * 2 * 2048 * 4 * ((896 + 896) + (896 + 128))


def test_report_a_terms_by_hand():
    A = flops.convention_named("report-a")
    # RMSNorm, 2 rows of 3: squares 6 mul, sum 2 x 2 add, / 3 2 div, root 2 sqrt; / root 6 div, weight 6 mul
    assert A.rms_norm(2, 3).ops == {"mul": 12, "add": 4, "div": 8, "sqrt": 2}
    assert A.rms_norm(2, 3).coursework == 12 + 4 + 8 + 20
    # RoPE of 2 tokens, 2 heads of 2: a (4 x 4) rotation per token, (2x4)(4x4) = 32 mul + 24 add
    assert A.rotary(2, 2, 2).coursework == 56
    # one head, 2 x 2: q k^T 12, / sqrt(hd) 4 div + one root (10); softmax: exp 4 (40), sums 2, divide 4; p v 12
    assert A.scaled_dot_product_attention(1, 1, 2, 2, 2).coursework == 12 + 4 + 10 + 40 + 2 + 4 + 12
    assert A.scaled_dot_product_attention(3, 2, 2, 2, 2).ops["sqrt"] == 3  # one root per sequence, not per head
    assert A.silu(3).coursework == 3 * (1 + 10 + 1)  # + 1, exp, divide; the negation free
    # LoRA 2 rows, 3 -> 4, r 1: base 40, x A^T (2x3)(3x1) 10, B (2x1)(1x3) 6 (3 wide, as its code), alpha 6, add 6
    assert A.lora_linear(2, 3, 4, 1).coursework == 40 + 10 + 6 + 6 + 6
    assert A.loss(5, 7) == Cost() and A.tokens_fed(512) == 512


def test_report_a_tiny_model_by_hand():
    """TINY, one sequence of 2 tokens, under report A's counting, each term by hand."""
    c = flops.decoder_block(Setup(TINY, convention="report-a"), 1, 2)
    by_hand = {
        "input_layernorm": 8 + 6 + 2 + 20 + 8 + 8,  # squares, sum, / d, root (x10), / root, weight
        "self_attn": (2 * 4 * 7 + 8)  # q (2x4)(4x4) + bias
        + 2 * (2 * 2 * 7 + 4)  # k, v as the model has them: (2x4)(4x2) + bias
        + 2 * (2 * 2 * 7 + 4)  # ... and the kv head MHA would add to each
        + 2 * (2 * 4 * 7)  # RoPE on q and on k, each a (4 x 4) matrix per token
        + 2 * (12 + 4 + 46 + 12) + 10  # 2 heads: scores, / sqrt, softmax, p v; one root
        + 2 * 4 * 7,  # o_proj
        "residual_attn": 8,
        "post_attention_layernorm": 52,
        "mlp": 2 * (2 * 6 * 7) + 12 * 12 + 12 + 2 * 4 * 11,  # gate, up, silu (12 each), product, down
        "residual_mlp": 8,
    }
    assert {k: p.coursework for k, p in c.parts.items()} == by_hand
    assert c.coursework == 1050
    assert flops.qwen2(Setup(TINY, convention="report-a"), 1, 2).coursework == 1050 + 52 + (2 * 10 * 7 + 20)  # norm, head + bias
    step = flops.train_step(Setup(TINY, {"q_proj": 1}, convention="report-a"), 3, 2)
    # 3 sequences x 3 x forward; with LoRA rank 1 on q the forward is 1262 + x A^T (2x4)(4x1) 14, . B^T counted
    # 4 wide (2x1)(1x4) 8, alpha on the 2 x 4 outputs 8, + 8
    assert step.coursework == 3 * 3 * (1262 + 14 + 8 + 8 + 8)
    assert step["optimizer"] == Cost()


def test_report_b_terms_by_hand():
    Bc = flops.convention_named("report-b")
    assert Bc.rms_norm(2, 3).coursework == 2 * (4 * 3 + 11)
    assert flops.matmul_2mnp(2, 3, 4).ops == {"mul": 24, "add": 24}
    assert Bc.linear(2, 3, 4, True).coursework == 48  # no bias
    assert Bc.silu(3).coursework + flops.ops(mul=3).coursework == 14 * 3  # with the gate's product
    assert Bc.rotary(2, 2, 2) == Cost() and Bc.rotary_embedding(2, 3).coursework == 6 and Bc.residual(2, 3) == Cost()
    # 2 heads of 2 x 2 tokens: 4 B L^2 d with d = 4
    assert Bc.scaled_dot_product_attention(1, 2, 2, 2, 2).coursework == 4 * 1 * 4 * 4
    assert Bc.lora_linear(2, 3, 4, 1).coursework == 48 + 2 * 2 * 1 * (3 + 4)


def test_report_b_tiny_model_by_hand():
    """TINY, 1 x 2 tokens, report B's formula with its numbers: B L d = 8, RMSNorm 2 (16 + 11) = 54,
    attention 8 B L d^2 + 4 B L^2 d = 256 + 64, MLP 6 B L d d_ff + 14 B L d_ff = 288 + 168, head 2 B L d V = 160."""
    assert flops.qwen2(Setup(TINY, convention="report-b"), 1, 2).coursework == 8 + 3 * 54 + 320 + 456 + 160
    lora = {"q_proj": 1, "v_proj": 1}  # + 2 B L r (d_in + d_out): q 4 -> 4, v 4 -> 2
    assert flops.qwen2(Setup(TINY, lora, convention="report-b"), 1, 2).coursework == 1106 + 2 * 2 * (4 + 4) + 2 * 2 * (4 + 2)
    step = flops.train_step(Setup(TINY, lora, lm_head_bias=True, convention="report-b"), 1, 2)
    assert step.coursework == 3 * 1162 and step["optimizer"] == Cost()


def test_conventions_change_only_their_terms():
    cfg = tiny_config()
    lora = {"q_proj": 4, "v_proj": 4}
    # "ours", by name, as the object or by default: TINY's block by hand (946, test_decoder_block_by_hand),
    # the final norm (56) and the head (2x4)(4x10) = 140, no bias (test_training_step_by_hand: the step)
    for convention in ({}, {"convention": "ours"}, {"convention": flops.CONVENTIONS["ours"]}):
        assert flops.qwen2(Setup(TINY, **convention), 1, 2).coursework == 946 + 56 + 140, convention
    a, b = (flops.decoder_block(Setup(cfg, lora, convention=n), 2, 8) for n in ("report-a", "report-b"))
    ours = flops.decoder_block(Setup(cfg, lora), 2, 8)
    assert a["mlp.gate_proj"] == ours["mlp.gate_proj"] and a["residual_mlp"] == ours["residual_mlp"]
    assert a["self_attn.o_proj"] == ours["self_attn.o_proj"] and a["self_attn.sdpa.weighted_sum"] == ours["self_attn.sdpa.weighted_sum"]
    assert "kv_as_mha" in a["self_attn"].parts and "kv_as_mha" not in ours["self_attn"].parts
    assert b["self_attn.sdpa.softmax"] == Cost() and b["mlp.product"] == ours["mlp.product"]
    # report A on TINY, windows of 2 tokens, LoRA rank 1 on q: its forward is 1300 (1262 without LoRA,
    # test_report_a_tiny_model_by_hand, + x A^T 14, . B^T 8 and alpha 8 at d_in = 4 wide, + 8). It feeds the
    # whole window (ours would feed 1 token), counts a step as 3 x forward and no loss in validation:
    plan = flops.plan_run(Setup(TINY, {"q_proj": 1}, convention="report-a"), steps=5, batch=1, context=2,
                          eval_every=5, eval_batches=2)
    assert plan["train"].coursework == 5 * 3 * 1300
    assert plan["eval"].coursework == (5 // 5) * 2 * 1300
    with pytest.raises(ValueError, match="unknown FLOP convention 'report-c'"):
        flops.qwen2(Setup(cfg, convention="report-c"), 1, 4)


def test_generation_sums_steps_exactly():
    """generate() sums runs of decode steps from three evaluations; the step-by-step sum must agree."""
    cfg = tiny_config()
    active = [4] * 6 + [3] * 2 + [1] * 7
    for convention in ("ours", "report-a", "report-b"):
        for kv_cache in (True, False):
            s = Setup(cfg, convention=convention)
            got = flops.generate(s, 4, 9, len(active), kv_cache=kv_cache, active=active)
            if kv_cache:
                steps = sum((flops.body(s, active[i], 1, 9 + i) for i in range(1, len(active))), Cost())
                assert got["decode"] == steps
            else:
                steps = sum((flops.body(s, r, 9 + i, 9 + i) for i, r in enumerate(active)), Cost())
                assert got["forward"] == steps


def test_cli_prints_each_reports_tables(capsys):
    flops.main(["--convention", "report-a", "--rank", "4", "--steps", "13800"])
    text = capsys.readouterr().out
    assert "Single Transformer Layer" in text and "6.04e+11" in text and "7.2455e+12" in text and "9.9988e+16" in text
    flops.main(["--convention", "report-b", "--rank", "4"])
    text = capsys.readouterr().out
    assert "2.252e+12   12.353" in text and "2.02e+12   12.305" in text and "2000  512  4  12.822  16.131  16.131" in text
    flops.main(["--convention", "report-b", "--rank", "8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["convention"] == "report-b" and out["report"]["table4_calflops"]["forward"] == flops.calflops(REAL, 4, 512)
    assert out["train_step"]["executed_over_estimate"] == 1.0
    flops.main(["--targets", "none", "--json"])  # no LoRA
    assert json.loads(capsys.readouterr().out)["shape"]["lora"] == {}


# ---------------------------------------------------------------- bad flags: one sentence each (issue #10)


def bad_flags(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_config().to_hf_dict()))  # 256 positions
    impossible = tmp_path / "impossible.json"
    impossible.write_text(json.dumps({**tiny_config().to_hf_dict(), "num_key_value_heads": 0}))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    empty = tmp_path / "no-checkpoint"  # a folder without a config.json
    empty.mkdir()
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text("this is not a ledger\n{}\n")
    huge = str(10**30)
    return [  # (argv, what the sentence must name)
        (["--context", "0"], "--context"), (["--context", "-5"], "--context"), (["--context", "1"], "--context"),
        (["--context", "40000"], "32768 positions"), (["--context", "abc"], "--context"),
        (["--model", str(cfg), "--context", "300"], "256 positions"),
        (["--batch", "0"], "--batch"), (["--batch", "-1"], "--batch"), (["--batch", huge], "--batch"),
        (["--batch", "2.5"], "--batch"),
        (["--steps", "0"], "--steps"), (["--steps", "-3"], "--steps"), (["--steps", huge], "--steps"),
        (["--rank", "0"], "--rank"), (["--rank", "-4"], "--rank"), (["--rank", "200"], "width of v_proj"),
        (["--rank", huge], "--rank"),
        (["--targets", "q,zz"], "unknown LoRA target 'zz'"), (["--targets", ","], "names no layer"),
        (["--targets", ""], "names no layer"),
        (["--convention", "report-c"], "--convention"), (["--convention", ""], "--convention"),
        (["--attention", "math", "--convention", "report-a"], "--attention"),
        (["--eval-every", "-1"], "--eval-every"), (["--eval-batches", "-2"], "--eval-batches"),
        (["--eval-every", "100"], "--eval-batches"), (["--eval-batches", "5"], "--eval-every"),
        (["--forecast-series", "-1"], "--forecast-series"), (["--forecast-series", huge], "--forecast-series"),
        (["--forecast-series", "2", "--forecast-batch", "0"], "--forecast-batch"),
        (["--forecast-series", "1", "--k", "0"], "--k"),
        (["--forecast-series", "1", "--h", "-5"], "--h"),
        (["--forecast-series", "1", "--h", "4000"], "32768 positions"),
        (["--forecast-series", "1", "--h", huge], "--h"),
        (["--tokens-per-step", "0"], "--tokens-per-step"), (["--tokens-per-step", huge], "--tokens-per-step"),
        (["--gen-head-rows", "0"], "--gen-head-rows"), (["--gen-head-rows", "200000"], "vocabulary"),
        (["--flops-budget", "0"], "--flops-budget"), (["--flops-budget", "-1"], "--flops-budget"), (["--flops-budget", "nan"], "--flops-budget"),
        (["--flops-budget", "inf"], "--flops-budget"), (["--flops-budget", "1e400"], "--flops-budget"), (["--flops-budget", "lots"], "--flops-budget"),
        (["--stage", " "], "--stage"),
        (["--vocab", "words"], "--vocab"), (["--unknown-flag"], "unrecognized arguments"),
        (["--model", str(tmp_path / "none.json")], "No config.json"), (["--model", str(empty)], "No config.json"),
        (["--model", str(garbage)], "not valid JSON"), (["--model", str(impossible)], "num_key_value_heads"),
        (["--ledger", str(tmp_path)], "--ledger"), (["--ledger", str(ledger)], "not a ledger entry"),
    ]


def test_every_bad_flag_ends_in_one_sentence(tmp_path, capsys):
    cases = bad_flags(tmp_path)
    assert len(cases) == 53
    for argv, names in cases:
        with pytest.raises(SystemExit) as exit:
            run_cli(flops.main, argv)
        assert exit.value.code == 2, argv
        out, err = capsys.readouterr()
        last = err.strip().splitlines()[-1]
        assert out == "" and "Traceback" not in err, argv
        assert last.startswith(("flops.py: error:", "error:")) and names in last, (argv, last)


def test_flags_at_their_limits_still_count(capsys):
    """The bounds refuse nonsense, not big honest runs: the longest context and forecast finish at once."""
    flops.main(["--context", "32768", "--batch", "1", "--rank", "128", "--forecast-series", "3", "--forecast-batch", "2",
                "--k", "1", "--h", "3275", "--no-kv-cache", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["run"]["generate"]["matmul_view"] > 0 and math.isfinite(out["run"]["budget_share"])


def test_docs_side_by_side_numbers_are_current():
    from tests.conftest import REPO

    doc = (REPO / "docs" / "flops.md").read_text()
    for convention in ("ours", "report-a", "report-b"):
        fwd = flops.qwen2(Setup(REAL, {"q_proj": 4, "v_proj": 4}, convention=convention), 1, 512)
        assert f"**{fwd.coursework:.4g}**" in doc, convention


def test_ledger_skips_an_append_cut_short(tmp_path):
    path = tmp_path / "ledger.jsonl"
    Ledger(path).add("a", "train", 5.0)
    with path.open("a") as f:
        f.write('{"stage": "b", "kind": "tr')  # a kill in the middle of an append
    assert Ledger.read(path).total() == 5.0
    path.write_text('{"stage": "b", "kind": "tr\n' + path.read_text())  # but a broken line inside is an error
    with pytest.raises(ValueError, match="line 1: not a ledger entry"):
        Ledger.read(path)
    flops.main(["--convention", "report-a", "--ledger", str(tmp_path / "plan.jsonl"), "--steps", "1", "--json"])
    assert Ledger.read(tmp_path / "plan.jsonl").entries[0]["convention"] == "report-a"


def test_setup_holds_what_a_count_depends_on():
    s = Setup(TINY, {"q_proj": 2, "v_proj": 0})  # rank 0: no adapter there
    assert s.lora == {"q_proj": 2} and s.rows == TINY.vocab_size and s.convention is flops.CONVENTIONS["ours"]
    r = s.replace(head_rows=13, convention="report-a")
    assert (r.rows, r.lora, r.convention.name) == (13, {"q_proj": 2}, "report-a") and s.rows == TINY.vocab_size
    # head_rows reaches the head: 2 positions, 4 -> 13 rows, (2x4)(4x13) = 104 mul + 78 add
    assert prims(flops.head(r.replace(convention="ours"), 2)) == {"mul": 104, "add": 78}
    with pytest.raises(ValueError, match="kernel must be"):
        Setup(TINY, kernel="flash")
    with pytest.raises(ValueError, match="unknown FLOP convention"):
        Setup(TINY, convention="report-c")
