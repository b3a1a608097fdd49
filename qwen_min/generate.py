"""Batched, KV-cached generation: prefill the prompts once, then decode one token at a time.

    python -m qwen_min --model DIR --prompt "1.00,2.00;1.10,1.90;" --max-new-tokens 20

Rows of different lengths are left-padded: every row's last prompt token then sits in the same
column, so each decode step appends one column for the whole batch. The attention mask keeps
padding out of attention and out of the RoPE positions (see model.positions_and_mask).

Decoding follows a checkpoint's generation_config.json the way transformers' `generate` does
(transformers 5.24, generation/utils.py and logits_process.py):
- Where the settings come from. transformers attaches the file to the model at load time and
  starts every `generate` from it; keyword arguments override it field by field. Here
  `GenerationConfig.from_pretrained(folder)` reads it and `generate(..., generation_config=gc)`
  uses it (or `model.generation_config`, if the loader attached one); every keyword that is not
  None overrides it. `use_generation_config=False` ignores any config: greedy, no penalty, stop at
  the model config's eos, unless keywords say otherwise. Two differences from transformers' API:
  None means "not given", so top_k=0 and top_p=1.0 switch those filters off; and a temperature
  passed without do_sample decides alone (0 greedy, > 0 sampling), as this function always has.
- The order, each step, on float32 logits: the repetition penalty; then, only when sampling,
  temperature, top-k, top-p, and one torch.multinomial draw. Greedy takes the argmax of the
  penalised logits; temperature, top-k and top-p never touch greedy decoding.
- The repetition penalty (CTRL, Keskar et al. 2019) reaches every token of the row: the prompt
  and the tokens generated so far, each once however often it occurred, but not the left
  padding (transformers 5 skips the columns before the attention mask's first 1).
- allowed_token_ids computes only the allowed columns of the head, and the penalty and the
  filters act on those columns. That is transformers with a prefix_allowed_tokens_fn allowing the
  same set (it masks the rest to -inf after the penalty): the penalty is per token, so the order
  does not matter, and top-k and top-p then choose among the allowed tokens. Greedy decoding is
  the same token for token; sampling draws from the same distribution, but over fewer columns,
  so a seed does not give transformers' draws.
With the same seed, sampling draws the same tokens as transformers as long as no row has
finished: finished rows leave our batch, while transformers keeps drawing for them, which
shifts the random stream for the rest.
"""

from dataclasses import dataclass

import torch

from .generation_config import GenerationConfig
from .kv_cache import KVCache
from .model import FEW_ROWS


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
    """logits (B, V) -> token indices (B,). temperature 0 is greedy (argmax).

    The filters run in transformers' order and form (temperature, then top-k, then top-p; top_k 0
    or None and top_p 1.0 are off), and the draw is one torch.multinomial over the rows, as in
    transformers: with the same seed and the same logits both draw the same tokens.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ascending, order = logits.sort(dim=-1)  # (B, V) smallest first
        tail = ascending.softmax(-1).cumsum(-1)  # probability of this token and all smaller ones
        drop = tail <= 1 - top_p  # the larger tokens alone already reach top_p
        drop[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def tokens_seen(input_ids, attention_mask, vocab_size):
    """(B, T) prompts -> (B, V) bool: which tokens each row already holds (its padding excluded)."""
    seen = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.bool, device=input_ids.device)
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    rows, cols = real.nonzero(as_tuple=True)
    seen[rows, input_ids[rows, cols]] = True
    return seen


def penalize_repeats(logits, seen, penalty):
    """CTRL's repetition penalty (Keskar et al. 2019) as transformers applies it: the logit of every
    token already in the row, prompt included, is divided by penalty if positive and multiplied by
    it if negative, once however often the token occurred. logits (B, V) float, seen (B, V) bool."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def decoding(model, generation_config=None, use_generation_config=True, do_sample=None, temperature=None,
             top_k=None, top_p=None, repetition_penalty=None, stop_token_ids=None, pad_token_id=None):
    """The settings one generate call decodes with: each keyword given (not None) wins, the rest come
    from generation_config, else the model's own `generation_config` attribute if it has one, else
    the neutral GenerationConfig (greedy, no penalty). use_generation_config=False ignores both configs.
    Returns a GenerationConfig with eos_token_id (the stop ids) and pad_token_id filled in."""
    base = GenerationConfig()
    if use_generation_config:
        base = generation_config or getattr(model, "generation_config", None) or base
    if do_sample is None:  # an explicit temperature decides, as it always has here: 0 is greedy
        do_sample = base.do_sample if temperature is None else temperature > 0
    temperature = base.temperature if temperature is None else temperature
    if do_sample and not temperature > 0:
        raise ValueError(f"Sampling needs a temperature > 0, got {temperature}; pass do_sample=False for greedy decoding.")
    penalty = base.repetition_penalty if repetition_penalty is None else float(repetition_penalty)
    if not penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 is none), got {penalty}.")
    if stop_token_ids is None:
        stop_token_ids = base.eos_token_id if base.eos_token_id is not None else [model.config.eos_token_id]
    if pad_token_id is None:
        pad_token_id = base.pad_token_id if base.pad_token_id is not None else model.config.bos_token_id
    return GenerationConfig(do_sample=do_sample, temperature=temperature,
                            top_k=base.top_k if top_k is None else top_k, top_p=base.top_p if top_p is None else top_p,
                            repetition_penalty=penalty, eos_token_id=tuple(stop_token_ids), pad_token_id=pad_token_id)


class StopRules:
    """When a row has finished: it produced one of `token_ids`, or, with `after` = (token_id, n), its
    n-th token_id (e.g. the n-th ";" of a forecast of n time steps). Keeps the count per row."""

    def __init__(self, token_ids, after, rows, device):
        self.token_ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=device)
        self.after = after
        self.counted = torch.zeros(rows, dtype=torch.long, device=device)  # occurrences of after's token

    def done(self, token):
        """token (r,) just produced by the rows still going -> (r,) bool: which of them have finished."""
        done = torch.isin(token, self.token_ids)
        if self.after is not None:
            self.counted += token == self.after[0]
            done |= self.counted >= self.after[1]
        return done

    def keep(self, rows):
        self.counted = self.counted[rows]


@dataclass
class Generation:
    """What one generate call did. tokens (R, T + n): the prompts, then the new tokens, padding
    after a row's end; lengths (R,): the new tokens each row produced, its stop token included;
    active: how many rows produced a token at each of the n steps (finished rows leave the batch).
    With guesses checked (speculative.py), active counts the rows of each forward pass instead,
    and fed the columns each of its rows fed (1 for the prefill: its last position makes logits), and
    keys the cache slots each pass attended to (dropped guesses and closed holes take none)."""
    tokens: torch.Tensor
    lengths: list
    active: list
    fed: list = None
    keys: list = None


def prefill(model, input_ids, mask, cache):
    """Every prompt token through the model, filling the empty cache -> the hidden state of each
    row's last position (B, 1, D), from which the first new token is chosen.

    On a CPU, prompts longer than FEW_ROWS go one at a time, padding included: the same arithmetic
    (still F.linear: more than FEW_ROWS rows) and the same cache, but one prompt's activations (a few
    MB) stay in the processor's caches where the batch's (hundreds of MB) do not; the bench's 20
    prompts of ~510 tokens took 8% less time (docs/evaluate.md)."""
    B, T = input_ids.shape
    if input_ids.device.type != "cpu" or B == 1 or T <= FEW_ROWS or cache.length > 0:
        return model.body(input_ids, mask, cache)[:, -1:]
    h = [model.body(input_ids[i:i + 1], None if mask is None else mask[i:i + 1], cache.row(i))[:, -1:] for i in range(B)]
    cache.append(T)  # the rows filled slots 0..T-1 through their views
    return torch.cat(h)


def decode_one(model, token, mask, cache):
    """One new token per row (r,) through the model, attending to the cache -> hidden states (r, 1, D)."""
    return model.body(token[:, None], mask, cache)


class CacheDecoder:
    """The default decode steps: the batch shrinks as rows finish (their cache rows are dropped), and
    each step attends to the slots filled so far. (The alternative, for GPUs, is cuda_graph.StaticDecoder.)"""

    def __init__(self, model, cache, mask):
        self.model, self.cache, self.mask = model, cache, mask  # mask (r, slots) or None: no padding

    def keep(self, rows):
        """Only the active rows `rows` (indices into them) go on."""
        self.cache.select(rows)
        self.mask = None if self.mask is None else self.mask[rows]

    def step(self, token):
        """token (r,) -> hidden states (r, 1, D) after it."""
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(token), 1)], dim=1)
        return decode_one(self.model, token, self.mask, self.cache)


def decoder_for(model, cache, mask, decoder):
    """decoder "cache" (the default), "graph" (one CUDA graph replayed every step) or "static" (the
    graph's fixed-shape step run without recording it, on any device)."""
    if decoder == "cache":
        return CacheDecoder(model, cache, mask)
    if decoder in ("graph", "static"):
        from .cuda_graph import StaticDecoder

        return StaticDecoder(model, cache, mask, record=decoder == "graph")
    raise ValueError(f"decoder must be 'cache', 'graph' or 'static', got {decoder!r}.")


def choose(model, h, s, allowed=None, seen=None, generator=None):
    """The next token of each row from its hidden state h (r, 1, D): the head's logits (only the
    allowed columns, if given), the repetition penalty, then greedy or sampled as s says. Marks
    the chosen token as seen. -> token ids (r,)."""
    logits = model.head(h, allowed)[:, -1].float()  # (r, V) or (r, n_allowed); processed in float32 as transformers does
    if seen is not None:
        logits = penalize_repeats(logits, seen, s.repetition_penalty)
    column = sample(logits, s.temperature if s.do_sample else 0.0, s.top_k, s.top_p, generator)  # (r,)
    if seen is not None:
        seen[torch.arange(len(column), device=column.device), column] = True
    return column if allowed is None else allowed[column]


@torch.inference_mode()
def generate(model, input_ids, max_new_tokens=64, attention_mask=None, temperature=None, top_k=None, top_p=None,
             seed=None, allowed_token_ids=None, stop_token_ids=None, stop_after=None, num_samples=1, pad_token_id=None,
             repetition_penalty=None, do_sample=None, generation_config=None, use_generation_config=True, details=False,
             decoder="cache", draft=None):
    """Continues each prompt by up to max_new_tokens tokens: a prefill, then one decode step per token.

    input_ids: (B, T) tensor (left-padded, with attention_mask (B, T)) or a list of token-id lists.
    Decoding settings (see `decoding`): do_sample, temperature (0 = greedy), top_k, top_p,
        repetition_penalty, stop_token_ids and pad_token_id; those left None come from
        generation_config (a GenerationConfig), else model.generation_config, else greedy with no
        penalty, stopping at the model config's eos. use_generation_config=False: keywords only.
    allowed_token_ids: if given, only these tokens can be produced (and only their logits are
        computed: a forecast needs 13 of the 151,936 output rows).
    stop_token_ids, stop_after: the stop rules (StopRules): a row ends after producing one of
        stop_token_ids, or once it has produced stop_after = (token_id, n)'s token n times.
    num_samples: continuations per prompt, all from one prefill of it (its cache rows are copied).
    Finished rows leave the batch (the rest decode faster) and are filled with pad_token_id;
    generation ends when every row has finished.
    decoder: "cache" (default), or "graph" on a GPU: every decode step replays one recorded CUDA
        graph (qwen_min/cuda_graph.py; same tokens but where rounding breaks a near-tie).
    draft: a guess of the next tokens, draft(tokens so far) -> (guess ids, sure), which greedy
        decoding (one sample, the default decoder) checks as it goes: the same tokens in fewer
        forward passes (qwen_min/speculative.py; data/draft.py guesses LLMTIME text).
    Returns (B * num_samples, T + n_new) token ids, each prompt's samples in consecutive rows:
    the prompts followed by the new tokens, like transformers; with details=True, a Generation
    that also says how many tokens each row produced and how many rows were active at each step.
    """
    cfg = model.config
    s = decoding(model, generation_config, use_generation_config, do_sample, temperature, top_k, top_p,
                 repetition_penalty, stop_token_ids, pad_token_id)
    if isinstance(input_ids, (list, tuple)):
        input_ids, attention_mask = pad_left(input_ids, s.pad_token_id)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}.")
    if draft is not None and not s.do_sample and num_samples == 1 and decoder == "cache":
        from .speculative import generate_drafted  # it builds on this module

        return generate_drafted(model, input_ids, max_new_tokens, draft, attention_mask=attention_mask,
                                allowed_token_ids=allowed_token_ids, stop_token_ids=s.eos_token_id, stop_after=stop_after,
                                pad_token_id=s.pad_token_id, repetition_penalty=s.repetition_penalty, details=details)
    B, T = input_ids.shape
    if T + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"{T} prompt tokens plus max_new_tokens={max_new_tokens} exceed the model's {cfg.max_seq_len} positions; generate fewer tokens or shorten the prompt.")
    device = model.embed_tokens.weight.device
    input_ids = input_ids.to(device)
    mask = None if attention_mask is None else attention_mask.to(device)
    allowed = None if allowed_token_ids is None else torch.as_tensor(list(allowed_token_ids), device=device)
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)

    cache = KVCache.for_model(model, B, T + max_new_tokens)
    h = prefill(model, input_ids, mask, cache)  # (B, 1, D)
    seen = None  # (B, V or n_allowed): tokens each row holds, in the columns the head computes
    if s.repetition_penalty != 1.0:
        seen = tokens_seen(input_ids, mask, cfg.vocab_size)
        seen = seen if allowed is None else seen[:, allowed]
    if num_samples > 1:  # every sample of a prompt continues from the same prefill
        rows = torch.arange(B, device=device).repeat_interleave(num_samples)  # (R,)
        cache.select(rows)
        input_ids, h, mask = input_ids[rows], h[rows], None if mask is None else mask[rows]
        seen = None if seen is None else seen[rows]
    R = input_ids.shape[0]
    new = torch.full((R, max_new_tokens), s.pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(R, dtype=torch.long, device=device)
    active = torch.arange(R, device=device)  # the rows still generating
    stop, per_step = StopRules(s.eos_token_id, stop_after, R, device), []
    steps = decoder_for(model, cache, mask, decoder)
    for n in range(1, max_new_tokens + 1):
        token = choose(model, h, s, allowed, seen, generator)  # (r,)
        new[active, n - 1] = token
        lengths[active] = n
        per_step.append(len(active))
        done = stop.done(token)
        if done.any():  # finished rows leave the batch (and, with the default decoder, the cache)
            keep = (~done).nonzero().squeeze(1)
            active, token = active[keep], token[keep]
            seen = None if seen is None else seen[keep]
            stop.keep(keep)
            steps.keep(keep)
        if len(active) == 0 or n == max_new_tokens:
            break
        h = steps.step(token)  # (r, 1, D)
    tokens = torch.cat([input_ids, new[:, :len(per_step)]], dim=1)
    return Generation(tokens, lengths.tolist(), per_step) if details else tokens
