"""Train / validation / test split by trajectory."""

import numpy as np
import pytest

from data import splits
from data.splits import split


def test_split_is_disjoint_complete_and_sized():
    s = split(1000, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (700, 150, 150)
    everything = np.concatenate(s)
    assert len(np.unique(everything)) == 1000 and set(everything) == set(range(1000))
    for part in s:
        assert part.dtype == np.int64 and (np.diff(part) > 0).all()


def test_split_is_stable_for_a_seed_and_changes_with_it():
    a, b, c = split(1000, seed=7), split(1000, seed=7), split(1000, seed=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.test, c.test)
    # pinned: a change to the recipe would silently change every published split
    np.testing.assert_array_equal(split(10, seed=0).test, [1])


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7])
def test_tiny_splits_stay_complete(n):
    s = split(n, seed=1)
    assert sorted(np.concatenate(s).tolist()) == list(range(n))


@pytest.mark.parametrize("fractions", [(0.7, 0.2, 0.2), (1.2, -0.1, -0.1), (0.5, 0.5)])
def test_bad_fractions_are_refused(fractions):
    with pytest.raises(ValueError, match="summing to 1"):
        split(100, fractions)


def test_default_seed_is_zero():
    np.testing.assert_array_equal(split(10).test, [1])  # the pinned seed-0 split above, seed not given


def test_sizes_follow_each_fraction_and_a_zero_fraction_is_allowed():
    s = split(10, (0.5, 0.3, 0.2), seed=3)
    assert (len(s.train), len(s.val), len(s.test)) == (5, 3, 2)
    s = split(10, (1.0, 0.0, 0.0))
    assert s.train.tolist() == list(range(10)) and len(s.val) == len(s.test) == 0


def _authors_shuffle(n):
    """np.random.seed(42); np.random.shuffle(list): what the reports' code ran, on a private generator."""
    order = np.arange(n)
    np.random.RandomState(42).shuffle(order)
    return order


def test_legacy_permutation_is_the_authors_shuffle():
    p = splits.legacy_permutation(17)
    assert p.dtype == np.int64 and p.tolist() == _authors_shuffle(17).tolist()
    rs = np.random.RandomState(3)
    other = np.arange(17)
    rs.shuffle(other)
    assert splits.legacy_permutation(17, seed=3).tolist() == other.tolist()


def test_report_a_split_sizes_by_int_and_keeps_the_shuffled_order():
    # n = 17: int(11.9) = 11 train, int(17 * 0.85) = int(14.45) = 14, so 3 validation and 3 test
    order = _authors_shuffle(17)
    s = splits.report_a_split(17)
    assert s.train.tolist() == order[:11].tolist()
    assert s.val.tolist() == order[11:14].tolist() and s.test.tolist() == order[14:].tolist()
    plain = splits.report_a_split(17, shuffled=False)
    assert plain.train.tolist() == list(range(11)) and plain.val.tolist() == [11, 12, 13]
    assert plain.test.tolist() == [14, 15, 16] and plain.test.dtype == np.int64
    assert len(splits.report_a_split().test) == 150  # n = 1000 by default


def test_report_b_split_shuffles_the_first_90_percent_again_80_20():
    # n = 17: int(15.3) = 15 to fit, 2 to test; the 15 shuffled again by seed 42, int(12.0) = 12 train, 3 validation
    order, inner = _authors_shuffle(17), _authors_shuffle(15)
    s = splits.report_b_split(17)
    assert s.test.tolist() == order[15:].tolist()
    assert s.train.tolist() == order[:15][inner[:12]].tolist()
    assert s.val.tolist() == order[:15][inner[12:]].tolist()
    assert [len(part) for part in splits.report_b_split()] == [720, 180, 100]  # n = 1000 by default


def test_report_split_names():
    assert splits.REPORT_SPLITS == {"report-a": splits.report_a_split, "report-b": splits.report_b_split}
