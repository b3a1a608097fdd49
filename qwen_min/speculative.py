"""Greedy decoding that checks a guess of the next tokens in one forward pass (speculative
verification; Leviathan et al. 2023, with a free guess in place of a draft model).

A decode step of plain greedy decoding feeds one token per row and reads every weight of the
model to get one next token. Here each pass feeds the row's newest token *and* a guess of the few
tokens after it, say [t, d1, d2, d3]. The forward pass gives the logits after each of them, so
greedy's choice after t, after d1, ... are all known at once: g0, g1, g2, g3. The guess d1 is
right if d1 == g0; then d2 is checked against g1, and so on. With a tokens of the guess right, the
pass yields a + 1 tokens, g0 .. ga, exactly those plain greedy decoding would have produced (each
g is computed from the same tokens before it; float rounding aside), and a wrong guess costs only
the arithmetic of its columns. The rest of the guess is discarded.

When it pays: a pass of W columns costs less than W one-column steps wherever a step is bound by
streaming the weights or by matrix products too skinny to reach the machine's peak (small
batches on a CPU). Where arithmetic binds, every column costs its share, and a wrong guess is
arithmetic spent for nothing; on a GPU, whose eager steps are bound by launching kernels, a pass
launched more than the steps it saved, so evaluate.py checks guesses on CPUs only
(docs/evaluate.md, "The limit", has the figures). A guess must be cheap: `draft(tokens)` sees a row's tokens so far (prompt and output)
and returns (guess, sure): token ids it expects next, and how many of them (from the start) are
likely enough to be worth a column of their own. data/draft.py guesses LLMTIME text.

The batch. Rows go at their own pace, but each pass feeds every row the same number of columns:
W = 1 + the median row's `sure`. A row with a shorter sure guess fills its columns from the rest
of its guess (or leaves holes); a row with a longer one is cut. Rows drift out of step (a value
that gains a digit shifts its row by a token), so W = 1 + the largest `sure` would spend most
columns on poor guesses: on this CPU at batch 20 that was no faster than plain decoding.

The cache. A pass writes W slots for every row. Columns past the longest run any row kept are
dropped at once (the next pass writes over them); the rest that a row did not keep (its wrong
guesses, its holes) stay as slots the attention mask turns off (0), like left padding: RoPE
positions count only the slots that are on (model.positions_and_mask), so the next token of every
row gets the position it would have had. The cache gets max_new_tokens slots beyond what plain
decoding needs; when they run short, the rows' slots that are on are moved together
(Rows.compact, KVCache.compact), and if that frees too few, passes narrow, down to one column:
plain greedy decoding.
"""

import torch

from .generate import Generation, StopRules, decoding, pad_left, penalize_repeats, prefill, tokens_seen
from .kv_cache import KVCache

NO_GUESS = -1  # a hole: a column a row has no guess for


class Rows:
    """What each row still generating carries from pass to pass; rows leave together (`keep`).
    ids (r,): their rows in the output; histories: their tokens so far (no padding), for the guess;
    mask (r, slots): their attention mask over the cache; seen (r, V') or None: the tokens each row
    holds, in the head's columns, when a repetition penalty applies; stop: their stop rules."""

    def __init__(self, ids, histories, mask, seen, stop, cache):
        self.ids, self.histories, self.mask, self.seen, self.stop, self.cache = ids, histories, mask, seen, stop, cache

    def keep(self, rows):
        self.ids, self.mask = self.ids[rows], self.mask[rows]
        self.histories = [self.histories[i] for i in rows.tolist()]
        self.seen = None if self.seen is None else self.seen[rows]
        self.stop.keep(rows)
        self.cache.select(rows)

    def compact(self):
        """Closes the holes: each row's slots that are on move to the end of the filled slots, in
        order, and columns then off in every row are forgotten. Positions count only slots that are
        on, so every token keeps its position. Nothing to do when no column is off in every row."""
        n = int(self.mask.sum(1).max())
        if n == self.cache.length:
            return
        slots = torch.sort(self.mask, dim=1, stable=True).indices[:, -n:]  # (r, n) off slots first, then on ones
        self.cache.compact(slots)
        self.mask = self.mask.gather(1, slots)


def as_columns(guesses, width, rooms):
    """Each row's guess (a list of ids) cut to width - 1 columns, and to rooms[i] - 1 (the tokens row i
    may still produce, less the one this pass yields anyway) -> (r, width - 1) ids, NO_GUESS where
    none. A hole takes no position, so no row's columns reach past its budget's last position."""
    out = torch.full((len(guesses), width - 1), NO_GUESS, dtype=torch.long)
    for i, (guess, room) in enumerate(zip(guesses, rooms)):
        guess = guess[:min(width, room) - 1]
        out[i, :len(guess)] = torch.as_tensor(guess, dtype=torch.long)
    return out


def seen_by_column(seen, guess, column_of):
    """The tokens each column's choice is penalised for: (r, V') held so far, guesses (r, W - 1) ->
    (r, W, V'). Column j's choice is used only if the j guesses before it were right, and then
    those guesses are the row's tokens too."""
    out = seen[:, None].repeat(1, guess.shape[1] + 1, 1)
    cols = column_of[guess.clamp(min=0)]  # (r, W - 1) each guess's head column, -1 if the head lacks it
    for j in range(guess.shape[1]):
        rows = ((guess[:, j] != NO_GUESS) & (cols[:, j] >= 0)).nonzero().squeeze(1)
        out[rows, j + 1:, cols[rows, j]] = True
    return out


def greedy(model, h, allowed, seen, penalty):
    """Hidden states h (r, W, D) -> greedy's next token after each of the W positions (r, W): the
    argmax of the head's float32 logits (only the allowed columns, if given), repeated tokens
    penalised (seen (r, W, V') or None), as generate.choose decides one token."""
    logits = model.head(h, allowed).float()  # (r, W, V')
    if seen is not None:
        logits = penalize_repeats(logits, seen, penalty)
    column = logits.argmax(-1)
    return column if allowed is None else allowed[column]


@torch.inference_mode()
def generate_drafted(model, input_ids, max_new_tokens, draft, attention_mask=None, allowed_token_ids=None,
                     stop_token_ids=None, stop_after=None, pad_token_id=None, repetition_penalty=1.0, max_width=8,
                     details=False):
    """Greedy decoding with each pass checking draft's guess of the next tokens: the same tokens as
    generate(..., do_sample=False) with the same settings, in fewer forward passes.

    Arguments as generate's (greedy, one sample per prompt, no generation config: pass the
    repetition penalty and stop ids); draft(tokens: list of ids) -> (guess ids, sure);
    max_width: columns per row and pass at most (1 + the longest guess checked).
    Returns tokens (B, T + n) as generate does; with details=True a Generation whose `active`,
    `fed` and `keys` say how many rows each forward pass had, how many columns each row fed and how
    many cache slots it attended to (the prefill first: B rows, 1 column of logits, T slots;
    flops.generate counts them).
    """
    s = decoding(model, temperature=0.0, repetition_penalty=repetition_penalty, stop_token_ids=stop_token_ids,
                 pad_token_id=pad_token_id, use_generation_config=False)
    if isinstance(input_ids, (list, tuple)):
        input_ids, attention_mask = pad_left(input_ids, s.pad_token_id)
    B, T = input_ids.shape
    if max_new_tokens < 1:  # nothing to generate: the prompts, as generate returns them
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
        return Generation(input_ids, [0] * B, [], []) if details else input_ids
    if T + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"{T} prompt tokens plus max_new_tokens={max_new_tokens} exceed the model's {model.config.max_seq_len} positions; generate fewer tokens or shorten the prompt.")
    device = model.embed_tokens.weight.device
    input_ids = input_ids.to(device)
    prompt_mask = None if attention_mask is None else attention_mask.to(device)  # None: no padding, causal fast path
    allowed = None if allowed_token_ids is None else torch.as_tensor(list(allowed_token_ids), device=device)
    V = model.config.vocab_size
    column_of = torch.arange(V, device=device) if allowed is None else \
        torch.full((V,), -1, device=device).index_copy_(0, allowed, torch.arange(len(allowed), device=device))
    seen = None
    if s.repetition_penalty != 1.0:
        seen = tokens_seen(input_ids, prompt_mask, V)
        seen = seen if allowed is None else seen[:, allowed]
    mask = torch.ones_like(input_ids) if prompt_mask is None else prompt_mask  # (B, slots so far)
    cache = KVCache.for_model(model, B, T + 2 * max_new_tokens)  # max_new_tokens spare slots for guesses
    rows = Rows(torch.arange(B, device=device), [r[m.bool()].tolist() for r, m in zip(input_ids.cpu(), mask.cpu())],
                mask, seen, StopRules(s.eos_token_id, stop_after, B, device), cache)
    new = torch.full((B, max_new_tokens), s.pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(B, dtype=torch.long, device=device)

    h = prefill(model, input_ids, prompt_mask, cache)  # (B, 1, D)
    g = greedy(model, h, allowed, None if seen is None else seen[:, None], s.repetition_penalty)  # (B, 1) the first token
    right, passes = torch.zeros(B, dtype=torch.long, device=device), [(B, 1, T)]  # (rows, columns, keys) of each pass
    while True:
        finished = emit(g, right, rows, new, lengths, column_of, max_new_tokens)
        token = g[torch.arange(len(g), device=device), right]  # (r,) each row's newest token, not yet fed
        if finished.any():  # finished rows leave the batch, their cache rows too
            keep = (~finished).nonzero().squeeze(1)
            rows.keep(keep)
            token = token[keep]
        if len(rows.ids) == 0:
            break
        rooms = (max_new_tokens - lengths[rows.ids]).tolist()  # the tokens each row may still produce
        if cache.max_seq_len - cache.length - max(rooms) < max_width - 1:  # short of room for a full pass
            rows.compact()
        spare = cache.max_seq_len - cache.length - max(rooms)  # cache slots beyond one per pass still to come
        keys = cache.length  # slots before this pass; it attends to them and its own W
        g, right, W = verify(model, rows, token, draft, rooms, allowed, column_of, s.repetition_penalty,
                             widest=min(max_width, max(rooms), 1 + spare))
        passes.append((len(rows.ids), W, keys + W))
    tokens = torch.cat([input_ids, new[:, :int(lengths.max())]], dim=1)
    if not details:
        return tokens
    return Generation(tokens, lengths.tolist(), *map(list, zip(*passes)))


def verify(model, rows, token, draft, rooms, allowed, column_of, penalty, widest):
    """One forward pass: each row's newest token (r,) and its guess of the next ones, W columns in
    all (W <= widest, which keeps one cache slot for every pass that may still come); rooms: the
    tokens each row may still produce.
    -> (g (r, W): greedy's choice after each column, right (r,): how many guesses it agrees with, W)."""
    drafts = [draft(h) for h in rows.histories]  # (guess, sure) per row
    sures = sorted(sure for _, sure in drafts)
    W = max(1, min(1 + sures[len(sures) // 2], widest))  # the median row's sure guesses get columns
    guess = as_columns([d for d, _ in drafts], W, rooms).to(token.device)  # (r, W - 1)
    fed = torch.cat([token[:, None], guess.clamp(min=0)], 1)  # (r, W): holes feed any token, masked
    on = torch.cat([torch.ones_like(token[:, None]), (guess != NO_GUESS).long()], 1)  # (r, W)
    rows.mask = torch.cat([rows.mask, on], 1)
    seen = None if rows.seen is None else seen_by_column(rows.seen, guess, column_of)
    g = greedy(model, model.body(fed, rows.mask, rows.cache), allowed, seen, penalty)
    right = (guess == g[:, :-1]).long().cumprod(1).sum(1)  # (r,) leading guesses greedy agrees with
    # a wrong guess and everything after it leave the cache: their slots are turned off, and the
    # columns no row kept are dropped, so the next pass writes over them
    rows.mask[:, -W:] *= (torch.arange(W, device=token.device)[None] <= right[:, None]).long()
    rows.cache.drop(W - 1 - int(right.max()))
    rows.mask = rows.mask[:, :rows.cache.length]  # one mask column per cache slot
    return g, right, W


def emit(g, right, rows, new, lengths, column_of, max_new_tokens):
    """Appends each row's verified tokens g[i, 0..right[i]] (r, W) in order, until its stop rule or
    its budget ends it (later ones are dropped). Returns (r,) bool: the rows that have finished.
    Masks instead of indexing by them, so the device is waited for once, for the histories."""
    r, ids = len(rows.ids), rows.ids
    finished = torch.zeros(r, dtype=torch.bool, device=g.device)
    before = lengths[ids]  # (r,) tokens each row had
    for j in range(g.shape[1]):
        going = (j <= right) & ~finished  # (r,) rows producing their j-th token of this pass
        at = lengths[ids].clamp(max=max_new_tokens - 1)  # (r,) where that token goes
        new[ids, at] = torch.where(going, g[:, j], new[ids, at])
        lengths[ids] += going.long()
        if rows.seen is not None:
            cols = column_of[g[:, j]]
            rows.seen[torch.arange(r, device=g.device), cols] |= going
        finished |= going & rows.stop.done(torch.where(going, g[:, j], NO_GUESS))  # NO_GUESS meets no stop rule
        finished |= lengths[ids] >= max_new_tokens
    for history, row, n in zip(rows.histories, g.tolist(), (lengths[ids] - before).tolist()):
        history += row[:n]
    return finished
