"""The published protocols (data/protocols.py, the report splits and metrics) and evaluate.py --score.

Expected values are worked out by hand, taken from the reports' own saved outputs (report A's
first test series), or computed by scikit-learn, which report B called."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

import evaluate
from data import metrics, protocols, splits, windows
from qwen_min.errors import UserError
from qwen_min.loss import IGNORE_INDEX, mean_cross_entropy, mean_of_batch_means


# ---------------------------------------------------------------- splits

def test_report_a_split_is_the_one_its_saved_forecasts_were_made_on():
    s = splits.report_a_split(1000)
    assert (len(s.train), len(s.val), len(s.test)) == (700, 150, 150)
    # the data rows of the first forecasts in its results/Evaluation/InitialQwenAnalysis.json (Table 7)
    assert s.test[:8].tolist() == [32, 779, 839, 200, 134, 27, 880, 230]
    assert sorted(np.concatenate(s).tolist()) == list(range(1000))
    assert splits.report_a_split(1000, shuffled=False).test[:3].tolist() == [850, 851, 852]  # Table 9's rows


def test_report_splits_follow_the_authors_global_shuffle():
    np.random.seed(42)  # what both reports' code did, literally
    order = list(range(1000))
    np.random.shuffle(order)
    a, b = splits.report_a_split(1000), splits.report_b_split(1000)
    assert a.test.tolist() == order[850:] and b.test.tolist() == order[900:]
    np.random.seed(42)
    inner = np.arange(900)
    np.random.shuffle(inner)  # report B's training script: the 900 split again, 80/20
    assert b.train.tolist() == [order[i] for i in inner[:720]] and b.val.tolist() == [order[i] for i in inner[720:]]
    assert set(b.test) <= set(a.test)  # report B's 100 test series are all among report A's 150


# ---------------------------------------------------------------- report A's text, prompt and reading

def test_report_a_decoder_cuts_at_the_last_separator_and_rejects_bad_pairs():
    np.testing.assert_array_equal(protocols.report_a_decode("1.00,2.00;3.50,4.25;5.00,6.00"), [[1, 2], [3.5, 4.25]])
    np.testing.assert_array_equal(protocols.report_a_decode("7;1.00,2.00; ;x;3.00,4.00;"), [[1, 2], [3, 4]])  # no ',' -> skipped
    for bad in ("1.00,2.00,3.00;", "1.00,;", "1.0.0,2.00;", "a,b;"):
        with pytest.raises(ValueError):
            protocols.report_a_decode(bad)


def test_report_a_prompt_and_budget():
    assert protocols.report_a_prompt_length(999) == 499 and protocols.report_a_prompt_length(1000) == 500
    assert protocols.report_a_max_new_tokens(999) == 600  # 1.2 * 500
    assert protocols.report_a_max_new_tokens(1001) == 602  # 1.2 * 501 = 601.2: transformers runs to 602


def test_report_a_reading_keeps_the_last_h_of_the_first_n_truth_steps():
    text = ";".join(f"{i}.00,{i + 100}.00" for i in range(12)) + ";"  # 12 complete steps 0..11
    np.testing.assert_array_equal(protocols.report_a_read(text, n_truth_steps=9, h=3), [[6, 106], [7, 107], [8, 108]])
    assert protocols.report_a_read(text, n_truth_steps=9, h=10) is None  # fewer than h values: lost
    assert protocols.report_a_read(text + "1,2,3;", n_truth_steps=9, h=3) is None  # its decoder raised: lost
    truth = protocols.report_a_truth("0.10,0.20;0.30,0.40;0.50,0.60", h=2)  # the last step has no ';' and is dropped
    np.testing.assert_array_equal(truth, np.float32([[0.1, 0.2], [0.3, 0.4]]))


def test_report_a_scaling_is_p90_over_everything_in_float32():
    x = np.arange(1, 21, dtype=np.float32).reshape(1, 10, 2)  # values 1..20: P90 = 18.1, alpha = 1.81
    scaled, alpha = protocols.report_a_scaled(x)
    assert alpha.dtype == np.float32 and float(alpha) == pytest.approx(1.81, rel=1e-6)
    assert protocols.report_a_text(scaled[0])[:19] == "0.55,1.10;1.66,2.21"  # 1/1.81, 2/1.81, 3/1.81, 4/1.81
    scaled, alpha = protocols.report_a_scaled(np.arange(1, 21).reshape(1, 10, 2).tolist())  # Python ints: float64 in numpy
    assert scaled.dtype == np.float32 and alpha.dtype == np.float32  # report A's numpy computed in float32 whatever came in


def test_report_a_horizon_defaults_to_its_50_steps_and_the_decoder_names_the_bad_piece():
    text = ";".join(f"{i}.00,{i + 100}.00" for i in range(60)) + ";"  # 60 complete steps 0..59
    np.testing.assert_array_equal(protocols.report_a_truth(text)[[0, -1]], [[10, 110], [59, 159]])  # the last 50
    assert protocols.report_a_truth(text).shape == (50, 2)
    read = protocols.report_a_read(text, n_truth_steps=55)  # the first 55, then the last 50: steps 5..54
    assert read.shape == (50, 2) and read[0].tolist() == [5, 105] and read[-1].tolist() == [54, 154]
    with pytest.raises(ValueError, match=r"rejects '1.00,2.00,3.00'"):
        protocols.report_a_decode("1.00,2.00,3.00;")


# ---------------------------------------------------------------- report B's prompt and reading

def test_report_b_prompt_scales_each_context_by_its_own_p95():
    text, scale = protocols.report_b_prompt(np.float32([[1, 2], [3, 4]]))  # P95 of 1..4 = 3.85
    assert scale == pytest.approx(3.85) and text == "0.26,0.52;0.78,1.04;"
    assert protocols.report_b_prompt(np.zeros((2, 2), np.float32)) == ("0.00,0.00;0.00,0.00;", 1.0)


def test_report_b_reading_takes_regex_pairs_and_pads_with_zeros():
    values, found = protocols.report_b_read("0.50,1.00;junk 0.25,0.75\n-1.00,2.00;3", scale=2.0, h=4)
    assert found == 3
    np.testing.assert_array_equal(values, [[1, 2], [0.5, 1.5], [-2, 4], [0, 0]])
    values, found = protocols.report_b_read("0.50,1.00;", scale=1.0)  # report B's horizon: 20 steps
    assert found == 1 and values.shape == (20, 2) and values[0].tolist() == [0.5, 1.0] and not values[1:].any()


def test_report_b_budget_is_ten_tokens_for_each_of_h_plus_10_steps():
    assert protocols.report_b_max_new_tokens(20) == 300  # its scripts: (20 + 10) * 10
    assert protocols.report_b_max_new_tokens(5) == 150


# ---------------------------------------------------------------- metrics

def test_report_a_per_step_by_hand():
    truth = np.array([[[1.0, 0.0], [2.0, 4.0]], [[3.0, 2.0], [2.0, 4.0]]])  # (N=2, h=2, 2)
    pred = np.array([[[1.5, 1.0], [2.0, 4.0]], [[2.0, 1.0], [3.0, 2.0]]])
    r = metrics.report_a_per_step(pred, truth)
    assert r["mae"]["prey"]["mean"].tolist() == [0.75, 0.5]  # step 0: |0.5|, |1.0|
    assert r["mae"]["prey"]["se"][0] == pytest.approx(0.25)  # std(0.5, 1.0; ddof 1) = 0.3536, / sqrt 2
    assert r["mape"]["predator"]["mean"][0] == pytest.approx((100 / 1e-8 + 50) / 2)  # t = 0 divides by 1e-8
    assert r["mape"]["predator"]["mean"][1] == pytest.approx(25.0)


def test_report_b_overall_equals_scikit_learn():
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.1, 5, (7, 4, 2))
    pred = truth + rng.normal(0, [0.3, 1.0], (7, 4, 2))
    t, p = truth.reshape(-1, 2), pred.reshape(-1, 2)
    got = metrics.report_b_overall(pred, truth)
    assert got["mse"] == pytest.approx(mean_squared_error(t, p)) and got["rmse"] == pytest.approx(math.sqrt(mean_squared_error(t, p)))
    assert got["mae"] == pytest.approx(mean_absolute_error(t, p))
    assert got["r2"] == pytest.approx(r2_score(t, p))  # the mean of the two species' R2
    assert got["r2"] != pytest.approx(metrics.point_metrics(pred, truth)["r2"])  # not our pooled R2
    assert got["nrmse"] == pytest.approx(100 * math.sqrt(mean_squared_error(t, p)) / (t.max() - t.min()))
    assert got["mape"] == pytest.approx(100 * np.mean(np.abs(t - p) / (np.abs(t) + 1e-10)))
    flat = np.ones((1, 3, 2))  # a constant species: scikit-learn's force_finite gives 1 if exact, else 0
    assert metrics.report_b_overall(flat, flat)["r2"] == r2_score(flat[0], flat[0]) == 1.0
    assert metrics.report_b_overall(flat + [0, 1], flat)["r2"] == pytest.approx(r2_score(flat[0], flat[0] + [0, 1]))


def test_report_b_sample_point_is_the_mean_and_uncertainty_the_std():
    """Three skewed samples, so the mean and the median differ: prey {0, 1, 4}, predator {2, 2, 8}."""
    samples = np.array([[[[0.0, 2.0]], [[1.0, 2.0]], [[4.0, 8.0]]]])  # (N=1, S=3, h=1, 2)
    np.testing.assert_allclose(protocols.point_forecast(protocols.REPORT_B, samples), [[[5 / 3, 4.0]]])  # mean
    np.testing.assert_allclose(protocols.point_forecast(protocols.OURS, samples), [[[1.0, 2.0]]])  # median
    s = protocols.score(protocols.REPORT_B, samples.mean(1), np.zeros((1, 1, 2)) + 1, samples)
    # std with ddof 0: prey sqrt(((5/3)^2 + (2/3)^2 + (7/3)^2) / 3) = sqrt(26) / 3, predator sqrt((4 + 4 + 16) / 3) = sqrt(8)
    assert s["published"]["overall"]["avg_uncertainty"] == pytest.approx((math.sqrt(26) / 3 + math.sqrt(8)) / 2)


# Two samples per value, one series, one step: prey {0, 2} against truth 1, predator {1, 5} against 4.5.
TWO = np.array([[[[0.0, 1.0]], [[2.0, 5.0]]]])  # (N=1, S=2, h=1, 2)
TWO_TRUTH = np.array([[[1.0, 4.5]]])


def test_score_adds_crps_and_coverage_for_ours_with_two_or_more_samples():
    point = np.array([[[1.0, 3.0]]])
    s = protocols.score(protocols.OURS, point, TWO_TRUTH, TWO)
    assert s["overall"]["mae"] == pytest.approx(0.75)  # |1 - 1|, |3 - 4.5|
    p = s["probabilistic"]
    # CRPS = E|X - y| - E|X - X'| / 2: prey (1 + 1) / 2 - (0 + 2 + 2 + 0) / 4 / 2 = 0.5; predator (3.5 + 0.5) / 2 - 4 / 2 / 2 = 1
    assert p["crps"] == pytest.approx(0.75)
    assert p["crps_per_step"]["prey"].tolist() == pytest.approx([0.5]) and p["crps_per_step"]["predator"].tolist() == pytest.approx([1.0])
    # linear quantiles of two samples: prey 50% [0.5, 1.5] holds 1, predator 50% [2, 4] misses 4.5, 90% [1.2, 4.8] holds it
    assert (p["coverage_50"], p["coverage_90"]) == (pytest.approx(0.5), pytest.approx(1.0))
    assert "probabilistic" not in protocols.score(protocols.OURS, point, TWO_TRUTH)  # no samples
    assert "probabilistic" not in protocols.score(protocols.OURS, point, TWO_TRUTH, TWO[:, :1])  # one sample has no spread
    a = protocols.score(protocols.REPORT_A, point, TWO_TRUTH, TWO)  # a report's table has no CRPS
    assert "probabilistic" not in a and set(a["published"]) == {"per_step"}


def test_report_b_uncertainty_needs_two_or_more_samples():
    point = TWO.mean(1)
    s = protocols.score(protocols.REPORT_B, point, TWO_TRUTH, TWO)
    assert s["published"]["overall"]["avg_uncertainty"] == pytest.approx(1.5)  # std (ddof 0): prey 1, predator 2
    assert "probabilistic" not in s
    one = protocols.score(protocols.REPORT_B, point, TWO_TRUTH, TWO[:, :1])
    assert "avg_uncertainty" not in one["published"]["overall"]


# ---------------------------------------------------------------- report A's cross-entropy convention

class Bigram(torch.nn.Module):
    """A model whose logits depend on the current token only: logits = TABLE[token]."""

    TABLE = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.5, 0.5, 3.0]])
    config = type("cfg", (), {"vocab_size": 3})

    def body(self, ids):
        return ids

    def head(self, h, vocab_ids=None):
        return self.TABLE[h]


def test_report_a_cross_entropy_counts_padding_and_averages_windows():
    lp = np.log(np.exp(Bigram.TABLE.numpy()) / np.exp(Bigram.TABLE.numpy()).sum(1, keepdims=True))
    nll = lambda a, b: -lp[a, b]
    short = torch.tensor([[1, 2, 0, 0]])  # 0 is padding here
    full = torch.tensor([[2, 1, 2, 2]])
    window_means = [(nll(1, 2) + nll(2, 0) + nll(0, 0)) / 3, (nll(2, 1) + nll(1, 2) + nll(2, 2)) / 3]
    got = mean_of_batch_means(Bigram(), [(short, short), (full, full)])  # labels = input_ids: padding scored
    assert got == pytest.approx(np.mean(window_means))
    masked = torch.where(short == 0, IGNORE_INDEX, short)
    ours, tokens = mean_cross_entropy(Bigram(), [(short, masked), (full, full)])  # ours: per token, padding masked
    assert tokens == 4 and ours == pytest.approx((nll(1, 2) + nll(2, 1) + nll(1, 2) + nll(2, 2)) / 4)
    assert F.cross_entropy(Bigram.TABLE[[1]], torch.tensor([2])).item() == pytest.approx(nll(1, 2))


def test_report_a_windows_start_every_stride_tokens():
    w = windows.fixed_windows(np.arange(10), max_length=4, stride=4, pad_id=-1)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -1, -1]]


# ---------------------------------------------------------------- --score

SIM = ["--n-series", "40", "--plots", "0", "--no-baselines"]


def truth_of(preset, rows):
    args = evaluate.parse_args(["--preset", preset, *SIM])
    traj, _, _, test = evaluate.load_series(args)
    return evaluate.Series(args, traj, test if rows is None else rows).truth, test


def test_score_a_perfect_and_a_shifted_forecast_under_report_b(tmp_path):
    truth, test = truth_of("report-b", None)  # 4 test series of 40: int(0.9 * 40) = 36 train
    assert len(test) == 4
    json_file = tmp_path / "f.json"
    json_file.write_text(json.dumps({"forecast": truth.tolist()}))
    res = evaluate.main(["--preset", "report-b", *SIM, "--score", str(json_file), "--out", str(tmp_path / "a")])
    b = res["results"]["model"]["published"]["overall"]
    assert b["mse"] == 0 and b["r2"] == 1 and res["truth_check"]["same_series"]
    np.savez(tmp_path / "f.npz", forecast=truth + 1.0, truth=truth + 1.0, series=test)
    res = evaluate.main(["--preset", "report-b", *SIM, "--score", str(tmp_path / "f.npz"), "--out", str(tmp_path / "b")])
    assert res["results"]["model"]["published"]["overall"]["mse"] == 0  # scored against the file's own truth
    assert not res["truth_check"]["truth_matches_protocol"] and res["truth_check"]["truth_max_abs_difference"] == pytest.approx(1.0)
    np.savez(tmp_path / "g.npz", forecast=truth + 1.0)
    res = evaluate.main(["--preset", "report-b", *SIM, "--score", str(tmp_path / "g.npz"), "--out", str(tmp_path / "c")])
    b = res["results"]["model"]["published"]["overall"]
    assert (b["mse"], b["mae"]) == (pytest.approx(1.0), pytest.approx(1.0))
    saved = json.loads((tmp_path / "c" / "results.json").read_text())
    assert saved["results"]["model"]["published"]["overall"]["mae"] == pytest.approx(1.0) and saved["series"]["index"] == test.tolist()


def test_score_report_a_on_rows_outside_its_test_split(tmp_path):
    rows = np.arange(3)
    truth, test = truth_of("report-a", rows)
    np.savez(tmp_path / "a.npz", forecast=truth + 0.5, series=rows)
    res = evaluate.main(["--preset", "report-a", *SIM, "--score", str(tmp_path / "a.npz"), "--out", str(tmp_path / "o")])
    step = res["results"]["model"]["published"]["per_step"]["mae"]["prey"]["mean"]
    assert step == pytest.approx([0.5] * 50) and res["config"]["units"] == "scaled"
    assert not res["truth_check"]["same_series"] and res["truth_check"]["in_test_split"] == int(np.isin(rows, test).sum())


def bad_files(tmp_path, n, h):
    ok = np.ones((n, h, 2)).tolist()
    cases = {
        "missing.json": None,
        "list.json": json.dumps([1, 2]),
        "nokey.json": json.dumps({"truth": ok}),
        "shape.json": json.dumps({"forecast": np.ones((n, h + 1, 2)).tolist()}),
        "ragged.json": json.dumps({"forecast": [[[1, 2]], [[1, 2], [3, 4]]]}),
        "nan.json": json.dumps({"forecast": ok}).replace("1.0", "NaN", 1),
        "count.json": json.dumps({"forecast": np.ones((n + 1, h, 2)).tolist()}),
        "truthshape.json": json.dumps({"forecast": ok, "truth": ok[:1]}),
        "series.json": json.dumps({"forecast": ok, "series": [0] * n}),
        "range.json": json.dumps({"forecast": ok, "series": list(range(10**6, 10**6 + n))}),
        "text.json": "forecast: 1, 2",
        "forecasts.csv": "1,2",
        "garbage.npz": "not a zip",
    }
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
    np.savez(tmp_path / "pickled.npz", forecast=np.array([{"a": 1}], dtype=object))
    return [*cases, "pickled.npz"]


def test_read_score_file_gives_float64_values_and_int64_rows(tmp_path):
    f = tmp_path / "one.json"  # one series (N = 1), integers in JSON
    f.write_text(json.dumps({"forecast": [[[1, 2], [3, 4]]], "truth": [[[5, 6], [7, 8]]], "series": [3]}))
    forecast, truth, series = protocols.read_score_file(f, h=2, n_rows=4)  # row 3 is the last of 4
    assert forecast.dtype == np.float64 and forecast.tolist() == [[[1, 2], [3, 4]]]
    assert truth.dtype == np.float64 and truth.tolist() == [[[5, 6], [7, 8]]]
    assert series.dtype == np.int64 and series.tolist() == [3]
    np.savez(tmp_path / "f.npz", forecast=np.float32([[[0.5, 1.5]], [[2.5, 3.5]]]), series=np.int32([1, 0]))
    forecast, truth, series = protocols.read_score_file(tmp_path / "f.npz", h=1, n_rows=None)
    assert forecast.dtype == np.float64 and forecast.tolist() == [[[0.5, 1.5]], [[2.5, 3.5]]] and truth is None
    assert series.dtype == np.int64 and series.tolist() == [1, 0]
    f.write_text(json.dumps({"forecast": [[[1, 2]]], "truth": None, "series": None}))  # null: as if absent
    assert protocols.read_score_file(f, h=1, n_rows=4)[1:] == (None, None)


def test_a_json_score_file_is_read_as_utf8_whatever_the_locale(tmp_path):
    import locale

    f = tmp_path / "s.json"
    f.write_bytes(json.dumps({"forecast": [[[1, 2]]], "model": "café"}, ensure_ascii=False).encode("utf-8"))
    before = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")  # an ASCII locale, as on a bare server (in Python's UTF-8 mode any file reads as UTF-8)
    try:
        assert protocols.read_score_file(f, h=1, n_rows=None)[0].tolist() == [[[1, 2]]]
    finally:
        locale.setlocale(locale.LC_CTYPE, before)


def test_read_score_file_messages_name_the_file_the_key_and_the_fix(tmp_path):
    def refused(data, h=2, n_rows=4, name="s.json"):
        f = tmp_path / name
        if isinstance(data, bytes):
            f.write_bytes(data)
        elif isinstance(data, str):
            f.write_text(data)
        elif name.endswith(".json"):
            f.write_text(json.dumps(data))
        else:
            np.savez(f, **data)
        with pytest.raises(UserError) as e:
            protocols.read_score_file(f, h=h, n_rows=n_rows)
        assert str(f) in str(e.value)
        return str(e.value)

    ok = np.ones((2, 2, 2)).tolist()
    assert "holds a JSON list, not an object" in refused([1, 2])
    for broken in (b"", b"PK\x03\x04 cut short"):  # empty, and a zip's signature with nothing after it
        assert "is not a readable .npz archive; write it with np.savez" in refused(broken, name="g.npz")
    assert "`forecast` is shaped (2, 3, 2), but this protocol scores (N, 2, 2)" in refused({"forecast": np.ones((2, 3, 2)).tolist()})
    assert "`truth` is shaped (2, 1, 2), but" in refused({"forecast": ok, "truth": np.ones((2, 1, 2)).tolist()})
    assert "`truth` holds NaN" in refused({"forecast": ok, "truth": [[[1, 1], [1, float("nan")]]] * 2})
    assert "`forecast` is shaped (0, 2, 2)" in refused({"forecast": np.ones((0, 2, 2))}, name="empty.npz")  # no series at all
    # `series`: one distinct integer row per forecast, each below the data file's row count
    rows = "`series` must be 2 integer row indices (one per forecast)"
    assert refused({"forecast": ok, "series": [[0], [1, 2]]}).endswith(f"{rows}, got shape (0,) of object.")  # ragged
    assert refused({"forecast": ok, "series": [0.0, 1.0]}).endswith(f"{rows}, got shape (2,) of float64.")  # right length, floats
    assert refused({"forecast": ok, "series": [0]}).endswith(f"{rows}, got shape (1,) of int64.")  # integers, too few
    assert "`series` must name distinct rows in 0..3 of the data file" in refused({"forecast": ok, "series": [0, 4]})
    assert "`series` must name distinct rows in 0..N-1 of the data file" in refused({"forecast": ok, "series": [0, -1]}, n_rows=None)


def test_an_npz_that_is_no_zip_is_called_unreadable(tmp_path):  # np.load alone would read these as a pickle, or an array
    (tmp_path / "text.npz").write_text("forecast: 1, 2")
    np.save(tmp_path / "array.npy", np.ones((1, 2, 2)))
    (tmp_path / "array.npy").rename(tmp_path / "array.npz")  # one .npy array under an .npz name
    for name in ("text.npz", "array.npz"):
        with pytest.raises(UserError, match="is not a readable .npz archive"):
            protocols.read_score_file(tmp_path / name, h=2, n_rows=None)


def test_bad_score_files_get_one_sentence(tmp_path, capsys):
    for name in bad_files(tmp_path, 4, 20):
        with pytest.raises(UserError) as e:
            evaluate.main(["--preset", "report-b", *SIM, "--score", str(tmp_path / name), "--out", str(tmp_path / "o")])
        message = str(e.value)
        assert "--score" in message and "\n" not in message and message.count(". ") <= 1, (name, message)
    with pytest.raises(SystemExit) as e:  # through the entry point: one line on stderr, exit 2
        evaluate.run_cli(evaluate.main, ["--preset", "report-b", *SIM, "--score", str(tmp_path / "pickled.npz")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --score")
