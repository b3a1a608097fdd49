"""data/forecast.py: prompts, targets, token budgets and reading a forecast back, on values worked out by hand.

The scalers are built from a level chosen here (not fitted), so every scaled value is known: with
level 2 and target 10, x maps to 5 x."""

import numpy as np
import pytest

from data import forecast, llmtime, windows

TOK = windows.DigitTokenizer()  # digits 0-9 -> 15..24, '.' -> 13, ',' -> 11, ';' -> 26
TRAJ = np.array([[0.2, 0.4], [1.0, 0.6], [0.1, 0.3], [2.0, 0.8], [0.4, 0.2]])  # (T=5, 2), original units
GLOBAL = llmtime.Scaler(np.asarray(2.0), target=10.0)  # x -> 5 x
PER_SERIES = llmtime.Scaler(np.array([1.0, 2.0, 4.0]), target=10.0, per_series=True)  # row i: x -> 10 x / level_i


def test_a_task_holds_the_scaled_prompt_and_the_unscaled_context_and_target():
    task = forecast.forecast_task(TRAJ, k=2, h=2, scaler=GLOBAL, decimals=1, tokenizer=TOK)
    assert task.prompt == "1.0,2.0;5.0,3.0;"  # 5 x, one decimal, ending with the separator
    assert task.prompt_ids.tolist() == [16, 13, 15, 11, 17, 13, 15, 26, 20, 13, 15, 11, 18, 13, 15, 26]
    assert task.prompt_ids.dtype == np.int64
    np.testing.assert_array_equal(task.context, [[0.2, 0.4], [1.0, 0.6]])
    np.testing.assert_array_equal(task.target, [[0.1, 0.3], [2.0, 0.8]])  # steps k .. k + h - 1, not scaled
    assert task.row == 0


def test_a_task_without_a_tokenizer_has_no_ids_and_two_decimals_by_default():
    task = forecast.forecast_task(TRAJ, k=3, h=1, scaler=GLOBAL)
    assert task.prompt == "1.00,2.00;5.00,3.00;0.50,1.50;"
    assert task.prompt_ids is None
    np.testing.assert_array_equal(task.target, [[2.0, 0.8]])


def test_a_task_takes_the_scale_of_its_row():
    task = forecast.forecast_task(TRAJ, k=1, h=1, scaler=PER_SERIES, row=2, decimals=2)
    assert task.prompt == "0.50,1.00;" and task.row == 2  # 10 x / 4
    first = forecast.forecast_task(TRAJ, k=1, h=1, scaler=PER_SERIES, decimals=2)  # row 0 by default
    assert first.prompt == "2.00,4.00;" and first.row == 0  # 10 x / 1


def test_tasks_give_trajectory_i_row_i():
    trajectories = np.stack([TRAJ, 2 * TRAJ, 4 * TRAJ])  # (3, 5, 2): each scales to the same text by its own level
    tasks = forecast.forecast_tasks(trajectories, k=1, h=3, scaler=PER_SERIES, decimals=1, tokenizer=TOK)
    assert [t.row for t in tasks] == [0, 1, 2]
    assert [t.prompt for t in tasks] == ["2.0,4.0;"] * 3
    assert all(t.prompt_ids.tolist() == [17, 13, 15, 11, 19, 13, 15, 26] for t in tasks)
    np.testing.assert_array_equal(tasks[2].target, 4 * TRAJ[1:4])
    assert forecast.forecast_tasks(TRAJ[None], k=2, h=2, scaler=GLOBAL)[0].prompt == "1.00,2.00;5.00,3.00;"  # decimals 2


@pytest.mark.parametrize("k, h", [(0, 2), (2, 0), (3, 3), (5, 1)])
def test_a_task_needs_k_and_h_steps_inside_the_trajectory(k, h):
    with pytest.raises(ValueError, match=f"k \\+ h <= 5 steps, got k={k}, h={h}"):
        forecast.forecast_task(TRAJ, k=k, h=h, scaler=GLOBAL)


def test_a_task_may_use_every_step():
    task = forecast.forecast_task(TRAJ, k=4, h=1, scaler=GLOBAL)  # k + h = T exactly
    np.testing.assert_array_equal(task.target, [[0.4, 0.2]])


@pytest.mark.parametrize("tokens_per_step, h, budget", [(5, 3, 21), (4.5, 3, 20), (10, 1, 12), (0.25, 2, 5)])
def test_new_token_budget_is_h_steps_of_prompt_tokens_plus_two_rounded_up(tokens_per_step, h, budget):
    # 3 * (5 + 2) = 21; 3 * 6.5 = 19.5 -> 20; 1 * 12 = 12; 2 * 2.25 = 4.5 -> 5
    got = forecast.new_token_budget(tokens_per_step, h)
    assert got == budget and type(got) is int


def test_read_forecast_decodes_pads_to_h_and_maps_back_to_original_units():
    task = forecast.forecast_task(TRAJ, k=2, h=3, scaler=GLOBAL)
    values, decoded = forecast.read_forecast("0.50,1.50;10.00,4.00;", task, GLOBAL)
    np.testing.assert_allclose(values, [[0.1, 0.3], [2.0, 0.8], [2.0, 0.8]])  # x / 5; step 3 repeats step 2
    assert decoded.issues == {"padded_step": 1}
    np.testing.assert_array_equal(decoded.values, [[0.5, 1.5], [10.0, 4.0], [10.0, 4.0]])  # still scaled


def test_read_forecast_cuts_extra_steps_and_uses_the_task_row():
    task = forecast.forecast_task(TRAJ, k=2, h=1, scaler=PER_SERIES, row=2)
    values, decoded = forecast.read_forecast("1.00,2.00;3.00,4.00;", task, PER_SERIES)
    np.testing.assert_allclose(values, [[0.4, 0.8]])  # x * 4 / 10
    assert decoded.issues == {"extra_step": 1}


def test_read_forecast_passes_decimals_to_the_decoder():
    task = forecast.forecast_task(TRAJ, k=2, h=2, scaler=GLOBAL)
    values, decoded = forecast.read_forecast("1.00,2.00;3.00,4.0", task, GLOBAL, decimals=2)
    assert decoded.issues == {"truncated_step": 1, "padded_step": 1}  # "4.0" lacks a decimal: cut off
    np.testing.assert_allclose(values, [[0.2, 0.4], [0.2, 0.4]])
    values, decoded = forecast.read_forecast("1.00,2.00;3.00,4.0", task, GLOBAL)  # no decimals: kept
    assert decoded.issues == {}
    np.testing.assert_allclose(values, [[0.2, 0.4], [0.6, 0.8]])


def test_a_float32_trajectory_gives_float64_context_and_target():
    task = forecast.forecast_task(TRAJ.astype(np.float32), k=2, h=2, scaler=GLOBAL)
    assert task.context.dtype == task.target.dtype == np.float64
    np.testing.assert_array_equal(task.target, TRAJ[2:4].astype(np.float32).astype(np.float64))
