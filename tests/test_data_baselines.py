"""data/baselines.py, piece by piece and cheaply: the regression start by hand, Nelder-Mead step for step against
scipy's (the same textbook method), the fit's loss against scipy minimising it series by series, and the forecast.

Short grids and few iterations keep each test well under a second, so the mutation run can afford them."""

import warnings

import numpy as np
import pytest
from scipy.optimize import minimize  # installed with scikit-learn (requirements-test.txt)

from data import baselines, lotka_volterra

PARAMS = np.array([[0.15, 0.3, 0.1, 0.2], [0.1, 0.4, 0.15, 0.25]])  # (2, 4) alpha, beta, delta, gamma
INITIAL = np.array([[1.0, 0.9], [1.1, 1.2]])


def test_regression_estimate_reads_exponential_growth_and_decay_exactly():
    # ln x = 0.3 t and ln y = -0.2 t: d ln x/dt = 0.3 = alpha - beta y, d ln y/dt = -0.2 = delta x - gamma,
    # so alpha = 0.3, gamma = 0.2 and beta = delta = 0, which the positive floor makes 1e-4
    times = np.linspace(0, 4, 9)
    context = np.exp(np.stack([0.3 * times, -0.2 * times], -1))[None]  # (1, 9, 2)
    np.testing.assert_allclose(baselines.regression_estimate(context, times), [[0.3, 1e-4, 1e-4, 0.2]], rtol=1e-8)


def test_regression_estimate_reads_the_four_rates_off_a_fine_grid():
    times = np.linspace(0, 50, 101)
    traj = lotka_volterra.integrate(PARAMS, INITIAL, times, substeps=4)
    first = baselines.regression_estimate(traj, times)  # finite differences: right to about 1%
    assert first.shape == (2, 4) and np.abs(first / PARAMS - 1).max() < 0.01


def test_regression_estimate_floors_zero_populations():
    times = np.arange(5.0)
    context = np.ones((1, 5, 2))
    context[0, 2, 0] = 0.0  # ln 0 would be -inf; the floor 1e-6 keeps it finite
    assert np.isfinite(baselines.regression_estimate(context, times)).all()


def _scipy_nelder_mead(f, x0, iterations, step):
    """scipy's Nelder-Mead (reflect 1, expand 2, contract 1/2, shrink 1/2) from our initial simplex, no early stop."""
    simplex = x0 + np.vstack([np.zeros(len(x0)), step * np.eye(len(x0))])
    # scipy counts the initial simplex as iteration 1, so `iterations` moves need maxiter = iterations + 1
    options = {"initial_simplex": simplex, "maxiter": iterations + 1, "maxfev": 10**6, "xatol": -1, "fatol": -1}
    return minimize(f, x0, method="Nelder-Mead", options=options).x


def test_nelder_mead_takes_scipys_steps_for_every_row():
    centres = np.array([[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0]])

    def banana(z, c):  # a curved valley: every move of the method gets used
        return (z[..., 0] - c[..., 0]) ** 2 + 5 * (z[..., 1] - c[..., 1] - (z[..., 0] - c[..., 0]) ** 2) ** 2

    x0 = np.array([[0.0, 0.0], [0.5, -0.5], [2.0, 1.0]])
    for iterations in (1, 2, 7, 30):
        ours = baselines.nelder_mead(lambda z, rows: banana(z, centres[rows]), x0, iterations=iterations, step=0.3)
        for i in range(3):
            expected = _scipy_nelder_mead(lambda z: banana(z, centres[i]), x0[i], iterations, 0.3)
            np.testing.assert_allclose(ours[i], expected, rtol=0, atol=1e-12, err_msg=f"row {i}, {iterations} iterations")


def test_nelder_mead_takes_scipys_steps_through_ties_and_shrinks():
    """A bumpy function rounded to one decimal: ties between values, and many iterations where no move helps."""
    centres = np.array([[1.0, -2.0], [3.0, 0.5], [-1.0, 4.0]])
    calls = 0

    def bumpy(z, c):
        return np.round(np.sin(3 * z[..., 0]) + np.sin(3 * z[..., 1]) + 0.1 * ((z - c) ** 2).sum(-1), 1)

    def f(z, rows):
        nonlocal calls
        calls += 1
        return bumpy(z, centres[rows])

    x0 = np.array([[0.0, 0.0], [0.5, -0.5], [2.0, 1.0]])
    ours = baselines.nelder_mead(f, x0, iterations=40, step=0.7)
    assert calls > 1 + 40 + 10  # one call per iteration, one more per shrink: it shrank more than 10 times
    for i in range(3):
        np.testing.assert_allclose(ours[i], _scipy_nelder_mead(lambda z: bumpy(z, centres[i]), x0[i], 40, 0.7), atol=1e-12)
    # unrounded, the best vertex keeps improving after the shrinks, so a wrong shrink shows in the result
    wavy = lambda z, c: np.sin(7 * z[..., 0]) * np.sin(7 * z[..., 1]) + 0.1 * ((z - c) ** 2).sum(-1)
    calls = 0
    ours = baselines.nelder_mead(lambda z, rows: (f(z, rows), wavy(z, centres[rows]))[1], x0, iterations=60, step=1.5)
    assert calls >= 1 + 60 + 5
    for i in range(3):
        np.testing.assert_allclose(ours[i], _scipy_nelder_mead(lambda z: wavy(z, centres[i]), x0[i], 60, 1.5), atol=1e-12)


def test_nelder_mead_shrinks_when_no_move_helps():
    # 1-D, a step from 0 to 1 on a function worse everywhere but near 0 and 0.9: reflection (-1), expansion (-2),
    # both contractions (-0.5, 0.5) fail, so the simplex shrinks to {0, 0.5}; then the next iterations follow scipy
    def spiky(z):
        z = np.asarray(z)[..., 0]
        return np.where(np.abs(z) < 1e-9, 0.0, np.where(np.abs(z - 0.9) < 0.3, 1.0 + (z - 0.9) ** 2, 2.0 + z ** 2))

    for iterations in (1, 3, 6):
        ours = baselines.nelder_mead(lambda z, rows: spiky(z), np.array([[0.0]]), iterations=iterations, step=1.0)
        expected = _scipy_nelder_mead(spiky, np.array([0.0]), iterations, 1.0)
        np.testing.assert_allclose(ours[0], expected, atol=1e-12)


def test_nelder_mead_breaks_exact_ties_as_scipy_does():
    """1-D from the simplex {0, 1} with f(0) = 0 and f(1) = 5: the four candidates are -1 (reflect), -2 (expand),
    -0.5 (contract outside) and 0.5 (contract inside), and f is designed to tie exactly where the textbook rules
    draw their lines. The reflection ties the best value (f(-1) = 0), so it is neither accepted nor expanded (the
    expansion, f(-2) = -1, would win); it is not below the second value (in 1-D the best one), so the method
    contracts outside; the contraction ties the reflection (f(-0.5) = 0) and is accepted, not a shrink towards 0
    (which would bring in f(0.5) = -0.5). So after one iteration the best vertex is still 0; after a second the
    reflection of -0.5 through 0 gives 0.5."""
    table = {0.0: 0.0, 1.0: 5.0, -1.0: 0.0, -2.0: -1.0, -0.5: 0.0, 0.5: -0.5}

    def f(z):
        x = np.asarray(z, dtype=np.float64)[..., 0]
        out = 0.1 * (x + 3) ** 2 + 1  # elsewhere: above every value in the table
        for point, value in table.items():
            out = np.where(x == point, value, out)
        return out

    for iterations, by_hand in ((1, 0.0), (2, 0.5)):
        ours = baselines.nelder_mead(lambda z, rows: f(z), np.array([[0.0]]), iterations=iterations, step=1.0)
        assert ours.tolist() == [[by_hand]]
        assert _scipy_nelder_mead(f, np.array([0.0]), iterations, 1.0).tolist() == [by_hand]
    for iterations in (3, 5):
        ours = baselines.nelder_mead(lambda z, rows: f(z), np.array([[0.0]]), iterations=iterations, step=1.0)
        np.testing.assert_allclose(ours[0], _scipy_nelder_mead(f, np.array([0.0]), iterations, 1.0), atol=1e-12)


def test_least_squares_ridge_shrinks_like_sklearns_ridge():
    """A predator that barely moves (1 +- 3e-5): X = [1, -y] is nearly collinear, the smallest eigenvalue of X^T X is
    1.8e-9, next to the 1e-9 ridge. The estimate is scikit-learn's Ridge with alpha 1e-9 (no intercept), whose norm a
    ridge keeps below the plain least-squares one (0.2, 0.3); a ridge subtracted instead would nearly cancel that
    eigenvalue and more than double the estimate."""
    from sklearn.linear_model import Ridge

    pred = 1 + 3e-5 * np.linspace(-1, 1, 10)
    X = np.stack([np.ones(10), -pred], -1)  # (k, 2)
    y = 0.2 - 0.3 * pred  # alpha 0.2, beta 0.3 exactly
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns that the matrix is ill-conditioned: that is the point
        expected = Ridge(alpha=1e-9, fit_intercept=False, solver="cholesky").fit(X, y).coef_
    got = baselines._least_squares(X[None], y[None])[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5)  # the conditioning (~1e10) leaves ~1e-6 of rounding
    assert np.linalg.norm(got) < np.linalg.norm(np.linalg.lstsq(X, y, rcond=None)[0]) < 0.4
    assert np.abs(expected - [0.2, 0.3]).max() > 0.05  # the premise: the ridge matters here


def test_nelder_mead_default_step_and_iterations():
    scales = 10.0 ** np.arange(6)
    bowl = lambda z: (scales * (z - 1) ** 2).sum(-1)  # 6 dimensions, badly scaled: still moving at iteration 150
    ours = baselines.nelder_mead(lambda z, rows: bowl(z), np.full((1, 6), 2.0))
    expected = _scipy_nelder_mead(bowl, np.full(6, 2.0), 150, 0.1)
    np.testing.assert_allclose(ours[0], expected, atol=1e-12)
    assert np.abs(_scipy_nelder_mead(bowl, np.full(6, 2.0), 151, 0.1) - expected).max() > 1e-9  # the premise


def _short_context():
    times = np.linspace(0, 12, 13)
    return lotka_volterra.integrate(PARAMS, INITIAL, times, substeps=2) * [[[1.02, 0.97]]], times  # off the model


def test_fit_without_iterations_is_the_regression_start():
    context, times = _short_context()
    context[1, 0, 1] = 0.0  # a zero first value: the fit starts at the floor, 1e-6
    params, initial = baselines.fit_lotka_volterra(context, times, iterations=0)
    np.testing.assert_allclose(params, baselines.regression_estimate(context, times), rtol=1e-12)
    np.testing.assert_allclose(initial, [context[0, 0], [context[1, 0, 0], 1e-6]], rtol=1e-12)


def _fit_against_scipy(context, times, iterations, substeps=2):
    """Fit with baselines, then minimise the documented loss series by series with scipy from the same start:
    the mean squared error of the integrated log-trajectory, inf where the integration blows up. Returns how
    many of scipy's evaluations were inf."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a candidate that blows up is expected: it must not warn
        params, initial = baselines.fit_lotka_volterra(context, times, iterations=iterations, substeps=substeps)
    start = baselines.fit_lotka_volterra(context, times, iterations=0)
    blown_up = 0
    for i in range(len(context)):
        def loss(z):  # z: log alpha, beta, delta, gamma, log prey and predator at times[0]
            nonlocal blown_up
            with np.errstate(all="ignore"):
                path = lotka_volterra.integrate(np.exp(z[None, :4]), np.exp(z[None, 4:]), times, substeps=substeps)[0]
                err = np.mean((np.log(path) - np.log(context[i])) ** 2)
            blown_up += not np.isfinite(err)
            return err if np.isfinite(err) else np.inf

        z0 = np.log(np.concatenate([start[0][i], start[1][i]]))
        expected = np.exp(_scipy_nelder_mead(loss, z0, iterations, 0.1))
        np.testing.assert_allclose(np.concatenate([params[i], initial[i]]), expected, rtol=1e-9)
        assert loss(np.log(expected)) < loss(z0)  # the fit did improve on its start
    return blown_up


def test_fit_minimises_the_mean_squared_log_error_as_scipy_does_series_by_series():
    assert _fit_against_scipy(*_short_context(), iterations=20) == 0


def _sensitive_context():
    """One series seen at times 0, 2, 4 and 30: over the long last gap 8 substeps are coarse enough that 9 would change
    the losses Nelder-Mead compares, and at 150 iterations the fit is still moving (the tests assert these premises)."""
    times = np.array([0.0, 2.0, 4.0, 30.0])
    return lotka_volterra.integrate(PARAMS[:1], INITIAL[:1], times, substeps=400) * [[[1.02, 0.97]]], times


def _scipy_fit(context, times, iterations, substeps):
    """scipy's Nelder-Mead on the documented loss of one series (context (k, 2)) from the regression start:
    returns params (4,) and initial values (2,)."""
    start = np.log(np.concatenate(baselines.fit_lotka_volterra(context[None], times, iterations=0), axis=1)[0])

    def loss(z):
        with np.errstate(all="ignore"):
            path = lotka_volterra.integrate(np.exp(z[None, :4]), np.exp(z[None, 4:]), times, substeps=substeps)[0]
            err = np.mean((np.log(path) - np.log(context)) ** 2)
        return err if np.isfinite(err) else np.inf

    z = np.exp(_scipy_nelder_mead(loss, start, iterations, 0.1))
    return z[:4], z[4:]


def test_fit_defaults_to_150_iterations_of_8_substeps():
    context, times = _sensitive_context()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # candidates that blow up must not warn
        params, initial = baselines.fit_lotka_volterra(context, times)
    expected = np.concatenate(_scipy_fit(context[0], times, 150, 8))
    np.testing.assert_allclose(np.concatenate([params[0], initial[0]]), expected, rtol=1e-9)
    for other in (_scipy_fit(context[0], times, 151, 8), _scipy_fit(context[0], times, 150, 9)):  # the premises
        assert np.abs(np.concatenate(other) / expected - 1).max() > 1e-3


def test_fit_treats_a_blown_up_candidate_as_infinitely_bad():
    # prey growing as e^(2t): some candidate rates overflow the integration; their loss must be inf, not NaN
    times = np.linspace(0, 12, 13)
    context = np.stack([np.exp(2 * times), 1 + 0.1 * np.sin(times)], -1)[None]  # (1, 13, 2)
    assert _fit_against_scipy(context, times, iterations=20) > 0  # the premise: some candidates did blow up


def test_lotka_volterra_forecast_integrates_the_fit_forward():
    times = np.linspace(0, 16, 17)
    traj = lotka_volterra.integrate(PARAMS, INITIAL, times, substeps=8)  # (2, 17, 2)
    context = traj[:, :12]
    forecast = baselines.lotka_volterra(context, times, 5, iterations=0, substeps=8)  # steps 12..16
    params, initial = baselines.fit_lotka_volterra(context, times[:12], iterations=0)
    expected = lotka_volterra.integrate(params, initial, times, substeps=8)[:, 12:]
    assert forecast.shape == (2, 5, 2)
    np.testing.assert_allclose(forecast, expected, rtol=1e-12)
    # the fitted equations beat repeating the last value by far
    assert np.abs(forecast - traj[:, 12:]).mean() < 0.2 * np.abs(baselines.persistence(context, 5) - traj[:, 12:]).mean()
    longer = baselines.lotka_volterra(context, np.linspace(0, 20, 21), 5, iterations=0, substeps=8)
    np.testing.assert_allclose(longer, expected, rtol=1e-12)  # times past k + h are not used


def test_lotka_volterra_defaults_to_150_iterations_of_8_substeps():
    context, times = _sensitive_context()
    future = np.concatenate([times, [32.0, 34.0]])
    got = baselines.lotka_volterra(context, future, 2)
    params, initial = _scipy_fit(context[0], times, 150, 8)
    # the fit's defaults test shows that a 151st iteration, or 9 substeps, moves the fit on this context
    np.testing.assert_allclose(got[0], lotka_volterra.integrate(params[None], initial[None], future, substeps=8)[0, 4:], rtol=1e-9)


def test_lotka_volterra_passes_iterations_and_substeps_to_the_fit():
    context, times = _short_context()
    got = baselines.lotka_volterra(context[:, :6], times[:8], 2, iterations=3, substeps=3)
    params, initial = baselines.fit_lotka_volterra(context[:, :6], times[:6], iterations=3, substeps=3)
    np.testing.assert_allclose(got, lotka_volterra.integrate(params, initial, times[:8], substeps=3)[:, 6:], rtol=1e-12)
    assert not np.array_equal(params, baselines.fit_lotka_volterra(context[:, :6], times[:6], iterations=0)[0])  # the premise
    # where the substeps change the fit: against scipy fitting with 3 substeps (the fit's own default, 8, differs)
    context, times = _sensitive_context()
    future = np.concatenate([times, [32.0]])
    got = baselines.lotka_volterra(context, future, 1, iterations=20, substeps=3)
    params, initial = _scipy_fit(context[0], times, 20, 3)
    expected = lotka_volterra.integrate(params[None], initial[None], future, substeps=3)[0, 4:]
    np.testing.assert_allclose(got[0], expected, rtol=1e-9)
    assert np.abs(_scipy_fit(context[0], times, 20, 8)[0] / params - 1).max() > 1e-3  # the premise


def test_float32_inputs_are_computed_in_float64():
    context, times = _short_context()
    c32 = context.astype(np.float32)
    np.testing.assert_array_equal(baselines.regression_estimate(c32, times), baselines.regression_estimate(c32.astype(np.float64), times))
    for a, b in zip(baselines.fit_lotka_volterra(c32[:, :6], times[:6], iterations=2, substeps=2),
                    baselines.fit_lotka_volterra(c32[:, :6].astype(np.float64), times[:6], iterations=2, substeps=2)):
        np.testing.assert_array_equal(a, b)
    t32 = (times * 0.1).astype(np.float32)  # times that float32 rounds
    np.testing.assert_array_equal(baselines.lotka_volterra(context[:, :6], t32, 3, iterations=0),
                                  baselines.lotka_volterra(context[:, :6], t32.astype(np.float64), 3, iterations=0))


def test_a_forecast_that_blows_up_falls_back_to_persistence(monkeypatch):
    """Series 0 fits sane rates, series 1 rates whose integration overflows: only its non-finite values are replaced."""
    context, times = _short_context()
    rates = np.array([[0.15, 0.3, 0.1, 0.2], [1e3, 1e-4, 1e-4, 1e-4]])
    start = context[:, 0]
    monkeypatch.setattr(baselines, "fit_lotka_volterra", lambda *args: (rates, start))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the overflow is expected: it must not warn
        forecast = baselines.lotka_volterra(context[:, :8], times, 3)
    with np.errstate(all="ignore"):
        raw = lotka_volterra.integrate(rates, start, times[:11], substeps=8)[:, 8:]  # (2, 3, 2)
    bad = ~np.isfinite(raw)
    assert bad[1].any() and not bad[0].any()  # the premise
    np.testing.assert_array_equal(forecast[bad], np.broadcast_to(context[:, 7:8], raw.shape)[bad])
    np.testing.assert_array_equal(forecast[~bad], raw[~bad])


def test_lotka_volterra_needs_k_plus_h_times():
    with pytest.raises(ValueError, match="needs k \\+ h = 9 times, got 8"):
        baselines.lotka_volterra(np.ones((1, 6, 2)), np.arange(8.0), 3)


def test_persistence_takes_the_last_step_of_each_series():
    context = np.array([[[1, 2], [3, 4]], [[5, 6], [7, 8]]])  # integers: returned as floats
    f = baselines.persistence(context, 3)
    assert f.dtype == np.float64 and f.tolist() == [[[3, 4]] * 3, [[7, 8]] * 3]
