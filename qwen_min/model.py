"""Qwen2.5, the network only, in reading order.

    tokens ─ embed_tokens ─┬─> [DecoderBlock] x n_layers ─> norm ─> lm_head ─> logits
                           │
    DecoderBlock:  x = x + Attention(RMSNorm(x))      grouped-query attention, RoPE, q/k/v biases
                   x = x + MLP(RMSNorm(x))            SwiGLU: down(silu(gate(x)) * up(x))

Shapes: B batch, T new tokens, S keys (cached + new), D dim, H query heads, K kv heads,
hd head_dim, F hidden_dim, V vocab_size. Module and parameter names follow the Hugging Face
checkpoint (without its `model.` prefix), so weights load by name. The numerics (where to
upcast to float32) follow transformers' Qwen2 so logits agree to float32 rounding; see
docs/reference.md. Loading, caching and generation live in their own modules.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Qwen2Config


FEW_ROWS = 256  # at most this many rows (tokens in the batch) take linear's CPU path below
BLOCKS = 4  # blocks of output features that path computes side by side
MIN_BLOCK = 128  # output features a block needs at least (k_proj's 128 ran slower cut in four)
FEW_QUERIES = 8  # new tokens a row at most for attention's grouped-query path on a CPU (verify passes)


def linear(x, weight, bias=None):
    """F.linear: x (..., in), weight (out, in) -> (..., out). With few rows on a CPU (a decode step
    has one row per sequence) the output features are cut into BLOCKS blocks and computed as one
    batched product, each block a matrix product of its own that a core can take whole: F.linear
    on 20 rows left this 2-core CPU's second core mostly idle (bench/linear.py: 1.25-1.75x faster
    products at 20 rows, 1.5-2.5x at 4 rows and 1.0-1.3x at 80 for the weights of Qwen2.5-0.5B).
    The same dot products, so results agree to float rounding."""
    rows, out = x.shape[:-1].numel(), weight.shape[0]
    if x.device.type != "cpu" or rows > FEW_ROWS or out % BLOCKS or out < BLOCKS * MIN_BLOCK or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    w = weight.view(BLOCKS, out // BLOCKS, weight.shape[1])  # (n, out / n, in): a view, no copy
    y = torch.bmm(x.reshape(1, rows, -1).expand(BLOCKS, -1, -1), w.transpose(1, 2))  # (n, rows, out / n)
    y = y.transpose(0, 1).reshape(*x.shape[:-1], out)
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """nn.Linear computed by `linear` (same parameters, names and initialisation)."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, normalised in float32, scaled in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # x: (..., D)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE tables, computed once for every position up to max_seq_len.

    Qwen uses the half-split layout: dimension i is paired with i + hd/2 (not 2i with 2i+1),
    so Hugging Face weights need no permutation. Looking up a position is indexing: free.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, device=None):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
        t = torch.arange(max_seq_len, device=device).float()
        freqs = torch.outer(t, inv_freq)  # (max_seq_len, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_seq_len, hd)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions, dtype):  # positions: (B, T) int64
        # (B, 1, T, hd) each: broadcast over heads; float32 tables cast to the activations' dtype.
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def rotate_half(x):  # (..., hd) -> (..., hd): (x1, x2) -> (-x2, x1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):  # x: (B, H, T, hd); cos, sin: (B, 1, T, hd)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query self-attention: H query heads share K key/value heads; q, k, v have biases."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=True)
        self.k_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=True)
        self.v_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=True)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask=None, cache=None):
        """x (B, T, D); mask (B, 1, T, S) bool, True = may attend, None = causal; cache: this layer's
        view of the KV cache (kv_cache.LayerCache), or None; -> (B, T, D)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:  # store the K new keys/values, get back all S so far
            k, v = cache.update(k, v)  # (B, K, S, hd)
        # softmax(q k^T / sqrt(hd) + mask) v, the softmax accumulated in float32. Query head h reads
        # kv head h // (H / K) in place; copying the K heads out to H (transformers' repeat_kv) would
        # move 7x the cache through memory at every decoding step.
        G = self.n_heads // self.n_kv_heads  # query heads per kv head
        cpu = x.device.type == "cpu"
        if (T == 1 and (cpu or x.dtype == torch.float32)) or (cpu and T <= FEW_QUERIES and mask is not None):
            # a decode step, or a verify pass on a CPU: the G query heads sharing a kv head become G * T
            # queries of that head, so each (row, kv head) pair is one small attention; query (g, t)
            # keeps the mask row of token t. A decode step runs about 2x faster than with enable_gqa on
            # a CPU, 1.4-5x on a GPU in float32; GPU kernels for bfloat16 read grouped heads natively,
            # as fast or faster (bench/attention.py, docs/evaluate.md). Causal prefill (mask None) keeps
            # enable_gqa and its causal fast path.
            if T > 1:
                mask = mask.unsqueeze(2).expand(-1, -1, G, -1, -1).flatten(2, 3)  # (B, 1, G * T, S)
            y = F.scaled_dot_product_attention(q.reshape(B, self.n_kv_heads, G * T, self.head_dim), k, v, attn_mask=mask)
            y = y.reshape(B, self.n_heads, T, self.head_dim)  # (B, H, T, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H * hd)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):  # (B, T, D) -> (B, T, D)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # inner: (B, T, F)


class DecoderBlock(nn.Module):
    """Pre-norm residual block: attention then MLP, each added back to the residual stream."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None):  # (B, T, D) -> (B, T, D)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Qwen2(nn.Module):
    """Qwen2.5 causal language model.

    model(input_ids) -> logits (B, T, V). For generation pass a KVCache and, when rows are
    left-padded, an attention_mask (B, S) of 1 for real tokens and 0 for padding, covering
    the cached tokens and the new ones (as in transformers).
    """

    def __init__(self, cfg: Qwen2Config, lm_head_bias: bool = False):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # A tied head reuses embed_tokens.weight, so it has no module of its own.
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.dim, cfg.vocab_size, bias=False)
        # The coursework trains a bias on the (otherwise bias-free) output layer; zero = no change.
        self.lm_head_bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if lm_head_bias else None
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)

    @classmethod
    def from_pretrained(cls, path_or_hub_id, dtype=torch.float32, device="cpu", lm_head_bias=False):
        """Loads a Qwen2 checkpoint folder (or Hugging Face hub id) into qwen-min."""
        from .weights import load_pretrained

        return load_pretrained(cls, path_or_hub_id, dtype=dtype, device=device, lm_head_bias=lm_head_bias)

    @staticmethod
    def checkpoint_name(name):
        """Our module or parameter name -> transformers' (`layers.0.self_attn.q_proj` -> `model.layers.0.self_attn.q_proj`).

        lora.save_adapter / load_adapter read it, so adapters are written and read under peft's names."""
        from .weights import hf_name

        return hf_name(name)

    def add_lm_head_bias(self):
        """Adds the coursework's trainable lm_head bias, initialised to zero (a no-op until trained)."""
        if self.lm_head_bias is None:
            w = self.embed_tokens.weight
            self.lm_head_bias = nn.Parameter(torch.zeros(self.config.vocab_size, dtype=w.dtype, device=w.device))
        return self.lm_head_bias

    @property
    def lm_head_weight(self):  # (V, D)
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, input_ids, attention_mask=None, cache=None):
        """input_ids (B, T) -> logits (B, T, V)."""
        return self.head(self.body(input_ids, attention_mask, cache))

    def body(self, input_ids, attention_mask=None, cache=None):
        """input_ids (B, T) -> final normed hidden states (B, T, D): everything but the head."""
        B, T = input_ids.shape
        past = 0 if cache is None else cache.append(T)  # the cache's slots for these T tokens start at past
        positions, mask = positions_and_mask(B, T, past, attention_mask, input_ids.device)
        return self.blocks(input_ids, positions, mask, cache)

    def blocks(self, input_ids, positions, mask, cache=None):
        """The decoder stack at given RoPE positions (B, T) and attention mask (B, 1, T, S) (None: causal):
        embedding, every block, final norm -> (B, T, D). A CUDA graph's decode step calls it with
        buffers of fixed shape (qwen_min/cuda_graph.py)."""
        x = self.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = self.rope(positions, x.dtype)  # (B, 1, T, hd) each
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, None if cache is None else cache.layer(i))
        return self.norm(x)

    def head(self, h, token_ids=None):
        """h (B, T, D) -> logits (B, T, V); or only the columns token_ids (n,) -> (B, T, n)."""
        w, b = self.lm_head_weight, self.lm_head_bias
        if token_ids is not None:  # e.g. the digits and separators a forecast may contain
            w, b = w[token_ids], None if b is None else b[token_ids]
        return linear(h, w, None if b is None else b.to(h.dtype))  # a float32 trained bias on a bf16 model


def positions_and_mask(B, T, past, attention_mask, device):
    """RoPE positions (B, T) and the attention mask (B, 1, T, past + T) for T new tokens after
    `past` cached ones; the mask is None when plain causal attention is right. Case by case:

    - No padding, nothing cached (a training batch, a prompt of equal rows): positions 0..T-1,
      mask None, so scaled_dot_product_attention takes its fast is_causal path.
    - No padding, `past` tokens cached (a decode step): positions past..past+T-1; each new token
      sees every cached key and the new keys up to itself.
    - Left padding (attention_mask (B, past + T), 0 = padding, covering cached and new tokens):
      a token's position counts only the real tokens before it, so a padded row gets the
      positions it would have alone; keys that are padding are masked out. A padding query
      attends to itself only, which keeps its softmax finite (its output is never used).
    """
    if attention_mask is None:
        positions = torch.arange(past, past + T, device=device).expand(B, T)
        if past == 0:
            return positions, None
        key_ok = torch.ones(B, past + T, dtype=torch.bool, device=device)
    else:
        if attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask must have shape {(B, past + T)} (cached + new tokens), got {tuple(attention_mask.shape)}.")
        key_ok = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
    q_idx = torch.arange(past, past + T, device=device)[:, None]  # (T, 1) slot of each query
    k_idx = torch.arange(past + T, device=device)[None, :]  # (1, S) slot of each key
    causal = k_idx <= q_idx  # (T, S)
    mask = (causal & key_ok[:, None, :]) | (k_idx == q_idx)  # (B, T, S)
    return positions, mask[:, None]  # (B, 1, T, S)
