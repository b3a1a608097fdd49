"""Forecast tasks: the first k steps of a trajectory as a prompt, the next h as the answer.

The prompt is the scaled, encoded context and ends with ';', so the model's next token
starts step k + 1. The target stays in original units: forecasts are decoded, mapped back
with the scaler, and only then compared, so the metric never depends on the scaling.

Recipe, global scaling (fit on the training split):
    scaler = llmtime.Scaler.fit(traj[split.train])
    tasks = forecast_tasks(traj[split.test], k=50, h=50, scaler=scaler, tokenizer=tok)
Per-series scaling (fit on each test series' own context, so the future is not peeked at):
    scaler = llmtime.Scaler.fit(traj[split.test, :50], per_series=True)
    tasks = forecast_tasks(traj[split.test], k=50, h=50, scaler=scaler, tokenizer=tok)
"""

from typing import NamedTuple

import numpy as np

from data import llmtime
from data.windows import token_ids


class ForecastTask(NamedTuple):
    prompt: str  # k scaled steps, "a,b;...;a,b;"
    prompt_ids: np.ndarray  # (P,) int64, or None without a tokenizer
    context: np.ndarray  # (k, 2) original units
    target: np.ndarray  # (h, 2) original units
    row: int  # which scale of a per-series scaler belongs to this task


def forecast_task(trajectory, k, h, scaler, row=0, decimals=2, tokenizer=None):
    """One task from a trajectory (T, 2) in original units; row picks a per-series scale."""
    trajectory = np.asarray(trajectory, dtype=np.float64)
    if not (k >= 1 and h >= 1 and k + h <= len(trajectory)):
        raise ValueError(f"need 1 <= k, 1 <= h and k + h <= {len(trajectory)} steps, got k={k}, h={h}.")
    context, target = trajectory[:k], trajectory[k : k + h]
    prompt = llmtime.encode(scaler.transform(context, rows=row), decimals, trailing_sep=True)
    ids = token_ids(prompt, tokenizer) if tokenizer is not None else None
    return ForecastTask(prompt, ids, context, target, row)


def forecast_tasks(trajectories, k, h, scaler, decimals=2, tokenizer=None):
    """One task per trajectory of (N, T, 2); task i uses row i of a per-series scaler."""
    return [forecast_task(x, k, h, scaler, i, decimals, tokenizer) for i, x in enumerate(trajectories)]


def new_token_budget(tokens_per_step, h):
    """max_new_tokens for h steps: each step as many tokens as the prompt's steps take, plus 2 of slack."""
    return int(np.ceil(h * (tokens_per_step + 2)))


def read_forecast(text, task, scaler, decimals=None):
    """Generated text -> (values (h, 2) in original units, Decoded report of repairs)."""
    decoded = llmtime.decode(text, n_steps=len(task.target), decimals=decimals)
    return scaler.inverse(decoded.values, rows=task.row), decoded
