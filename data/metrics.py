"""Forecast metrics in original units (numpy only).

Shapes: N series, h horizon steps, 2 species ([..., 0] prey, [..., 1] predator), S samples.
Point forecasts and truth are (N, h, 2); sample forecasts are (N, S, h, 2).

Definitions (all over every value of every series and both species unless said otherwise):
    MSE    mean (p - t)^2                 RMSE   sqrt(MSE)
    MAE    mean |p - t|                   R2     1 - sum (p - t)^2 / sum (t - mean t)^2
    NRMSE  RMSE / (max t - min t), in %: normalised by the range of the true values
    MAPE   mean 100 |p - t| / max(|t|, EPS), in %. EPS is machine epsilon, as scikit-learn's
           mean_absolute_percentage_error does, so the numbers compare with the published
           reports; true values near zero (the coursework file goes down to 3.7e-5) make it
           explode, which is why WAPE is given beside it.
    WAPE   100 sum |p - t| / sum |t|, in %: a percentage error that stays finite near zero.
    CRPS   of the empirical distribution of the S samples, per value:
           mean_i |x_i - t| - 1/(2 S^2) sum_ij |x_i - x_j|, computed from the sorted samples in
           O(S log S); for S = 1 it is the absolute error. Averaged over values.
    coverage(q)  fraction of true values inside the central q interval of the samples,
           [quantile (1 - q) / 2, quantile (1 + q) / 2] (numpy's linear quantiles).
Per horizon step: MAE and MAPE for each species, the mean over series and its standard
error std / sqrt(N) (ddof = 1; NaN for a single series).
"""

import numpy as np

SPECIES = ("prey", "predator")
EPS = np.finfo(np.float64).eps


def _check(pred, truth):
    pred, truth = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if pred.shape != truth.shape or pred.ndim != 3 or pred.shape[-1] != 2:
        raise ValueError(f"forecasts and truth must both be (series, steps, 2), got {pred.shape} and {truth.shape}.")
    return pred, truth


def absolute_percentage_error(pred, truth):
    """100 |p - t| / max(|t|, EPS), elementwise."""
    return 100.0 * np.abs(pred - truth) / np.maximum(np.abs(truth), EPS)


def point_metrics(pred, truth):
    """Forecasts and truth (N, h, 2) -> {mse, rmse, mae, r2, nrmse, mape, wape} as floats."""
    pred, truth = _check(pred, truth)
    err = pred - truth
    mse = float(np.mean(err**2))
    spread = float(np.sum((truth - truth.mean()) ** 2))
    value_range = float(truth.max() - truth.min())
    return {
        "mse": mse,
        "rmse": mse**0.5,
        "mae": float(np.mean(np.abs(err))),
        "r2": 1.0 - float(np.sum(err**2)) / spread if spread > 0 else float("nan"),
        "nrmse": 100.0 * mse**0.5 / value_range if value_range > 0 else float("nan"),
        "mape": float(np.mean(absolute_percentage_error(pred, truth))),
        "wape": 100.0 * float(np.sum(np.abs(err)) / max(np.sum(np.abs(truth)), EPS)),
    }


def mean_and_se(x):
    """x (N, ...) -> mean over axis 0 and its standard error (NaN when N = 1)."""
    n = len(x)
    se = x.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.full(x.shape[1:], np.nan)
    return x.mean(axis=0), se


def per_step(pred, truth):
    """{"mae"|"mape": {"prey"|"predator": {"mean": (h,), "se": (h,)}}}: errors against horizon."""
    pred, truth = _check(pred, truth)
    out = {}
    for name, err in (("mae", np.abs(pred - truth)), ("mape", absolute_percentage_error(pred, truth))):
        mean, se = mean_and_se(err)  # (h, 2) each
        out[name] = {s: {"mean": mean[:, j], "se": se[:, j]} for j, s in enumerate(SPECIES)}
    return out


def crps(samples, truth):
    """Samples (N, S, h, 2), truth (N, h, 2) -> CRPS (N, h, 2) of the samples' empirical distribution."""
    x = np.sort(np.asarray(samples, dtype=np.float64), axis=1)  # (N, S, h, 2)
    S = x.shape[1]
    to_truth = np.abs(x - np.asarray(truth, dtype=np.float64)[:, None]).mean(axis=1)
    weights = (2 * np.arange(1, S + 1) - S - 1).reshape(1, S, 1, 1)  # sum_ij |x_i - x_j| = 2 sum_i (2i - S - 1) x_(i)
    spread = (weights * x).sum(axis=1) / S**2  # = 1/(2 S^2) sum_ij |x_i - x_j|
    return to_truth - spread


def coverage(samples, truth, level):
    """Fraction of truth (N, h, 2) inside the central `level` interval of samples (N, S, h, 2)."""
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2], axis=1)  # (N, h, 2) each
    return float(np.mean((truth >= low) & (truth <= high)))


def sample_metrics(samples, truth):
    """{crps, coverage_50, coverage_90, crps_per_step {prey, predator}: (h,)} for samples (N, S, h, 2)."""
    per_value = crps(samples, truth)  # (N, h, 2)
    step = per_value.mean(axis=0)  # (h, 2)
    return {
        "crps": float(per_value.mean()),
        "coverage_50": coverage(samples, truth, 0.5),
        "coverage_90": coverage(samples, truth, 0.9),
        "crps_per_step": {s: step[:, j] for j, s in enumerate(SPECIES)},
    }


# ---------------------------------------------------------------- the published reports' definitions
# As their code computed them (data/protocols.py says where each comes from); tests check report B's
# against scikit-learn, which it called.

def report_a_per_step(pred, truth):
    """Report A's per-step table: MAE and MAPE per horizon index and species, mean over series and
    std (ddof 1) / sqrt(N). Its MAPE divides by clip(t, 1e-8), not by |t|. Same layout as per_step."""
    pred, truth = _check(pred, truth)
    ape = np.abs((truth - pred) / np.clip(truth, 1e-8, None)) * 100
    out = {}
    for name, err in (("mae", np.abs(truth - pred)), ("mape", ape)):
        mean, se = mean_and_se(err)  # (h, 2) each
        out[name] = {s: {"mean": mean[:, j], "se": se[:, j]} for j, s in enumerate(SPECIES)}
    return out


def report_b_overall(pred, truth):
    """Report B's metrics on (N * h, 2) arrays, as scikit-learn's uniform average over the two species:
    MSE, MAE pooled (equal counts), RMSE = sqrt(MSE); R2 = the mean of the prey and predator R2
    (a constant species scores 1 if predicted exactly, else 0, scikit-learn's force_finite);
    NRMSE = 100 RMSE / (max t - min t); MAPE = 100 mean |t - p| / (|t| + 1e-10)."""
    pred, truth = _check(pred, truth)
    p, t = pred.reshape(-1, 2), truth.reshape(-1, 2)
    mse = float(np.mean((t - p) ** 2))
    residual = ((t - p) ** 2).sum(axis=0)  # (2,)
    total = ((t - t.mean(axis=0)) ** 2).sum(axis=0)  # (2,)
    r2 = np.where(total > 0, 1 - residual / np.where(total > 0, total, 1), np.where(residual == 0, 1.0, 0.0))
    value_range = float(t.max() - t.min())
    return {
        "mse": mse,
        "rmse": mse**0.5,
        "mae": float(np.mean(np.abs(t - p))),
        "r2": float(r2.mean()),
        "nrmse": 100 * mse**0.5 / value_range if value_range > 0 else float("inf"),
        "mape": float(np.mean(np.abs((t - p) / (np.abs(t) + 1e-10)))) * 100,
    }
