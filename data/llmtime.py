"""LLMTIME text encoding of two-species trajectories, and its forgiving decoder.

    values (n, 2) --Scaler.transform--> scaled --encode--> "2.734,2.996;2.132,2.244"
    text --decode--> Decoded(values, issues) --Scaler.inverse--> original units

Encoding: each value with a fixed number of decimals (rounded), `,` between prey and
predator, `;` between time steps, no spaces. Qwen2.5 reads each digit as one token, so
scaling matters: it decides how many digits the model must write per value.

Decoding rules. Model output is untrusted: `decode` never raises on a string and never
returns NaN or inf. It repairs what it must, in this order, and counts each repair by
kind in `Decoded.issues`:

1. "stray": every character other than 0-9 . , ; is deleted (spaces, newlines, letters,
   a '-' sign: the alphabet has no sign). One count per deleted character.
2. The text is cut at each ';' into steps. Empty steps (";;", a leading ';') are skipped
   ("empty_step"). The empty piece after a final ';' is normal and not counted.
3. "truncated_step": the last step, when no ';' follows it, is dropped if it is
   unfinished: fewer than two values, a second value that is not a number ("2.7,1."), or,
   when `decimals` is given, a second value with fewer decimals than that ("2.734,1.9").
   Fields after the second do not matter here ("2.7,1.9,3" keeps 2.7,1.9; rule 4).
   Generation is usually cut off mid-step; a complete last step is kept.
4. "extra_value": fields after the second in a step are dropped.
5. A value is a plain decimal number: 1 to 4 digits, optionally '.' and digits. An
   empty or absent value is "missing_value"; anything else ("1.2.3", "12345", ".5") is
   "bad_value". Extra decimal digits are fine: "2.7345" reads as 2.7345, no repair.
   Each missing or bad value takes the same species' previous value; before that
   species' first number, its first number; if it has none at all, `fill`.
6. With `n_steps`: steps beyond it are cut ("extra_step", one per step); a short result
   is padded by repeating its last step ("padded_step", one per step), or with `fill`
   when nothing was decoded.
7. "empty": counted once when no step at all could be decoded (e.g. the empty string).
   Without `n_steps` the result then has shape (0, 2).
"""

import re
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

ALPHABET = "0123456789.,;"  # every character LLMTIME text is made of (and all a forecast may contain)
MAX_INT_DIGITS = 4  # scaled values are O(10); a longer number is a model failure
ZERO_AT_2DP = 0.005  # scaled values below this are written 0.00 at 2 decimals
_NUMBER = re.compile(r"\d{1,%d}(?:\.\d+)?" % MAX_INT_DIGITS)
_NOT_ALPHABET = re.compile(r"[^0-9.,;]")


@dataclass(frozen=True)
class Scaler:
    """Maps values so that the `percentile`-th percentile of |x| becomes `target`.

    level: the percentile in original units, () for one global scale or (N,) for one
    per trajectory (per_series). transform is x * target / level, inverse its opposite.
    """

    level: np.ndarray
    percentile: float = 95.0
    target: float = 10.0
    per_series: bool = False

    @classmethod
    def fit(cls, data, percentile=95, target=10, per_series=False):
        """Fit on data (N, T, 2): over all values, or per trajectory when per_series."""
        data = np.abs(np.asarray(data, dtype=np.float64))
        if per_series:
            if data.ndim != 3:
                raise ValueError(f"per-series scaling needs data shaped (N, T, 2), got {data.shape}; add a leading axis for one trajectory.")
            level = np.percentile(data.reshape(len(data), -1), percentile, axis=1)  # (N,)
        else:
            level = np.asarray(np.percentile(data, percentile))  # ()
        if not (np.isfinite(level).all() and (level > 0).all()):
            raise ValueError(f"the {percentile}th percentile of |x| is 0 or not finite for some data, so it cannot be scaled to {target}; drop all-zero or non-finite trajectories.")
        scaled = data * target / (level.reshape(-1, *[1] * (data.ndim - 1)) if per_series else level)
        zeroed = float(np.mean(scaled < ZERO_AT_2DP))
        if zeroed > 0.5:  # e.g. one 1e9 outlier trajectory in a small file sets the global scale
            warnings.warn(f"the {percentile}th percentile of |x| ({float(np.max(level)):.3g}) scales {zeroed:.0%} of the values "
                          f"below {ZERO_AT_2DP}, so at 2 decimals they are all written 0.00; an outlier probably sets the scale: "
                          "drop it, or scale per series.", stacklevel=2)
        return cls(level, float(percentile), float(target), bool(per_series))

    def _level(self, x, rows):
        """The level broadcastable against x; rows picks trajectories of a per-series fit."""
        if not self.per_series:
            return self.level
        if rows is None and x.ndim != 3:
            raise ValueError(f"a per-series scaler needs trajectories shaped (N, T, 2), or rows= naming whose scales to use; got {x.shape}.")
        level = self.level if rows is None else self.level[rows]
        if level.ndim == 0:
            return level
        if x.shape[0] != len(level):
            raise ValueError(f"per-series scaler holds {len(level)} scales but the data has {x.shape[0]} trajectories; pass rows= to pick the matching ones.")
        return level.reshape((-1,) + (1,) * (x.ndim - 1))

    def transform(self, x, rows=None):
        """Original units -> scaled. rows (int or index array) selects per-series scales."""
        x = np.asarray(x, dtype=np.float64)
        return x * self.target / self._level(x, rows)

    def inverse(self, x, rows=None):
        """Scaled -> original units; the exact opposite of transform."""
        x = np.asarray(x, dtype=np.float64)
        return x * self._level(x, rows) / self.target

    def to_dict(self):
        """Plain, JSON-ready dict (for a run folder)."""
        return {"level": self.level.tolist(), "percentile": self.percentile, "target": self.target, "per_series": self.per_series}

    @classmethod
    def from_dict(cls, d):
        return cls(np.asarray(d["level"], dtype=np.float64), float(d["percentile"]), float(d["target"]), bool(d["per_series"]))


def encode(values, decimals=2, trailing_sep=False):
    """Scaled values (n, 2), non-negative -> "a,b;a,b;...", each value rounded to `decimals`."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or values.shape[1] != 2:
        raise ValueError(f"encode takes values shaped (n, 2) (prey, predator per step), got {values.shape}.")
    values = values + 0.0  # -0.0 -> 0.0: a '-' is not in the LLMTIME alphabet
    too_big = np.round(values, decimals) >= 10**MAX_INT_DIGITS  # 9999.996 would be written 10000.00
    if not np.isfinite(values).all() or (values < 0).any() or too_big.any():
        raise ValueError(f"encode takes finite values in [0, {10**MAX_INT_DIGITS}); scale the data with Scaler first.")
    text = ";".join(f"{a:.{decimals}f},{b:.{decimals}f}" for a, b in values)
    return text + ";" if trailing_sep else text


class Decoded(NamedTuple):
    """values (n, 2) float64, never NaN or inf; issues {kind: count} of the repairs made."""

    values: np.ndarray
    issues: dict

    @property
    def n_repaired(self):
        return sum(self.issues.values())


def decode(text, n_steps=None, decimals=None, fill=0.0):
    """Parse model output into values (n, 2), repairing by the rules in the module docstring."""
    issues = Counter()
    kept = _NOT_ALPHABET.sub("", text)
    issues["stray"] += len(text) - len(kept)
    *pieces, last = kept.split(";")  # last: whatever follows the final ';'
    steps = []
    for piece in pieces:
        if piece:
            steps.append(piece.split(","))
        else:
            issues["empty_step"] += 1
    if last:
        fields = last.split(",")
        if _unfinished(fields, decimals):
            issues["truncated_step"] += 1
        else:
            steps.append(fields)
    if not steps:
        issues["empty"] += 1

    values = np.full((len(steps), 2), np.nan)
    for i, fields in enumerate(steps):
        issues["extra_value"] += max(len(fields) - 2, 0)
        for j, field in enumerate((fields + [""])[:2]):
            if _NUMBER.fullmatch(field):
                values[i, j] = float(field)
            else:
                issues["bad_value" if field else "missing_value"] += 1
    _fill_gaps(values, fill)

    if n_steps is not None and len(values) > n_steps:
        issues["extra_step"] += len(values) - n_steps
        values = values[:n_steps]
    elif n_steps is not None and len(values) < n_steps:
        issues["padded_step"] += n_steps - len(values)
        pad = values[-1] if len(values) else np.full(2, float(fill))
        values = np.vstack([values, np.tile(pad, (n_steps - len(values), 1))])
    return Decoded(values, {kind: n for kind, n in issues.items() if n})


def _unfinished(fields, decimals):
    """Whether the fields of a last, unterminated step look cut off (its first two values decide)."""
    if len(fields) < 2 or not _NUMBER.fullmatch(fields[1]):
        return True
    return decimals is not None and len(fields[1].partition(".")[2]) < decimals


def _fill_gaps(values, fill):
    """In place: each NaN takes its column's previous number, else its first, else fill."""
    for column in values.T:  # views: prey, then predator
        ok = ~np.isnan(column)
        if not ok.any():
            column[:] = fill
            continue
        source = np.maximum.accumulate(np.where(ok, np.arange(len(column)), 0))
        source[: ok.argmax()] = ok.argmax()  # before the first number: that number
        column[:] = column[source]
