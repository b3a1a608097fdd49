"""Baseline forecasts from the context window alone (numpy only), to show what a model adds.

Shapes: N series, k context steps, h forecast steps, 2 species (prey, predator).

persistence: every future step repeats the last observed one.

lotka_volterra: the equations that generate the data, fitted to each context window and
integrated forward. With u = ln x, v = ln y the system is

    du/dt = alpha - beta y        dv/dt = delta x - gamma

which is *linear* in the parameters: a least-squares regression of finite-difference
d(ln x)/dt on y (and d(ln y)/dt on x) gives them directly. That first estimate is then
refined, together with the initial condition, by Nelder-Mead on the squared error of the
integrated log-trajectory over the context (vectorised: every series has its own simplex).
"""

import numpy as np

from data.lotka_volterra import integrate

FLOOR = 1e-6  # populations are positive; keeps log() finite on values rounded to zero


def persistence(context, h):
    """Context (N, k, 2) -> forecast (N, h, 2): the last context step, repeated."""
    context = np.asarray(context, dtype=np.float64)
    return np.repeat(context[:, -1:], h, axis=1)


def regression_estimate(context, times):
    """Parameters (N, 4) alpha, beta, delta, gamma from finite differences and linear least squares."""
    x = np.maximum(np.asarray(context, dtype=np.float64), FLOOR)  # (N, k, 2)
    du, dv = np.gradient(np.log(x), times, axis=1).transpose(2, 0, 1)  # (N, k) each
    prey, pred = x[..., 0], x[..., 1]
    ones = np.ones_like(prey)
    # du = alpha * 1 + beta * (-y);  dv = delta * x + gamma * (-1)
    a = _least_squares(np.stack([ones, -pred], -1), du)  # (N, 2): alpha, beta
    b = _least_squares(np.stack([prey, -ones], -1), dv)  # (N, 2): delta, gamma
    return np.maximum(np.concatenate([a, b], axis=1), 1e-4)  # the model needs positive rates


def _least_squares(X, y):
    """Per-series least squares: X (N, k, p), y (N, k) -> (N, p)."""
    XtX = X.transpose(0, 2, 1) @ X  # (N, p, p)
    Xty = X.transpose(0, 2, 1) @ y[..., None]  # (N, p, 1)
    return np.linalg.solve(XtX + 1e-9 * np.eye(X.shape[-1]), Xty)[..., 0]


def nelder_mead(f, x0, iterations=150, step=0.1):
    """Minimises a function for every row of x0 (N, d) independently.

    f(points (M, d), rows (M,)) -> values (M,): rows says which problem (row of x0) each point is for.

    The textbook method (reflect 1, expand 2, contract 1/2, shrink 1/2); each iteration
    evaluates the four candidate points of all N simplices in one call of f.
    """
    N, d = x0.shape
    simplex = x0[:, None] + np.vstack([np.zeros(d), step * np.eye(d)])  # (N, d+1, d)
    values = f(simplex.reshape(-1, d), np.repeat(np.arange(N), d + 1)).reshape(N, d + 1)
    coefs = np.array([-1.0, -2.0, -0.5, 0.5])  # reflect, expand, contract outside, contract inside
    for _ in range(iterations):
        order = np.argsort(values, axis=1)
        simplex = np.take_along_axis(simplex, order[..., None], axis=1)
        values = np.take_along_axis(values, order, axis=1)
        centroid = simplex[:, :-1].mean(axis=1)  # (N, d)
        points = centroid + coefs[:, None, None] * (simplex[:, -1] - centroid)  # (4, N, d)
        fr, fe, fo, fi = f(points.reshape(-1, d), np.tile(np.arange(N), 4)).reshape(4, N)
        best, second, worst = values[:, 0], values[:, -2], values[:, -1]
        take = np.full(N, -1)
        take[(fr >= second) & (fr < worst) & (fo <= fr)] = 2
        take[(fr >= worst) & (fi < worst)] = 3
        take[fr < second] = 0
        take[(fr < best) & (fe < fr)] = 1
        ok = take >= 0
        simplex[ok, -1] = points[take[ok], np.flatnonzero(ok)]
        values[ok, -1] = np.stack([fr, fe, fo, fi])[take[ok], np.flatnonzero(ok)]
        if not ok.all():  # shrink every vertex towards the best one
            shrunk = simplex[~ok, :1] + 0.5 * (simplex[~ok, 1:] - simplex[~ok, :1])  # (n, d, d)
            simplex[~ok, 1:] = shrunk
            values[~ok, 1:] = f(shrunk.reshape(-1, d), np.repeat(np.flatnonzero(~ok), d)).reshape(-1, d)
    return simplex[np.arange(N), values.argmin(axis=1)]


def fit_lotka_volterra(context, times, iterations=150, substeps=8):
    """Fit each context (N, k, 2) on times (k,) -> params (N, 4) and initial values (N, 2) at times[0]."""
    context = np.maximum(np.asarray(context, dtype=np.float64), FLOOR)
    target = np.log(context)  # (N, k, 2)
    start = np.concatenate([np.log(regression_estimate(context, times)), target[:, 0]], axis=1)  # (N, 6)

    def loss(z, rows):  # z (M, 6): log params, log initial of series rows (M,)
        with np.errstate(all="ignore"):
            path = integrate(np.exp(z[:, :4]), np.exp(z[:, 4:]), times, substeps)  # (M, k, 2)
            err = np.mean((np.log(path) - target[rows]) ** 2, axis=(1, 2))
        return np.where(np.isfinite(err), err, np.inf)

    z = nelder_mead(loss, start, iterations) if iterations else start
    return np.exp(z[:, :4]), np.exp(z[:, 4:])


def lotka_volterra(context, times, h, iterations=150, substeps=8):
    """Context (N, k, 2) on times (k + h,) -> forecast (N, h, 2) of the fitted equations."""
    k = np.asarray(context).shape[1]
    times = np.asarray(times, dtype=np.float64)
    if len(times) < k + h:
        raise ValueError(f"the LV baseline needs k + h = {k + h} times, got {len(times)}.")
    params, initial = fit_lotka_volterra(context, times[:k], iterations, substeps)
    with np.errstate(all="ignore"):
        path = integrate(params, initial, times[: k + h], substeps)  # (N, k + h, 2)
    forecast = path[:, k:]
    return np.where(np.isfinite(forecast), forecast, persistence(context, h))  # a blown-up fit falls back
