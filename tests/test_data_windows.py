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


# ---------------------------------------------------------------- exact checks, expected values by hand

QWEN_IDS = {"0": 15, "1": 16, "2": 17, "3": 18, "4": 19, "5": 20, "6": 21, "7": 22, "8": 23, "9": 24,
            ".": 13, ",": 11, ";": 26}  # Qwen2.5's vocabulary, written out (tokenizer.json)
TOKENIZER_ERROR = "DigitTokenizer only knows the characters 0123456789.,;; use the real tokenizer for other text."


def _by_hand(text):
    return [QWEN_IDS[c] for c in text]


def test_digit_tokenizer_maps_every_known_character_and_refuses_the_rest_with_its_sentence():
    tok = windows.DigitTokenizer()  # built inside the test: its table is part of what is checked
    for char, token in QWEN_IDS.items():
        assert tok.encode(char) == [token]
    assert tok.encode("") == []
    assert tok.encode("12.5,0.75;3") == [16, 17, 13, 20, 11, 15, 13, 22, 20, 26, 18]
    # unknown ASCII (space, sign, letter, newline, '?', DEL, NUL) and non-ASCII, which must be refused,
    # not read as the byte or '?' that an encoding would turn it into
    for bad in ["1 2", "-1", "e", "1\n", "?", "\x7f", "\x00", "1é", "٣", "１", "1.5€", "\U0001f600"]:
        with pytest.raises(ValueError) as e:
            tok.encode(bad)
        assert str(e.value) == TOKENIZER_ERROR, bad


class _Encoding:
    """Stands in for a tokenizers Encoding: the ids sit in `.ids`."""

    def __init__(self, ids):
        self.ids = ids


class _EncodingTokenizer:
    def encode(self, text):
        return _Encoding([QWEN_IDS[c] for c in text])


class _Int32Tokenizer:
    def encode(self, text):
        return np.array([QWEN_IDS[c] for c in text], dtype=np.int32)


def test_token_ids_are_int64_from_an_encoding_a_list_or_another_integer_type():
    for tok in (windows.DigitTokenizer(), _EncodingTokenizer(), _Int32Tokenizer()):
        ids = windows.token_ids("1.5;", tok)
        assert ids.dtype == np.int64 and ids.tolist() == [16, 13, 20, 26], tok
        empty = windows.token_ids("", tok)  # an empty list would otherwise become float64
        assert empty.dtype == np.int64 and empty.shape == (0,), tok


def test_window_starts_boundary_cases():
    stride_error = "stride {} must be in 1..max_length (4), or some tokens would be in no window."
    # stride 1 is allowed: with no boundaries, a window at every token until one reaches the end
    ids = np.full(7, 15, dtype=np.int64)
    np.testing.assert_array_equal(windows.window_starts(ids, max_length=4, stride=1, sep_id=SEMI), [0, 1, 2, 3])
    for stride in (0, -1, 5):  # refused even where a single window would cover the ids
        with pytest.raises(ValueError) as e:
            windows.window_starts(ids[:3], max_length=4, stride=stride, sep_id=SEMI)
        assert str(e.value) == stride_error.format(stride)
    # the first boundary (index 0 of the boundaries) is used: ';' at 3 -> window at 4, not at 0 + stride
    ids = np.array([15, 15, 15, SEMI] + [15] * 8)  # 12 tokens, one boundary at 4
    np.testing.assert_array_equal(windows.window_starts(ids, max_length=8, stride=6, sep_id=SEMI), [0, 4])
    # a boundary exactly at the current start does not count: the next window goes stride on
    ids = np.array([15] * 4 + [SEMI] + [15] * 15)  # 20 tokens, one boundary at 5
    starts = windows.window_starts(ids, max_length=8, stride=5, sep_id=SEMI)
    np.testing.assert_array_equal(starts, [0, 5, 10, 15])
    assert starts.dtype == np.int64


def _default_case_ids():
    """700 tokens with boundaries at 250 and 257 only (';' at 249 and 256)."""
    ids = np.full(700, 15, dtype=np.int64)
    ids[[249, 256]] = SEMI
    return ids


def test_make_windows_defaults_are_512_tokens_stride_256_separator_26_qwen_pad_trajectory_0():
    """Starts by hand: from 0, the last boundary in (0, 256] is 250 (257 lies beyond the stride;
    with no boundary it would be 256); 250 + 512 = 762 reaches the end of 700, so that is all."""
    ids = _default_case_ids()
    w = windows.make_windows(ids.astype(np.int32))  # another integer type in: int64 out
    expected = np.full((2, 512), windows.PAD_ID, dtype=np.int64)
    expected[0] = ids[:512]
    expected[1, :450] = ids[250:]
    np.testing.assert_array_equal(w.input_ids, expected)
    np.testing.assert_array_equal(w.attention_mask, [[1] * 512, [1] * 450 + [0] * 62])
    np.testing.assert_array_equal(w.labels, np.where(expected == windows.PAD_ID, -100, expected))
    np.testing.assert_array_equal(w.trajectory, [0, 0])
    for field in w:
        assert field.dtype == np.int64
    assert windows.PAD_ID == 151643  # Qwen2.5's <|endoftext|>
    # the trajectory number given is kept, as int64 whatever integer type it came as
    tagged = windows.make_windows(ids, trajectory=np.int32(3))
    np.testing.assert_array_equal(tagged.trajectory, [3, 3])
    assert tagged.trajectory.dtype == np.int64


def _trajectory_case():
    """A scaled trajectory (85, 2) and its LLMTIME text at 2 decimals, written by hand.

    18 steps of "1.25,3.50" then 7 of "12.25,3.50" then 60 of "1.25,3.50": the step boundaries
    are 10, 20, ..., 180, 191, ..., 257, 267, ..., 847, and the text is 856 characters. Windows
    (512, stride 256): 0; the last boundary in (0, 256] is 246; from 246, the last in (246, 502]
    is 497; 497 + 512 reaches 856. A stride of 257 would pick 257, no separator 256."""
    scaled = np.array([[1.25, 3.5]] * 18 + [[12.25, 3.5]] * 7 + [[1.25, 3.5]] * 60)
    text = "1.25,3.50;" * 18 + "12.25,3.50;" * 7 + "1.25,3.50;" * 59 + "1.25,3.50"
    return scaled, text


def _expected_windows(ids, starts, max_length):
    """input_ids (W, L) by hand: ids from each start, then Qwen's pad id."""
    out = np.full((len(starts), max_length), windows.PAD_ID, dtype=np.int64)
    for row, s in zip(out, starts):
        piece = ids[s : s + max_length]
        row[: len(piece)] = piece
    return out


def test_trajectory_and_dataset_windows_defaults():
    scaled, text = _trajectory_case()
    ids = np.array(_by_hand(text))
    assert len(ids) == 856
    expected = _expected_windows(ids, [0, 246, 497], 512)
    real = expected != windows.PAD_ID
    for tok in (windows.DigitTokenizer(), _EncodingTokenizer()):
        w = windows.trajectory_windows(scaled, tok)  # defaults: 512, 256, 2 decimals, ';' from the tokenizer
        np.testing.assert_array_equal(w.input_ids, expected)
        np.testing.assert_array_equal(w.attention_mask, real.astype(np.int64))
        np.testing.assert_array_equal(w.labels, np.where(real, expected, -100))
        np.testing.assert_array_equal(w.trajectory, [0, 0, 0])
    # dataset_windows: the same windows per trajectory, numbered by trajectory
    w = windows.dataset_windows(np.stack([scaled, scaled]), windows.DigitTokenizer())
    np.testing.assert_array_equal(w.input_ids, np.concatenate([expected, expected]))
    np.testing.assert_array_equal(w.labels, np.concatenate([np.where(real, expected, -100)] * 2))
    np.testing.assert_array_equal(w.trajectory, [0, 0, 0, 1, 1, 1])
    for field in w:
        assert field.dtype == np.int64


class _OtherSeparator:
    """A tokenizer whose ';' is id 99 (and whose 26 is a digit): the separator must be asked of it."""

    def encode(self, text):
        return [99 if c == ";" else 26 if c == "9" else QWEN_IDS[c] for c in text]


def test_trajectory_windows_take_the_separator_from_the_tokenizer_and_pass_every_argument_on():
    scaled, text = _trajectory_case()
    ids = np.array([99 if c == ";" else 26 if c == "9" else QWEN_IDS[c] for c in text])
    w = windows.trajectory_windows(scaled, _OtherSeparator(), trajectory=5)
    np.testing.assert_array_equal(w.input_ids, _expected_windows(ids, [0, 246, 497], 512))
    np.testing.assert_array_equal(w.trajectory, [5, 5, 5])
    # decimals, max_length, stride and pad_id given: 3 decimals make 12-character steps
    text3 = "1.250,3.500;" * 18 + "12.250,3.500;" * 7 + "1.250,3.500;" * 59 + "1.250,3.500"
    ids3 = np.array(_by_hand(text3))
    assert len(ids3) == 1026
    for call in (lambda: windows.trajectory_windows(scaled, windows.DigitTokenizer(), 600, 300, 3, -7, 2),
                 lambda: windows.dataset_windows(scaled[None], windows.DigitTokenizer(), 600, 300, 3, -7)):
        w = call()
        # boundaries 12, ..., 216, 229, ..., 307, 319, ...: last in (0, 300] is 294; in (294, 594] is 583;
        # 583 + 600 reaches the end of the 1026 tokens
        starts = [0, 294, 583]
        expected = np.full((3, 600), -7, dtype=np.int64)
        for row, s in zip(expected, starts):
            row[: len(ids3[s : s + 600])] = ids3[s : s + 600]
        np.testing.assert_array_equal(w.input_ids, expected)
        assert w.input_ids.dtype == np.int64
        np.testing.assert_array_equal(w.labels, np.where(w.attention_mask == 1, expected, -100))


def test_dataset_windows_of_no_trajectories_are_four_empty_int64_arrays():
    for kwargs, length in (({}, 512), ({"max_length": 8}, 8)):
        w = windows.dataset_windows(np.zeros((0, 50, 2)), windows.DigitTokenizer(), **kwargs)
        assert isinstance(w, windows.Windows)
        assert [f.shape for f in w] == [(0, length)] * 3 + [(0,)]
        assert [f.dtype for f in w] == [np.dtype(np.int64)] * 4


def test_fixed_windows_every_stride_right_padded_last_one_partial():
    """Report A's windows, by hand: starts 0, 3, 6, 9 over 11 tokens, 5 long, overlapping by 2;
    no step boundary is looked for (26 in the ids is just a token)."""
    ids = [40, 41, 42, SEMI, 44, 45, 46, 47, 48, 49, 50]
    w = windows.fixed_windows(ids, max_length=5, stride=3, pad_id=-1)
    np.testing.assert_array_equal(w, [[40, 41, 42, SEMI, 44],
                                      [SEMI, 44, 45, 46, 47],
                                      [46, 47, 48, 49, 50],
                                      [49, 50, -1, -1, -1]])
    assert w.dtype == np.int64
    # the default pad is Qwen's; int32 ids in, int64 out; a window starts at every stride even
    # when the one before already reached the end
    w = windows.fixed_windows(np.array([7, 8, 9], dtype=np.int32), max_length=4, stride=2)
    np.testing.assert_array_equal(w, [[7, 8, 9, 151643], [9, 151643, 151643, 151643]])
    assert w.dtype == np.int64
    assert windows.fixed_windows([], max_length=4, stride=2).shape == (0, 4)
