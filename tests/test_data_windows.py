"""Token windows: ids, starts at step boundaries, padding masked out of the loss; forecast tasks."""

import os
from pathlib import Path

import numpy as np
import pytest

from data import forecast, llmtime, lotka_volterra, windows

TOK = windows.DigitTokenizer()
SEMI = 26


def test_digit_tokenizer_ids():
    assert TOK.encode("0123456789.,;") == list(range(15, 25)) + [13, 11, 26]
    with pytest.raises(ValueError, match="only knows"):
        TOK.encode("1 2")


@pytest.mark.skipif(not os.environ.get("QWEN_MIN_CHECKPOINT"), reason="QWEN_MIN_CHECKPOINT not set")
def test_real_tokenizer_reads_llmtime_text_one_character_per_token():
    from tokenizers import Tokenizer

    real = Tokenizer.from_file(str(Path(os.environ["QWEN_MIN_CHECKPOINT"]) / "tokenizer.json"))
    traj, _ = lotka_volterra.simulate(20, seed=0)
    for decimals, target in ((2, 10), (3, 10), (2, 1)):
        scaled = llmtime.Scaler.fit(traj, target=target).transform(traj)
        for x in scaled:
            text = llmtime.encode(x, decimals, trailing_sep=True)
            ids = windows.token_ids(text, real)
            assert ids.tolist() == TOK.encode(text)
            assert len(ids) == len(text)


def _ids(n_steps, width=4):
    """ids of n_steps steps, each `width` digits then ';' -- step boundaries every width + 1."""
    step = [15] * width + [SEMI]
    return np.array(step * n_steps, dtype=np.int64)


def test_short_sequence_is_one_right_padded_window_with_masked_labels():
    ids = _ids(3)  # 15 tokens
    w = windows.make_windows(ids, max_length=20, stride=10, pad_id=0)
    assert w.input_ids.shape == (1, 20) and w.input_ids.dtype == np.int64
    np.testing.assert_array_equal(w.input_ids[0, :15], ids)
    np.testing.assert_array_equal(w.input_ids[0, 15:], 0)
    np.testing.assert_array_equal(w.attention_mask[0], [1] * 15 + [0] * 5)
    np.testing.assert_array_equal(w.labels[0], list(ids) + [-100] * 5)


def test_exact_fit_has_no_padding_and_no_second_window():
    w = windows.make_windows(_ids(4), max_length=20, stride=10)
    assert w.input_ids.shape == (1, 20)
    assert w.attention_mask.all() and (w.labels != -100).all()


def test_windows_start_after_a_separator_and_cover_every_token():
    ids = _ids(40)  # 200 tokens, boundaries at multiples of 5
    starts = windows.window_starts(ids, max_length=32, stride=16, sep_id=SEMI)
    assert starts[0] == 0 and (starts % 5 == 0).all()
    assert (np.diff(starts) > 0).all() and (np.diff(starts) <= 16).all()
    assert starts[-1] + 32 >= len(ids) and starts[-2] + 32 < len(ids)  # last window is the first to reach the end
    w = windows.make_windows(ids, max_length=32, stride=16, sep_id=SEMI)
    covered = np.zeros(len(ids), bool)
    for s, mask in zip(starts, w.attention_mask):
        covered[s : s + mask.sum()] = True
    assert covered.all()
    assert (w.input_ids[:, 0] != SEMI).all()


def test_without_boundaries_windows_step_by_exactly_stride():
    ids = np.full(100, 15, dtype=np.int64)
    starts = windows.window_starts(ids, max_length=30, stride=20, sep_id=SEMI)
    np.testing.assert_array_equal(starts, [0, 20, 40, 60, 80])
    w = windows.make_windows(ids, 30, 20, pad_id=0)
    assert w.attention_mask[-1].sum() == 20 and (w.labels[-1, 20:] == -100).all()


def test_stride_equal_to_max_length_gives_validation_windows():
    ids = _ids(20, width=3)  # 80 tokens, boundaries every 4: aligned with 16
    starts = windows.window_starts(ids, max_length=16, stride=16, sep_id=SEMI)
    np.testing.assert_array_equal(starts, [0, 16, 32, 48, 64])


def test_empty_ids_and_bad_stride():
    w = windows.make_windows(np.zeros(0, dtype=np.int64), 8, 4)
    assert w.input_ids.shape == (0, 8)
    with pytest.raises(ValueError, match="stride"):
        windows.window_starts(_ids(3), max_length=8, stride=9, sep_id=SEMI)


def test_dataset_windows_never_cross_trajectories():
    traj, _ = lotka_volterra.simulate(3, seed=0)
    scaled = llmtime.Scaler.fit(traj).transform(traj)
    w = windows.dataset_windows(scaled, TOK, max_length=512, stride=256, decimals=2)
    assert w.input_ids.shape[1] == 512 and len(w.trajectory) == len(w.input_ids)
    assert sorted(set(w.trajectory.tolist())) == [0, 1, 2]
    for i in range(3):
        text = llmtime.encode(scaled[i], 2)
        first = w.input_ids[w.trajectory == i][0]
        n = min(512, len(text))
        assert first[:n].tolist() == TOK.encode(text[:n])
    # the real tokens of the windows, step boundaries aside, all come from the alphabet
    assert set(np.unique(w.input_ids[w.attention_mask == 1])) <= set(range(11, 27))


def test_forecast_task_prompt_ends_with_separator_and_target_is_in_original_units():
    traj, _ = lotka_volterra.simulate(4, seed=1)
    scaler = llmtime.Scaler.fit(traj)
    task = forecast.forecast_task(traj[2], k=10, h=5, scaler=scaler, decimals=2, tokenizer=TOK)
    assert task.prompt.endswith(";") and task.prompt.count(";") == 10
    assert task.prompt_ids[-1] == SEMI and len(task.prompt_ids) == len(task.prompt)
    np.testing.assert_array_equal(task.target, traj[2, 10:15])
    np.testing.assert_array_equal(task.context, traj[2, :10])
    # a perfect model's continuation reads back to the target, within the rounding
    answer = llmtime.encode(scaler.transform(task.target), 2)
    values, report = forecast.read_forecast(answer + ";9.99", task, scaler, decimals=2)
    assert values.shape == (5, 2) and report.issues == {"truncated_step": 1}
    assert np.abs(values - task.target).max() <= 0.005 * scaler.level / 10 + 1e-6


def test_forecast_tasks_use_their_own_per_series_scale():
    traj, _ = lotka_volterra.simulate(3, seed=2)
    scaler = llmtime.Scaler.fit(traj[:, :20], target=1, per_series=True)
    tasks = forecast.forecast_tasks(traj, k=20, h=10, scaler=scaler)
    assert [t.row for t in tasks] == [0, 1, 2]
    for i, task in enumerate(tasks):
        assert llmtime.decode(task.prompt).values == pytest.approx(scaler.transform(traj[i, :20], rows=i), abs=0.005)
    with pytest.raises(ValueError, match="k \\+ h"):
        forecast.forecast_task(traj[0], k=95, h=10, scaler=scaler)


def test_batch_pads_to_its_longest_row_and_masks_the_padding():
    """Rows of 3, 6 and 4 real tokens (L = 8): the batch is 6 wide, shorter rows keep their padding."""
    pad = 99
    ids = [[15, 16, 26], [17, 18, 19, 26, 20, 26], [21, 22, 23, 26]]
    w = windows.Windows(
        input_ids=np.array([row + [pad] * (8 - len(row)) for row in ids], dtype=np.int64),
        attention_mask=np.array([[1] * len(row) + [0] * (8 - len(row)) for row in ids], dtype=np.int64),
        labels=np.array([row + [-100] * (8 - len(row)) for row in ids], dtype=np.int64),
        trajectory=np.zeros(3, dtype=np.int64))
    input_ids, labels = windows.batch(w, np.array([2, 0, 1]))
    np.testing.assert_array_equal(input_ids, [[21, 22, 23, 26, pad, pad],
                                              [15, 16, 26, pad, pad, pad],
                                              [17, 18, 19, 26, 20, 26]])
    np.testing.assert_array_equal(labels, [[21, 22, 23, 26, -100, -100],
                                           [15, 16, 26, -100, -100, -100],
                                           [17, 18, 19, 26, 20, 26]])
    # two short rows: cut to the longer of them (4), not the shorter (3), not the window (8)
    input_ids, labels = windows.batch(w, slice(0, 3, 2))
    np.testing.assert_array_equal(input_ids, [[15, 16, 26, pad], [21, 22, 23, 26]])
    np.testing.assert_array_equal(labels, [[15, 16, 26, -100], [21, 22, 23, 26]])


def test_batch_of_real_windows_keeps_every_real_token():
    """make_windows' own padding (Qwen's pad id, -100 labels) survives batching of rows of 15 and 10 tokens."""
    a = windows.make_windows(_ids(3), max_length=20, stride=10)  # 15 tokens
    b = windows.make_windows(_ids(2), max_length=20, stride=10)  # 10 tokens
    w = windows.Windows(*(np.concatenate(f) for f in zip(a, b)))
    input_ids, labels = windows.batch(w, [1, 0])
    assert input_ids.shape == labels.shape == (2, 15)
    np.testing.assert_array_equal(input_ids[1], _ids(3))
    np.testing.assert_array_equal(input_ids[0], list(_ids(2)) + [151643] * 5)
    np.testing.assert_array_equal(labels[0], list(_ids(2)) + [-100] * 5)
    assert (labels[1] != -100).all()
