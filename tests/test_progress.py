"""Progress: a bar on a terminal, plain timed lines in logs, with rate and time left worked out by hand."""

import io
import sys

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
                                           (119.6, "2m00s"), (3599.7, "1h00m")])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not isinstance(progress(5, "x"), Lines)
    assert isinstance(progress(5, "x", bar=False), Lines)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress(5, "x"), Lines)


def test_tracked_yields_every_item_in_order_and_counts_them(capsys):
    items = ["a", "b", "c"]
    assert list(tracked(items, "work", every=0.0)) == items
    err = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in err] == ["work: 1/3 it (33%)", "work: 2/3 it (67%)", "work: 3/3 it (100%)"]  # no repeat at close
