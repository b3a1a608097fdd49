"""LLMTIME encoding: the published example, round trips, the scaler, and a decoder that never raises."""

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data import llmtime, lotka_volterra

REAL_FILE = Path(os.environ.get("QWEN_MIN_DATA", Path(__file__).resolve().parents[2] / "shared/data/lotka_volterra_data.h5"))


@pytest.mark.skipif(not REAL_FILE.is_file(), reason="coursework data file not present")
def test_published_worked_example():
    traj, _ = lotka_volterra.load(REAL_FILE)
    scaler = llmtime.Scaler.fit(traj, percentile=95, target=10)
    assert scaler.level == pytest.approx(3.4738405, abs=1e-7)  # REFERENCE prints it in float32
    text = llmtime.encode(scaler.transform(traj[0, :5]), decimals=3)
    assert text == "2.734,2.996;2.132,2.244;1.964,1.625;2.063,1.173;2.373,0.864"
    back = scaler.inverse(llmtime.decode(text).values)
    assert np.abs(back - traj[0, :5]).max() <= 0.0005 * scaler.level / 10 + 1e-9


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 9999.4), st.floats(0, 9999.4)), min_size=1, max_size=30),
    st.integers(0, 4),
    st.booleans(),
)
def test_encode_then_decode_is_within_half_a_unit_of_the_last_decimal(rows, decimals, trailing_sep):
    values = np.array(rows)
    text = llmtime.encode(values, decimals, trailing_sep)
    decoded = llmtime.decode(text, decimals=decimals)
    assert decoded.issues == {}
    assert decoded.values.shape == values.shape
    assert np.all(np.abs(decoded.values - values) <= 0.5 * 10.0**-decimals * (1 + 1e-9) + 1e-12 * values)


def test_encode_format():
    values = np.array([[0.0, 1.0], [12.3456, 0.0049], [2.675, 9.9999]])
    assert llmtime.encode(values, 2) == "0.00,1.00;12.35,0.00;2.67,10.00"  # 2.675 is 2.67499.. in binary
    assert llmtime.encode(values, 0, trailing_sep=True) == "0,1;12,0;3,10;"
    assert " " not in llmtime.encode(values * 100, 3)


@pytest.mark.parametrize(
    "values",
    [np.array([[1.0, -0.5]]), np.array([[np.nan, 1.0]]), np.array([[np.inf, 1.0]]), np.array([[1e4, 1.0]]), np.ones((3, 3)), np.ones(4)],
)
def test_encode_refuses_what_it_cannot_write(values):
    with pytest.raises(ValueError, match="encode takes"):
        llmtime.encode(values)


@pytest.mark.parametrize(
    "text, n_steps, decimals, expected, issues",
    [
        ("1.50,2.50;3.50,4.50", None, 2, [[1.5, 2.5], [3.5, 4.5]], {}),
        ("1.50,2.50;3.50,4.50;", None, 2, [[1.5, 2.5], [3.5, 4.5]], {}),
        # a truncated last value: with decimals known, the cut step is dropped
        ("1.50,2.50;3.50,4.5", None, 2, [[1.5, 2.5]], {"truncated_step": 1}),
        ("1.50,2.50;3.50,4.5", None, None, [[1.5, 2.5], [3.5, 4.5]], {}),
        ("1.50,2.50;3.50,4.", None, None, [[1.5, 2.5]], {"truncated_step": 1}),
        ("1.50,2.50;3.50", None, None, [[1.5, 2.5]], {"truncated_step": 1}),
        ("1.50,2.50;3.50,", None, None, [[1.5, 2.5]], {"truncated_step": 1}),
        # a missing value takes the same species' previous value
        ("1.50,2.50;3.50;5.50,6.50", None, None, [[1.5, 2.5], [3.5, 2.5], [5.5, 6.5]], {"missing_value": 1}),
        ("1.50,2.50;,4.50;", None, None, [[1.5, 2.5], [1.5, 4.5]], {"missing_value": 1}),
        # before a species' first number: that first number
        (",2.50;3.50,4.50;", None, None, [[3.5, 2.5], [3.5, 4.5]], {"missing_value": 1}),
        # stray characters are deleted, one count each
        (" 1.5, 2.5;\n3.5x,4.5;", None, None, [[1.5, 2.5], [3.5, 4.5]], {"stray": 4}),
        ("-1.5,2.5;", None, None, [[1.5, 2.5]], {"stray": 1}),
        # extra values and bad numbers
        ("1.5,2.5,9.9;3.5,4.5;", None, None, [[1.5, 2.5], [3.5, 4.5]], {"extra_value": 1}),
        ("1.5,2.5;1.2.3,4.5;", None, None, [[1.5, 2.5], [1.5, 4.5]], {"bad_value": 1}),
        ("1.5,2.5;12345,4.5;", None, None, [[1.5, 2.5], [1.5, 4.5]], {"bad_value": 1}),
        ("1.5,2.5;3.14159,4.5;", None, None, [[1.5, 2.5], [3.14159, 4.5]], {}),  # extra decimals read as written
        ("1.5,2.5;;3.5,4.5;", None, None, [[1.5, 2.5], [3.5, 4.5]], {"empty_step": 1}),
        # n_steps: pad by repeating, or cut
        ("1.5,2.5;3.5,4.5;", 4, None, [[1.5, 2.5], [3.5, 4.5], [3.5, 4.5], [3.5, 4.5]], {"padded_step": 2}),
        ("1.5,2.5;3.5,4.5;5.5,6.5;", 1, None, [[1.5, 2.5]], {"extra_step": 2}),
        # nothing usable
        ("", None, None, np.zeros((0, 2)), {"empty": 1}),
        ("", 2, None, [[0.0, 0.0], [0.0, 0.0]], {"empty": 1, "padded_step": 2}),
        ("abc", 1, None, [[0.0, 0.0]], {"stray": 3, "empty": 1, "padded_step": 1}),
        ("9" * 400 + ",1;", None, None, [[0.0, 1.0]], {"bad_value": 1}),
    ],
)
def test_decode_repairs(text, n_steps, decimals, expected, issues):
    decoded = llmtime.decode(text, n_steps=n_steps, decimals=decimals)
    np.testing.assert_array_equal(decoded.values, np.asarray(expected, dtype=np.float64).reshape(-1, 2))
    assert decoded.issues == issues
    assert decoded.n_repaired == sum(issues.values())


def test_decode_fill_value_for_a_species_without_numbers():
    decoded = llmtime.decode("1.5;2.5;", fill=7.0)
    np.testing.assert_array_equal(decoded.values, [[1.5, 7.0], [2.5, 7.0]])
    assert decoded.issues == {"missing_value": 2}


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.text(alphabet="0123456789.,;", max_size=60), st.text(alphabet="12.,;- x\n", max_size=60)), st.one_of(st.none(), st.integers(0, 20)), st.one_of(st.none(), st.integers(0, 4)))
def test_decode_never_raises_and_never_returns_nan(text, n_steps, decimals):
    decoded = llmtime.decode(text, n_steps=n_steps, decimals=decimals)
    assert decoded.values.ndim == 2 and decoded.values.shape[1] == 2
    assert np.isfinite(decoded.values).all()
    if n_steps is not None:
        assert len(decoded.values) == n_steps
    assert all(count > 0 for count in decoded.issues.values())


def test_global_scaler_maps_the_percentile_to_the_target():
    data = np.random.default_rng(0).lognormal(size=(20, 30, 2))
    scaler = llmtime.Scaler.fit(data, percentile=95, target=10)
    scaled = scaler.transform(data)
    assert np.percentile(scaled, 95) == pytest.approx(10)
    np.testing.assert_allclose(scaler.inverse(scaled), data, rtol=1e-12)


def test_per_series_scaler_keeps_one_scale_per_trajectory():
    data = np.random.default_rng(1).lognormal(size=(5, 30, 2)) * np.arange(1, 6)[:, None, None]
    scaler = llmtime.Scaler.fit(data, percentile=90, target=1, per_series=True)
    assert scaler.level.shape == (5,)
    scaled = scaler.transform(data)
    np.testing.assert_allclose(np.percentile(scaled.reshape(5, -1), 90, axis=1), 1.0)
    # one trajectory at a time, by row, and back
    np.testing.assert_allclose(scaler.transform(data[3], rows=3), scaled[3])
    np.testing.assert_allclose(scaler.inverse(scaled[[4, 2]], rows=[4, 2]), data[[4, 2]])
    with pytest.raises(ValueError, match="pass rows="):
        scaler.transform(data[:2])


def test_scaler_round_trips_through_json():
    data = np.random.default_rng(2).lognormal(size=(4, 10, 2))
    for per_series in (False, True):
        scaler = llmtime.Scaler.fit(data, per_series=per_series)
        again = llmtime.Scaler.from_dict(json.loads(json.dumps(scaler.to_dict())))
        np.testing.assert_array_equal(again.transform(data), scaler.transform(data))
        assert again.per_series == per_series


def test_scaler_refuses_all_zero_data():
    data = np.ones((3, 10, 2))
    data[1] = 0
    with pytest.raises(ValueError, match="cannot be scaled"):
        llmtime.Scaler.fit(data, per_series=True)


def test_encode_checks_what_it_writes():
    assert llmtime.encode(np.array([[-0.0, 1.0]]), 2) == "0.00,1.00"  # never a '-' the alphabet lacks
    with pytest.raises(ValueError, match="finite values in"):
        llmtime.encode(np.array([[9999.996, 1.0]]), 2)  # would be written 10000.00: five integer digits


def test_an_unterminated_last_step_with_an_extra_field_keeps_its_two_values():
    d = llmtime.decode("1.00,2.00;3.00,4.00,5", decimals=2)
    assert d.values.tolist() == [[1.0, 2.0], [3.0, 4.0]] and d.issues == {"extra_value": 1}


def test_a_scale_that_writes_most_values_as_zero_is_warned_about():
    import warnings

    rng = np.random.default_rng(0)
    data = rng.uniform(0.5, 5, (10, 20, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ordinary data: no warning
        llmtime.Scaler.fit(data)
    data[3] = 1e9  # one outlier trajectory: 10% of the values, so the global P95 is 1e9 and 5 -> 5e-8
    with pytest.warns(UserWarning, match="written 0.00"):
        llmtime.Scaler.fit(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llmtime.Scaler.fit(data, per_series=True)  # per series, the outlier scales only itself


def test_fit_defaults_to_p95_to_10_in_float64():
    data = np.float32([[[0.5, 1.0], [2.0, 3.0]], [[4.0, 6.0], [7.5, 9.0]]])  # (2, 2, 2), float32 on purpose
    scaler = llmtime.Scaler.fit(data)
    # P95 of the 8 values by linear interpolation: 7.5 + 0.65 * (9 - 7.5) = 8.475, computed in float64
    assert scaler.level.dtype == np.float64 and scaler.level == 8.475
    assert (scaler.percentile, scaler.target, scaler.per_series) == (95.0, 10.0, False)
    assert llmtime.Scaler.fit(data / 20).level == pytest.approx(8.475 / 20)  # a level below 1 is fine


def test_transform_computes_in_float64():
    scaler = llmtime.Scaler(np.asarray(2.0), target=10.0)
    x = np.float32([[0.1, 0.3]])  # float32(0.1) = 0.100000001490..; times 10 in float32 would round to exactly 1
    np.testing.assert_array_equal(scaler.transform(x), x.astype(np.float64) * 10 / 2)
    assert scaler.transform(x)[0, 0] != 0.5


def test_scaler_messages_name_the_shape_and_the_fix():
    data = np.random.default_rng(4).lognormal(size=(5, 30, 2))
    with pytest.raises(ValueError, match=r"needs data shaped \(N, T, 2\), got \(30, 2\); add a leading axis"):
        llmtime.Scaler.fit(data[0], per_series=True)
    scaler = llmtime.Scaler.fit(data, per_series=True)
    with pytest.raises(ValueError, match=r"needs trajectories shaped \(N, T, 2\), or rows= naming whose scales to use; got \(30, 2\)"):
        scaler.transform(data[0])
    with pytest.raises(ValueError, match="holds 5 scales but the data has 2 trajectories; pass rows="):
        scaler.inverse(data[:2])


def test_from_dict_restores_every_field():
    again = llmtime.Scaler.from_dict({"level": [2.0, 4.0], "percentile": 90, "target": 1, "per_series": True})
    assert again.percentile == 90.0 and again.target == 1.0 and again.per_series is True
    assert again.level.tolist() == [2.0, 4.0]


def test_the_zero_warning_counts_values_strictly_below_half_a_hundredth_and_needs_more_than_half():
    import warnings

    # target 1, P95 = 1: 60% of the values scale to exactly 0.005, which 2 decimals write "0.01", not 0.00
    data = np.array([0.005] * 6 + [1.0] * 4).reshape(1, 5, 2)
    # per series, scales 0.1 and 1000: exactly half of all values scale below 0.005, which is not "most" (a
    # scale applied to the other series would zero 5/8 of them: series 0's 0.1 over 1000 is 0.001)
    halves = np.array([[1e-6, 0.1] * 5, [1e-6, 1000.0] * 5]).reshape(2, 5, 2)
    # ten times smaller than the level is still 1 at target 10: not below 0.005
    small = np.array([0.01] * 6 + [1.0] * 4).reshape(1, 5, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llmtime.Scaler.fit(data, target=1)
        llmtime.Scaler.fit(halves, per_series=True)
        llmtime.Scaler.fit(small)


def test_the_zero_warning_points_at_the_caller_and_says_what_to_do(monkeypatch):
    """stacklevel: the warning names the frame that called fit (the line below), not llmtime.py. Under
    tests/mutation.py, mutmut wraps fit in two frames of its own (a trampoline and its wrapper), so the frame that
    called fit's code is then the trampoline: the check follows the stack actually run, which is why a stacklevel one
    too high (naming the wrapper, or this test's caller) fails here under mutmut as well as in a plain run."""
    data = np.ones((10, 20, 2))
    data[3] = 1e9
    real_warn, seen = warnings.warn, []

    def recording_warn(message, category=None, stacklevel=1):  # forwards with one level more: the same frame named
        fit = sys._getframe(1)  # the frame of fit's own code, which called warn
        seen.append((fit.f_code.co_filename, fit.f_back.f_code.co_filename, fit.f_back.f_lineno))  # and its caller
        real_warn(message, category, stacklevel=stacklevel + 1)

    monkeypatch.setattr(warnings, "warn", recording_warn)
    with pytest.warns(UserWarning, match=r"an outlier probably sets the scale: drop it, or scale per series\.$") as caught:
        call_line = sys._getframe().f_lineno + 1
        llmtime.Scaler.fit(data)
    [(fit_file, caller_file, caller_line)] = seen
    assert fit_file == llmtime.__file__ and (caught[0].filename, caught[0].lineno) == (caller_file, caller_line)
    if caller_file == __file__:  # a plain run: fit is called from here
        assert caller_line == call_line
    else:  # under mutmut, fit's caller is its trampoline
        assert caller_file.endswith("mutmut/mutation/trampoline.py")


def test_encode_defaults_to_two_decimals_and_checks_the_rounded_value():
    assert llmtime.encode(np.array([[1.0, 2.5]])) == "1.00,2.50"
    assert llmtime.encode(np.array([[9999.5, 1.0]]), 2) == "9999.50,1.00"  # four integer digits: fine
    with pytest.raises(ValueError, match=r"finite values in \[0, 10000\)"):
        llmtime.encode(np.array([[9999.5, 1.0]]), 0)  # written 10000


def test_each_empty_step_is_counted():
    d = llmtime.decode("1.0,2.0;;;;3.0,4.0;")
    assert d.issues == {"empty_step": 3} and d.values.tolist() == [[1.0, 2.0], [3.0, 4.0]]
