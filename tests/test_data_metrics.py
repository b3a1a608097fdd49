"""data/metrics.py against hand-computed values and scikit-learn (data/baselines.py: test_data_baselines.py)."""

import numpy as np
import pytest
from sklearn.metrics import mean_absolute_percentage_error

from data import baselines, metrics


def test_point_metrics_equal_hand_computed_values():
    truth = np.array([[[1.0, 2.0], [3.0, 4.0]]])  # (N=1, h=2, 2)
    pred = np.array([[[2.0, 2.0], [1.0, 4.0]]])  # errors 1, 0, -2, 0
    m = metrics.point_metrics(pred, truth)
    assert m["mse"] == pytest.approx(5 / 4)
    assert m["rmse"] == pytest.approx(np.sqrt(5 / 4))
    assert m["mae"] == pytest.approx(3 / 4)
    assert m["r2"] == pytest.approx(1 - 5 / 5)  # sum (t - 2.5)^2 = 2.25 + 0.25 + 0.25 + 2.25
    assert m["nrmse"] == pytest.approx(100 * np.sqrt(5 / 4) / 3)  # range of truth 4 - 1
    assert m["mape"] == pytest.approx((100 + 0 + 200 / 3 + 0) / 4)
    assert m["wape"] == pytest.approx(100 * 3 / 10)


def test_perfect_forecast_scores_zero_error_and_r2_one():
    truth = np.random.default_rng(0).uniform(0.5, 3, size=(4, 6, 2))
    m = metrics.point_metrics(truth, truth)
    assert m["mse"] == m["mae"] == m["mape"] == m["nrmse"] == 0 and m["r2"] == 1


def test_mape_near_zero_truth_is_finite_and_wape_stays_moderate():
    truth = np.array([[[0.0, 1.0]]])
    pred = np.array([[[0.1, 1.0]]])
    m = metrics.point_metrics(pred, truth)
    # as scikit-learn computes it (a zero true value is divided by float64's machine epsilon, 2^-52)
    sklearn_mape = 100 * mean_absolute_percentage_error(truth.ravel(), pred.ravel())
    assert np.isfinite(m["mape"]) and m["mape"] == pytest.approx(sklearn_mape)
    assert m["mape"] == pytest.approx(100 * 0.1 / 2.0 ** -52 / 2)
    assert m["wape"] == pytest.approx(100 * 0.1 / 1.0)


def test_per_step_mean_and_standard_error_by_species():
    truth = np.ones((2, 3, 2))
    pred = truth.copy()
    pred[0, :, 0] += [1.0, 2.0, 3.0]  # prey errors of series 0
    pred[1, :, 0] -= [3.0, 2.0, 1.0]  # prey errors of series 1
    pred[:, 1, 1] += 0.5  # predator error 0.5 at step 2 in both series
    s = metrics.per_step(pred, truth)
    np.testing.assert_allclose(s["mae"]["prey"]["mean"], [2.0, 2.0, 2.0])
    np.testing.assert_allclose(s["mae"]["prey"]["se"], [np.sqrt(2) / np.sqrt(2), 0.0, 1.0])  # std(ddof=1)/sqrt(2)
    np.testing.assert_allclose(s["mae"]["predator"]["mean"], [0.0, 0.5, 0.0])
    np.testing.assert_allclose(s["mape"]["predator"]["mean"], [0.0, 50.0, 0.0])
    assert np.isnan(metrics.per_step(pred[:1], truth[:1])["mae"]["prey"]["se"]).all()


def test_crps_equals_its_definition_and_known_values():
    rng = np.random.default_rng(1)
    samples, truth = rng.normal(size=(3, 7, 4, 2)), rng.normal(size=(3, 4, 2))
    brute = (np.abs(samples - truth[:, None]).mean(1)
             - 0.5 * np.abs(samples[:, :, None] - samples[:, None, :]).mean((1, 2)))
    np.testing.assert_allclose(metrics.crps(samples, truth), brute, atol=1e-12)
    two = np.array([0.0, 1.0]).reshape(1, 2, 1, 1) * np.ones((1, 2, 1, 2))
    np.testing.assert_allclose(metrics.crps(two, np.zeros((1, 1, 2))), 0.25)  # 0.5 - 0.5 * 0.5
    np.testing.assert_allclose(metrics.crps(samples[:, :1], truth), np.abs(samples[:, 0] - truth))  # one sample: MAE


def test_interval_coverage_counts_truths_inside_the_central_interval():
    samples = np.broadcast_to(np.linspace(0, 100, 101).reshape(1, 101, 1, 1), (1, 101, 4, 2))
    truth = np.array([[[50, 10], [26, 74], [80, 96], [4, 50]]], dtype=float)
    # 50% interval [25, 75]: 50, 26, 74, 50 inside; 90% interval [5, 95]: all but 96 and 4
    assert metrics.coverage(samples, truth, 0.5) == pytest.approx(4 / 8)
    assert metrics.coverage(samples, truth, 0.9) == pytest.approx(6 / 8)
    m = metrics.sample_metrics(samples, truth)
    assert m["coverage_50"] == pytest.approx(0.5) and m["crps_per_step"]["prey"].shape == (4,)


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="series, steps, 2"):
        metrics.point_metrics(np.zeros((2, 3)), np.zeros((2, 3)))


def test_persistence_repeats_the_last_context_step():
    context = np.arange(12.0).reshape(2, 3, 2)
    f = baselines.persistence(context, 4)
    assert f.shape == (2, 4, 2) and (f == context[:, -1:]).all()


def test_nelder_mead_minimises_each_row_separately():
    centres = np.array([[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0]])
    f = lambda z, rows: ((z - centres[rows]) ** 2).sum(1) + (z[:, 0] - centres[rows, 0]) ** 4
    z = baselines.nelder_mead(f, np.zeros((3, 2)), iterations=200, step=0.5)
    np.testing.assert_allclose(z, centres, atol=1e-4)


# Samples (N=2, S=5, h=1, 2): series 0 draws 0..4, series 1 draws 10..14 (both species). By numpy's linear
# quantiles the central 50% interval is [1, 3] and [11, 13], the central 90% [0.2, 3.8] and [10.2, 13.8].
SAMPLES = np.stack([np.arange(5.0), np.arange(10.0, 15.0)])[:, :, None, None] * np.ones((1, 1, 1, 2))
TRUTH = np.array([[[1.0, 3.5]], [[13.0, 20.0]]])  # (2, 1, 2): 1 and 13 sit exactly on the 50% bounds


def test_coverage_uses_each_values_own_samples_and_counts_the_bounds_as_inside():
    # 50%: 1 in (on the lower bound), 3.5 out, 13 in (on the upper bound), 20 out
    assert metrics.coverage(SAMPLES, TRUTH, 0.5) == 2 / 4
    # 90%: 1, 3.5 and 13 in, 20 out
    assert metrics.coverage(SAMPLES, TRUTH, 0.9) == 3 / 4


def test_sample_metrics_by_hand():
    # CRPS = mean |x - t| - 1/(2 S^2) sum_ij |x_i - x_j|; for 5 consecutive draws the second term is 40 / 50 = 0.8.
    # series 0: t = 1: 7/5 - 0.8 = 0.6; t = 3.5: 8.5/5 - 0.8 = 0.9. series 1: t = 13: 0.6; t = 20: 40/5 - 0.8 = 7.2
    m = metrics.sample_metrics(SAMPLES, TRUTH)
    assert set(m) == {"crps", "coverage_50", "coverage_90", "crps_per_step"}
    assert m["crps"] == pytest.approx((0.6 + 0.9 + 0.6 + 7.2) / 4)
    assert m["coverage_50"] == 0.5 and m["coverage_90"] == 0.75
    assert set(m["crps_per_step"]) == {"prey", "predator"}
    np.testing.assert_allclose(m["crps_per_step"]["prey"], [0.6])  # the mean over series, per step
    np.testing.assert_allclose(m["crps_per_step"]["predator"], [(0.9 + 7.2) / 2])


def test_one_series_gives_a_nan_standard_error_without_a_numpy_warning():
    import warnings

    truth = np.ones((1, 3, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "degrees of freedom <= 0" would be one
        s = metrics.per_step(truth + 1, truth)
    assert np.isnan(s["mae"]["prey"]["se"]).all() and s["mae"]["prey"]["se"].shape == (3,)
    np.testing.assert_array_equal(s["mae"]["predator"]["mean"], [1.0, 1.0, 1.0])
    mean, se = metrics.mean_and_se(np.array([[1.0, 2.0], [3.0, 6.0]]))
    np.testing.assert_allclose(mean, [2.0, 4.0])
    np.testing.assert_allclose(se, [1.0, 2.0])  # std (ddof 1) sqrt(2) and 2 sqrt(2), over sqrt(2)


def test_report_a_per_step_by_hand_with_a_zero_truth():
    truth = np.array([[[2.0, 0.0], [4.0, 1.0]], [[1.0, 2.0], [5.0, 4.0]]])  # (N=2, h=2, 2)
    pred = np.array([[[3.0, 1.0], [4.0, 0.0]], [[0.0, 1.0], [2.0, 4.0]]])
    r = metrics.report_a_per_step(pred, truth)
    assert set(r) == {"mae", "mape"} and set(r["mae"]) == {"prey", "predator"}
    # |t - p|: prey step 0 (1, 1), step 1 (0, 3); predator step 0 (1, 1), step 1 (1, 0)
    np.testing.assert_allclose(r["mae"]["prey"]["mean"], [1.0, 1.5])
    np.testing.assert_allclose(r["mae"]["prey"]["se"], [0.0, 1.5])  # std(0, 3; ddof 1) = 2.1213, / sqrt 2
    np.testing.assert_allclose(r["mae"]["predator"]["mean"], [1.0, 0.5])
    np.testing.assert_allclose(r["mae"]["predator"]["se"], [0.0, 0.5])
    # 100 |t - p| / clip(t, 1e-8): prey step 0 (50, 100), step 1 (0, 60); predator step 0 (1e10, 50), step 1 (100, 0)
    np.testing.assert_allclose(r["mape"]["prey"]["mean"], [75.0, 30.0])
    np.testing.assert_allclose(r["mape"]["prey"]["se"], [25.0, 30.0])
    np.testing.assert_allclose(r["mape"]["predator"]["mean"], [(1e10 + 50) / 2, 50.0], rtol=1e-12)
    assert metrics.report_a_per_step(pred[:1], truth[:1])["mape"]["prey"]["mean"].tolist() == [50.0, 0.0]


def test_report_b_overall_equals_scikit_learn_species_by_species():
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    rng = np.random.default_rng(3)
    truth = rng.uniform(0.5, 4, size=(3, 4, 2)) * [1.0, 3.0]  # the species on different scales
    pred = truth + rng.normal(0, 0.3, size=truth.shape) * [1.0, 2.0]
    t, p = truth.reshape(-1, 2), pred.reshape(-1, 2)
    got = metrics.report_b_overall(pred, truth)
    assert set(got) == {"mse", "rmse", "mae", "r2", "nrmse", "mape"}
    assert got["mse"] == pytest.approx(mean_squared_error(t, p))
    assert got["rmse"] == pytest.approx(np.sqrt(mean_squared_error(t, p)))
    assert got["mae"] == pytest.approx(mean_absolute_error(t, p))
    assert got["r2"] == pytest.approx(r2_score(t, p))  # the mean of the two species' R2
    assert got["r2"] != pytest.approx(r2_score(t.ravel(), p.ravel()))  # not the pooled one
    assert got["nrmse"] == pytest.approx(100 * np.sqrt(mean_squared_error(t, p)) / (t.max() - t.min()))
    assert got["mape"] == pytest.approx(100 * np.mean(np.abs(t - p) / np.abs(t)), rel=1e-9)


def test_report_b_overall_at_the_edges():
    from sklearn.metrics import r2_score

    truth = np.array([[[2.0, 0.0], [2.0, 1.0], [2.0, 3.0]]])  # prey constant, a zero predator
    pred = np.array([[[2.0, 0.5], [2.0, 1.0], [2.0, 2.0]]])
    got = metrics.report_b_overall(pred, truth)
    # a constant species predicted exactly scores 1 (scikit-learn's force_finite); predator R2 = 1 - 1.25 / 4.6667
    assert got["r2"] == pytest.approx(r2_score(truth[0], pred[0])) == pytest.approx((1 + 1 - 1.25 / (14 / 3)) / 2)
    assert got["mape"] == pytest.approx(100 * (0.5 / 1e-10 + 1 / 3) / 6)  # |t| + 1e-10 below
    assert got["nrmse"] == pytest.approx(100 * np.sqrt(1.25 / 6) / 3)
    constant = np.full((1, 2, 2), 2.0)
    off = metrics.report_b_overall(constant + [1.0, 0.0], constant)  # prey wrong, predator exact
    assert off["r2"] == pytest.approx(r2_score(constant[0], constant[0] + [1.0, 0.0])) == 0.5
    assert off["nrmse"] == float("inf")  # no range to divide by
    assert off["mse"] == 0.5 and off["mae"] == 0.5 and off["rmse"] == pytest.approx(np.sqrt(0.5))


def test_report_b_overall_on_values_below_one_and_constant_species_without_warnings():
    import warnings

    from sklearn.metrics import r2_score

    truth = np.array([[[0.2, 1e-9], [0.4, 0.3], [0.3, 0.1]]])  # spreads and range below 1, a truth of 1e-9
    pred = np.array([[[0.25, 2e-9], [0.35, 0.2], [0.3, 0.1]]])
    got = metrics.report_b_overall(pred, truth)
    assert got["r2"] == pytest.approx(r2_score(truth[0], pred[0]))
    assert got["nrmse"] == pytest.approx(100 * np.sqrt(np.mean((truth - pred) ** 2)) / (0.4 - 1e-9))
    # 1e-9 off a truth of 1e-9 weighs 1e-9 / (1e-9 + 1e-10) = 10/11
    expected_mape = 100 * (0.05 / 0.2 + 1 / 1.1 + 0.05 / 0.4 + 0.1 / 0.3 + 0 + 0) / 6
    assert got["mape"] == pytest.approx(expected_mape, rel=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a constant species must not divide by its zero spread, even unused
        assert metrics.report_b_overall(np.full((1, 2, 2), 3.0), np.full((1, 2, 2), 3.0))["r2"] == 1.0


def test_point_metrics_without_spread_give_nan_and_small_spreads_are_used():
    constant = np.full((1, 3, 2), 2.0)
    m = metrics.point_metrics(constant + 1, constant)
    assert np.isnan(m["r2"]) and np.isnan(m["nrmse"]) and m["mae"] == 1.0
    truth = np.array([[[0.1, 0.2], [0.3, 0.4]]])  # sum (t - 0.25)^2 = 0.05, range 0.3
    m = metrics.point_metrics(truth + 0.1, truth)
    assert m["r2"] == pytest.approx(1 - 0.04 / 0.05) and m["nrmse"] == pytest.approx(100 * 0.1 / 0.3)


def test_shapes_must_match_and_end_in_two_species():
    for pred, truth in ((np.zeros((3, 2)), np.zeros((3, 2))), (np.zeros((1, 2, 2)), np.zeros((1, 3, 2)))):
        with pytest.raises(ValueError, match=r"must both be \(series, steps, 2\), got"):
            metrics.point_metrics(pred, truth)


def test_a_float32_truth_is_scored_in_float64():
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(5)
    truth = rng.uniform(0.5, 4, size=(5, 40, 2)).astype(np.float32)
    pred = truth + rng.normal(0, 0.01, size=truth.shape)
    r2 = r2_score(truth.astype(np.float64).ravel(), pred.ravel())  # the pooled R2, in float64
    assert metrics.point_metrics(pred, truth)["r2"] == pytest.approx(r2, rel=1e-13, abs=0)
