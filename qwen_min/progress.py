"""Progress on long work: a bar on a terminal, plain periodic lines everywhere else.

A person at a terminal wants tqdm's bar with its rate and time left. A log file (nohup, CI,
a job scheduler) wants lines it can grep: a bar redrawn with carriage returns turns into
one unreadable line. `progress` picks by whether stderr is a terminal; `Lines` keeps tqdm's
small interface (update, set_postfix, write, close) so callers never ask which they hold.
"""

import sys
import time


def progress(total, desc, unit="it", initial=0, bar=None, every=30.0, silent=False):
    """A tqdm bar when `bar` (default: stderr is a terminal), else `Lines` printing every `every` seconds;
    `Silent` when silent (a torchrun process other than rank 0: one display is enough)."""
    if silent:
        return Silent()
    if bar is None:
        bar = sys.stderr.isatty()
    if bar:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True)
    return Lines(total, desc, unit, initial, every)


def duration(seconds):
    """3725 -> '1h02m', 125 -> '2m05s', 7.5 -> '7.5s'."""
    if round(seconds) >= 3600:
        minutes = round(seconds / 60)
        return f"{minutes // 60}h{minutes % 60:02d}m"
    if round(seconds, 1) >= 60:
        seconds = round(seconds)
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds:.1f}s"


class Lines:
    """tqdm's interface as plain lines on stderr: one when `every` seconds have passed since the last, and one at the end."""

    def __init__(self, total, desc, unit="it", initial=0, every=30.0, clock=time.monotonic):
        self.total, self.desc, self.unit, self.every, self.clock = total, desc, unit, every, clock
        self.n = self.start_n = self.printed_n = initial
        self.start = self.last = clock()
        self.postfix = {}

    def update(self, n=1):
        self.n += n
        if self.clock() - self.last >= self.every:
            self.print_line()

    def set_postfix(self, **values):
        self.postfix = values

    def write(self, text):
        """A message between progress lines: on stdout, as tqdm.write puts it."""
        print(text, flush=True)

    def close(self):
        if self.n > self.printed_n:  # the final count, unless the last line already showed it
            self.print_line()

    def line(self):
        """'desc: n/total unit (p%), rate, time left | key value ...' from the work done since the start."""
        elapsed, done = self.clock() - self.start, self.n - self.start_n
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        if done > 0 and elapsed > 0:
            per = elapsed / done  # seconds per unit, since this bar began (a resumed run's earlier steps don't count)
            parts.append(f"{per:.3g} s/{self.unit}" if per >= 1 else f"{1 / per:.3g} {self.unit}/s")
            if self.total:
                parts.append(f"{duration(per * max(0, self.total - self.n))} left")
        line = ", ".join(parts)
        if self.postfix:
            line += " | " + " ".join(f"{k} {v}" for k, v in self.postfix.items())
        return line

    def print_line(self):
        self.last, self.printed_n = self.clock(), self.n
        print(self.line(), file=sys.stderr, flush=True)


class Silent:
    """tqdm's interface, showing nothing."""

    def update(self, n=1):
        pass

    def set_postfix(self, **values):
        pass

    def write(self, text):
        pass

    def close(self):
        pass


def tracked(items, desc, unit="it", **kwargs):
    """Yield each item of a sized iterable, advancing a `progress` display by one per item."""
    bar = progress(len(items), desc, unit, **kwargs)
    for item in items:
        yield item
        bar.update(1)
    bar.close()
