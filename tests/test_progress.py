"""Progress: a bar on a terminal, plain timed lines in logs, with rate and time left worked out by hand."""

import io
import sys
import threading

import pytest

from qwen_min.progress import Lines, duration, progress, tracked


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_lines_print_only_when_the_interval_has_passed_with_rate_and_time_left(capsys):
    clock = Clock()
    bar = Lines(total=10, desc="forecast", unit="series", every=30.0, clock=clock)
    clock.t += 10
    bar.update(2)  # 10 s after the start: quiet
    assert capsys.readouterr().err == ""
    clock.t += 30
    bar.update(2)  # 40 s for 4 series: 10 s/series, 6 left -> 60 s
    assert capsys.readouterr().err == "forecast: 4/10 series (40%), 10 s/series, 1m00s left\n"
    clock.t += 5
    bar.update(1)  # 5 s after the last line: quiet
    assert capsys.readouterr().err == ""


def test_a_resumed_bar_times_only_the_work_it_saw_and_shows_its_postfix(capsys):
    clock = Clock()
    bar = Lines(total=100, desc="train", unit="step", initial=40, every=1.0, clock=clock)
    clock.t += 2.0
    bar.set_postfix(loss="0.5000", lr="1.00e-04")
    bar.update(8)  # 8 steps in 2 s: 4 step/s; 52 steps left -> 13 s
    assert capsys.readouterr().err == "train: 48/100 step (48%), 4 step/s, 13.0s left | loss 0.5000 lr 1.00e-04\n"


def test_close_prints_the_final_line_only_after_work(capsys):
    clock = Clock()
    Lines(total=3, desc="idle", clock=clock).close()
    assert capsys.readouterr().err == ""
    bar = Lines(total=3, desc="cross-entropy", unit="batch", clock=clock)
    clock.t += 6
    bar.update(3)
    bar.close()
    assert capsys.readouterr().err == "cross-entropy: 3/3 batch (100%), 2 s/batch, 0.0s left\n"


@pytest.mark.parametrize("seconds, text", [(7.25, "7.2s"), (125, "2m05s"), (3725, "1h02m"), (59.99, "1m00s"),
                                           (119.6, "2m00s"), (3599.7, "1h00m"),
                                           (59.5, "59.5s"), (59.94, "59.9s")])  # under a minute to one decimal
def test_duration(seconds, text):
    assert duration(seconds) == text


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def own_tqdm_lock(monkeypatch):
    """tqdm's class-wide lock is a multiprocessing lock shared by every process forked after its first bar:
    a bar that raises while drawing leaves it held, and every later bar in every sibling process waits
    forever (mutation testing forks one process per mutant). Each test gets its own lock, and no monitor thread."""
    from tqdm import tqdm

    monkeypatch.setattr(tqdm, "_lock", threading.RLock(), raising=False)
    monkeypatch.setattr(tqdm, "monitor_interval", 0)


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(monkeypatch, own_tqdm_lock):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = progress(5, "forecast", unit="series", initial=2)
    assert not isinstance(bar, Lines) and callable(bar.dynamic_ncols)  # tqdm, following the terminal's width
    bar.close()
    assert "forecast:  40%" in terminal.getvalue() and "| 2/5 [" in terminal.getvalue()
    assert "?series/s]" in terminal.getvalue()
    assert isinstance(progress(5, "x", bar=False), Lines)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    lines = progress(5, "x")
    assert isinstance(lines, Lines) and lines.every == 30.0  # the README's "a plain line every 30 s"
    assert lines.line() == "x: 0/5 it (0%)"


def test_tracked_yields_every_item_in_order_and_counts_them(capsys):
    items = ["a", "b", "c"]
    assert list(tracked(items, "work", every=0.0)) == items
    err = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in err] == ["work: 1/3 it (33%)", "work: 2/3 it (67%)", "work: 3/3 it (100%)"]  # no repeat at close


def test_tracked_names_its_unit(capsys):
    assert list(tracked([1, 2], "cross-entropy", "batch", every=0.0)) == [1, 2]
    assert capsys.readouterr().err.splitlines()[-1].startswith("cross-entropy: 2/2 batch (100%)")


def test_update_counts_one_by_default_and_prints_once_the_interval_is_exactly_reached(capsys):
    clock = Clock()
    bar = Lines(total=10, desc="steps", clock=clock)  # every 30 s unless told
    clock.t += 29.5
    bar.update()
    assert capsys.readouterr().err == ""
    clock.t += 0.5  # exactly 30 s since the start
    bar.update()  # 2 it in 30 s: 15 s/it, 8 left -> 120 s
    assert capsys.readouterr().err == "steps: 2/10 it (20%), 15 s/it, 2m00s left\n"


# Lines.line() at the boundaries of its rate: no work or no time yet, one unit done, exactly 1 s per unit.
@pytest.mark.parametrize("done, seconds, text", [
    (0, 5.0, "w: 0/8 it (0%)"),                                     # time passed, nothing done: no rate yet
    (2, 0.0, "w: 2/8 it (25%)"),                                    # done at once: no time to divide by
    (1, 0.5, "w: 1/8 it (12%), 2 it/s, 3.5s left"),                 # one unit, half a second
    (2, 2.0, "w: 2/8 it (25%), 1 s/it, 6.0s left"),                 # exactly 1 s per unit: seconds per unit
    (2, 3.0, "w: 2/8 it (25%), 1.5 s/it, 9.0s left"),               # 1.5 s per unit
])
def test_the_rate_at_its_boundaries(done, seconds, text):
    clock = Clock()
    bar = Lines(total=8, desc="w", every=1e9, clock=clock)
    clock.t += seconds
    bar.update(done)
    assert bar.line() == text


class Flushes(io.StringIO):
    """A stream that counts flushes: a log file (nohup, CI) shows a line only once it is flushed."""

    def __init__(self):
        super().__init__()
        self.flushes = 0

    def flush(self):
        self.flushes += 1
        super().flush()


def test_lines_and_messages_are_flushed_as_they_are_written(monkeypatch):
    out, err = Flushes(), Flushes()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    clock = Clock()
    bar = Lines(total=2, desc="train", unit="step", every=1.0, clock=clock)
    bar.write("step 1: validation loss 0.5000")
    assert out.getvalue() == "step 1: validation loss 0.5000\n" and out.flushes == 1
    clock.t += 1.0
    bar.update()
    assert err.getvalue() == "train: 1/2 step (50%), 1 s/step, 1.0s left\n" and err.flushes == 1
