"""Train / validation / test split by trajectory.

Whole trajectories go to one side only, so no test series is ever seen, even in part,
in training. The split depends on nothing but the number of trajectories and the seed:
the same file and seed always give the same split.
"""

from typing import NamedTuple

import numpy as np


class Split(NamedTuple):
    """Index arrays (int64) into the trajectories, disjoint and together complete: sorted, except in
    the reports' splits below, which keep their authors' order."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def split(n, fractions=(0.7, 0.15, 0.15), seed=0):
    """Split range(n) into train / validation / test by a seeded permutation.

    Sizes are round(n * fraction) for train and validation, the rest for test
    (n = 1000 gives 700 / 150 / 150).
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.shape != (3,) or (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"fractions {tuple(fractions)} must be three non-negative numbers summing to 1, e.g. (0.7, 0.15, 0.15).")
    order = np.random.default_rng(seed).permutation(n)
    n_train = round(n * fractions[0])
    n_val = min(round(n * fractions[1]), n - n_train)
    parts = np.split(order, [n_train, n_train + n_val])
    return Split(*(np.sort(p).astype(np.int64) for p in parts))


# ---------------------------------------------------------------- the published reports' splits
# Each report drew its split from numpy's legacy global generator (np.random.seed(42), then
# np.random.shuffle), whose stream RandomState(42).permutation reproduces draw for draw. Their
# index arrays keep the authors' order, not sorted: report A scored the first 149 test series of
# that order, and report B's test file holds its 100 series in that order.

def legacy_permutation(n, seed=42):
    """np.random.seed(seed); np.random.shuffle(arange(n)): the order both reports shuffled into."""
    return np.random.RandomState(seed).permutation(n).astype(np.int64)


def report_a_split(n=1000, shuffled=True):
    """Report A's split (its preprocessor: seed 42, 70/15/15, sizes by int(), train first).

    shuffled=False is the file order it falls back to without shuffling; the forecasts behind its
    Table 9 (results/Final/Trained_Gen.json) were made on that split's test series, rows 850-998.
    """
    order = legacy_permutation(n) if shuffled else np.arange(n, dtype=np.int64)
    n_train, n_train_val = int(n * 0.7), int(n * (0.7 + 0.15))
    return Split(order[:n_train], order[n_train:n_train_val], order[n_train_val:])


def report_b_split(n=1000):
    """Report B's split: seed 42, the first 90% of the shuffled file to training, the rest to test.

    Its training script then split the 900 again (seed 42, 80/20: 720 train, 180 validation), which
    train and val reproduce, assuming nothing drew from numpy's global generator in between.
    """
    order = legacy_permutation(n)
    n_fit = int(0.9 * n)
    fit, test = order[:n_fit], order[n_fit:]
    inner = legacy_permutation(n_fit)
    n_train = int(0.8 * n_fit)
    return Split(fit[inner[:n_train]], fit[inner[n_train:]], test)


REPORT_SPLITS = {"report-a": report_a_split, "report-b": report_b_split}  # train.py's --split names
