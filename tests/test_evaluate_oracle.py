"""evaluate.py end to end with an oracle forecaster: generation writes the true continuation (or the
truth plus a designed error), so every metric in results.json has a value known by hand.

The tiny random checkpoint writes only one digit, so these tests replace the one generation call
evaluate.py makes (`evaluate.generate`) by the oracle; everything around it runs for real: the
data file, the split, the scaling and the prompts, the decode batches, the reading of the text,
the point forecast from samples, the metrics and results.json.

The data are built so that nothing rounds: every value is a multiple of 0.25 (exact in float32
and in two decimals) times a power of two, and every scale is a power of two or 1 (ours: the
largest value, --percentile 100; report B: each context's 95th percentile, 1). The oracle then
reads the truth back exactly, and a designed error comes back exactly.
"""

import json

import numpy as np
import pytest
import torch

import evaluate
from conftest import fake_generation, random_model, tiny_config, write_checkpoint
from data import lotka_volterra, splits
from qwen_min import Tokenizer

SAMPLE_OFFSETS = (0.0, 4.0, 1.0)  # sample s adds this to every prey value: median 1, mean 5/3


def text_of(values):
    """Steps (n, 2) -> "a,b;a,b;" at two decimals: the encoding both protocols use here (scale 1)."""
    return "".join(f"{a:.2f},{b:.2f};" for a, b in values)


def write_data(path, n, steps, top, forced):
    """n series of `steps` steps, values in {0.25, 0.5, ..., top}, the first `forced` steps (top, top).
    Returns the trajectories (n, steps, 2) float64 (exactly the file's float32 values)."""
    rng = np.random.default_rng(0)
    traj = 0.25 * rng.integers(1, int(4 * top) + 1, size=(n, steps, 2))
    traj[:, :forced] = top
    lotka_volterra.save(path, traj, np.linspace(0.0, 1.0, steps))
    return traj


class Oracle:
    """Stands in for qwen_min.generate: continues each prompt with the truth of the series whose
    context it encodes, plus error(row, sample) (h, 2), in scaled units: series r's values divided
    by scale[r] (default 1), formatted as `text_of` writes them."""

    def __init__(self, tok, traj, k, h, error, scale=None):
        self.tok, self.traj, self.k, self.h, self.error = tok, traj, k, h, error
        self.scale = np.ones(len(traj)) if scale is None else scale
        self.row_of = {text_of(x[:k] / c): r for r, (x, c) in enumerate(zip(traj, self.scale))}  # every series' prompt, by hand
        self.batches, self.settings = [], []  # per call: the number of prompts, the decoding keywords

    def __call__(self, model, prompts, max_new_tokens, num_samples=1, pad_token_id=0, details=False, **settings):
        self.batches.append(len(prompts))
        self.settings.append(settings | {"num_samples": num_samples})
        out = []
        for p in prompts:
            r = self.row_of[self.tok.decode(p)]  # KeyError: the prompt is not the series' context as encoded by hand
            for s in range(num_samples):
                new = self.tok.encode(text_of(self.traj[r, self.k : self.k + self.h] / self.scale[r] + self.error(r, s)))
                assert len(new) <= max_new_tokens  # the oracle needs no more tokens than evaluate.py allows
                out.append((p, new))
        return fake_generation([p for p, _ in out], [new for _, new in out], pad_token_id, details)


SIZE = 2.0 ** (np.arange(40) % 3)  # series r of `ours` is 1, 2 or 4 times a series whose largest value is 10


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A tiny checkpoint and 40 series of 10 steps: series r holds multiples of 0.25 up to 10, step 0
    (10, 10), times SIZE[r]. Global scaling at --percentile 100 --scale-target 40 is the identity;
    per-series scaling at --scale-target 10 divides series r by SIZE[r]."""
    folder = tmp_path_factory.mktemp("oracle_ours")
    ckpt = write_checkpoint(random_model(tiny_config()), folder / "ckpt")
    traj = write_data(folder / "lv.h5", n=40, steps=10, top=10.0, forced=1) * SIZE[:, None, None]
    lotka_volterra.save(folder / "lv.h5", traj, np.linspace(0.0, 1.0, 10))
    return ckpt, folder / "lv.h5", traj


@pytest.fixture(scope="module")
def report_b(tmp_path_factory):
    """A tiny checkpoint with room for report B's 510-token prompts + 300 new tokens, and 40 series of
    71 steps: series r holds multiples of 0.25 up to 1, the first 8 steps (1, 1), times SIZE[r]; so
    the 95th percentile of its context (values 96 and 97 of 102, sorted) is SIZE[r], its scale."""
    folder = tmp_path_factory.mktemp("oracle_b")
    ckpt = write_checkpoint(random_model(tiny_config(max_seq_len=1024)), folder / "ckpt")
    traj = write_data(folder / "lv.h5", n=40, steps=71, top=1.0, forced=8) * SIZE[:, None, None]
    lotka_volterra.save(folder / "lv.h5", traj, np.linspace(0.0, 1.0, 71))
    return ckpt, folder / "lv.h5", traj


K, H = 6, 4  # ours: 6 steps of context, 4 forecast


def run_ours(ours, tmp_path, monkeypatch, error, flags, scaling="global"):
    ckpt, data, traj = ours
    scale, target = (None, "40") if scaling == "global" else (SIZE, "10")
    oracle = Oracle(Tokenizer.from_pretrained(ckpt), traj, K, H, error, scale)
    monkeypatch.setattr(evaluate, "generate", oracle)
    res = evaluate.main(["--model", str(ckpt), "--data", str(data), "--k", str(K), "--h", str(H), "--percentile", "100",
                         "--scaling", scaling, "--scale-target", target, "--no-ce", "--no-baselines", "--plots", "0",
                         "--out", str(tmp_path), *flags])
    rows = np.array(res["series"]["index"])
    assert rows.tolist() == splits.split(40, seed=0).test.tolist()  # 6 series: 28 / 6 / 6 of 40
    saved = json.loads((tmp_path / "results.json").read_text())
    return res, saved, oracle, traj[rows, K : K + H]


def test_oracle_forecasts_score_zero_over_several_decode_batches(ours, tmp_path, monkeypatch):
    res, saved, oracle, truth = run_ours(ours, tmp_path, monkeypatch, lambda r, s: 0.0, ["--batch", "4"])
    assert oracle.batches == [4, 2]  # two decode batches, the second partial
    np.testing.assert_array_equal(np.array(saved["series"]["forecasts"]["model"]), truth)
    overall = res["results"]["model"]["overall"]
    assert (overall["mse"], overall["mae"], overall["mape"], overall["wape"], overall["r2"]) == (0, 0, 0, 0, 1)
    step = res["results"]["model"]["per_step"]["mae"]
    assert [list(step[sp]["mean"]) for sp in ("prey", "predator")] == [[0.0] * H] * 2
    assert res["repairs"]["forecasts_repaired"] == 0 and res["repairs"]["forecasts"] == 6


@pytest.mark.parametrize("scaling", ["global", "per-series"])
def test_a_known_error_per_series_and_step_is_scored_exactly(ours, tmp_path, monkeypatch, scaling):
    """Row r's prey at step j is off by 0.25 (1 + (r + j) % 3), its predator by 0.5 at step 0 only
    (scaled units; times the series' scale in original units): every series and step has its own
    error, so a forecast scored against another series' truth or unscaled with another series'
    scale, or one batch's forecasts written over another's, changes the numbers."""
    def error(r, s):
        e = np.zeros((H, 2))
        e[:, 0] = 0.25 * (1 + (r + np.arange(H)) % 3)
        e[0, 1] = 0.5
        return e

    res, saved, oracle, truth = run_ours(ours, tmp_path, monkeypatch, error, ["--batch", "4"], scaling)
    rows = res["series"]["index"]
    scale = np.ones(40) if scaling == "global" else SIZE
    E = np.stack([error(r, 0) * scale[r] for r in rows])  # (6, H, 2): the error of each scored series, original units
    assert len(set(SIZE[rows])) == 3  # the scored series come in all three sizes
    np.testing.assert_array_equal(np.array(saved["series"]["forecasts"]["model"]), truth + E)
    overall = res["results"]["model"]["overall"]
    assert overall["mae"] == pytest.approx(np.abs(E).mean(), rel=1e-12)
    assert overall["mse"] == pytest.approx((E ** 2).mean(), rel=1e-12)
    assert overall["mape"] == pytest.approx((100 * np.abs(E) / truth).mean(), rel=1e-12)
    step = res["results"]["model"]["per_step"]["mae"]
    np.testing.assert_allclose(step["prey"]["mean"], E[:, :, 0].mean(0), rtol=1e-12)
    np.testing.assert_allclose(step["predator"]["mean"], [E[:, 0, 1].mean(), 0, 0, 0], rtol=1e-12)
    np.testing.assert_allclose(step["prey"]["se"], E[:, :, 0].std(0, ddof=1) / np.sqrt(6), rtol=1e-12)


def test_samples_are_summarised_by_their_median(ours, tmp_path, monkeypatch):
    """Three samples per series, prey + 0, + 4, + 1: the median is the truth + 1 (the mean would be
    + 5/3); decoded two series per batch (--batch 6 // 3 samples), three batches, each with the
    decoding flags given, over the 13 LLMTIME characters, up to H separators, no generation config."""
    res, saved, oracle, truth = run_ours(ours, tmp_path, monkeypatch, lambda r, s: np.array([SAMPLE_OFFSETS[s], 0.0]),
                                         ["--batch", "6", "--samples", "3", "--temperature", "0.5", "--top-k", "3",
                                          "--top-p", "0.9"])
    assert oracle.batches == [2, 2, 2]
    tok = Tokenizer.from_pretrained(ours[0])
    alphabet = sorted(tok.encode(c)[0] for c in "0123456789.,;")
    for s in oracle.settings:
        assert (s["temperature"], s["top_k"], s["top_p"], s["num_samples"], s["stop_after"]) == (0.5, 3, 0.9, 3, (tok.encode(";")[0], H))
        assert sorted(s["allowed_token_ids"]) == alphabet and s["use_generation_config"] is False and s["repetition_penalty"] == 1.0
    assert len({s["seed"] for s in oracle.settings}) == 3  # each batch its own draws
    np.testing.assert_array_equal(np.array(saved["series"]["forecasts"]["model"]), truth + [1.0, 0.0])
    model = res["results"]["model"]
    assert model["overall"]["mae"] == 0.5 and model["overall"]["mse"] == 0.5  # prey off by 1, predator exact
    # CRPS of prey samples {t, t+4, t+1}: mean |x - t| = 5/3, minus sum_ij |x_i - x_j| / (2 * 9) = 16/18; predator 0
    p = model["probabilistic"]
    assert p["crps"] == pytest.approx((5 / 3 - 16 / 18) / 2, rel=1e-12)
    # the central 50% and 90% intervals of the prey samples start above the truth; the predator's hold it
    assert p["coverage_50"] == 0.5 and p["coverage_90"] == 0.5
    q = np.array(saved["series"]["quantiles"]["values"])  # (5, N, h, 2) at 5, 25, 50, 75, 95%
    # linear quantiles of {0, 1, 4}: positions 0.1, 0.5, 1, 1.5, 1.9 between the sorted samples
    np.testing.assert_allclose(q[..., 0] - truth[None, ..., 0], np.broadcast_to(np.array([0.1, 0.5, 1.0, 2.5, 3.7])[:, None, None], q.shape[:3]), atol=1e-12)
    np.testing.assert_allclose(q[..., 1], np.broadcast_to(truth[..., 1], q.shape[:3]), atol=0)


def run_report_b(report_b, tmp_path, monkeypatch, error, flags):
    ckpt, data, traj = report_b
    oracle = Oracle(Tokenizer.from_pretrained(ckpt), traj, 51, 20, error, SIZE)
    monkeypatch.setattr(evaluate, "generate", oracle)
    res = evaluate.main(["--model", str(ckpt), "--data", str(data), "--preset", "report-b", "--no-baselines", "--plots", "0",
                         "--out", str(tmp_path), *flags])
    rows = np.array(res["series"]["index"])
    assert rows.tolist() == np.random.RandomState(42).permutation(40)[36:].tolist()  # its last 10% of the shuffled file
    assert len(set(SIZE[rows])) > 1  # with different scales
    return res, oracle, traj[rows, 51:71]


def test_report_b_oracle_scores_zero_and_a_known_error_exactly(report_b, tmp_path, monkeypatch):
    res, oracle, truth = run_report_b(report_b, tmp_path / "exact", monkeypatch, lambda r, s: 0.0, ["--batch", "3"])
    assert oracle.batches == [3, 1]
    np.testing.assert_array_equal(np.array(res["series"]["forecasts"]["model"]), truth)
    published = res["results"]["model"]["published"]["overall"]
    assert (published["mse"], published["mae"], published["mape"], published["r2"]) == (0, 0, 0, 1)

    def error(r, s):  # series r's prey is off by 0.25 (1 + r % 5) at every step, scaled units
        return np.array([0.25 * (1 + r % 5), 0.0])

    res, oracle, truth = run_report_b(report_b, tmp_path / "off", monkeypatch, error, ["--batch", "3"])
    E = np.stack([np.broadcast_to(error(r, 0) * SIZE[r], (20, 2)) for r in res["series"]["index"]])  # (4, 20, 2) original units
    published = res["results"]["model"]["published"]["overall"]
    assert published["mae"] == pytest.approx(np.abs(E).mean(), rel=1e-12)  # both species pooled, equal counts
    assert published["mse"] == pytest.approx((E ** 2).mean(), rel=1e-12)
    assert res["results"]["model"]["overall"]["mae"] == pytest.approx(np.abs(E).mean(), rel=1e-12)


def test_report_b_samples_are_summarised_by_their_mean(report_b, tmp_path, monkeypatch):
    """Report B took the mean of its samples: prey + 0, + 4, + 1 (scaled units) gives the truth + 5/3
    times the series' scale (the median would give + 1); its "Avg. Unc." is the mean over values of
    the samples' std (ddof 0)."""
    res, oracle, truth = run_report_b(report_b, tmp_path, monkeypatch, lambda r, s: np.array([SAMPLE_OFFSETS[s], 0.0]),
                                      ["--batch", "6", "--samples", "3"])
    assert oracle.batches == [2, 2]
    size = SIZE[res["series"]["index"]][:, None]  # (4, 1)
    np.testing.assert_allclose(np.array(res["series"]["forecasts"]["model"])[..., 0], truth[..., 0] + 5 / 3 * size, rtol=1e-12)
    np.testing.assert_array_equal(np.array(res["series"]["forecasts"]["model"])[..., 1], truth[..., 1])
    published = res["results"]["model"]["published"]["overall"]
    assert published["mae"] == pytest.approx(5 / 6 * size.mean(), rel=1e-12)
    # prey std of {0, 4, 1} (mean 5/3) = sqrt((25 + 49 + 4) / 27) = sqrt(26) / 3, times the scale; predator 0
    assert published["avg_uncertainty"] == pytest.approx(np.sqrt(26) / 6 * size.mean(), rel=1e-12)
