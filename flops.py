"""FLOPs of qwen-min, counted exactly, module by module: read it beside qwen_min/model.py.

Every module of the model has a function here of the same name (snake_case for classes), in the
same order, whose lines are the lines of that module's `forward`, counted:

    model.py                              flops.py
    RMSNorm.forward                       rms_norm(n, dim)
    RotaryEmbedding.forward               rotary_embedding()            (table lookup: free)
    rotate_half, apply_rotary             rotate_half, apply_rotary
    F.scaled_dot_product_attention        scaled_dot_product_attention(B, H, T, S, hd)
    Attention.forward                     attention(cfg, B, T, S, lora)
    MLP.forward                           mlp(cfg, n, lora)
    DecoderBlock.forward                  decoder_block(cfg, B, T, S, lora)
    Qwen2.body / head / forward           body(...), head(...), qwen2(...)
    LoRALinear.forward (lora/layer.py)    lora_linear(n, d_in, d_out, r)

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

Shapes: B batch, T new tokens, S keys (cached + new), n = B*T rows. `lora` maps a module name to
its LoRA rank, e.g. {"q_proj": 8, "v_proj": 8}; the LoRA matrices are unmerged. `head_rows` is
the number of output rows the head computes: vocab_size, or 13 when the loss or the decoding is
restricted to the LLMTIME digits and separators.

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

Training, generation, the budget:

    train_step(cfg, B, T, lora, ...)         -> Cost with parts forward, backward, optimizer
    forward_backward(cfg, B, T, lora, ...)   -> forward and backward merged module by module
    generate(cfg, B, prompt, new, ...)       -> prefill + decode with the KV cache, or without it
    forecast(cfg, B, k, h, tokens_per_step)  -> generate() for k context steps, h forecast steps
    plan_run(cfg, steps=..., ...)            -> {"train": Cost, "eval": Cost, "generate": Cost}

Ledger (plan and spend side by side; train.py adds what each run really spent):

    ledger = Ledger("runs/ledger.jsonl", budget=1e17)  # loads the file if it exists; appends on add
    ledger.add("lr=1e-4 r=8", "train", cost_or_flops, source="spent")   # kind: train|eval|generate
    ledger.total(source="spent") -> float; ledger.totals() -> {(stage, source): {...}}
    print(ledger.markdown())   # | stage | source | training | evaluation | total | % of budget |
    Ledger.read(path), ledger.write(path)      # JSON lines: {"stage", "kind", "flops", "matmul", "source", ...}

Entries count coursework FLOPs (`flops`); given a Cost, its matmul view is kept too (`matmul`).

Command line:

    python flops.py --context 512 --batch 4 --rank 8 --steps 2000 [--json]
"""

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

PRIMITIVES = ("add", "mul", "div", "cmp", "exp", "log", "sqrt")
WEIGHTS = {"add": 1, "mul": 1, "div": 1, "cmp": 1, "exp": 10, "log": 10, "sqrt": 10}  # docs/reference.md
BUDGET = 1e17  # the coursework's total
NUMERIC_ROWS = 13  # LLMTIME's alphabet: 0-9 . , ;


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
        if isinstance(other, int) and other == 0:  # so that sum() works
            return self
        if other == FREE:
            return self
        if self == FREE:
            return other
        ops = dict(self.ops)
        for k, v in other.ops.items():
            ops[k] = ops.get(k, 0) + v
        parts = {}
        if self.parts and other.parts:  # merged by name; otherwise the pieces would not add up
            parts = dict(self.parts)
            for k, v in other.parts.items():
                parts[k] = parts[k] + v if k in parts else v
        return Cost(self.matmul + other.matmul, ops, parts)

    __radd__ = __add__

    def __mul__(self, k: int):
        return Cost(self.matmul * k, {o: v * k for o, v in self.ops.items()}, {n: p * k for n, p in self.parts.items()})

    __rmul__ = __mul__

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
    total = sum(parts.values(), FREE)
    return Cost(total.matmul, total.ops, dict(parts))


# ---------------------------------------------------------------- forward, in model.py's order


def linear(n: int, d_in: int, d_out: int, bias: bool = False) -> Cost:
    """nn.Linear / F.linear on n rows: x (n, d_in) @ W^T (d_in, d_out) [+ b] -> (n, d_out)."""
    return matmul(n, d_in, d_out) + (ops(add=n * d_out) if bias else FREE)


def rms_norm(n: int, dim: int) -> Cost:
    """RMSNorm on n rows of width dim."""
    return (ops(mul=n * dim)  # x32.pow(2)
            + ops(add=n * (dim - 1), div=n)  # .mean(-1)
            + ops(add=n)  # + eps
            + ops(sqrt=n, div=n)  # rsqrt
            + ops(mul=n * dim)  # x32 * rsqrt(...)
            + ops(mul=n * dim))  # weight * x; the casts are free


def rotary_embedding() -> Cost:
    """RotaryEmbedding.forward: cos, sin looked up by position (tables are precomputed: free)."""
    return FREE


def rotate_half(n: int, hd: int) -> Cost:
    """rotate_half on n vectors of head_dim hd: negate one half."""
    return ops(add=n * hd // 2)


def apply_rotary(n: int, hd: int) -> Cost:
    """x * cos + rotate_half(x) * sin on n vectors of head_dim hd."""
    return ops(mul=n * hd) + rotate_half(n, hd) + ops(mul=n * hd) + ops(add=n * hd)


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


def lora_linear(n: int, d_in: int, d_out: int, r: int, bias: bool = False) -> Cost:
    """LoRALinear.forward (unmerged) on n rows: base(x) + (x A^T * scaling) B^T."""
    return group(base=linear(n, d_in, d_out, bias),  # y = self.base(x)
                 lora_A=matmul(n, d_in, r),  # F.linear(dropout(x), lora_A)   (n, r)
                 scaling=ops(mul=n * r),  # * scaling, on r numbers per row
                 lora_B=matmul(n, r, d_out),  # F.linear(h, lora_B)   (n, d_out)
                 add=ops(add=n * d_out))  # y + ...


def projection(n, d_in, d_out, bias=False, r=0) -> Cost:
    """A linear layer of the model, LoRA-wrapped when r > 0."""
    return lora_linear(n, d_in, d_out, r, bias) if r else linear(n, d_in, d_out, bias)


def attention(cfg, B: int, T: int, S: int = None, lora=None) -> Cost:
    """Attention.forward: x (B, T, D) with S keys (cached + new; S = T without a cache) -> (B, T, D)."""
    S, lora, n = S or T, lora or {}, B * T
    D, H, K, hd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return group(q_proj=projection(n, D, H * hd, True, lora.get("q_proj", 0)),
                 k_proj=projection(n, D, K * hd, True, lora.get("k_proj", 0)),
                 v_proj=projection(n, D, K * hd, True, lora.get("v_proj", 0)),
                 rotary=apply_rotary(B * H * T, hd) + apply_rotary(B * K * T, hd),  # q and k
                 # (cache.update is a copy, and enable_gqa reads each kv head in place: both free)
                 sdpa=scaled_dot_product_attention(B, H, T, S, hd),
                 o_proj=projection(n, H * hd, D, False, lora.get("o_proj", 0)))


def silu(n: int) -> Cost:
    """silu(x) = x / (1 + exp(-x)) on n numbers."""
    return ops(add=n, exp=n) + ops(add=n, div=n)


def mlp(cfg, n: int, lora=None) -> Cost:
    """MLP.forward on n rows: down(silu(gate(x)) * up(x))."""
    lora, D, F = lora or {}, cfg.dim, cfg.hidden_dim
    return group(gate_proj=projection(n, D, F, False, lora.get("gate_proj", 0)),
                 silu=silu(n * F),
                 up_proj=projection(n, D, F, False, lora.get("up_proj", 0)),
                 product=ops(mul=n * F),
                 down_proj=projection(n, F, D, False, lora.get("down_proj", 0)))


def decoder_block(cfg, B: int, T: int, S: int = None, lora=None) -> Cost:
    """DecoderBlock.forward: two pre-norm residual branches."""
    n, D = B * T, cfg.dim
    return group(input_layernorm=rms_norm(n, D),
                 self_attn=attention(cfg, B, T, S, lora),
                 residual_attn=ops(add=n * D),  # x = x + ...
                 post_attention_layernorm=rms_norm(n, D),
                 mlp=mlp(cfg, n, lora),
                 residual_mlp=ops(add=n * D))  # x = x + ...


def body(cfg, B: int, T: int, S: int = None, lora=None) -> Cost:
    """Qwen2.body: input_ids (B, T), S keys in attention -> final normed hidden states (B, T, D)."""
    return group(embed_tokens=FREE,  # a lookup
                 rope=rotary_embedding(),
                 layers=group(**{str(i): decoder_block(cfg, B, T, S, lora) for i in range(cfg.n_layers)}),
                 norm=rms_norm(B * T, cfg.dim))


def head(cfg, n: int, rows: int = None, bias: bool = False) -> Cost:
    """Qwen2.head on n positions: logits over `rows` tokens (default all), with the optional bias."""
    return linear(n, cfg.dim, rows or cfg.vocab_size, bias)


def qwen2(cfg, B: int, T: int, lora=None, lm_head_bias=False, head_rows=None) -> Cost:
    """Qwen2.forward: input_ids (B, T) -> logits (B, T, head_rows)."""
    return body(cfg, B, T, T, lora) + group(lm_head=head(cfg, B * T, head_rows, lm_head_bias))


def cross_entropy(n: int, rows: int) -> Cost:
    """Mean cross-entropy of n rows of logits over `rows` classes: log_softmax, pick, average."""
    return (ops(cmp=n * (rows - 1), add=n * rows)  # subtract the row max
            + ops(exp=n * rows, add=n * (rows - 1), log=n)  # log of the sum of exps
            + ops(add=n * rows)  # logp = z - logsumexp
            + ops(add=n)  # -logp[target]
            + ops(add=n - 1, div=1))  # mean


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


def _attention_grads(lora, grad_input):
    """Which of q, k, v (and the attention output) need gradients."""
    q, k, v = (grad_input or lora.get(m, 0) > 0 for m in ("q_proj", "k_proj", "v_proj"))
    return q, k, v, (q or k or v) or lora.get("o_proj", 0) > 0


def attention_backward(cfg, B, T, S=None, lora=None, grad_input=True, kernel="fused") -> Cost:
    """Backward of Attention; grad_input: whether x (the normed input) needs a gradient."""
    S, lora, n = S or T, lora or {}, B * T
    D, H, K, hd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    g_q, g_k, g_v, g_out = _attention_grads(lora, grad_input)
    g_y = g_q or g_k or g_v
    if not g_out:
        return FREE
    n_rep = H // K
    sum_reps = ops(add=B * K * S * hd * (n_rep - 1))  # enable_gqa's backward: n_rep query heads' grads summed per kv head

    def proj(name, d_out, needed):
        return linear_backward(n, D, d_out, lora.get(name, 0), grad_input) if needed else FREE

    return group(q_proj=proj("q_proj", H * hd, g_q),
                 k_proj=proj("k_proj", K * hd, g_k),
                 v_proj=proj("v_proj", K * hd, g_v),
                 inputs=ops(add=2 * n * D) if grad_input else FREE,  # dx from q, k, v summed
                 rotary=(apply_rotary_backward(B * H * T, hd) if g_q else FREE)
                 + (apply_rotary_backward(B * K * T, hd) if g_k else FREE),
                 gqa_sum=(sum_reps if g_k else FREE) + (sum_reps if g_v else FREE),
                 sdpa=scaled_dot_product_attention_backward(B, H, T, S, hd, g_q, g_k, g_v, kernel) if g_y else FREE,
                 o_proj=linear_backward(n, H * hd, D, lora.get("o_proj", 0), g_y))


def silu_backward(n: int) -> Cost:
    """dx = dy * s (1 + x (1 - s)), s = sigmoid(x) recomputed, on n numbers."""
    return ops(add=2 * n, exp=n, div=n) + ops(add=2 * n, mul=3 * n)


def _mlp_grads(lora, grad_input):
    gate, up = (grad_input or lora.get(m, 0) > 0 for m in ("gate_proj", "up_proj"))
    return gate, up, gate or up or lora.get("down_proj", 0) > 0


def mlp_backward(cfg, n, lora=None, grad_input=True) -> Cost:
    """Backward of MLP on n rows."""
    lora, D, F = lora or {}, cfg.dim, cfg.hidden_dim
    g_gate, g_up, g_out = _mlp_grads(lora, grad_input)
    if not g_out:
        return FREE
    return group(gate_proj=linear_backward(n, D, F, lora.get("gate_proj", 0), grad_input) if g_gate else FREE,
                 silu=silu_backward(n * F) if g_gate else FREE,
                 up_proj=linear_backward(n, D, F, lora.get("up_proj", 0), grad_input) if g_up else FREE,
                 product=ops(mul=n * F * (g_gate + g_up)),  # d gate = dy * up, d up = dy * gate
                 inputs=ops(add=n * D) if grad_input else FREE,  # dx from gate and up summed
                 down_proj=linear_backward(n, F, D, lora.get("down_proj", 0), g_gate or g_up))


def decoder_block_backward(cfg, B, T, lora=None, grad_input=True, kernel="fused"):
    """Backward of DecoderBlock; returns (Cost, whether its output needs a gradient)."""
    lora, n, D = lora or {}, B * T, cfg.dim
    g_attn = _attention_grads(lora, grad_input)[3]
    g_mid = grad_input or g_attn
    g_mlp = _mlp_grads(lora, g_mid)[2]
    cost = group(input_layernorm=rms_norm_backward(n, D) if grad_input and g_attn else FREE,
                 self_attn=attention_backward(cfg, B, T, T, lora, grad_input, kernel),
                 residual_attn=ops(add=n * D) if grad_input and g_attn else FREE,  # dx: residual + branch
                 post_attention_layernorm=rms_norm_backward(n, D) if g_mid and g_mlp else FREE,
                 mlp=mlp_backward(cfg, n, lora, g_mid),
                 residual_mlp=ops(add=n * D) if g_mid and g_mlp else FREE)
    return cost, g_mid or g_mlp


def cross_entropy_backward(n: int, rows: int) -> Cost:
    """d logits of the mean cross-entropy: d logp = -1/n at the target; log_softmax^T."""
    return (ops(div=1, add=n)  # mean and pick
            + ops(add=n * (rows - 1))  # sum of d logp per row
            + ops(exp=n * rows, mul=n * rows, add=n * rows))  # d z = d logp - exp(logp) * sum


def backward(cfg, B, T, lora=None, lm_head_bias=False, head_rows=None, kernel="fused") -> Cost:
    """The backward pass of one LoRA training step: T tokens in, each position scored (see forward())."""
    lora, rows, n = lora or {}, head_rows or cfg.vocab_size, B * T
    layers, g = {}, False  # the embedding output needs no gradient
    for i in range(cfg.n_layers):
        layers[str(i)], g = decoder_block_backward(cfg, B, T, lora, g, kernel)
    if not (g or lm_head_bias):
        return FREE
    return group(embed_tokens=FREE, rope=FREE,
                 layers=group(**layers),
                 norm=rms_norm_backward(n, cfg.dim) if g else FREE,
                 lm_head=(matmul(n, rows, cfg.dim) if g else FREE)  # dh = dlogits @ W
                 + (ops(add=(n - 1) * rows) if lm_head_bias else FREE),  # db = sum over rows
                 loss=cross_entropy_backward(n, rows))


def forward(cfg, B, T, lora=None, lm_head_bias=False, head_rows=None) -> Cost:
    """The training forward of qwen_min/loss.py: T tokens through qwen2(), every position scored.

    A window of T + 1 tokens feeds its first T and scores its last T (padding is skipped by the
    loss after the log-softmax, so it still costs), hence train.py passes T = window - 1.
    """
    rows = head_rows or cfg.vocab_size
    return qwen2(cfg, B, T, lora, lm_head_bias, rows) + group(loss=cross_entropy(B * T, rows))


def forward_backward(cfg, B, T, lora=None, lm_head_bias=False, head_rows=None, kernel="fused") -> Cost:
    """Forward plus backward, merged module by module (what FlopCounterMode attributes to each)."""
    return forward(cfg, B, T, lora, lm_head_bias, head_rows) + backward(cfg, B, T, lora, lm_head_bias, head_rows, kernel)


def trainable_parameters(cfg, lora=None, lm_head_bias=False) -> int:
    """Numbers the optimizer updates: every lora_A, lora_B, and the full-vocab head bias."""
    lora, D, F, H, K, hd = lora or {}, cfg.dim, cfg.hidden_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    shapes = {"q_proj": (D, H * hd), "k_proj": (D, K * hd), "v_proj": (D, K * hd), "o_proj": (H * hd, D),
              "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}
    per_layer = sum(r * sum(shapes[m]) for m, r in lora.items() if r)
    return cfg.n_layers * per_layer + (cfg.vocab_size if lm_head_bias else 0)


def adamw(n_params: int) -> Cost:
    """One torch.optim.AdamW step on n numbers (per-tensor scalars such as bias corrections: ignored)."""
    p = n_params
    return (ops(mul=p)  # p *= 1 - lr * wd
            + ops(mul=2 * p, add=p)  # m = b1 m + (1 - b1) g
            + ops(mul=3 * p, add=p)  # v = b2 v + (1 - b2) g g
            + ops(sqrt=p, div=p, add=p)  # denom = sqrt(v) / sqrt(bc2) + eps
            + ops(div=p, mul=p, add=p))  # p -= step * m / denom


def train_step(cfg, B, T, lora=None, lm_head_bias=False, head_rows=None, kernel="fused") -> Cost:
    """One optimizer step on a (B, T) batch: parts forward, backward, optimizer."""
    return group(forward=forward(cfg, B, T, lora, lm_head_bias, head_rows),
                 backward=backward(cfg, B, T, lora, lm_head_bias, head_rows, kernel),
                 optimizer=adamw(trainable_parameters(cfg, lora, lm_head_bias)))


def coursework_estimate(step: Cost) -> Cost:
    """The coursework's training estimate: backward = 2 x forward, so a step = 3 x forward."""
    return 3 * Cost(step["forward"].matmul, step["forward"].ops)


# ---------------------------------------------------------------- generation (qwen_min/generate.py)


def generate(cfg, B, prompt_tokens, new_tokens, head_rows=None, kv_cache=True, lm_head_bias=False, lora=None,
             samples=1, active=None) -> Cost:
    """Producing new_tokens tokens after prompt_tokens, B prompts at once.

    With the KV cache (qwen_min.generate): prefill the prompt, the head on its last position
    only, then one token per step attending to all keys so far (the last token is never fed
    back). Without it: the whole sequence so far through the body for every new token.
    head_rows: output rows computed per token (13 when decoding is restricted to LLMTIME).
    samples: continuations per prompt, all from one prefill (the prefill runs B rows, the rest
    B * samples). active: how many rows produce each new token (default all, every time); a row
    that has finished leaves the batch. Sampling (argmax, top-k, ...) is not counted. `lora`
    for unmerged adapters; merged: None.
    """
    P, N = prompt_tokens, new_tokens
    active = list(active) if active is not None else [B * samples] * N
    heads = sum((head(cfg, r, head_rows, lm_head_bias) for r in active), FREE)
    if not kv_cache:
        return group(forward=sum((body(cfg, r, P + i, P + i, lora) for i, r in enumerate(active)), FREE), lm_head=heads)
    return group(prefill=body(cfg, B, P, P, lora),
                 decode=sum((body(cfg, active[i], 1, P + i, lora) for i in range(1, N)), FREE),  # rows that go on
                 lm_head=heads)


def forecast(cfg, B, context_steps, horizon_steps, tokens_per_step=10, head_rows=NUMERIC_ROWS, kv_cache=True,
             lm_head_bias=False) -> Cost:
    """Forecasting horizon_steps time steps from context_steps, B series at once.

    tokens_per_step: LLMTIME tokens per step, e.g. "1.23,0.45;" = 10 (2 decimals).
    """
    return generate(cfg, B, context_steps * tokens_per_step, horizon_steps * tokens_per_step,
                    head_rows, kv_cache, lm_head_bias)


# ---------------------------------------------------------------- planning a run, and the ledger


def plan_run(cfg, steps, batch, context, lora=None, lm_head_bias=False, head_rows=None, kernel="fused",
             val_every=0, val_batches=0, eval_series=0, eval_batch=1, context_steps=50, horizon_steps=50,
             tokens_per_step=10, gen_head_rows=NUMERIC_ROWS, kv_cache=True) -> dict:
    """The cost of one run: {"train": steps x train_step, "eval": validation, "generate": final forecasts}.

    context: tokens per window; the model reads context - 1 of them (see forward()). Validation: every val_every steps, val_batches forward passes with the loss (no backward).
    Final evaluation: eval_series forecasts in batches of eval_batch (the last batch may be partial).
    """
    train = steps * train_step(cfg, batch, context - 1, lora, lm_head_bias, head_rows, kernel)
    n_val = (steps // val_every) * val_batches if val_every else 0
    val = n_val * forward(cfg, batch, context - 1, lora, lm_head_bias, head_rows)
    gen = FREE
    if eval_series:
        full, rest = divmod(eval_series, eval_batch)
        one = lambda b: forecast(cfg, b, context_steps, horizon_steps, tokens_per_step, gen_head_rows, kv_cache, lm_head_bias)
        gen = full * one(eval_batch) + (one(rest) if rest else FREE)
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
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")
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
        Path(path).write_text("".join(json.dumps(e) + "\n" for e in self.entries))

    @classmethod
    def read(cls, path, budget: float = BUDGET) -> "Ledger":
        ledger = cls(budget=budget)
        for i, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                e = json.loads(line)
                e["flops"] = float(e["flops"])
                if not isinstance(e.get("stage"), str) or e["kind"] not in cls.KINDS or e["source"] not in cls.SOURCES:
                    raise KeyError("kind")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ValueError(f"{path}, line {i}: not a ledger entry (need stage, kind, source, flops).") from None
            ledger.entries.append(e)
        return ledger


# ---------------------------------------------------------------- command line


def lora_targets(targets: str, rank: int) -> dict:
    """"q,v" -> {"q_proj": rank, "v_proj": rank}."""
    names = {"q", "k", "v", "o", "gate", "up", "down"}
    out = {}
    for t in filter(None, (t.strip() for t in targets.split(","))):
        t = t.removesuffix("_proj")
        if t not in names:
            raise ValueError(f"unknown LoRA target '{t}'; use some of q,k,v,o,gate,up,down.")
        out[f"{t}_proj"] = rank
    return out if rank else {}


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


def main(argv=None):
    from qwen_min.config import Qwen2Config

    p = argparse.ArgumentParser(description="Exact FLOPs of qwen-min: one forward pass, a LoRA training step, a run.")
    p.add_argument("--config", help="a Qwen2 config.json (default: Qwen2.5-0.5B)")
    p.add_argument("--context", type=int, default=512, help="tokens per training window")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (0: no LoRA)")
    p.add_argument("--lora-targets", default="q,v", help="comma-separated: q,k,v,o,gate,up,down")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lm-head-bias", action="store_true", help="train the coursework's lm_head bias")
    p.add_argument("--vocab", choices=["full", "numeric"], default="full",
                   help="loss over the full vocabulary or the 13 LLMTIME tokens (head of 13 rows)")
    p.add_argument("--attention", choices=["math", "fused"], default="fused",
                   help="attention backward: fused (flash / memory-efficient, what training runs) or math")
    p.add_argument("--val-every", type=int, default=0, help="validate every N steps (0: never)")
    p.add_argument("--val-batches", type=int, default=0, help="batches per validation")
    p.add_argument("--eval-series", type=int, default=0, help="series forecast in the final evaluation")
    p.add_argument("--eval-batch", type=int, default=1, help="series generated at once")
    p.add_argument("--eval-context-steps", type=int, default=50)
    p.add_argument("--eval-horizon-steps", type=int, default=50)
    p.add_argument("--tokens-per-step", type=int, default=10, help="LLMTIME tokens per time step (10 at 2 decimals)")
    p.add_argument("--gen-head-rows", type=int, default=NUMERIC_ROWS, help="head rows while decoding (vocab: all)")
    p.add_argument("--no-kv-cache", action="store_true", help="generation recomputes the context every token")
    p.add_argument("--budget", type=float, default=BUDGET)
    p.add_argument("--stage", default="run", help="stage name in the ledger")
    p.add_argument("--ledger", help="append the plan to this JSON-lines ledger")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        cfg = Qwen2Config.from_json(a.config) if a.config else Qwen2Config()
        lora = lora_targets(a.lora_targets, a.rank)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    for flag in ("context", "batch", "steps", "eval_batch", "tokens_per_step", "gen_head_rows"):
        if getattr(a, flag) < (2 if flag == "context" else 1 if flag != "steps" else 0):
            p.error(f"--{flag.replace('_', '-')} is too small ({getattr(a, flag)}).")
    if a.rank < 0 or a.val_every < 0 or a.val_batches < 0 or a.eval_series < 0:
        p.error("--rank, --val-every, --val-batches and --eval-series must not be negative.")
    rows = NUMERIC_ROWS if a.vocab == "numeric" else cfg.vocab_size
    gen_rows = min(a.gen_head_rows, cfg.vocab_size)

    fwd = qwen2(cfg, a.batch, a.context, lora, a.lm_head_bias, rows)
    step = train_step(cfg, a.batch, a.context - 1, lora, a.lm_head_bias, rows, a.attention)  # as qwen_min/loss.py
    estimate = coursework_estimate(step)
    run = plan_run(cfg, a.steps, a.batch, a.context, lora, a.lm_head_bias, rows, a.attention, a.val_every,
                   a.val_batches, a.eval_series, a.eval_batch, a.eval_context_steps, a.eval_horizon_steps,
                   a.tokens_per_step, gen_rows, not a.no_kv_cache)
    ledger = Ledger(a.ledger, a.budget)
    for kind, c in run.items():
        if c.matmul or c.ops:
            ledger.add(a.stage, kind, c, source="plan")
    total = sum(run.values(), FREE)

    if a.json:
        out = {"config": cfg.to_dict(), "shape": {"batch": a.batch, "context": a.context, "lora": lora,
                                                   "lm_head_bias": a.lm_head_bias, "head_rows": rows,
                                                   "attention": a.attention},
               "forward": {**fwd.to_dict(), "modules": {n: c.to_dict() for n, c in forward_table(fwd)[:-1]}},
               "train_step": {**step.to_dict(), **{k: step[k].to_dict() for k in ("forward", "backward", "optimizer")},
                              "coursework_estimate": estimate.to_dict(),
                              "executed_over_estimate": step.coursework / estimate.coursework},
               "run": {**total.to_dict(), **{k: c.to_dict() for k, c in run.items()}, "steps": a.steps,
                       "budget": a.budget, "budget_share": total.coursework / a.budget}}
        print(json.dumps(out, indent=2))
        return
    print(f"One forward pass: batch {a.batch} x {a.context} tokens, head {rows} rows"
          f"{' + bias' if a.lm_head_bias else ''}, LoRA {lora or 'none'}")
    print(_fmt_table(forward_table(fwd)))
    print()
    print(f"Training step: windows of {a.context} tokens (the model reads {a.context - 1}), {a.attention} attention")
    print(f"  {'':<32}{'matmul view':>12}{'coursework':>14}")
    for name, c in [("forward (with loss)", step["forward"]), ("backward", step["backward"]),
                    ("optimizer (AdamW)", step["optimizer"]), ("step", step),
                    ("coursework 3 x forward", estimate)]:
        print(f"  {name:<32}{c.matmul:>12.4g}{c.coursework:>14.4g}")
    print(f"  executed step / (3 x forward): {step.coursework / estimate.coursework:.3f} (coursework), "
          f"{step.matmul / estimate.matmul:.3f} (matmul view)")
    print()
    print(f"Run: {a.steps} steps")
    for name, c in [*run.items(), ("total", total)]:
        print(f"  {name:<32}{c.matmul:>12.4g}{c.coursework:>14.4g}")
    print(f"  share of the {a.budget:.3g} budget: {100 * total.coursework / a.budget:.2f}%")
    print()
    print(ledger.markdown())


if __name__ == "__main__":
    sys.exit(main())
