"""The evaluation protocols: ours, and the two published reports' as their authors' code ran them.

One home for what each protocol does; evaluate.py wires them to a model or to a score file.
Read from the authors' repositories (report A: JacobTutt/lora_timeseries, report B:
AdamWang0224/Finetune_Lora_for_Time_Series_Forecasting) and checked against report A's saved
forecasts; docs/evaluate.md tabulates every difference. A report's preset reproduces, quirks
included; it does not fix.

Report A (src/preprocessor.py, generate.py, decoder.py, analysis.py, evaluate.py):
    scaling   x / alpha, alpha = (90th percentile of every value in the file) / 10, in float32
    text      2 decimals, "a,b;a,b;...;a,b" (no final ';'), one string per series
    prompt    the first int(0.5 * n) of the series' n tokens: it usually ends inside step 49
    decoding  transformers greedy over the full vocabulary, with the checkpoint's generation
              config (repetition penalty 1.1, stop at <|im_end|> / <|endoftext|>), up to
              1.2 * (n - prompt) new tokens
    reading   prompt + output as one text, cut at its last ';', split into "a,b" pairs (a piece
              without ',' skipped, any other bad piece raises: that series is lost), the first
              99 kept (its truth has 99 steps: the same cut drops step 99), then the last 50
    truth     the same decoder on the series' own text: steps 49..98, scaled, rounded, float32
    table     "step s" is horizon index s (0-based), i.e. series step 49 + s; mean over series
              +- std (ddof 1) / sqrt(N); MAPE = 100 |p - t| / clip(t, 1e-8)
    series    the first 149 of its 150 test series (shuffled order); see data/splits.py
Report B (src/preprocessor.py, forecast_evaluation*.py, scripts/evaluate*.sh):
    prompt    51 steps, each series scaled by the 95th percentile of |its 51 context values|
              (both species), 2 decimals, a ';' after every step; tokens past 512 cut off
    decoding  greedy (or 20 samples) over the full vocabulary with the generation config,
              at most (20 + 10) * 10 = 300 new tokens
    reading   regex "-?\\d+\\.\\d+,-?\\d+\\.\\d+" over the new text, the first 20 matches,
              times the scale; fewer than 20 are padded with zeros
    metrics   scikit-learn on (N * 20, 2) arrays (data/metrics.report_b_overall), original units
    sampling  point forecast = mean of the samples (padded zeros included); "Avg. Unc." = mean
              over values of the samples' std (ddof 0)
"""

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data import llmtime, metrics
from qwen_min.errors import UserError
from qwen_min.files import read_json_object


@dataclass(frozen=True)
class Protocol:
    name: str
    summary: str  # one line for --help
    k: int  # context steps before horizon index 0 (report A's prompt is cut by tokens, not steps)
    h: int  # horizon steps scored
    units: str  # "original" or "scaled" (report A's x * 10 / P90, rounded to 2 decimals)
    n_scored: int | None = None  # test series scored (None: all)


OURS = Protocol("ours", "k whole steps -> h, digits and separators only, no generation config, original units, "
                "padding masked (the default)", k=50, h=50, units="original")
REPORT_A = Protocol("report-a", "report A as run: P90 -> 10 over the whole file, prompt = first half of the tokens "
                    "(ends mid-step), full vocabulary + generation config (repetition penalty 1.1), scaled units, "
                    "149 of its 150 shuffled test series, per-step MAE/MAPE", k=49, h=50, units="scaled", n_scored=149)
REPORT_B = Protocol("report-b", "report B as run: 51 -> 20 steps, each series' context P95 -> 1, full vocabulary + "
                    "generation config, regex parse with zero padding, scikit-learn metrics in original units, "
                    "its 100 test series", k=51, h=20, units="original")
PROTOCOLS = {p.name: p for p in (OURS, REPORT_A, REPORT_B)}
ALIASES = {"tutt": "report-a", "wang": "report-b"}  # the presets' earlier names

A_PERCENTILE, A_DECIMALS, A_PROMPT_FRACTION, A_NEW_TOKEN_FACTOR = 90, 2, 0.5, 1.2
B_PERCENTILE, B_DECIMALS, B_MAX_PROMPT_TOKENS = 95, 2, 512
B_PAIR = re.compile(r"(-?\d+\.\d+,-?\d+\.\d+)")


# ---------------------------------------------------------------- report A

def report_a_scaled(trajectories):
    """(N, T, 2) -> (scaled float32 (N, T, 2), alpha): x / alpha, alpha = P90 of all values / 10, in float32."""
    x = np.asarray(trajectories, dtype=np.float32)
    alpha = np.percentile(x.reshape(-1), A_PERCENTILE) / np.float32(10)  # float32, as its numpy computed it
    return x / alpha, alpha


def report_a_text(scaled):
    """One scaled series (T, 2) -> its text: 2 decimals, ';' between steps, none at the end."""
    return llmtime.encode(np.asarray(scaled, dtype=np.float64), A_DECIMALS)  # float32 -> float64 is exact


def report_a_decode(text):
    """Report A's decoder: text -> values (n, 2) float32. Cuts at the last ';' (dropping whatever
    follows, even a whole last step), skips pieces without ',', and raises ValueError on any other
    piece that is not two numbers (Python float() rules, spaces stripped)."""
    pairs = []
    for piece in text[: text.rfind(";")].split(";"):
        if not piece.strip() or "," not in piece:
            continue
        fields = piece.split(",")
        if len(fields) != 2:
            raise ValueError(f"report A's decoder rejects {piece!r}")
        pairs.append([float(fields[0].strip()), float(fields[1].strip())])
    return np.asarray(pairs, dtype=np.float32).reshape(-1, 2)


def report_a_prompt_length(n_tokens):
    return int(A_PROMPT_FRACTION * n_tokens)


def report_a_max_new_tokens(n_tokens):
    """transformers stops once the new tokens reach 1.2 * (n - prompt), a float: so its ceiling."""
    return int(np.ceil(A_NEW_TOKEN_FACTOR * (n_tokens - report_a_prompt_length(n_tokens))))


def report_a_truth(text, h=50):
    """The truth report A scored against: its decoder on the series' own text, the last h steps (h, 2)."""
    return report_a_decode(text)[-h:]


def report_a_read(full_text, n_truth_steps, h=50):
    """Prompt + generated text -> forecast (h, 2) float32 as report A kept it, or None where its code
    lost the series (its decoder raised, or fewer than h values were left)."""
    try:
        values = report_a_decode(full_text)[:n_truth_steps][-h:]
    except ValueError:
        return None
    return values if len(values) == h else None


# ---------------------------------------------------------------- report B

def report_b_prompt(context):
    """Context (k, 2) in original units -> (text, scale): each series scaled by the 95th percentile
    of |its context| (scale 1 if that is 0), 2 decimals, a ';' after every step."""
    context = np.asarray(context)
    scale = np.percentile(np.abs(context), B_PERCENTILE)
    if scale == 0:
        scale = 1.0
    text = "".join(",".join(f"{v:.{B_DECIMALS}f}" for v in step) + ";" for step in context / scale)
    return text, scale


def report_b_max_new_tokens(h):
    return (h + 10) * 10


def report_b_read(generated_text, scale, h=20):
    """New text only -> (forecast (h, 2) in original units, pairs found): the first h regex pairs,
    times the scale; missing steps are zeros."""
    pairs = [[float(v) for v in m.split(",")] for m in B_PAIR.findall(generated_text)[:h]]
    values = np.zeros((h, 2))
    if pairs:
        values[: len(pairs)] = np.asarray(pairs) * scale
    return values, len(pairs)


# ---------------------------------------------------------------- scoring

def score(protocol, point, truth, samples=None):
    """All metrics of one forecaster under a protocol, in its units: ours (overall, per step, and
    with samples CRPS / coverage) and, for a report, its published metrics under "published"."""
    result = {"overall": metrics.point_metrics(point, truth), "per_step": metrics.per_step(point, truth)}
    if samples is not None and samples.shape[1] > 1 and protocol.name == "ours":
        result["probabilistic"] = metrics.sample_metrics(samples, truth)
    if protocol.name == "report-a":
        result["published"] = {"per_step": metrics.report_a_per_step(point, truth)}
    elif protocol.name == "report-b":
        result["published"] = {"overall": metrics.report_b_overall(point, truth)}
        if samples is not None and samples.shape[1] > 1:
            result["published"]["overall"]["avg_uncertainty"] = float(np.std(samples, axis=1).mean())
    return result


def point_forecast(protocol, samples):
    """Samples (N, S, h, 2) -> point (N, h, 2): the median (ours, as LLMTime), the mean (report B)."""
    return samples.mean(axis=1) if protocol.name == "report-b" else np.median(samples, axis=1)


# ---------------------------------------------------------------- forecasts made elsewhere

def read_score_file(path, h, n_rows):
    """A score file -> (forecast (N, h, 2), truth (N, h, 2) or None, series (N,) int64 or None), checked.

    JSON (an object) or .npz (plain arrays; loaded with allow_pickle=False) with `forecast`
    [prey, predator] per step in the protocol's units, optional `truth` of the same shape and
    optional `series`, N distinct row indices into the data file (n_rows rows; None: not checked).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--score {path}: no such file; pass a .json or .npz file holding `forecast` (N, {h}, 2).")
    if path.suffix == ".json":
        data = read_json_object(path, f"write an object with a `forecast` list of shape (N, {h}, 2), and optional `truth` "
                                      "and `series`", name=f"--score {path}")
    elif path.suffix == ".npz":
        if not zipfile.is_zipfile(path):  # np.load would read other bytes as a pickle or a bare .npy array
            raise UserError(f"--score {path} is not a readable .npz archive; write it with np.savez(path, forecast=..., truth=..., series=...).")
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = {key: npz[key] for key in npz.files}
        except ValueError:
            raise UserError(f"--score {path} holds pickled (object) arrays, which are never loaded; save plain numeric arrays with np.savez.") from None
        except (OSError, zipfile.BadZipFile, EOFError):
            raise UserError(f"--score {path} is not a readable .npz archive; write it with np.savez(path, forecast=..., truth=..., series=...).") from None
    else:
        raise UserError(f"--score {path} must end in .json or .npz (holding `forecast`, optional `truth` and `series`).")
    if "forecast" not in data:
        raise UserError(f"--score {path} has no `forecast`; add forecasts shaped (N, {h}, 2), [prey, predator] per step in the protocol's units.")
    forecast = _array(data["forecast"], path, "forecast", h)
    truth = None if data.get("truth") is None else _array(data["truth"], path, "truth", h)
    if truth is not None and truth.shape != forecast.shape:
        raise UserError(f"--score {path}: `truth` is shaped {truth.shape} but `forecast` {forecast.shape}; give one truth per forecast value.")
    series = None
    if data.get("series") is not None:
        try:
            series = np.asarray(data["series"])
        except ValueError:
            series = np.zeros(0, dtype=object)
        if series.dtype.kind not in "iu" or series.shape != (len(forecast),):
            raise UserError(f"--score {path}: `series` must be {len(forecast)} integer row indices (one per forecast), got shape {series.shape} of {series.dtype}.")
        if len(np.unique(series)) != len(series) or (series < 0).any() or (n_rows is not None and (series >= n_rows).any()):
            raise UserError(f"--score {path}: `series` must name distinct rows in 0..{'N-1' if n_rows is None else n_rows - 1} of the data file.")
        series = series.astype(np.int64)
    return forecast, truth, series


def _array(value, path, key, h):
    try:
        x = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise UserError(f"--score {path}: `{key}` is not a numeric array (ragged lists or non-numbers); give numbers shaped (N, {h}, 2).") from None
    if x.ndim != 3 or x.shape[1:] != (h, 2) or len(x) == 0:
        raise UserError(f"--score {path}: `{key}` is shaped {x.shape}, but this protocol scores (N, {h}, 2): N series, {h} steps, [prey, predator].")
    if not np.isfinite(x).all():
        raise UserError(f"--score {path}: `{key}` holds NaN or infinite values; score only finite forecasts (repair or drop those series).")
    return x
