"""FLOPs of qwen-min, counted exactly, module by module: read it beside qwen_min/model.py.

Every module of the model has a function here of the same name (snake_case for classes), in the
same order, whose lines are the lines of that module's `forward`, counted. The file opens with
them, so it reads side by side with model.py:

    model.py                              flops.py
    RMSNorm.forward                       rms_norm(n, dim)
    RotaryEmbedding.forward               rotary_embedding(n, dim)      (table lookup: free)
    rotate_half, apply_rotary             rotate_half, apply_rotary
    nn.Linear, F.scaled_dot_product_attention   linear, softmax, scaled_dot_product_attention
    Attention.forward                     attention(s, B, T, S)
    MLP.forward                           mlp(s, n)
    DecoderBlock.forward                  decoder_block(s, B, T, S)
    Qwen2.forward / body / head           qwen2(s, B, T), body(s, B, T, S), head(s, n)
    LoRALinear.forward (lora/layer.py)    lora_linear(n, d_in, d_out, r); projection(s, name, ...)
    causal_lm_loss (qwen_min/loss.py)     cross_entropy(n, rows); forward_with_loss(s, B, T)

`s` is a Setup: the model's config and how it runs (LoRA ranks, lm_head bias, head rows,
attention kernel, counting convention), one object instead of five arguments threaded through
every call:

    s = Setup(cfg, lora={"q_proj": 8, "v_proj": 8})         # the defaults: no bias, full head, fused, ours
    qwen2(s, 1, 512); train_step(s, 4, 511); generate(s.replace(head_rows=13), 20, 500, 200)

Each returns a `Cost`: two views of one count (matmul, coursework), the primitives the
coursework view weighs, and the named parts:

    cost.matmul      what torch.utils.flop_counter.FlopCounterMode reports: 2 m n k per matrix
                     product (attention as its batched products), nothing else. Tests prove it
                     equal to FlopCounterMode on the real modules, difference 0.
    cost.ops         primitive operations {add, mul, div, cmp, exp, log, sqrt}: a matmul
                     (m x n)(n x p) is m n p mul + m p (n - 1) add (so m p (2n - 1) in all).
    cost.coursework  ops weighted by the coursework convention (docs/reference.md): exp, log, sqrt
                     (and sin, cos, which the model never runs) 10; everything else 1.
    cost.parts       the named pieces (module names, as in model.py) the total is made of;
                     cost["layers.0.self_attn.q_proj"] picks one. Costs add (pieces merged by
                     name) and scale by integers.

Shapes: B batch, T new tokens, S keys (cached + new), n = B*T rows. Setup.lora maps a module name
to its LoRA rank; the LoRA matrices are unmerged. Setup.head_rows is the number of output rows
the head computes: the vocabulary, or 13 when the loss or the decoding is restricted to the
LLMTIME digits and separators. After the mirror: the Cost algebra (Costs add part by part and
never drop a part's name), the backward pass, a training step, generation, the conventions,
planning and the ledger, the reports' tables, the command line.

Conventions where the model leaves a choice (see docs/flops.md):
- Attention is counted as PyTorch documents scaled_dot_product_attention's reference (full
  T x S scores, scale, additive mask, softmax, weighted sum), masked entries included, as the
  math kernel computes them and as FlopCounterMode counts them.
- Backward counts only what autograd runs: frozen weights get no weight gradient; an input
  gets a gradient only when something upstream needs one (layer 0's projections do not).
  Attention's backward depends on the kernel. kernel="fused" (the default: what training with
  is_causal=True runs, on CPU and in bf16 on CUDA): the flash / memory-efficient kernels recompute the
  scores and return all of dq, dk, dv. kernel="math": PyTorch's math path, autograd through the
  reference, each gradient only when needed (what runs on the meta device). On CPU the fused
  kernel is invisible to FlopCounterMode (it counts 0): measure on the meta device, or under
  sdpa_kernel(SDPBackend.MATH) and compare with kernel="math".
- Casts, views, indexing, embedding lookups, RoPE tables and copies into the KV cache are free.

Each report's own convention: Setup(..., convention=) "ours" (the default, all of the above),
"report-a" or "report-b": the same mirror, with only the terms each report counted otherwise
swapped in (classes Ours, ReportA, ReportB; docs/flops.md sets them side by side).
report_a_tables() and report_b_tables() rebuild the reports' FLOP tables; calflops() is what
report B's calflops check counts.

Training, generation, the budget:

    train_step(s, B, T)                    -> Cost with parts forward, backward, optimizer
    forward_backward(s, B, T)              -> forward and backward merged module by module
    generate(s, B, prompt, new, ...)       -> prefill + decode with the KV cache, or without it
    forecast(s, B, k, h, tokens_per_step)  -> generate() for k context steps, h forecast steps
    plan_run(s, steps, batch, context, eval_every, eval_batches, Forecasts(series, batch, k, h))
                                           -> {"train": Cost, "eval": Cost, "generate": Cost}

Ledger (plan and spend side by side; train.py adds what each run really spent):

    ledger = Ledger("runs/ledger.jsonl", budget=1e17)  # loads the file if it exists; appends on add
    ledger.add("lr=1e-4 r=8", "train", cost_or_flops, source="spent")   # kind: train|eval|generate
    ledger.total(source="spent") -> float; ledger.totals() -> {(stage, source): {...}}
    print(ledger.markdown())   # | stage | source | training | evaluation | total | % of budget |
    Ledger.read(path), ledger.write(path)      # JSON lines: {"stage", "kind", "flops", "matmul", "source", ...}

Entries count coursework FLOPs (`flops`); given a Cost, its matmul view is kept too (`matmul`).

Command line:

    python flops.py --context 512 --batch 4 --rank 8 --steps 2000 [--json]
    python flops.py --convention report-a --rank 4 --steps 13800     # report A's Tables 3 and 4
    python flops.py --convention report-b --rank 4                   # report B's Tables 3, 4 and a Table 13 row
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from itertools import accumulate, groupby
from pathlib import Path

from lora.inject import parse_targets
from qwen_min.cli import HelpFormatter, parse_with_config, renamed
from qwen_min.errors import run_cli
from qwen_min.files import append_jsonl, atomic_write_text
from qwen_min.loss import tokens_fed

PRIMITIVES = ("add", "mul", "div", "cmp", "exp", "log", "sqrt")
WEIGHTS = {"add": 1, "mul": 1, "div": 1, "cmp": 1, "exp": 10, "log": 10, "sqrt": 10}  # docs/reference.md
BUDGET = 1e17  # the coursework's total
NUMERIC_ROWS = 13  # LLMTIME's alphabet: 0-9 . , ;


# ---------------------------------------------------------------- what a count depends on, besides the shapes


@dataclass(frozen=True)
class Setup:
    """The model and how it runs: every composite count below takes one.

    cfg: the Qwen2Config (sizes). lora: module name -> rank of its unmerged adapter, e.g.
    {"q_proj": 8, "v_proj": 8} (merged adapters: {}). lm_head_bias: the head has the coursework's
    bias. head_rows: rows the head computes (None: the vocabulary; 13 when the loss or the decoding
    is restricted to LLMTIME). kernel: which attention backward runs ("fused" or "math").
    convention: how the terms are counted: "ours", "report-a" or "report-b" (see Ours below).
    """
    cfg: object
    lora: dict = field(default_factory=dict)
    lm_head_bias: bool = False
    head_rows: int = None
    kernel: str = "fused"
    convention: object = "ours"

    def __post_init__(self):
        object.__setattr__(self, "lora", {m: r for m, r in (self.lora or {}).items() if r})
        object.__setattr__(self, "convention", convention_named(self.convention))
        if self.kernel not in ("math", "fused"):
            raise ValueError(f"kernel must be 'math' or 'fused', got '{self.kernel}'.")

    def replace(self, **changes) -> "Setup":
        """This setup with some fields changed, e.g. setup.replace(head_rows=13) for restricted decoding."""
        return dataclasses.replace(self, **changes)

    @property
    def rows(self) -> int:
        return self.head_rows or self.cfg.vocab_size


# ---------------------------------------------------------------- the forward pass, in model.py's order


def rms_norm(n: int, dim: int) -> Cost:
    """RMSNorm on n rows of width dim."""
    return (ops(mul=n * dim)  # x32.pow(2)
            + ops(add=n * (dim - 1), div=n)  # .mean(-1)
            + ops(add=n)  # + eps
            + ops(sqrt=n, div=n)  # rsqrt
            + ops(mul=n * dim)  # x32 * rsqrt(...)
            + ops(mul=n * dim))  # weight * x; the casts are free


def rotary_embedding(n: int, dim: int) -> Cost:
    """RotaryEmbedding.forward for n positions: cos, sin looked up (tables are precomputed: free)."""
    return FREE


def rotate_half(n: int, hd: int) -> Cost:
    """rotate_half on n vectors of head_dim hd: negate one half."""
    return ops(add=n * hd // 2)


def apply_rotary(n: int, hd: int) -> Cost:
    """x * cos + rotate_half(x) * sin on n vectors of head_dim hd."""
    return ops(mul=n * hd) + rotate_half(n, hd) + ops(mul=n * hd) + ops(add=n * hd)


def linear(n: int, d_in: int, d_out: int, bias: bool = False) -> Cost:
    """nn.Linear / F.linear on n rows: x (n, d_in) @ W^T (d_in, d_out) [+ b] -> (n, d_out)."""
    return matmul(n, d_in, d_out) + (ops(add=n * d_out) if bias else FREE)


def softmax(rows: int, n: int) -> Cost:
    """softmax over the last dim of (rows, n): max, subtract, exp, sum, divide."""
    return ops(cmp=rows * (n - 1), add=rows * n, exp=rows * n) + ops(add=rows * (n - 1), div=rows * n)


def scaled_dot_product_attention(B: int, H: int, T: int, S: int, hd: int) -> Cost:
    """softmax(q k^T * scale + mask) v for q (B, H, T, hd), k, v (B, H, S, hd): PyTorch's reference."""
    bh = B * H
    return group(scores=matmul(T, hd, S, bh) + ops(mul=bh * T * S),  # q @ k^T * scale
                 mask=ops(add=bh * T * S),  # + attn_bias (0 or -inf; causal or padding)
                 softmax=softmax(bh * T, S),
                 weighted_sum=matmul(T, S, hd, bh))  # @ v


def attention(s: Setup, B: int, T: int, S: int = None) -> Cost:
    """Attention.forward: x (B, T, D) with S keys (cached + new; S = T without a cache) -> (B, T, D)."""
    c, cfg, S, n = s.convention, s.cfg, S or T, B * T
    D, H, K, hd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    parts = dict(q_proj=projection(s, "q_proj", n, D, H * hd, bias=True),
                 k_proj=projection(s, "k_proj", n, D, K * hd, bias=True),
                 v_proj=projection(s, "v_proj", n, D, K * hd, bias=True))
    Kc = H if c.gqa_as_mha else K  # kv heads counted (the reports: as many as query heads)
    if Kc > K:  # the k and v heads that multi-head attention would have on top of the model's
        parts["kv_as_mha"] = 2 * c.linear(n, D, (Kc - K) * hd, True)
    return group(**parts,
                 rotary=c.rotary(n, H, hd) + c.rotary(n, Kc, hd),  # q and k
                 # (cache.update is a copy, and a kv head is read in place by its query heads: both free)
                 sdpa=c.scaled_dot_product_attention(B, H, T, S, hd),
                 o_proj=projection(s, "o_proj", n, H * hd, D))


def silu(n: int) -> Cost:
    """silu(x) = x / (1 + exp(-x)) on n numbers."""
    return ops(add=n, exp=n) + ops(add=n, div=n)


def mlp(s: Setup, n: int) -> Cost:
    """MLP.forward on n rows: down(silu(gate(x)) * up(x))."""
    D, F = s.cfg.dim, s.cfg.hidden_dim
    return group(gate_proj=projection(s, "gate_proj", n, D, F),
                 silu=s.convention.silu(n * F),
                 up_proj=projection(s, "up_proj", n, D, F),
                 product=ops(mul=n * F),
                 down_proj=projection(s, "down_proj", n, F, D))


def decoder_block(s: Setup, B: int, T: int, S: int = None) -> Cost:
    """DecoderBlock.forward: two pre-norm residual branches."""
    c, n, D = s.convention, B * T, s.cfg.dim
    return group(input_layernorm=c.rms_norm(n, D),
                 self_attn=attention(s, B, T, S),
                 residual_attn=c.residual(n, D),  # x = x + ...
                 post_attention_layernorm=c.rms_norm(n, D),
                 mlp=mlp(s, n),
                 residual_mlp=c.residual(n, D))  # x = x + ...


def qwen2(s: Setup, B: int, T: int) -> Cost:
    """Qwen2.forward: input_ids (B, T) -> logits (B, T, s.rows): head(body(ids))."""
    return body(s, B, T, T).extended(lm_head=head(s, B * T))


def body(s: Setup, B: int, T: int, S: int = None) -> Cost:
    """Qwen2.body: input_ids (B, T), S keys in attention -> final normed hidden states (B, T, D)."""
    c = s.convention
    return group(embed_tokens=FREE,  # a lookup
                 rope=c.rotary_embedding(B * T, s.cfg.dim),
                 layers=group(**{str(i): decoder_block(s, B, T, S) for i in range(s.cfg.n_layers)}),
                 norm=c.rms_norm(B * T, s.cfg.dim))


def head(s: Setup, n: int) -> Cost:
    """Qwen2.head on n positions: logits over s.rows tokens, with the bias when the model has one."""
    c = s.convention
    return c.linear(n, s.cfg.dim, s.rows, s.lm_head_bias if c.lm_head_bias is None else c.lm_head_bias)


# ---------------------------------------------------------------- lora/layer.py


def lora_linear(n: int, d_in: int, d_out: int, r: int, bias: bool = False) -> Cost:
    """LoRALinear.forward (unmerged) on n rows: base(x) + (x A^T * scaling) B^T."""
    return group(base=linear(n, d_in, d_out, bias),  # y = self.base(x)
                 lora_A=matmul(n, d_in, r),  # F.linear(dropout(x), lora_A)   (n, r)
                 scaling=ops(mul=n * r),  # * scaling, on r numbers per row
                 lora_B=matmul(n, r, d_out),  # F.linear(h, lora_B)   (n, d_out)
                 add=ops(add=n * d_out))  # y + ...


def projection(s: Setup, name: str, n: int, d_in: int, d_out: int, bias: bool = False) -> Cost:
    """The model's linear layer `name` (q_proj, ..., down_proj): LoRA-wrapped when s.lora gives it a rank."""
    r, c = s.lora.get(name, 0), s.convention
    return c.lora_linear(n, d_in, d_out, r, bias) if r else c.linear(n, d_in, d_out, bias)


# ---------------------------------------------------------------- qwen_min/loss.py


def cross_entropy(n: int, rows: int) -> Cost:
    """Mean cross-entropy of n rows of logits over `rows` classes: log_softmax, pick, average."""
    return (ops(cmp=n * (rows - 1), add=n * rows)  # subtract the row max
            + ops(exp=n * rows, add=n * (rows - 1), log=n)  # log of the sum of exps
            + ops(add=n * rows)  # logp = z - logsumexp
            + ops(add=n)  # -logp[target]
            + ops(add=n - 1, div=1))  # mean


def forward_with_loss(s: Setup, B: int, T: int) -> Cost:
    """The training forward of qwen_min/loss.py: T tokens through qwen2(), every position scored.

    A window of T + 1 tokens feeds its first T and scores its last T (padding is skipped by the
    loss after the log-softmax, so it still costs), hence train.py passes T = window - 1.
    """
    return qwen2(s, B, T).extended(loss=s.convention.loss(B * T, s.rows))


# ---------------------------------------------------------------- Cost: one count, two views


@dataclass(frozen=True)
class Cost:
    matmul: int = 0  # FlopCounterMode's view
    ops: dict = field(default_factory=dict)  # primitive -> count
    parts: dict = field(default_factory=dict)  # name -> Cost; when present they sum to this Cost

    @property
    def coursework(self) -> int:
        return sum(WEIGHTS[k] * v for k, v in self.ops.items())

    def __add__(self, other):
        """Counts add; named parts merge by name. A sum never drops names: adding a cost without
        parts to one with parts is refused (give it a name with extended() or group())."""
        if isinstance(other, int) and other == 0:  # so that sum() works
            return self
        if not isinstance(other, Cost):
            return NotImplemented
        if other.is_free():
            return self
        if self.is_free():
            return other
        if bool(self.parts) != bool(other.parts):
            raise ValueError("adding a Cost without named parts to one with them would lose the names; "
                             "name it with group() or extended().")
        parts = dict(self.parts)
        for k, v in other.parts.items():
            parts[k] = parts[k] + v if k in parts else v
        return Cost(self.matmul + other.matmul, _merged_ops(self, other), parts)

    __radd__ = __add__

    def __mul__(self, k: int):
        return Cost(self.matmul * k, {o: v * k for o, v in self.ops.items()}, {n: p * k for n, p in self.parts.items()})

    __rmul__ = __mul__

    def is_free(self) -> bool:
        return not self.matmul and not any(self.ops.values()) and all(p.is_free() for p in self.parts.values())

    def extended(self, **parts) -> "Cost":
        """This cost with more named parts beside its own (which it must have)."""
        clash = parts.keys() & self.parts.keys()
        if not self.parts or clash:
            raise ValueError(f"extended() adds new names to a cost with parts; got {sorted(clash) or 'a cost without parts'}.")
        return group(**self.parts, **parts)

    def __getitem__(self, path: str):
        """cost["layers.0.self_attn"]: the piece at a dotted path of part names."""
        c = self
        for name in path.split("."):
            c = c.parts[name]
        return c

    def get(self, path, default=None):
        try:
            return self[path]
        except KeyError:
            return default

    def flat(self, prefix=""):
        """(dotted name, Cost) for every piece, depth first, parents before children."""
        for name, p in self.parts.items():
            full = f"{prefix}.{name}" if prefix else name
            yield full, p
            yield from p.flat(full)

    def to_dict(self) -> dict:
        return {"matmul_view": self.matmul,
                "coursework": {"total": self.coursework, **{k: self.ops.get(k, 0) for k in PRIMITIVES}}}


def _merged_ops(*costs) -> dict:
    ops = {}
    for c in costs:
        for k, v in c.ops.items():
            ops[k] = ops.get(k, 0) + v
    return ops


FREE = Cost()


def ops(**counts) -> Cost:
    """Elementwise work, e.g. ops(add=n, exp=n)."""
    for k in counts:
        if k not in WEIGHTS:
            raise ValueError(f"unknown primitive '{k}'; use one of {', '.join(PRIMITIVES)}.")
    return Cost(ops={k: v for k, v in counts.items() if v})


def matmul(m: int, n: int, p: int, batch: int = 1) -> Cost:
    """(m x n) @ (n x p), `batch` times: m n p products and m p (n - 1) sums each; 2 m n p in the matmul view."""
    return Cost(2 * batch * m * n * p, {"mul": batch * m * n * p, "add": batch * m * p * (n - 1)})


def group(**parts) -> Cost:
    """The sum of named pieces, which stay readable in `.parts`."""
    return Cost(sum(p.matmul for p in parts.values()), _merged_ops(*parts.values()), dict(parts))


# ---------------------------------------------------------------- backward, as autograd runs it


def linear_backward(n: int, d_in: int, d_out: int, r: int = 0, grad_input: bool = True) -> Cost:
    """Backward of a frozen linear layer (LoRA-wrapped when r > 0) on n rows, for dy (n, d_out).

    The frozen W gets no gradient; dx = dy W only when the input needs one. LoRA's B and A do.
    """
    base = matmul(n, d_out, d_in) if grad_input else FREE  # dx = dy @ W
    if not r:
        return base
    return group(base=base,
                 add=FREE,  # y + ...: dy flows to both branches
                 lora_B=matmul(d_out, n, r) + matmul(n, d_out, r),  # dB = dy^T h;  dh = dy B
                 scaling=ops(mul=n * r),  # dh * scaling
                 lora_A=matmul(r, n, d_in)  # dA = dh^T x
                 + (matmul(n, r, d_in) + ops(add=n * d_in) if grad_input else FREE))  # dx += dh A


def rms_norm_backward(n: int, dim: int) -> Cost:
    """dx of RMSNorm (its weight frozen) on n rows: each op of rms_norm() in reverse."""
    return (ops(mul=n * dim)  # weight * x: d(x32 r) = dy * weight
            + ops(mul=n * dim)  # x32 * r: dx32 = g * r
            + ops(mul=n * dim, add=n * (dim - 1))  # ... and dr = sum(g * x32)
            + ops(mul=4 * n)  # rsqrt: d = -0.5 * dr * r^3
            + ops(div=n)  # mean: / dim, broadcast
            + ops(mul=2 * n * dim)  # pow(2): * 2 x
            + ops(add=n * dim))  # the two paths into x32 summed


def apply_rotary_backward(n: int, hd: int) -> Cost:
    """dx of x * cos + rotate_half(x) * sin: dy * cos + rotate_half^T(dy * sin)."""
    return ops(mul=n * hd) + ops(mul=n * hd) + rotate_half(n, hd) + ops(add=n * hd)


def softmax_backward(rows: int, n: int) -> Cost:
    """dz = p * (dp - sum(dp * p)) on (rows, n)."""
    return ops(mul=rows * n, add=rows * (n - 1)) + ops(add=rows * n) + ops(mul=rows * n)


def scaled_dot_product_attention_backward(B, H, T, S, hd, grad_q=True, grad_k=True, grad_v=True, kernel="fused") -> Cost:
    """Backward of scaled_dot_product_attention for the gradients needed.

    math: autograd through the reference, each product only when its gradient is needed.
    fused: the flash / memory-efficient kernels recompute the scores and return dq, dk, dv.
    """
    bh = B * H
    fused = kernel == "fused"
    if kernel not in ("math", "fused"):
        raise ValueError(f"kernel must be 'math' or 'fused', got '{kernel}'.")
    if fused:
        grad_q = grad_k = grad_v = True
    grad_scores = grad_q or grad_k
    recompute = (matmul(T, hd, S, bh) + ops(mul=bh * T * S, add=bh * T * S) + softmax(bh * T, S)) if fused else FREE
    return group(recompute=recompute,
                 weighted_sum=(matmul(T, hd, S, bh) if grad_scores else FREE)  # dp = dy v^T
                 + (matmul(S, T, hd, bh) if grad_v else FREE),  # dv = p^T dy
                 softmax=softmax_backward(bh * T, S) if grad_scores else FREE,
                 mask=FREE,
                 scores=(ops(mul=bh * T * S) if grad_scores else FREE)  # dz * scale
                 + (matmul(T, S, hd, bh) if grad_q else FREE)  # dq = dz k
                 + (matmul(S, T, hd, bh) if grad_k else FREE))  # dk = dz^T q


def _attention_grads(s: Setup, grad_input):
    """Which of q, k, v (and the attention output) need gradients."""
    q, k, v = (grad_input or m in s.lora for m in ("q_proj", "k_proj", "v_proj"))
    return q, k, v, (q or k or v) or "o_proj" in s.lora


def attention_backward(s: Setup, B, T, S=None, grad_input=True) -> Cost:
    """Backward of Attention; grad_input: whether x (the normed input) needs a gradient."""
    cfg, S, n = s.cfg, S or T, B * T
    D, H, K, hd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    g_q, g_k, g_v, g_out = _attention_grads(s, grad_input)
    g_y = g_q or g_k or g_v
    if not g_out:
        return FREE
    n_rep = H // K
    sum_reps = ops(add=B * K * S * hd * (n_rep - 1))  # enable_gqa's backward: n_rep query heads' grads summed per kv head

    def proj(name, d_out, needed):
        return linear_backward(n, D, d_out, s.lora.get(name, 0), grad_input) if needed else FREE

    return group(q_proj=proj("q_proj", H * hd, g_q),
                 k_proj=proj("k_proj", K * hd, g_k),
                 v_proj=proj("v_proj", K * hd, g_v),
                 inputs=ops(add=2 * n * D) if grad_input else FREE,  # dx from q, k, v summed
                 rotary=(apply_rotary_backward(B * H * T, hd) if g_q else FREE)
                 + (apply_rotary_backward(B * K * T, hd) if g_k else FREE),
                 gqa_sum=(sum_reps if g_k else FREE) + (sum_reps if g_v else FREE),
                 sdpa=scaled_dot_product_attention_backward(B, H, T, S, hd, g_q, g_k, g_v, s.kernel) if g_y else FREE,
                 o_proj=linear_backward(n, H * hd, D, s.lora.get("o_proj", 0), g_y))


def silu_backward(n: int) -> Cost:
    """dx = dy * s (1 + x (1 - s)), s = sigmoid(x) recomputed, on n numbers."""
    return ops(add=2 * n, exp=n, div=n) + ops(add=2 * n, mul=3 * n)


def _mlp_grads(s: Setup, grad_input):
    gate, up = (grad_input or m in s.lora for m in ("gate_proj", "up_proj"))
    return gate, up, gate or up or "down_proj" in s.lora


def mlp_backward(s: Setup, n, grad_input=True) -> Cost:
    """Backward of MLP on n rows."""
    D, F = s.cfg.dim, s.cfg.hidden_dim
    g_gate, g_up, g_out = _mlp_grads(s, grad_input)
    if not g_out:
        return FREE
    return group(gate_proj=linear_backward(n, D, F, s.lora.get("gate_proj", 0), grad_input) if g_gate else FREE,
                 silu=silu_backward(n * F) if g_gate else FREE,
                 up_proj=linear_backward(n, D, F, s.lora.get("up_proj", 0), grad_input) if g_up else FREE,
                 product=ops(mul=n * F * (g_gate + g_up)),  # d gate = dy * up, d up = dy * gate
                 inputs=ops(add=n * D) if grad_input else FREE,  # dx from gate and up summed
                 down_proj=linear_backward(n, F, D, s.lora.get("down_proj", 0), g_gate or g_up))


def block_needs_grad(s: Setup, grad_input: bool) -> bool:
    """Whether a decoder block's output needs a gradient: its input does, or it holds something trained.
    Autograd runs nothing below the first trained module, so layer 0's input never gets one."""
    g_mid = grad_input or _attention_grads(s, grad_input)[3]
    return g_mid or _mlp_grads(s, g_mid)[2]


def decoder_block_backward(s: Setup, B, T, grad_input=True) -> Cost:
    """Backward of DecoderBlock; grad_input: whether its input needs a gradient."""
    n, D = B * T, s.cfg.dim
    g_attn = _attention_grads(s, grad_input)[3]
    g_mid = grad_input or g_attn
    g_mlp = _mlp_grads(s, g_mid)[2]
    return group(input_layernorm=rms_norm_backward(n, D) if grad_input and g_attn else FREE,
                 self_attn=attention_backward(s, B, T, T, grad_input),
                 residual_attn=ops(add=n * D) if grad_input and g_attn else FREE,  # dx: residual + branch
                 post_attention_layernorm=rms_norm_backward(n, D) if g_mid and g_mlp else FREE,
                 mlp=mlp_backward(s, n, g_mid),
                 residual_mlp=ops(add=n * D) if g_mid and g_mlp else FREE)


def cross_entropy_backward(n: int, rows: int) -> Cost:
    """d logits of the mean cross-entropy: d logp = -1/n at the target; log_softmax^T."""
    return (ops(div=1, add=n)  # mean and pick
            + ops(add=n * (rows - 1))  # sum of d logp per row
            + ops(exp=n * rows, mul=n * rows, add=n * rows))  # d z = d logp - exp(logp) * sum


def backward(s: Setup, B, T) -> Cost:
    """The backward pass of one LoRA training step: T tokens in, each position scored (see forward_with_loss())."""
    rows, n = s.rows, B * T
    layers, g = {}, False  # the embedding output needs no gradient
    for i in range(s.cfg.n_layers):
        layers[str(i)] = decoder_block_backward(s, B, T, g)
        g = block_needs_grad(s, g)
    if not (g or s.lm_head_bias):
        return FREE
    return group(embed_tokens=FREE, rope=FREE,
                 layers=group(**layers),
                 norm=rms_norm_backward(n, s.cfg.dim) if g else FREE,
                 lm_head=(matmul(n, rows, s.cfg.dim) if g else FREE)  # dh = dlogits @ W
                 + (ops(add=(n - 1) * rows) if s.lm_head_bias else FREE),  # db = sum over rows
                 loss=cross_entropy_backward(n, rows))


# ---------------------------------------------------------------- a training step


def forward_backward(s: Setup, B, T) -> Cost:
    """Forward plus backward, merged module by module (what FlopCounterMode attributes to each)."""
    return forward_with_loss(s, B, T) + backward(s, B, T)


def trainable_parameters(s: Setup) -> int:
    """Numbers the optimizer updates: every lora_A, lora_B, and the full-vocab head bias."""
    per_layer = sum(r * sum(layer_widths(s.cfg)[m]) for m, r in s.lora.items())
    return s.cfg.n_layers * per_layer + (s.cfg.vocab_size if s.lm_head_bias else 0)


def adamw(n_params: int) -> Cost:
    """One torch.optim.AdamW step on n numbers (per-tensor scalars such as bias corrections: ignored)."""
    p = n_params
    return (ops(mul=p)  # p *= 1 - lr * wd
            + ops(mul=2 * p, add=p)  # m = b1 m + (1 - b1) g
            + ops(mul=3 * p, add=p)  # v = b2 v + (1 - b2) g g
            + ops(sqrt=p, div=p, add=p)  # denom = sqrt(v) / sqrt(bc2) + eps
            + ops(div=p, mul=p, add=p))  # p -= step * m / denom


def train_step(s: Setup, B, T) -> Cost:
    """One optimizer step on a (B, T) batch: parts forward, backward, optimizer.

    Under a report's convention the backward is a multiple of the forward and the optimizer is not counted.
    """
    fwd = forward_with_loss(s, B, T)
    if s.convention.backward_factor:
        return group(forward=fwd, backward=s.convention.backward_factor * fwd, optimizer=FREE)
    return group(forward=fwd, backward=backward(s, B, T), optimizer=adamw(trainable_parameters(s)))


def train_step_accumulated(s: Setup, shapes, replicas: int = 1) -> Cost:
    """One optimizer step over micro-batches of the (B, T) `shapes` (train.py --micro-batch): each one's
    forward and backward, autograd adding each later one's gradients into .grad (part "accumulate":
    an add per trained number), then one optimizer step. The loss weights per micro-batch are scalars: not counted.

    Data parallel (torchrun): `shapes` are every rank's micro-batches. Summing the ranks' gradients
    (the all-reduce) adds the same numbers accumulation would, so it is counted as accumulation; the
    optimizer step runs on each of the `replicas` ranks, so it is counted that many times."""
    if len(shapes) == 1 and replicas == 1:
        return train_step(s, *shapes[0])
    steps = [train_step(s, B, T) for B, T in shapes]
    added = FREE if s.convention.backward_factor else ops(add=(len(shapes) - 1) * trainable_parameters(s))
    return group(forward=sum(c["forward"] for c in steps), backward=sum(c["backward"] for c in steps),
                 accumulate=added, optimizer=steps[0]["optimizer"] * replicas)


def coursework_estimate(step: Cost) -> Cost:
    """The coursework's training estimate: backward = 2 x forward, so a step = 3 x forward."""
    return 3 * Cost(step["forward"].matmul, step["forward"].ops)


# ---------------------------------------------------------------- generation (qwen_min/generate.py)


def generate(s: Setup, B, prompt_tokens, new_tokens, samples=1, active=None, kv_cache=True, fed=None, keys=None) -> Cost:
    """Producing new_tokens tokens after prompt_tokens, B prompts at once.

    With the KV cache (qwen_min.generate): prefill the prompt, the head on its last position
    only, then one token per step attending to all keys so far (the last token is never fed
    back). Without it: the whole sequence so far through the body for every new token.
    s.head_rows: output rows computed per token (13 when decoding is restricted to LLMTIME).
    samples: continuations per prompt, all from one prefill (the prefill runs B rows, the rest
    B * samples). active: how many rows produce each new token (default all, every time); a row
    that has finished leaves the batch. Sampling (argmax, top-k, ...) is not counted.
    fed: with guesses checked (qwen_min/speculative.py), active[i] counts the rows of forward pass i
    and fed[i] the columns each of them fed (fed[0] = 1: the prefill's last position); every column
    is counted, holes and wrong guesses included: the arithmetic was done; keys[i]: the cache slots
    pass i attended to (Generation.keys; default: the prompt and every column fed so far, as if
    none were dropped). new_tokens and samples are then not used (one sample per prompt).
    """
    P, N = prompt_tokens, new_tokens
    if keys is not None and fed is None:
        raise ValueError("keys counts the slots of passes with guesses: pass fed (and active) with it.")
    if fed is not None and (active is None or len(fed) != len(active) or len(keys or fed) != len(fed)):
        raise ValueError(f"fed needs active (and keys, if given), one entry per forward pass each; got {len(fed)} "
                         f"passes, {None if active is None else len(active)} and {None if keys is None else len(keys)}.")
    active = list(active) if active is not None else [B * samples] * N
    if fed is not None:  # pass i: active[i] rows of fed[i] columns, attending to keys[i] slots
        keys = keys or list(accumulate(fed[1:], initial=P))  # P, P + fed[1], ...
        decode = sum((body(s, rows, w, S) for rows, w, S in zip(active[1:], fed[1:], keys[1:])), FREE)
        return group(prefill=body(s, B, P, P), decode=decode,
                     lm_head=sum((head(s, rows * w) for rows, w in zip(active, fed)), FREE))
    heads = sum((k * head(s, r) for r, k in Counter(active).items()), FREE)
    if not kv_cache:
        return group(forward=_steps(active, 0, lambda r, i: body(s, r, P + i, P + i)), lm_head=heads)
    return group(prefill=body(s, B, P, P),
                 decode=_steps(active, 1, lambda r, i: body(s, r, 1, P + i)),  # rows that go on
                 lm_head=heads)


def _steps(active, start, cost) -> Cost:
    """cost(active[i], i) summed over the steps i >= start, without a call per step.

    For a fixed number of rows a step's cost is a polynomial of degree 2 at most in i (attention is
    T x S), so a run of k steps sums exactly to a combination of its first three (Newton's forward
    differences): f(0) + ... + f(k-1) = (k - C2 + C3) f(0) + (C2 - 2 C3) f(1) + C3 f(2), with
    C2 = k(k-1)/2 and C3 = k(k-1)(k-2)/6. A 30,000-token forecast costs three calls, not 30,000.
    """
    total, i = FREE, start
    for rows, run in groupby(active[start:]):
        k = len(list(run))
        f = lambda j, rows=rows, i=i: cost(rows, i + j)
        if k <= 3:
            total += sum((f(j) for j in range(k)), FREE)
        else:
            c2, c3 = k * (k - 1) // 2, k * (k - 1) * (k - 2) // 6
            total += (k - c2 + c3) * f(0) + (c2 - 2 * c3) * f(1) + c3 * f(2)
        i += k
    return total


def forecast(s: Setup, B, context_steps, horizon_steps, tokens_per_step=10, kv_cache=True) -> Cost:
    """Forecasting horizon_steps time steps from context_steps, B series at once.

    tokens_per_step: LLMTIME tokens per step, e.g. "1.23,0.45;" = 10 (2 decimals).
    """
    return generate(s, B, context_steps * tokens_per_step, horizon_steps * tokens_per_step, kv_cache=kv_cache)


# ---------------------------------------------------------------- conventions: ours, and each report's own


class Ours:
    """How each term of the mirror is counted. This one, the default, counts what qwen-min runs as
    it runs it; its matmul view is proved equal to FlopCounterMode. A report's convention is a
    subclass that changes only the terms its authors counted otherwise (docs/flops.md, one table).
    """

    name = "ours"
    gqa_as_mha = False  # k, v counted with the model's n_kv_heads
    lm_head_bias = None  # the head's bias counted when the model has one; True: always
    backward_factor = None  # None: the backward autograd runs (backward()); k: k x forward, no optimizer
    linear = staticmethod(linear)
    lora_linear = staticmethod(lora_linear)
    rms_norm = staticmethod(rms_norm)
    rotary_embedding = staticmethod(rotary_embedding)
    scaled_dot_product_attention = staticmethod(scaled_dot_product_attention)
    silu = staticmethod(silu)
    loss = staticmethod(cross_entropy)

    @staticmethod
    def rotary(n, heads, hd):
        """apply_rotary on `heads` heads of n tokens."""
        return apply_rotary(n * heads, hd)

    @staticmethod
    def residual(n, dim):
        return ops(add=n * dim)

    tokens_fed = staticmethod(tokens_fed)  # a window's last token is only a target (qwen_min/loss.py)


def _free(*_):
    return FREE


class ReportA(Ours):
    """Report A (Tutt 2025, Tables 3 and 4), as its code counts (JacobTutt/lora_timeseries,
    src/flops_counter.py): primitives weighted as ours, products m p (2n - 1) as ours."""

    name = "report-a"
    gqa_as_mha = True  # "assume a traditional multi-head attention": k and v 896 wide
    lm_head_bias = True  # the coursework's trainable head bias, always added
    backward_factor = 2  # "the backward pass has twice the cost of the forward pass"
    loss = staticmethod(_free)  # cross-entropy "not considered internal to the model"

    @staticmethod
    def rms_norm(n, dim):
        """Squares, their sum, / dim and a root per row; a divide by the root and a weight per number (no eps)."""
        return ops(mul=n * dim, add=n * (dim - 1), div=n, sqrt=n) + ops(div=n * dim, mul=n * dim)

    @staticmethod
    def rotary(n, heads, hd):
        """RoPE as the full (heads hd x heads hd) rotation matrix applied to each token."""
        return matmul(n, heads * hd, heads * hd)

    @staticmethod
    def scaled_dot_product_attention(B, H, T, S, hd):
        """Scores divided by sqrt(hd) (one root per sequence), no mask, softmax without its max."""
        bh = B * H
        return group(scores=matmul(T, hd, S, bh) + ops(div=bh * T * S, sqrt=B),
                     mask=FREE,
                     softmax=ops(exp=bh * T * S, add=bh * T * (S - 1), div=bh * T * S),
                     weighted_sum=matmul(T, S, hd, bh))

    @staticmethod
    def silu(n):
        return ops(exp=n, add=n, div=n)  # x / (1 + exp(-x)), the negation free

    @staticmethod
    def lora_linear(n, d_in, d_out, r, bias=False):
        """x W + alpha B A x, the adapter counted d_in wide on both sides and alpha on its output."""
        return group(base=linear(n, d_in, d_out, bias),
                     lora_A=matmul(n, d_in, r),
                     lora_B=matmul(n, r, d_in),
                     scaling=ops(mul=n * d_in),
                     add=ops(add=n * d_in))

    @staticmethod
    def tokens_fed(window):
        return window


def matmul_2mnp(m: int, n: int, p: int, batch: int = 1) -> Cost:
    """Report B's (m x n) @ (n x p): 2 m n p, that is n multiplies and n adds per output number."""
    return Cost(2 * batch * m * n * p, {"mul": batch * m * n * p, "add": batch * m * n * p})


class ReportB(Ours):
    """Report B (Wang 2025, section 3.3, Tables 3 and 13), as its code counts (AdamWang0224/
    Finetune_Lora_for_Time_Series_Forecasting, src/flops.py): per layer 2 RMSNorm (B L)(4d + 11),
    attention 8 B L d^2 + 4 B L^2 d, MLP 6 B L d d_ff + 14 B L d_ff; RoPE B L d and the head
    2 B L d V once; LoRA 2 B L r (d_in + d_out) at the layer's real widths. Its constants are the
    coursework's weights: 11 = a divide and a root, 14 = exp, add, divide and two multiplies.
    """

    name = "report-b"
    gqa_as_mha = True  # "simplify GQA to standard multi-head attention"
    backward_factor = 2
    loss = staticmethod(_free)
    residual = staticmethod(_free)  # not in its formula
    rotary = staticmethod(_free)  # counted once, as an addition to the embeddings (rotary_embedding)

    @staticmethod
    def linear(n, d_in, d_out, bias=False):
        return matmul_2mnp(n, d_in, d_out)  # biases not counted

    @staticmethod
    def lora_linear(n, d_in, d_out, r, bias=False):
        return group(base=matmul_2mnp(n, d_in, d_out), lora_A=matmul_2mnp(n, d_in, r), lora_B=matmul_2mnp(n, r, d_out))

    @staticmethod
    def rms_norm(n, dim):
        """4d + 11 per row: square and sum (2d), a divide and a root (11), divide and weight (2d)."""
        return ops(mul=n * dim, add=n * dim) + ops(div=n, sqrt=n) + ops(div=n * dim, mul=n * dim)

    @staticmethod
    def rotary_embedding(n, dim):
        return ops(add=n * dim)  # "only account for their addition to token embeddings"

    @staticmethod
    def scaled_dot_product_attention(B, H, T, S, hd):
        """Q K^T and A V, 2 B L^2 d each; no scale, mask or softmax."""
        return group(scores=matmul_2mnp(T, hd, S, B * H), mask=FREE, softmax=FREE,
                     weighted_sum=matmul_2mnp(T, S, hd, B * H))

    @staticmethod
    def silu(n):
        return ops(exp=n, add=n, div=n, mul=n)  # x sigma(x): 13 per number, the gate's product makes 14

    @staticmethod
    def tokens_fed(window):
        return window


CONVENTIONS = {c.name: c() for c in (Ours, ReportA, ReportB)}


def convention_named(convention) -> Ours:
    """A convention from its name ("ours", "report-a", "report-b") or itself."""
    if isinstance(convention, Ours):
        return convention
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOP convention {convention!r}; use one of {', '.join(CONVENTIONS)}.")
    return CONVENTIONS[convention]


LORA_PARTS = ("lora_A", "scaling", "lora_B", "add")


def lora_share(cost: Cost) -> Cost:
    """The adapters' part of a cost: every lora_A, scaling, lora_B and add of a LoRA-wrapped *_proj."""
    return sum((p for name, p in cost.flat()
                if name.rsplit(".", 2)[-1] in LORA_PARTS and name.rsplit(".", 2)[-2].endswith("_proj")), FREE)


def calflops(cfg, B: int, T: int) -> int:
    """What calflops 0.3.2 (report B's check, its Table 4) counts for transformers' Qwen2 forward on
    (B, T) ids: 2 per multiply-add of every F.linear (the real GQA widths, no bias) and 1 per output
    of F.silu. It patches neither scaled_dot_product_attention nor the `*`, `+` and `@` operators,
    so it sees no attention scores, norms, RoPE or residuals, and no LoRA branch (`x @ A.T`)."""
    D, F, H, K, hd = cfg.dim, cfg.hidden_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    n = B * T
    macs_per_row = cfg.n_layers * (D * H * hd + 2 * D * K * hd + H * hd * D + 3 * D * F) + D * cfg.vocab_size
    return 2 * n * macs_per_row + cfg.n_layers * n * F


# ---------------------------------------------------------------- planning a run, and the ledger


@dataclass(frozen=True)
class Forecasts:
    """A run's final evaluation: `series` forecasts, `batch` at a time (the last batch may be partial),
    each `k` context steps -> `h` steps of `tokens_per_step` tokens, the head computing `head_rows` rows."""
    series: int
    batch: int = 1
    k: int = 50
    h: int = 50
    tokens_per_step: int = 10
    head_rows: int = NUMERIC_ROWS
    kv_cache: bool = True


def plan_run(s: Setup, steps, batch, context, eval_every=0, eval_batches=0, forecasts: Forecasts = None) -> dict:
    """The cost of one run: {"train": steps x train_step, "eval": validation, "generate": final forecasts}.

    context: tokens per window; the model reads context - 1 of them (see forward_with_loss()); a
    report's convention counts all of them. Validation: every eval_every steps, eval_batches forward
    passes with the loss (no backward).
    """
    T = s.convention.tokens_fed(context)
    train = steps * train_step(s, batch, T)
    n_val = -(-steps // eval_every) * eval_batches if eval_every else 0  # and one at the last step (train.py)
    val = n_val * forward_with_loss(s, batch, T)
    gen = FREE
    if forecasts and forecasts.series:
        f, g = forecasts, s.replace(lora={}, head_rows=forecasts.head_rows)  # evaluate.py merges the adapter
        full, rest = divmod(f.series, f.batch)
        one = lambda b: forecast(g, b, f.k, f.h, f.tokens_per_step, f.kv_cache)
        gen = full * one(f.batch) + (one(rest) if rest else FREE)
    return {"train": train, "eval": val, "generate": gen}


class Ledger:
    """FLOPs planned and spent, by stage; kept as one JSON object per line."""

    KINDS = ("train", "eval", "generate")
    SOURCES = ("plan", "spent")

    def __init__(self, path=None, budget: float = BUDGET):
        self.path, self.budget, self.entries = (Path(path) if path else None), budget, []
        if self.path is not None and self.path.exists():
            self.entries = Ledger.read(self.path).entries

    def add(self, stage: str, kind: str, flops, source: str = "spent", **extra) -> dict:
        """Records flops (a Cost, or a number of coursework FLOPs) for a stage; appends to the file."""
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {', '.join(self.KINDS)}, got '{kind}'.")
        if source not in self.SOURCES:
            raise ValueError(f"source must be 'plan' or 'spent', got '{source}'.")
        entry = {"stage": str(stage), "kind": kind, "source": source}
        if isinstance(flops, Cost):
            entry.update(flops=float(flops.coursework), matmul=float(flops.matmul))
        else:
            entry["flops"] = float(flops)
        entry.update(extra)
        self.entries.append(entry)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            append_jsonl(self.path, entry)
        return entry

    def totals(self) -> dict:
        """(stage, source) -> {"train", "eval", "generate", "total"}, in order of first entry."""
        out = {}
        for e in self.entries:
            row = out.setdefault((e["stage"], e["source"]), dict.fromkeys(self.KINDS + ("total",), 0.0))
            row[e["kind"]] += e["flops"]
            row["total"] += e["flops"]
        return out

    def total(self, source: str = "spent") -> float:
        return sum(e["flops"] for e in self.entries if e["source"] == source)

    def markdown(self) -> str:
        lines = ["| stage | source | training | evaluation | total | % of budget |", "|---|---|---|---|---|---|"]
        pct = lambda x: f"{100 * x / self.budget:.2f}%"
        for (stage, source), t in self.totals().items():
            lines.append(f"| {stage} | {source} | {t['train']:.3g} | {t['eval'] + t['generate']:.3g} | "
                         f"{t['total']:.3g} | {pct(t['total'])} |")
        for source in self.SOURCES:
            if any(e["source"] == source for e in self.entries):
                tr = sum(e["flops"] for e in self.entries if e["source"] == source and e["kind"] == "train")
                tot = self.total(source)
                lines.append(f"| **total** | {source} | {tr:.3g} | {tot - tr:.3g} | {tot:.3g} | {pct(tot)} |")
        return "\n".join(lines)

    def write(self, path):
        atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in self.entries))

    @classmethod
    def read(cls, path, budget: float = BUDGET) -> "Ledger":
        ledger = cls(budget=budget)
        text = Path(path).read_text()
        lines = text.split("\n")
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                e = json.loads(line)
                e["flops"] = float(e["flops"])
                if not isinstance(e.get("stage"), str) or e["kind"] not in cls.KINDS or e["source"] not in cls.SOURCES:
                    raise KeyError("kind")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                if i == len(lines):  # a last line without its newline: an append cut short by a kill
                    break
                raise ValueError(f"{path}, line {i}: not a ledger entry (need stage, kind, source, flops).") from None
            ledger.entries.append(e)
        return ledger


# ---------------------------------------------------------------- each report's own tables


def report_a_tables(cfg, B: int, T: int, steps: int, lora=None) -> dict:
    """Report A's Table 3 (one sequence of T tokens: Cost per row) and Table 4 (a step of B sequences, and steps of them)."""
    plain, adapted = Setup(cfg, convention="report-a"), Setup(cfg, lora, convention="report-a")
    fwd = qwen2(adapted, 1, T)
    layer = fwd["layers.0"]
    table3 = {"Single Attention Block": attention(plain, 1, T),  # its LoRA has a row of its own
              "Single MLP Block": mlp(plain, T),
              "RMS, Residual etc": sum((layer[k] for k in ("input_layernorm", "residual_attn",
                                                          "post_attention_layernorm", "residual_mlp")), FREE),
              "Single Transformer Layer": layer,
              "LoRA Cost in this Layer": lora_share(layer),
              "Full Forward Pass": fwd}
    step = train_step(adapted, B, T)
    table4 = {f"Single Step (N = 1, B = {B})": step, f"Training Limit (N = {steps}, B = {B})": steps * step}
    return {"table3": table3, "table4": {k: {"total": c.coursework, "lora": lora_share(c).coursework,
                                             "budget_share": c.coursework / BUDGET} for k, c in table4.items()}}


def report_b_tables(cfg, B: int, T: int, steps: int, lora=None) -> dict:
    """Report B's Table 3 (Qwen without LoRA), Table 4 (calflops) and a Table 13 row (steps of B x T), in FLOPs."""
    qwen = train_step(Setup(cfg, convention="report-b"), B, T)
    with_lora = train_step(Setup(cfg, lora, convention="report-b"), B, T)
    measured = calflops(cfg, B, T)
    return {"table3": {"forward": qwen["forward"].coursework, "forward_backward": qwen.coursework},
            "table4_calflops": {"forward": measured, "forward_backward": 3 * measured},
            "table13": {"steps": steps, "L": T, "r": max(lora.values()) if lora else 0,
                        "lora": steps * lora_share(with_lora).coursework, "qwen": steps * qwen.coursework,
                        "total": steps * with_lora.coursework}}


def _log10(x) -> str:
    return f"{math.log10(x):.3f}" if x > 0 else "-"


def _fmt_report(name: str, t: dict, B: int, T: int, lora) -> str:
    if name == "report-a":
        cols = ("add", "mul", "div", "exp", "sqrt")
        lines = [f"Report A, Table 3: one sequence of {T} tokens, LoRA {lora or 'none'} (Exp and Sqrt weighted x 10)",
                 f"  {'Operation Cost':<28}" + "".join(f"{h:>11}" for h in ("Add.", "Mult.", "Div.", "Exp.", "Sqrt", "Total"))]
        for row, c in t["table3"].items():
            lines.append(f"  {row:<28}" + "".join(f"{WEIGHTS[k] * c.ops.get(k, 0):>11.3g}" for k in cols)
                         + f"{c.coursework:>11.3g}")
        lines.append(f"  Percentage of budget: {100 * t['table3']['Full Forward Pass'].coursework / BUDGET:.3g}%")
        lines += ["Report A, Table 4", f"  {'Training Setup':<36}{'Total FLOPs':>13}{'LoRA FLOPs':>13}{'% of budget':>13}"]
        for row, v in t["table4"].items():
            lines.append(f"  {row:<36}{v['total']:>13.5g}{v['lora']:>13.5g}{100 * v['budget_share']:>12.5g}%")
        return "\n".join(lines)
    t3, t4, t13 = t["table3"], t["table4_calflops"], t["table13"]
    rounded = {k: float(f"{v:.3g}") for k, v in t4.items()}  # calflops prints 3 digits; the report's logs are of those
    return "\n".join([
        f"Report B, Table 3: batch {B} x {T} tokens, no LoRA",
        f"  {'Single Forward Pass':<22}{t3['forward']:>12.4g}{_log10(t3['forward']):>9}",
        f"  {'Forward + Backward':<22}{t3['forward_backward']:>12.4g}{_log10(t3['forward_backward']):>9}",
        "Report B, Table 4: calflops on transformers' Qwen2 (sdpa attention), as it prints",
        f"  {'Single Forward Pass':<22}{rounded['forward']:>12.3g}{_log10(rounded['forward']):>9}",
        f"  {'Forward + Backward':<22}{rounded['forward_backward']:>12.3g}{_log10(rounded['forward_backward']):>9}",
        "Report B, Table 13 row: Steps  L  r  log10(LoRA FLOPs)  log10(Qwen FLOPs)  log10(Total FLOPs)",
        f"  {t13['steps']}  {t13['L']}  {t13['r']}  {_log10(t13['lora'])}  {_log10(t13['qwen'])}  {_log10(t13['total'])}"])


# ---------------------------------------------------------------- command line

# Upper bounds far above any real run and far below sizes whose counts would overflow a float or
# whose generation loop would not finish: a typo fails here with one sentence.
MAX_BATCH, MAX_STEPS, MAX_SERIES, MAX_BUDGET = 1 << 20, 10**9, 10**7, 1e30


def lora_targets(targets: str, rank: int) -> dict:
    """A --targets value ("q,v", peft's "q_proj,v_proj", "all-linear", "none") -> {"q_proj": rank, ...}; rank 0 -> {}."""
    return dict.fromkeys(parse_targets(targets), rank) if rank else {}


def layer_widths(cfg) -> dict:
    """module name -> (d_in, d_out) of each linear layer LoRA can wrap."""
    D, F, H, K, hd = cfg.dim, cfg.hidden_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return {"q_proj": (D, H * hd), "k_proj": (D, K * hd), "v_proj": (D, K * hd), "o_proj": (H * hd, D),
            "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}


def forward_table(cost: Cost) -> list:
    """(module, Cost) rows for a qwen2() cost, the decoder layers summed into `layers.*`."""
    layers = sum(cost["layers"].parts.values(), FREE)
    rows = [("embed_tokens", cost["embed_tokens"]), ("rope", cost["rope"])]
    for name, c in layers.parts.items():
        rows.append((f"layers.*.{name}", c))
        if name in ("self_attn", "mlp"):
            rows += [(f"layers.*.{name}.{sub}", s) for sub, s in c.parts.items()]
    rows += [("norm", cost["norm"]), ("lm_head", cost["lm_head"]), ("total", cost)]
    return rows


def _fmt_table(rows) -> str:
    head = ["module", "matmul view", *PRIMITIVES, "coursework"]
    body = [[name, f"{c.matmul:.4g}", *(f"{c.ops.get(k, 0):.4g}" for k in PRIMITIVES), f"{c.coursework:.4g}"]
            for name, c in rows]
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = lambda r: "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head)] + [fmt(r) for r in body])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="flops.py", description="Exact FLOPs of qwen-min: one forward pass, a LoRA training step, a run.")
    p.add_argument("--model", help="a local checkpoint folder or its config.json: the shape to count (default: Qwen2.5-0.5B's)")
    p.add_argument("--config", metavar="FILE", help="flag values from a TOML, YAML or JSON file; flags given here override the file's")
    p.add_argument("--convention", choices=list(CONVENTIONS), default="ours",
                   help="ours: every operation as it runs (matmul view equal to FlopCounterMode); report-a, "
                        "report-b: the same mirror counted as each published report counted it, with its tables "
                        "(docs/flops.md)")
    p.add_argument("--context", type=int, default=512, help="tokens per training window")
    p.add_argument("--batch", type=int, default=4, help="training windows per step")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--targets", default="q,v", help="layers LoRA adapts: q,k,v,o,gate,up,down, peft's q_proj,..., "
                                                   "all-linear, or none (no LoRA)")
    p.add_argument("--steps", type=int, default=2000, help="training steps")
    p.add_argument("--lm-head-bias", action="store_true", help="train the coursework's lm_head bias")
    p.add_argument("--vocab", choices=["full", "numeric"], default="full",
                   help="loss over the full vocabulary or the 13 LLMTIME tokens (head of 13 rows)")
    p.add_argument("--attention", choices=["math", "fused"], default=None,
                   help="attention backward: fused (flash / memory-efficient, what training runs; default) or math; "
                        "our convention only")
    p.add_argument("--eval-every", type=int, default=0, help="validate every N steps, as train.py's --eval-every (0: never; train.py's default is 100)")
    p.add_argument("--eval-batches", type=int, default=0, help="batches per validation, as train.py's --eval-batches (train.py's default is 10)")
    p.add_argument("--forecast-series", type=int, default=0, help="series forecast in the final evaluation (evaluate.py)")
    p.add_argument("--forecast-batch", type=int, default=1, help="series generated at once, as evaluate.py's --batch")
    p.add_argument("--k", type=int, default=50, help="forecast prompt: context time steps, as evaluate.py's --k")
    p.add_argument("--h", type=int, default=50, help="forecast: time steps generated, as evaluate.py's --h")
    p.add_argument("--tokens-per-step", type=int, default=10, help="LLMTIME tokens per time step (10 at 2 decimals)")
    p.add_argument("--gen-head-rows", type=int, default=NUMERIC_ROWS, help="head rows while decoding (vocab: all)")
    p.add_argument("--no-kv-cache", action="store_true", help="generation recomputes the context every token")
    p.add_argument("--flops-budget", type=float, default=BUDGET, help="the FLOP budget the plan is checked against, as train.py's")
    p.add_argument("--stage", default="run", help="stage name in the ledger")
    p.add_argument("--ledger", help="append the plan to this JSON-lines ledger")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    for old, new in (("--lora-targets", "--targets"), ("--budget", "--flops-budget"), ("--val-every", "--eval-every"),
                     ("--val-batches", "--eval-batches"), ("--eval-series", "--forecast-series"),
                     ("--eval-batch", "--forecast-batch"), ("--eval-context-steps", "--k"), ("--eval-horizon-steps", "--h")):
        renamed(p, old, new)  # the names before one vocabulary across the scripts
    return p


def check_flags(a, cfg) -> list:
    """The flags' problems, one sentence each (empty when all is well)."""
    def within(flag, low, high, why=""):
        v = getattr(a, flag.removeprefix("--").replace("-", "_"))
        return [] if low <= v <= high else [f"{flag} must be from {low} to {high}{why}, not {v}"]

    positions = f" (the model's {cfg.max_seq_len} positions)"
    problems = (within("--context", 2, cfg.max_seq_len, positions) + within("--batch", 1, MAX_BATCH)
                + within("--steps", 1, MAX_STEPS) + within("--eval-every", 0, MAX_STEPS)
                + within("--eval-batches", 0, MAX_SERIES) + within("--forecast-series", 0, MAX_SERIES)
                + within("--forecast-batch", 1, MAX_BATCH) + within("--gen-head-rows", 1, cfg.vocab_size, " (the vocabulary)")
                + within("--k", 1, cfg.max_seq_len) + within("--h", 1, cfg.max_seq_len)
                + within("--tokens-per-step", 1, cfg.max_seq_len))
    if (a.eval_every > 0) != (a.eval_batches > 0):
        problems.append("--eval-every and --eval-batches go together: give both, or neither, a value above 0")
    if not problems and a.forecast_series:
        tokens = (a.k + a.h) * a.tokens_per_step
        if tokens > cfg.max_seq_len:
            problems.append(f"a forecast of --k + --h = "
                            f"{a.k + a.h} steps of {a.tokens_per_step} tokens is "
                            f"{tokens} tokens, more than the model's {cfg.max_seq_len} positions")
    try:
        targets = lora_targets(a.targets, 1)
    except ValueError as e:
        return problems + [f"--targets: {e}".rstrip(".")]
    if a.targets.strip() != "none":
        if not targets:
            problems.append(f"--targets {a.targets!r} names no layer; give some of q,k,v,o,gate,up,down, all-linear, or none")
        else:  # a rank above a layer's narrower side is no longer low-rank
            width, name = min((min(layer_widths(cfg)[m]), m) for m in targets)
            problems += within("--rank", 1, width, f" (the width of {name})")
    if not (0 < a.flops_budget <= MAX_BUDGET):  # also refuses nan and inf
        problems.append(f"--flops-budget must be a number of FLOPs above 0 and at most {MAX_BUDGET:g}, not {a.flops_budget}")
    if a.attention and a.convention != "ours":
        problems.append(f"--attention chooses the backward kernel, which {a.convention} does not count "
                        "(backward = 2 x forward); leave it out")
    if not a.stage.strip():
        problems.append("--stage must name the stage in the ledger, not be empty")
    return problems


def main(argv=None):
    from qwen_min.config import Qwen2Config

    p = build_parser()
    a = parse_with_config(p, argv)
    path = Path(a.model) / "config.json" if a.model and Path(a.model).is_dir() else a.model
    cfg = Qwen2Config.from_json(path) if a.model else Qwen2Config()  # a bad file: a UserError naming it
    problems = check_flags(a, cfg)
    if problems:
        p.error(problems[0] + ".")
    c = CONVENTIONS[a.convention]
    lora = lora_targets(a.targets, a.rank)
    rows = NUMERIC_ROWS if a.vocab == "numeric" else cfg.vocab_size
    kernel = a.attention or "fused"
    setup = Setup(cfg, lora, a.lm_head_bias, rows, kernel, c)
    T = c.tokens_fed(a.context)  # ours: the loss feeds context - 1 tokens (qwen_min/loss.py); the reports: all

    fwd = qwen2(setup, a.batch, a.context)
    step = train_step(setup, a.batch, T)
    estimate = coursework_estimate(step)
    run = plan_run(setup, a.steps, a.batch, a.context, a.eval_every, a.eval_batches,
                   Forecasts(a.forecast_series, a.forecast_batch, a.k, a.h, a.tokens_per_step, a.gen_head_rows,
                             not a.no_kv_cache))
    total = group(**run)
    tables = {"report-a": report_a_tables, "report-b": report_b_tables}.get(c.name)
    report = tables(cfg, a.batch, a.context, a.steps, lora) if tables else None
    try:
        ledger = Ledger(a.ledger, a.flops_budget)
        for kind, cost in run.items():
            if not cost.is_free():
                ledger.add(a.stage, kind, cost, source="plan", **({} if c.name == "ours" else {"convention": c.name}))
    except ValueError as e:
        p.error(f"--ledger {a.ledger}: {e}".rstrip(".") + ".")
    except OSError as e:
        p.error(f"--ledger {a.ledger}: {e.strerror or e}; give a JSON-lines file that can be written.")

    if a.json:
        out = {"config": cfg.to_dict(), "convention": c.name,
               "shape": {"batch": a.batch, "context": a.context, "lora": lora, "lm_head_bias": a.lm_head_bias,
                         "head_rows": rows, "attention": kernel},
               "forward": {**fwd.to_dict(), "modules": {n: x.to_dict() for n, x in forward_table(fwd)[:-1]}},
               "train_step": {**step.to_dict(), **{k: step[k].to_dict() for k in ("forward", "backward", "optimizer")},
                              "coursework_estimate": estimate.to_dict(),
                              "executed_over_estimate": step.coursework / estimate.coursework},
               "run": {**total.to_dict(), **{k: x.to_dict() for k, x in run.items()}, "steps": a.steps,
                       "budget": a.flops_budget, "budget_share": total.coursework / a.flops_budget}}
        if report and c.name == "report-a":  # its Table 3 columns: Add., Mult., Div., Exp. and Sqrt weighted, Total
            report["table3"] = {k: {**{o: WEIGHTS[o] * x.ops.get(o, 0) for o in ("add", "mul", "div", "exp", "sqrt")},
                                    "total": x.coursework} for k, x in report["table3"].items()}
        if report:
            out["report"] = report
        print(json.dumps(out, indent=2))
        return
    print(f"Convention: {c.name}" + ("" if c.name == "ours" else " (the coursework column is the report's count)"))
    print(f"One forward pass: batch {a.batch} x {a.context} tokens, head {rows} rows"
          f"{' + bias' if a.lm_head_bias else ''}, LoRA {lora or 'none'}")
    print(_fmt_table(forward_table(fwd)))
    print()
    fed = f"the model reads {T}" if T < a.context else "all of them read"
    how = f"{kernel} attention" if c.name == "ours" else f"backward = {c.backward_factor} x forward"
    print(f"Training step: windows of {a.context} tokens ({fed}), {how}")
    print(f"  {'':<32}{'matmul view':>12}{'coursework':>14}")
    for name, x in [("forward (with loss)" if c.name == "ours" else "forward", step["forward"]),
                    ("backward", step["backward"]), ("optimizer (AdamW)" if c.name == "ours" else "optimizer", step["optimizer"]),
                    ("step", step), ("coursework 3 x forward", estimate)]:
        print(f"  {name:<32}{x.matmul:>12.4g}{x.coursework:>14.4g}")
    print(f"  executed step / (3 x forward): {step.coursework / estimate.coursework:.3f} (coursework), "
          f"{step.matmul / estimate.matmul:.3f} (matmul view)")
    print()
    print(f"Run: {a.steps} steps")
    for name, x in [*run.items(), ("total", total)]:
        print(f"  {name:<32}{x.matmul:>12.4g}{x.coursework:>14.4g}")
    print(f"  share of the {a.flops_budget:.3g} budget: {100 * total.coursework / a.flops_budget:.2f}%")
    print()
    print(ledger.markdown())
    if report:
        print()
        print(_fmt_report(c.name, report, a.batch, a.context, lora))


if __name__ == "__main__":
    sys.exit(run_cli(main))
