"""train.py or evaluate.py as one torchrun process, for tests/test_distributed.py, with two test hooks:

- it records every write (open for writing, mkdir, rename, replace, remove) that a rank other
  than 0 makes under --out, and the forecast batches each rank decodes (evaluate.py), and leaves
  both lists in REPORT_DIR/rank<N>.json at exit;
- with KILL_AT=N, rank 0 kills itself with SIGKILL, as a user or a scheduler might: train.py
  after step N, evaluate.py after journaling its N-th forecast batch.

Usage: torchrun --nproc-per-node 2 tests/torchrun_worker.py train|evaluate REPORT_DIR [KILL_AT] -- FLAGS...
"""

import builtins
import io
import json
import os
import shutil
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evaluate  # noqa: E402
import train  # noqa: E402
from qwen_min.errors import run_cli  # noqa: E402
from qwen_min.files import Journal  # noqa: E402

script, report_dir, rest = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
kill_at = int(rest.pop(0)) if rest[0] != "--" else None
flags = rest[1:]
out = Path(flags[flags.index("--out") + 1]).resolve()
rank = int(os.environ.get("RANK", "0"))
writes, decoded = [], []  # this rank's writes under --out; the forecast batches it decoded (evaluate.py)


def under_out(path):
    try:
        return Path(os.fspath(path)).resolve().is_relative_to(out)
    except TypeError:  # a file descriptor, not a path
        return False


def watched(fn, name, writing=lambda *a, **k: True):
    def wrapper(path, *args, **kwargs):
        if under_out(path) and writing(*args, **kwargs):
            writes.append(f"{name} {path}")
        return fn(path, *args, **kwargs)
    return wrapper


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if rank != 0:
    builtins.open = io.open = watched(io.open, "open", lambda mode="r", *a, **k: any(c in mode for c in "wax+"))  # pathlib calls io.open
    for name in ("mkdir", "makedirs", "rename", "replace", "remove", "unlink", "rmdir"):
        setattr(os, name, watched(getattr(os, name), name))
    shutil.rmtree = watched(shutil.rmtree, "rmtree")
generate_forecasts = evaluate.generate_forecasts


def counted(model, prompts, *args, **kwargs):
    decoded.append(len(prompts))
    return generate_forecasts(model, prompts, *args, **kwargs)


evaluate.generate_forecasts = counted
if rank == 0 and kill_at is not None and script == "train":
    train.on_step = lambda step: step == kill_at and die()
if rank == 0 and kill_at is not None and script == "evaluate":
    journal_add = Journal.add

    def add_then_die(self, piece, record):
        kept = journal_add(self, piece, record)
        if piece.startswith("forecast") and sum(name.startswith("forecast") for name in self.done) == kill_at:
            die()
        return kept
    Journal.add = add_then_die
try:
    run_cli({"train": train.main, "evaluate": evaluate.main}[script], flags)
finally:
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"rank{rank}.json").write_text(json.dumps({"writes_under_out": writes, "decoded": decoded}))
