"""A static key/value cache: preallocated once, filled left to right during generation.

Only the n_kv_heads key/value heads are stored (2 for Qwen2.5-0.5B), 7x less than one per query
head: attention reads each kv head in place for the query heads that share it (enable_gqa). `length` counts the slots filled so far;
the model writes a step's keys at slots [length, length + T) and then advances `length`.
"""

import torch


class KVCache:
    def __init__(self, n_layers, batch_size, n_kv_heads, max_seq_len, head_dim, dtype=torch.float32, device="cpu"):
        shape = (n_layers, batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, K, S_max, hd)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (L, B, K, S_max, hd)
        self.length = 0

    @classmethod
    def for_model(cls, model, batch_size, max_seq_len):
        cfg, w = model.config, model.embed_tokens.weight
        return cls(cfg.n_layers, batch_size, cfg.n_kv_heads, max_seq_len, cfg.head_dim, w.dtype, w.device)

    @property
    def max_seq_len(self):
        return self.k.shape[3]

    def update(self, layer_idx, k, v):
        """Writes k, v (B, K, T, hd) after the filled slots; returns all keys, values (B, K, length+T, hd)."""
        end = self.length + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache is full: {end} tokens do not fit in its {self.max_seq_len} slots.")
        self.k[layer_idx, :, :, self.length:end] = k
        self.v[layer_idx, :, :, self.length:end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def select(self, rows):
        """Keeps only the given batch rows (e.g. to copy one prefilled prompt into N samples)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        return self
