"""The simulator (against a fine-step solve and the closed-orbit invariant) and the file reader."""

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from data import lotka_volterra
from data.h5file import DataFileError, DataFileNotFoundError
from qwen_min.errors import UserError

REAL_FILE = Path(os.environ.get("QWEN_MIN_DATA", Path(__file__).resolve().parents[2] / "shared/data/lotka_volterra_data.h5"))


def test_simulate_layout_and_determinism():
    traj, t = lotka_volterra.simulate(8, seed=3)
    assert traj.shape == (8, 100, 2) and traj.dtype == np.float32
    assert t.shape == (100,) and t.dtype == np.float64
    assert t[0] == 0.0 and t[-1] == 200.0 and np.allclose(np.diff(t), 200 / 99)
    assert (traj > 0).all()
    np.testing.assert_array_equal(traj, lotka_volterra.simulate(8, seed=3)[0])
    assert not np.array_equal(traj, lotka_volterra.simulate(8, seed=4)[0])
    ic = traj[:, 0]
    assert ((ic >= 0.8) & (ic <= 1.2)).all()


def test_integrator_matches_a_ten_times_finer_solve():
    params, initial = lotka_volterra.sample_params(50, np.random.default_rng(0))
    t = lotka_volterra.time_grid()
    coarse = lotka_volterra.integrate(params, initial, t)  # the default 40 substeps
    fine = lotka_volterra.integrate(params, initial, t, substeps=400)
    assert np.abs(coarse / fine - 1).max() < 1e-6


def test_integrator_keeps_the_lotka_volterra_invariant():
    # V = delta x - gamma ln x + beta y - alpha ln y is constant along exact orbits.
    params, initial = lotka_volterra.sample_params(50, np.random.default_rng(1))
    x = lotka_volterra.integrate(params, initial, lotka_volterra.time_grid())
    alpha, beta, delta, gamma = (p[:, None] for p in params.T)
    prey, pred = x[..., 0], x[..., 1]
    v = delta * prey - gamma * np.log(prey) + beta * pred - alpha * np.log(pred)
    assert np.abs(v - v[:, :1]).max() < 1e-7


def test_integrator_follows_a_known_solution():
    # At the equilibrium (gamma / delta, alpha / beta) populations do not move.
    params = np.array([[0.2, 0.4, 0.1, 0.3]])
    x = lotka_volterra.integrate(params, [[3.0, 0.5]], lotka_volterra.time_grid())
    np.testing.assert_allclose(x[0], np.tile([3.0, 0.5], (100, 1)), rtol=1e-12)


@pytest.mark.skipif(not REAL_FILE.is_file(), reason="coursework data file not present")
def test_simulated_data_look_like_the_coursework_file():
    real, _ = lotka_volterra.load(REAL_FILE)
    sim, _ = lotka_volterra.simulate(1000, seed=0)
    a, b = lotka_volterra.summary(real), lotka_volterra.summary(sim)
    for key in ("p50", "p95", "p99", "mean", "prey p95"):
        assert abs(b[key] / a[key] - 1) < 0.1, key
    assert abs(b["cycles per window, mean"] - a["cycles per window, mean"]) < 0.5


def test_save_then_load_round_trips(tmp_path):
    traj, t = lotka_volterra.simulate(4, seed=0)
    lotka_volterra.save(tmp_path / "lv.h5", traj, t)
    traj2, t2 = lotka_volterra.load(tmp_path / "lv.h5")
    np.testing.assert_array_equal(traj, traj2)
    np.testing.assert_array_equal(t, t2)


def test_compare_cli_prints_the_table(tmp_path, capsys):
    """The file (seed 5) beside a simulation of another seed (6): each column holds its own data's
    percentiles, computed here with numpy and printed to 4 significant digits."""
    traj, t = lotka_volterra.simulate(20, seed=5)
    lotka_volterra.save(tmp_path / "lv.h5", traj, t)
    lotka_volterra.main(["--compare", str(tmp_path / "lv.h5"), "-n", "20", "--seed", "6"])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "| statistic | real file | simulated |" and "| cycles per window, mean |" in out
    other = lotka_volterra.simulate(20, seed=6)[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]] for line in out.splitlines()[2:]}
    both = slice(None)
    for name, q, cut in (("p95", 95, both), ("p50", 50, both), ("prey p95", 95, 0), ("predator p50", 50, 1)):
        expected = [f"{np.percentile(x[..., cut].astype(np.float64), q):.4g}" for x in (traj, other)]
        assert expected[0] != expected[1] and rows[name] == expected, name


def _write(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f.create_dataset(name, data=value)
    return path


GOOD = np.ones((3, 5, 2), np.float32)
TIME = np.linspace(0, 1, 5)


@pytest.mark.parametrize(
    "datasets, message",
    [
        ({"time": TIME}, "no 'trajectories' dataset"),
        ({"trajectories": GOOD}, "no 'time' dataset"),
        ({"trajectories": np.ones((3, 5), np.float32), "time": TIME}, "has shape (3, 5)"),
        ({"trajectories": np.ones((3, 5, 3), np.float32), "time": TIME}, "has shape (3, 5, 3)"),
        ({"trajectories": np.ones((0, 5, 2), np.float32), "time": TIME}, "has shape (0, 5, 2)"),
        ({"trajectories": GOOD, "time": TIME[:4]}, "'time' has shape (4,)"),
        ({"trajectories": np.ones((3, 5, 2), np.int32), "time": TIME}, "must hold floats"),
        ({"trajectories": GOOD, "time": np.array([b"a"] * 5)}, "must hold floats"),
        ({"trajectories": np.where(np.eye(5)[:3, :, None] > 0, np.nan, GOOD), "time": TIME}, "NaN or inf"),
        ({"trajectories": GOOD, "time": np.array([0, 1, np.inf, 3, 4.0])}, "NaN or inf"),
        ({"trajectories": GOOD, "time": TIME[::-1]}, "not strictly increasing"),
        ({"trajectories": -GOOD, "time": TIME}, "negative populations"),
    ],
)
def test_every_bad_file_has_its_own_clear_error(tmp_path, datasets, message):
    path = _write(tmp_path / "bad.h5", **datasets)
    with pytest.raises(DataFileError) as info:
        lotka_volterra.load(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        lotka_volterra.load(tmp_path / "nope.h5")
    assert isinstance(info.value, DataFileNotFoundError) and isinstance(info.value, UserError)
    assert "No data file at" in str(info.value)


def test_a_file_that_is_not_hdf5(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("prey,predator\n1,2\n")
    with pytest.raises(DataFileError, match="is not an HDF5 file"):
        lotka_volterra.load(path)


def test_a_group_where_a_dataset_should_be(tmp_path):
    path = tmp_path / "group.h5"
    with h5py.File(path, "w") as f:
        f.create_group("trajectories")
        f.create_dataset("time", data=TIME)
    with pytest.raises(DataFileError, match="no 'trajectories' dataset"):
        lotka_volterra.load(path)


def test_compare_cli_reports_a_bad_path_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        lotka_volterra.main(["--compare", str(tmp_path / "missing.h5"), "-n", "2"])
    assert "No data file at" in capsys.readouterr().err


def test_a_folder_where_the_file_should_be(tmp_path):
    with pytest.raises(DataFileError, match=f"{tmp_path} is a folder"):
        lotka_volterra.load(tmp_path)


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.99])
def test_a_truncated_file_is_damaged_not_a_traceback(tmp_path, cut):
    path = _write(tmp_path / "good.h5", trajectories=GOOD, time=TIME)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(DataFileError, match=f"{path} is a damaged HDF5 file"):
        lotka_volterra.load(path)


def test_an_empty_file_is_not_hdf5(tmp_path):
    (tmp_path / "empty.h5").write_bytes(b"")
    with pytest.raises(DataFileError, match="is not an HDF5 file"):
        lotka_volterra.load(tmp_path / "empty.h5")


def test_a_huge_declared_dataset_is_refused_before_it_is_read(tmp_path):
    """A file of a few KB can declare (N, T, 2) far beyond memory: its shape alone refuses it."""
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("trajectories", shape=(10**7, 100, 2), dtype="f4", chunks=(1, 100, 2))  # 8 GB if read
        f.create_dataset("time", data=np.arange(100.0))
    assert path.stat().st_size < 10**6
    with pytest.raises(DataFileError, match="holds 2000000000 values, more than qwen-min reads"):
        lotka_volterra.load(path)


def test_a_null_dataspace_is_a_shape_error(tmp_path):
    path = tmp_path / "null.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("trajectories", data=h5py.Empty("f4"))
        f.create_dataset("time", data=TIME)
    with pytest.raises(DataFileError, match="'trajectories' has shape None"):
        lotka_volterra.load(path)


# Two hand-made trajectories (N=2, T=7): prey peaks (interior points above the one before and not below the one
# after) at values 3 and 5 in the first, and 2, 4, 8 in the second; the predator is flat (no peaks).
PREY = np.array([[1.0, 3, 2, 2, 5, 5, 4], [0.5, 2, 0.5, 4, 0.5, 8, 0.5]])
HAND = np.stack([PREY, np.array([[1.0] * 7, [2.0] * 7])], axis=-1)  # (2, 7, 2)


def test_prey_peaks_by_hand():
    peaks = lotka_volterra.prey_peaks(HAND)  # (2, 5): interior steps 1..5
    assert peaks.tolist() == [[True, False, False, True, False], [True, False, True, False, True]]
    swapped = HAND[..., ::-1]  # the same curves as predator: the flat prey has no peak
    assert not lotka_volterra.prey_peaks(swapped).any()


def test_peak_decay_is_last_prey_peak_over_first_for_trajectories_with_two_or_more():
    np.testing.assert_allclose(lotka_volterra.peak_decay(HAND), [5 / 3, 8 / 2])
    one_peak = HAND.copy()
    one_peak[0, :, 0] = [1, 3, 2, 1, 1, 1, 1]  # a single peak: left out
    np.testing.assert_allclose(lotka_volterra.peak_decay(one_peak), [4.0])
    falling = HAND[:, ::-1].copy()  # time reversed: second trajectory's peaks 8, 4, 2
    falling[0, :, 0] = [9, 1, 6, 1, 3, 1, 1]  # peaks 6 and 3: decays to a half
    np.testing.assert_allclose(lotka_volterra.peak_decay(falling), [0.5, 2 / 8])
    early = HAND.copy()
    early[0, :, 0] = [1, 3, 1, 1, 5, 1, 1]  # peaks at interior steps 0 and 3, not placed symmetrically
    np.testing.assert_allclose(lotka_volterra.peak_decay(early)[0], 5 / 3)


def test_summary_by_hand():
    s = lotka_volterra.summary(HAND.astype(np.float32))
    values = np.concatenate([PREY.ravel(), [1.0] * 7, [2.0] * 7])
    assert s["trajectories"] == 2 and s["min"] == 0.5 and s["max"] == 8.0
    assert float(s["mean"]) == (22 + 16 + 7 + 14) / 28  # prey sums 22 and 16, predators 7 and 14: exact in float64
    for key, q in (("p1", 1), ("p50", 50), ("p95", 95), ("p99", 99)):
        assert s[key] == pytest.approx(np.percentile(values, q)), key
    assert s["p50"] == 2.0 and s["prey p50"] == 2.0 and s["predator p50"] == 1.5
    assert s["prey p95"] == pytest.approx(np.percentile(PREY, 95))  # 5 + 0.35 * 3 = 6.05
    assert s["prey p95"] == pytest.approx(6.05) and s["predator p95"] == 2.0
    assert s["max per trajectory, median"] == 6.5  # maxima 5 and 8
    assert s["cycles per window, mean"] == 2.5  # 2 and 3 prey peaks
    assert s["cycles per window, 10-90%"] == "2-3"  # 2.1 and 2.9, no decimals
    assert s["last / first prey peak, median"] == pytest.approx((5 / 3 + 4) / 2)
    assert list(s)[:3] == ["trajectories", "min", "max"] and len(s) == 16


def test_compare_table_rows_are_real_beside_simulated(tmp_path):
    other = HAND * 2
    table = lotka_volterra.compare_table(HAND, other).splitlines()
    assert table[:2] == ["| statistic | real file | simulated |", "|---|---|---|"] and len(table) == 18
    assert table[2] == "| trajectories | 2 | 2 |"
    assert "| max | 8 | 16 |" in table and "| mean | 2.107 | 4.214 |" in table  # 4 significant digits
    assert "| cycles per window, 10-90% | 2-3 | 2-3 |" in table  # a string is printed as it is


def test_write_cli_writes_the_simulation_it_names(tmp_path, capsys):
    path = tmp_path / "sim.h5"
    lotka_volterra.main(["--write", str(path), "-n", "3", "--seed", "2"])
    assert capsys.readouterr().out == f"wrote 3 trajectories to {path}\n"
    traj, t = lotka_volterra.load(path)
    expected, times = lotka_volterra.simulate(3, seed=2)
    np.testing.assert_array_equal(traj, expected)
    np.testing.assert_array_equal(t, times)
    lotka_volterra.main(["--write", str(path), "-n", "2"])  # the default seed is 0
    np.testing.assert_array_equal(lotka_volterra.load(path)[0], lotka_volterra.simulate(2, seed=0)[0])
    assert not np.array_equal(lotka_volterra.load(path)[0], lotka_volterra.simulate(2, seed=1)[0])


def test_cli_without_a_task_says_what_to_pass(capsys):
    with pytest.raises(SystemExit) as info:
        lotka_volterra.main(["-n", "2"])
    assert info.value.code == 2 and capsys.readouterr().err.endswith("error: nothing to do; pass --compare PATH and/or --write PATH.\n")


def test_cli_help_names_each_flag_its_metavar_and_default(capsys):
    with pytest.raises(SystemExit) as info:
        lotka_volterra.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines to the terminal width
    assert info.value.code == 0
    for line in ("Lotka-Volterra predator-prey trajectories: the simulator that makes the default data.",
                 "--compare PATH h5 file to compare the simulator with (default: None)",
                 "--write PATH write simulated data to this h5 file (default: None)",
                 "-n N number of trajectories (default: 1000)", "[--seed SEED]"):
        assert line in help_text, line


def test_save_writes_the_layouts_dtypes_and_load_returns_them(tmp_path):
    path = tmp_path / "lv.h5"
    lotka_volterra.save(path, np.ones((2, 3, 2), np.float64) * 1.5, np.arange(3, dtype=np.float32))
    with h5py.File(path, "r") as f:
        assert f["trajectories"].dtype == np.float32 and f["time"].dtype == np.float64
    _write(path, trajectories=np.full((1, 3, 2), 0.1, np.float64), time=np.arange(3, dtype=np.float32))  # the other way round
    traj, time = lotka_volterra.load(path)
    assert traj.dtype == np.float32 and time.dtype == np.float64
    assert traj[0, 0, 0] == np.float32(0.1) and time.tolist() == [0.0, 1.0, 2.0]


def test_edge_files_that_follow_the_layout_load(tmp_path):
    """One trajectory of one step, all populations zero: the smallest file the layout allows."""
    one = _write(tmp_path / "one.h5", trajectories=np.zeros((1, 1, 2), np.float32), time=np.array([5.0]))
    traj, time = lotka_volterra.load(one)
    assert traj.shape == (1, 1, 2) and not traj.any() and time.tolist() == [5.0]


def test_the_size_limit_counts_values(tmp_path, monkeypatch):
    from data import h5file

    path = _write(tmp_path / "lv.h5", trajectories=GOOD, time=TIME)  # 3 * 5 * 2 = 30 values
    monkeypatch.setattr(h5file, "MAX_VALUES", 30)
    assert lotka_volterra.load(path)[0].shape == (3, 5, 2)  # exactly at the limit
    monkeypatch.setattr(h5file, "MAX_VALUES", 29)
    with pytest.raises(DataFileError, match=r"holds 30 values, more than qwen-min reads \(29\); split the file"):
        lotka_volterra.load(path)


@pytest.mark.parametrize(
    "datasets, message",
    [
        ({"trajectories": GOOD, "time": TIME[:4]}, "'time' has shape (4,) but trajectories have 5 steps; make 'time' one value per step."),
        ({"trajectories": GOOD, "time": np.array([0, 1, 1, 2, 3.0])}, "'time' is not strictly increasing"),
        ({"trajectories": GOOD, "time": np.arange(5)}, "must hold floats, not float32 and int64"),
        ({"trajectories": np.ones((3, 5, 2, 1), np.float32), "time": TIME}, "expected (N, T, 2) with N, T >= 1"),
        ({"trajectories": np.ones((3, 0, 2), np.float32), "time": TIME[:0]}, "has shape (3, 0, 2)"),
    ],
)
def test_more_bad_files_and_their_whole_messages(tmp_path, datasets, message):
    path = _write(tmp_path / "bad.h5", **datasets)
    with pytest.raises(DataFileError) as info:
        lotka_volterra.load(path)
    assert message in str(info.value)


def test_integrate_computes_in_float64_whatever_it_is_given():
    params, initial = lotka_volterra.sample_params(3, np.random.default_rng(6))
    p32, i32 = params.astype(np.float32), initial.astype(np.float32)
    t = lotka_volterra.time_grid(6, 10.0)
    got = lotka_volterra.integrate(p32, i32, t, substeps=4)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, lotka_volterra.integrate(p32.astype(np.float64), i32.astype(np.float64), t, substeps=4))


def test_simulate_passes_its_grid_and_substeps_on():
    traj, t = lotka_volterra.simulate(2, seed=4, n_steps=6, t_end=10.0, substeps=3)
    np.testing.assert_array_equal(t, [0.0, 2.0, 4.0, 6.0, 8.0, 10.0])
    params, initial = lotka_volterra.sample_params(2, np.random.default_rng(4))  # simulate's draws, in its order
    expected = lotka_volterra.integrate(params, initial, t, substeps=3).astype(np.float32)
    np.testing.assert_array_equal(traj, expected)
    assert not np.array_equal(traj, lotka_volterra.integrate(params, initial, t).astype(np.float32))  # 40 substeps differ
    np.testing.assert_array_equal(lotka_volterra.simulate(2, n_steps=6)[0], lotka_volterra.simulate(2, seed=0, n_steps=6)[0])


def _rk4_by_hand(params, initial, times, substeps):
    """One trajectory, written out here: classic RK4 on (ln x, ln y), `substeps` equal steps per output interval."""
    alpha, beta, delta, gamma = params
    rhs = lambda u, v: np.array([alpha - beta * np.exp(v), delta * np.exp(u) - gamma])
    z = np.log(np.array(initial, dtype=np.float64))
    out = [np.exp(z)]
    for t0, t1 in zip(times[:-1], times[1:]):
        h = (t1 - t0) / substeps
        for _ in range(substeps):
            k1 = rhs(*z)
            k2 = rhs(*(z + h / 2 * k1))
            k3 = rhs(*(z + h / 2 * k2))
            k4 = rhs(*(z + h * k3))
            z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        out.append(np.exp(z))
    return np.array(out)  # (T, 2)


def test_integrate_is_rk4_with_40_substeps_by_default():
    """Output steps of 25 time units: 40 and 41 substeps differ by ~1e-6, far above the rounding of the two codes."""
    params = np.array([[0.15, 0.3, 0.1, 0.2], [0.1, 0.4, 0.15, 0.25]])
    initial = np.array([[1.0, 0.9], [1.1, 1.2]])
    times = np.array([0.0, 25.0, 50.0])
    got = lotka_volterra.integrate(params, initial, times)
    for i in range(2):
        np.testing.assert_allclose(got[i], _rk4_by_hand(params[i], initial[i], times, 40), rtol=1e-12)
        assert np.abs(_rk4_by_hand(params[i], initial[i], times, 41) / got[i] - 1).max() > 1e-7  # the premise
    np.testing.assert_allclose(lotka_volterra.integrate(params, initial, times, substeps=3)[1],
                               _rk4_by_hand(params[1], initial[1], times, 3), rtol=1e-12)  # substeps is obeyed


def test_simulate_integrates_with_40_substeps_by_default():
    """Two output steps of 50 time units: 41 substeps would move the float32 values by many units in the last place."""
    traj, t = lotka_volterra.simulate(2, seed=5, n_steps=3, t_end=100.0)
    params, initial = lotka_volterra.sample_params(2, np.random.default_rng(5))  # simulate's draws, in its order
    for i in range(2):
        expected = _rk4_by_hand(params[i], initial[i], t, 40)
        np.testing.assert_allclose(traj[i], expected, rtol=2e-7)  # float32: about one unit in the last place
        assert np.abs(_rk4_by_hand(params[i], initial[i], t, 41) / expected - 1).max() > 1e-6  # the premise: 5x the tolerance


def test_summary_takes_each_percentile_at_its_named_level():
    """Eleven trajectories of 30 steps, every value distinct (so neighbouring percentiles differ), with designed prey
    peak counts 0, 0, 7 (eight times), 14: with 11 trajectories the 10th and 90th percentiles fall exactly on the
    2nd and 10th smallest counts, 0 and 7, while the 11th and 91st would be 0.7 and 7.7, written 1 and 8."""
    rng = np.random.default_rng(0)
    counts = [0, 0] + [7] * 8 + [14]
    x = np.empty((11, 30, 2))
    for n, m in enumerate(counts):
        prey = 3.0 + 0.1 * np.arange(30) + rng.uniform(0, 0.05, 30)  # rising: no peak
        prey[: 2 * m + 1] = rng.uniform(1.0, 1.2, 2 * m + 1)  # lows ...
        prey[1 : 2 * m : 2] = rng.uniform(2.0, 2.4, m)  # ... and m highs between them: m peaks
        x[n, :, 0] = prey * (1 + n)  # each trajectory at its own scale: no value repeats
        x[n, :, 1] = rng.uniform(0.1, 5.0, 30)
    assert lotka_volterra.prey_peaks(x).sum(axis=1).tolist() == counts  # the premise
    s = lotka_volterra.summary(x)
    prey, pred = x[..., 0], x[..., 1]
    for key, values, q in (("p1", x, 1), ("p50", x, 50), ("p95", x, 95), ("p99", x, 99), ("prey p50", prey, 50),
                           ("prey p95", prey, 95), ("predator p50", pred, 50), ("predator p95", pred, 95)):
        assert s[key] == pytest.approx(np.percentile(values, q), rel=1e-12), key
        assert np.percentile(values, q + 1) != pytest.approx(s[key], rel=1e-6), key  # the premise: a neighbour differs
    assert s["cycles per window, mean"] == pytest.approx(70 / 11)
    assert s["cycles per window, 10-90%"] == "0-7"
