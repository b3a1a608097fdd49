"""A static key/value cache: preallocated once, filled left to right during generation.

Only the n_kv_heads key/value heads are stored (2 for Qwen2.5-0.5B), 7x less than one per query
head: attention reads each kv head in place for the query heads that share it (model.Attention).

The cache owns its position. A forward pass of T new tokens first calls `append(T)`, which
reserves the next T slots and returns `past`, the number of slots filled before them; each
attention layer then writes its keys and values into those slots through its own view,
`cache.layer(i).update(k, v)`, and reads back everything so far (a CPU prefill fills an empty
cache one prompt at a time through `row(i)` views, then appends). Only speculative verification
(qwen_min/speculative.py) moves `length` back: `drop(n)` forgets the slots of guesses no row kept,
and `compact(slots)` moves each row's live slots together.
"""

import torch


class KVCache:
    def __init__(self, n_layers, batch_size, n_kv_heads, max_seq_len, head_dim, dtype=torch.float32, device="cpu"):
        shape = (n_layers, batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, K, S_max, hd)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, K, S_max, hd)
        self.length = 0  # slots filled (or reserved by the forward pass under way)
        self.start = 0  # where the slots of the forward pass under way begin

    @classmethod
    def for_model(cls, model, batch_size, max_seq_len):
        cfg, w = model.config, model.embed_tokens.weight
        return cls(cfg.n_layers, batch_size, cfg.n_kv_heads, max_seq_len, cfg.head_dim, w.dtype, w.device)

    @property
    def max_seq_len(self):
        return self.k.shape[3]

    def append(self, T) -> int:
        """Reserves slots for T new tokens; returns past, the slots filled before them."""
        if self.length + T > self.max_seq_len:
            raise ValueError(f"KV cache is full: {self.length + T} tokens do not fit in its {self.max_seq_len} slots.")
        self.start, self.length = self.length, self.length + T
        return self.start

    def drop(self, n):
        """Forgets the last n slots: the next forward pass writes over them."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot drop {n} of the cache's {self.length} filled slots.")
        self.length -= n

    def row(self, i):
        """An empty cache over row i alone that shares this one's memory: what it is given lands in
        row i's slots from 0 on (generate.prefill fills an empty cache a prompt at a time)."""
        view = object.__new__(KVCache)
        view.k, view.v, view.length, view.start = self.k[:, i:i + 1], self.v[:, i:i + 1], 0, 0
        return view

    def compact(self, slots):
        """slots (B, n): the slots each row keeps, in order; they become its first n slots and the
        rest is forgotten. Attention reads keys in any order and RoPE is already in them, so moving
        a slot changes nothing but where it lives (speculative.py uses this to close holes)."""
        n = slots.shape[1]
        at = slots[None, :, None, :, None].expand(self.k.shape[0], -1, self.k.shape[2], -1, self.k.shape[4])
        self.k[:, :, :, :n] = self.k.gather(3, at)
        self.v[:, :, :, :n] = self.v.gather(3, at)
        self.length = n

    def layer(self, i) -> "LayerCache":
        return LayerCache(self, i)

    def select(self, rows):
        """Keeps only the given batch rows (e.g. to copy one prefilled prompt into N samples)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        return self


class LayerCache:
    """One attention layer's view of the cache."""

    def __init__(self, cache, i):
        self.cache, self.i = cache, i

    def update(self, k, v):
        """Writes k, v (B, K, T, hd) into the reserved slots; returns all keys, values so far (B, K, S, hd)."""
        c = self.cache
        c.k[self.i, :, :, c.start:c.length] = k
        c.v[self.i, :, :, c.start:c.length] = v
        return c.k[self.i, :, :, :c.length], c.v[self.i, :, :, :c.length]
