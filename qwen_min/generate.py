"""Batched, KV-cached generation: prefill the prompts once, then decode one token at a time.

    python -m qwen_min --model DIR --prompt "1.00,2.00;1.10,1.90;" --max-new-tokens 20

Rows of different lengths are left-padded: every row's last prompt token then sits in the same
column, so each decode step appends one column for the whole batch. The attention mask keeps
padding out of attention and out of the RoPE positions (see Qwen2._positions_and_mask).
"""

import torch

from .kv_cache import KVCache


def pad_left(rows, pad_id):
    """list of token-id lists -> input_ids (B, T) and attention_mask (B, T), padding on the left."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("Every prompt must hold at least one token.")
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, T - len(r):] = torch.as_tensor(r, dtype=torch.long)
        attention_mask[i, T - len(r):] = 1
    return input_ids, attention_mask


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> token indices (B,). temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # the tokens before this one already reach p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model, input_ids, max_new_tokens=64, attention_mask=None, temperature=0.0, top_k=None, top_p=None,
             seed=None, allowed_token_ids=None, stop_token_ids=None, stop_after=None, num_samples=1, pad_token_id=None):
    """Continues each prompt by up to max_new_tokens tokens.

    input_ids: (B, T) tensor (left-padded, with attention_mask (B, T)) or a list of token-id lists.
    allowed_token_ids: if given, only these tokens can be produced (and only their logits are
        computed: a forecast needs 13 of the 151,936 output rows).
    stop_token_ids: a row ends after producing one of these (default: the config's eos).
    stop_after: (token_id, n): a row also ends once it has produced token_id n times
        (e.g. (id of ";", h): a forecast of h time steps).
    num_samples: continuations per prompt, all from one prefill of it (its cache rows are copied).
    Finished rows leave the batch (the rest decode faster) and are filled with pad_token_id;
    generation ends when every row has finished.
    Returns (B * num_samples, T + n_new) token ids, each prompt's samples in consecutive rows:
    the prompts followed by the new tokens, like transformers.
    """
    cfg = model.config
    pad_token_id = cfg.bos_token_id if pad_token_id is None else pad_token_id
    if isinstance(input_ids, (list, tuple)):
        input_ids, attention_mask = pad_left(input_ids, pad_token_id)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}.")
    device = model.embed_tokens.weight.device
    input_ids = input_ids.to(device)
    mask = None if attention_mask is None else attention_mask.to(device)
    stop = torch.as_tensor([cfg.eos_token_id] if stop_token_ids is None else list(stop_token_ids), dtype=torch.long, device=device)
    allowed = None if allowed_token_ids is None else torch.as_tensor(list(allowed_token_ids), device=device)
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)

    B, T = input_ids.shape
    cache = KVCache.for_model(model, B, T + max_new_tokens)
    h = model.body(input_ids, mask, cache)[:, -1:]  # prefill; (B, 1, D) for the last position
    if num_samples > 1:  # every sample of a prompt continues from the same prefill
        rows = torch.arange(B, device=device).repeat_interleave(num_samples)  # (R,)
        cache.select(rows)
        input_ids, h, mask = input_ids[rows], h[rows], None if mask is None else mask[rows]
    R = input_ids.shape[0]
    new = torch.full((R, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    active = torch.arange(R, device=device)  # the rows still generating
    counted = torch.zeros(R, dtype=torch.long, device=device)  # occurrences of stop_after's token
    n = 0
    for n in range(1, max_new_tokens + 1):
        logits = model.head(h, allowed)[:, -1]  # (r, V) or (r, n_allowed)
        token = sample(logits, temperature, top_k, top_p, generator)  # (r,)
        if allowed is not None:
            token = allowed[token]
        new[active, n - 1] = token
        done = torch.isin(token, stop)
        if stop_after is not None:
            counted[active] += token == stop_after[0]
            done |= counted[active] >= stop_after[1]
        if done.any():  # finished rows leave the batch and the cache
            keep = (~done).nonzero().squeeze(1)
            active, token = active[keep], token[keep]
            mask = None if mask is None else mask[keep]
            cache.select(keep)
        if len(active) == 0 or n == max_new_tokens:
            break
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        h = model.body(token[:, None], mask, cache)  # decode one token: (r, 1, D)
    return torch.cat([input_ids, new[:, :n]], dim=1)


def produced_lengths(new_tokens, stop_token_ids=(), stop_after=None):
    """How many of each row's new tokens (R, n) generate really produced, by its stopping rules
    (the rest is padding): the row's last token is its first stop token, or stop_after's n-th."""
    stops, lengths = set(stop_token_ids), []
    for row in new_tokens.tolist():
        length, seen = len(row), 0
        for j, t in enumerate(row):
            seen += stop_after is not None and t == stop_after[0]
            if t in stops or (stop_after is not None and seen >= stop_after[1]):
                length = j + 1
                break
        lengths.append(length)
    return lengths
