"""data/recipe.py: one recipe gives train.py and evaluate.py the same trajectories, split and scale."""

from types import SimpleNamespace

import numpy as np
import pytest

import evaluate
from data import llmtime, lotka_volterra, splits
from data.recipe import Recipe


def test_a_recipe_reads_its_fields_from_a_namespace_and_ignores_the_rest():
    args = SimpleNamespace(data=None, n_series=12, seed=3, split="report-a", scaling="per-series", percentile=90.0,
                           scale_target=1.0, lr=1e-4, rank=8)
    assert Recipe.of(args) == Recipe(None, 12, 3, "report-a", "per-series", 90.0, 1.0)


def test_trajectories_split_and_scaler_are_the_data_modules_own(tmp_path):
    traj, times = lotka_volterra.simulate(10, seed=4)
    got, got_times = Recipe(n_series=10, seed=4).trajectories()
    np.testing.assert_array_equal(got, traj) and np.testing.assert_array_equal(got_times, times)
    lotka_volterra.save(tmp_path / "d.h5", traj[:6], times)
    assert Recipe(data=str(tmp_path / "d.h5"), n_series=10).trajectories()[0].shape[0] == 6  # the file's, not simulated
    ours, report = Recipe(seed=4).split_of(40), Recipe(split="report-b").split_of(1000)
    assert [a.tolist() for a in ours] == [a.tolist() for a in splits.split(40, seed=4)]
    assert len(report.test) == 100  # report B: 90/10, its own shuffle
    x = np.abs(traj) + 1.0
    g = Recipe(percentile=50, scale_target=2.0).scaler(x)  # global: the median of all |values| becomes 2
    assert g.transform(np.full((1, 2), np.median(x))) == pytest.approx(2.0)
    p = Recipe(scaling="per-series", percentile=50, scale_target=2.0).scaler(x)
    assert p.per_series and p.level.shape == (10,) and p.level[3] == pytest.approx(np.median(x[3]))


def test_an_evaluation_of_a_run_scores_the_test_rows_that_run_held_out(tmp_path, monkeypatch):
    """train.py and evaluate.py split through the same Recipe: for every split name and seed, the test
    rows evaluate.py scores are disjoint from the rows the same flags give train.py to train and validate on."""
    monkeypatch.chdir(tmp_path)  # parse_args claims a results folder under the working directory
    for split, seed in (("ours", 0), ("ours", 7), ("report-a", 42), ("report-b", 42)):
        trained = Recipe(split=split, seed=seed).split_of(1000)
        args = evaluate.parse_args(["--split", split, "--seed", str(seed), "--n-series", "1000"])
        _, _, _, test = evaluate.load_series(args)
        assert len(test) and not np.isin(test, np.concatenate([trained.train, trained.val])).any(), split
