"""Token windows for training: LLMTIME text -> token ids -> fixed-length windows.

Qwen2.5 reads each character of LLMTIME text as one token:
0-9 -> 15..24, '.' -> 13, ',' -> 11, ';' -> 26. `DigitTokenizer` is that table, so the
data pipeline runs without loading anything; any object with `encode(text) -> list[int]`
(or a `tokenizers.Tokenizer`, whose Encoding has `.ids`) can stand in its place.

A `Windows` holds, for W windows of L = max_length tokens:

    input_ids       (W, L) int64   token ids, right-padded with pad_id
    attention_mask  (W, L) int64   1 on real tokens, 0 on padding
    labels          (W, L) int64   input_ids, with -100 on padding so that padding never
                                   enters the loss (the coursework starter's bug). Not
                                   shifted: the loss shifts by one, as Hugging Face does.
    trajectory      (W,)   int64   the trajectory each window came from

Where windows start, within one trajectory's ids (windows never cross trajectories):
the first at token 0; each next one at the last step boundary (the token just after a
';') in (start, start + stride], so a window opens on a whole time step, or exactly at
start + stride when no boundary lies there. The last window is the first that reaches
the end. So every token is in some window, and neighbours overlap by at least
max_length - stride tokens (stride = max_length: little or no overlap).
"""

from typing import NamedTuple

import numpy as np

from data import llmtime

PAD_ID = 151643  # Qwen2.5 <|endoftext|>, its pad token
IGNORE_INDEX = -100  # label value the cross-entropy loss skips


class DigitTokenizer:
    """Qwen2.5's ids for the LLMTIME alphabet; encode only, no model files needed.

    Equal to the real tokenizer on LLMTIME text, where '.', ',' and ';' always sit after a
    digit (tests check it); BPE merges odd strings such as ".," into one token.
    """

    VOCAB = {**{str(d): 15 + d for d in range(10)}, ".": 13, ",": 11, ";": 26}

    def __init__(self):
        self._table = np.full(128, -1, dtype=np.int64)  # ASCII code -> id
        for char, token in self.VOCAB.items():
            self._table[ord(char)] = token

    def encode(self, text):
        codes = np.frombuffer(text.encode("ascii", errors="replace"), dtype=np.uint8)
        ids = self._table[codes]  # non-ASCII became '?', which maps to -1
        if (ids < 0).any():
            raise ValueError(f"DigitTokenizer only knows the characters {''.join(self.VOCAB)}; use the real tokenizer for other text.")
        return ids.tolist()


class Windows(NamedTuple):
    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    trajectory: np.ndarray


def batch(w, rows):
    """Windows rows (indices or a slice) -> input_ids, labels (b, L'): the columns that are padding
    in every one of these rows cut off, so a batch of short windows costs no padded compute."""
    n_real = int(w.attention_mask[rows].sum(1).max())
    return w.input_ids[rows, :n_real], w.labels[rows, :n_real]


def token_ids(text, tokenizer):
    """text -> (n,) int64 ids, no special tokens added."""
    ids = tokenizer.encode(text)
    return np.asarray(getattr(ids, "ids", ids), dtype=np.int64)  # tokenizers returns an Encoding


def window_starts(ids, max_length, stride, sep_id):
    """Start offsets (W,) int64 of the windows over ids (n,), by the rule in the docstring."""
    if not 0 < stride <= max_length:
        raise ValueError(f"stride {stride} must be in 1..max_length ({max_length}), or some tokens would be in no window.")
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int64)
    boundaries = np.flatnonzero(ids == sep_id) + 1  # (B,) sorted: first token of each step
    starts = [0]
    while starts[-1] + max_length < len(ids):
        start = starts[-1]
        i = np.searchsorted(boundaries, start + stride, side="right") - 1
        starts.append(int(boundaries[i]) if i >= 0 and boundaries[i] > start else start + stride)
    return np.asarray(starts, dtype=np.int64)


def make_windows(ids, max_length=512, stride=256, pad_id=PAD_ID, sep_id=26, trajectory=0):
    """Cut one sequence of ids (n,) into right-padded windows; see the module docstring."""
    ids = np.asarray(ids, dtype=np.int64)
    starts = window_starts(ids, max_length, stride, sep_id)  # (W,)
    offsets = starts[:, None] + np.arange(max_length)  # (W, L) positions into ids
    real = offsets < len(ids)  # (W, L) False on padding
    input_ids = np.where(real, ids[np.minimum(offsets, len(ids) - 1)], pad_id)  # (W, L)
    return Windows(
        input_ids=input_ids,
        attention_mask=real.astype(np.int64),
        labels=np.where(real, input_ids, IGNORE_INDEX),
        trajectory=np.full(len(starts), trajectory, dtype=np.int64),
    )


def trajectory_windows(scaled, tokenizer, max_length=512, stride=256, decimals=2, pad_id=PAD_ID, trajectory=0):
    """Windows over one scaled trajectory (T, 2): encode, tokenise, cut."""
    ids = token_ids(llmtime.encode(scaled, decimals), tokenizer)
    sep_id = int(token_ids(";", tokenizer)[0])
    return make_windows(ids, max_length, stride, pad_id, sep_id, trajectory)


def dataset_windows(scaled, tokenizer, max_length=512, stride=256, decimals=2, pad_id=PAD_ID):
    """Windows over scaled trajectories (N, T, 2), concatenated; .trajectory says whose."""
    parts = [trajectory_windows(x, tokenizer, max_length, stride, decimals, pad_id, i) for i, x in enumerate(scaled)]
    if not parts:
        empty = np.zeros((0, max_length), dtype=np.int64)
        return Windows(empty, empty, empty, np.zeros(0, dtype=np.int64))
    return Windows(*(np.concatenate(field) for field in zip(*parts)))


def fixed_windows(ids, max_length, stride, pad_id=PAD_ID):
    """Report A's windows (its TimeSeriesData): one every `stride` tokens from token 0, wherever the
    step boundaries fall, each max_length long and right-padded with pad_id. ids (n,) -> (W, L)."""
    ids = np.asarray(ids, dtype=np.int64)
    starts = np.arange(0, len(ids), int(stride))  # (W,)
    offsets = starts[:, None] + np.arange(max_length)  # (W, L)
    return np.where(offsets < len(ids), ids[np.minimum(offsets, len(ids) - 1)], pad_id)
