"""Decoding through one recorded CUDA graph: every new token replays the same kernels.

On a GPU an eager decode step is bound by launching its hundreds of small kernels from Python
(bench/decode_step.py on an H100: 15 ms a step eager, 3 ms replayed, against 0.3 ms to stream the
weights once). A CUDA graph records the kernels of one call and replays them with one launch, but
every tensor it reads or writes must keep its shape and its address. So, unlike generate's
default decoder (`CacheDecoder` in generate.py), this one
- keeps every row to the end (a finished row is still computed, and ignored),
- attends over all S slots of the cache, with the slots not yet written masked out (`key_ok`),
- writes each step's keys and values at a slot held in a tensor (`slot`), not a Python slice,
- feeds the new tokens and their RoPE positions through fixed buffers.
The arithmetic is the default decoder's, over extra masked keys, so it gives the same tokens but
where float rounding breaks a near-tie. `StaticDecoder(..., record=False)` runs the same static
step without a graph, on any device (the CPU tests check the logic that way).
"""

import torch

from .kv_cache import KVCache


class StaticCache:
    """The cache's buffers (L, R, K, S, hd), written in place at the slot `slot` (a 1-element tensor)."""

    def __init__(self, cache: KVCache):
        self.k, self.v = cache.k, cache.v
        self.slot = torch.zeros(1, dtype=torch.long, device=cache.k.device)

    def layer(self, i):
        return StaticLayerCache(self, i)


class StaticLayerCache:
    def __init__(self, cache, i):
        self.cache, self.i = cache, i

    def update(self, k, v):
        """Writes k, v (R, K, 1, hd) at the slot; returns all S slots' keys and values (R, K, S, hd)."""
        c = self.cache
        c.k[self.i].index_copy_(2, c.slot, k)
        c.v[self.i].index_copy_(2, c.slot, v)
        return c.k[self.i], c.v[self.i]


class StaticDecoder:
    """Decode steps for all R rows of a prefilled cache at fixed shapes, recorded as a CUDA graph
    (record=True, CUDA only) or run as they are (record=False). mask: the prompts' attention mask
    (R, T), or None when no row is padded."""

    def __init__(self, model, cache: KVCache, mask=None, record=True):
        R, S, device = cache.k.shape[1], cache.max_seq_len, cache.k.device
        self.model, self.cache, self.length = model, StaticCache(cache), cache.length  # slots filled so far
        self.key_ok = torch.zeros(R, S, dtype=torch.bool, device=device)  # which slots each row may attend
        self.key_ok[:, :self.length] = True if mask is None else mask.bool()
        self.token = torch.zeros(R, 1, dtype=torch.long, device=device)  # each row's newest token
        real = torch.full((R, 1), self.length, device=device) if mask is None else mask.long().sum(1, keepdim=True)
        self.position = real.long()  # (R, 1): RoPE position of the newest token = real tokens before it
        self.active = torch.arange(R, device=device)  # rows still generating
        # nothing to record when the cache has no free slot (max_new_tokens=0: no step will come)
        self.run = self.record() if record and self.length < S else self.forward

    def forward(self):
        """One step for every row -> hidden states (R, 1, D); reads and writes only the fixed buffers."""
        return self.model.blocks(self.token, self.position, self.key_ok[:, None, None, :], self.cache)

    def record(self):
        """The step recorded once; -> a function replaying it. Warm-up runs (on a side stream, as
        torch.cuda.graph asks) write only the slot the first real step overwrites."""
        if self.token.device.type != "cuda":
            raise ValueError("A CUDA graph needs the model on a CUDA device; decode with the default decoder instead.")
        self.cache.slot.fill_(self.length)
        with torch.cuda.device(self.token.device):  # streams and capture on the model's GPU, whichever is current
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.forward()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.forward()
        return lambda: (graph.replay(), out)[1]

    def keep(self, rows):
        """Of the active rows, only `rows` (indices into them) go on; the others stay in the batch, unread."""
        self.active = self.active[rows]

    def step(self, token):
        """token (r,) of the active rows -> their hidden states (r, 1, D) after it."""
        self.token[self.active, 0] = token
        self.cache.slot.fill_(self.length)
        self.key_ok[:, self.length] = True  # the new token sees itself
        h = self.run()[self.active]
        self.position += 1
        self.length += 1
        return h
