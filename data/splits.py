"""Train / validation / test split by trajectory.

Whole trajectories go to one side only, so no test series is ever seen, even in part,
in training. The split depends on nothing but the number of trajectories and the seed:
the same file and seed always give the same split.
"""

from typing import NamedTuple

import numpy as np


class Split(NamedTuple):
    """Sorted index arrays (int64) into the trajectories, disjoint and together complete."""

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
