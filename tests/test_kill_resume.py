"""Fault injection: a run killed at any write, rename or delete in its folder resumes bit-identical.

A run (tiny model, 2 steps, checkpoints at steps 0 and 2: a first save, then a save that
replaces one) goes once uninterrupted, counting every change it
makes to its folder: a file opened for writing, torch.save, safetensors' save_file, os.replace,
os.rename, unlink, mkdir, rmdir, rmtree. Then, for each change n, a fresh child process runs the
same command and dies by SIGKILL at change n, either just before it or, for a write, halfway
through it (the file cut at half of what was written). `train.py --resume` must then finish the
run with adapter/, best/, loss.png, the logs and the summary byte for byte as the uninterrupted
run left them, and with no leftovers. The children are forked from the test process, so each
costs the run itself, not an interpreter start. Two things are made cheap in them: fsync (it
guards against power cuts; a killed process loses nothing the kernel already holds) and the
loss plot (written by the same atomic_write, with the losses as text instead of a picture).
"""

import builtins
import hashlib
import io
import json
import os
import shutil
import signal
import traceback
from pathlib import Path

import pytest
import safetensors.torch
import torch

import train
from conftest import random_model, tiny_config, write_checkpoint
from data import lotka_volterra
from qwen_min.errors import UserError
from qwen_min.files import atomic_write_text

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks child processes")

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def die():
    os.kill(os.getpid(), signal.SIGKILL)


class Faults:
    """Counts the changes a process makes under `root`; dies at change `kill_at` ('before' or 'torn')."""

    def __init__(self, root, kill_at=None, how="before"):
        self.root, self.kill_at, self.how = os.path.realpath(root), kill_at, how
        self.events, self.depth = [], 0  # events: [name, path, wrote data]

    def inside(self, path):
        return os.path.realpath(os.fspath(path)).startswith(self.root + os.sep)

    def event(self, name, path):
        """Records a change; True when it is the one to tear. Dies here when it is the one to precede."""
        self.events.append([name, os.path.relpath(os.path.realpath(os.fspath(path)), self.root), False])
        if len(self.events) == self.kill_at:
            if self.how == "before":
                die()
            return True
        return False

    def cut(self, path, before):
        """Keeps `before` bytes and half of what was written after them, then dies: a torn write."""
        size = os.path.getsize(path)
        os.truncate(path, before + (size - before) // 2)
        die()

    def wrap(self, fn, name, path_arg=0, write=False):
        def wrapper(*args, **kwargs):
            path = args[path_arg] if len(args) > path_arg else None
            if self.depth or path is None or not self.inside(path):
                return fn(*args, **kwargs)
            tear = self.event(name, path)
            self.depth += 1
            try:
                result = fn(*args, **kwargs)
            finally:
                self.depth -= 1
            if write:
                self.events[-1][2] = True
                if tear:
                    self.cut(path, 0)
            return result
        return wrapper

    def wrap_open(self, real_open):
        faults = self

        class Torn:  # a file object that dies halfway through its first write
            def __init__(self, f, path):
                self.f, self.path, self.before = f, path, f.tell() if "a" in f.mode else 0

            def write(self, data):
                faults.events[self.index][2] = faults.events[self.index][2] or bool(data)
                if self.tear and data:
                    self.f.write(data)
                    self.f.close()
                    faults.cut(self.path, self.before)
                return self.f.write(data)

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def __iter__(self):
                return iter(self.f)

        def opener(file, mode="r", *args, **kwargs):
            if self.depth or not isinstance(file, (str, os.PathLike)) or not any(c in mode for c in "wax+") \
                    or not self.inside(file):
                return real_open(file, mode, *args, **kwargs)
            tear = self.event("open-" + mode, file)
            f = Torn(real_open(file, mode, *args, **kwargs), file)
            f.index, f.tear = len(self.events) - 1, tear
            return f
        return opener

    def install(self):
        real_os_open = os.open

        def os_open(path, flags, *args, **kwargs):
            if flags & WRITE_FLAGS and not self.depth and self.inside(path):
                self.event("os.open", path)
            return real_os_open(path, flags, *args, **kwargs)
        os.open = os_open
        builtins.open = io.open = self.wrap_open(io.open)
        for name in ("replace", "rename", "unlink", "remove", "mkdir", "rmdir"):
            setattr(os, name, self.wrap(getattr(os, name), "os." + name))
        shutil.rmtree = self.wrap(shutil.rmtree, "rmtree")
        torch.save = self.wrap(torch.save, "torch.save", path_arg=1, write=True)
        real_save_file = safetensors.torch.save_file
        wrapped = self.wrap(real_save_file, "save_file", path_arg=1, write=True)
        for module in list(__import__("sys").modules.values()):  # `from safetensors.torch import save_file` too
            if getattr(module, "save_file", None) is real_save_file:
                module.save_file = wrapped


def plot_as_text(run, path):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    atomic_write_text(path, json.dumps([[r["kind"], r["step"], r.get("loss", r.get("val_loss"))] for r in rows]))


def pin_globals():
    """Sets the process-wide state a run's bytes depend on beyond its flags, whatever an earlier test left.

    Every run here is a child forked from this process, so a leaked setting would reach the uninterrupted
    run and the killed ones alike; pinned, the comparison holds only train.py to account.
    """
    torch.set_num_threads(1)  # also: one thread sums in one order
    torch.set_default_dtype(torch.float32)
    torch.set_grad_enabled(True)
    torch.use_deterministic_algorithms(False)
    torch.set_flush_denormal(False)
    train.on_step = None


def in_child(argv, root, kill_at=None, how="before", log=None):
    """Runs train.main(argv) in a forked child -> (exit: 'killed', 0, 2 or 1, the error message or traceback)."""
    message = Path(root).parent / f"{Path(root).name}.message"
    message.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            pin_globals()
            os.fsync = lambda fd: None
            train.plot_losses = plot_as_text
            faults = Faults(root, kill_at, how)
            faults.install()
            try:
                train.main(argv)
                code = 0
            except UserError as e:
                message.write_text(str(e))
                code = 2
            if log is not None:
                Path(log).write_text(json.dumps(faults.events))
        except BaseException:
            message.write_text(traceback.format_exc())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    text = message.read_text() if message.exists() else ""
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL, text
        return "killed", text
    return os.WEXITSTATUS(status), text


def outputs(run):
    """What a finished run promises, as comparable values: file bytes, logs without timings."""
    out = {}
    for path in sorted(run.rglob("*")):
        name = str(path.relative_to(run))
        if path.is_dir():
            out[name] = "folder"
        elif name == ".lock":
            continue
        elif name in ("metrics.jsonl", "ledger.jsonl"):
            lines = [json.loads(line) for line in path.read_text().splitlines()]
            out[name] = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in lines]
        elif name in ("summary.json", "args.json"):  # less the folder's own path, the wall time and the machine
            out[name] = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("run", "out", "wall_s", "provenance")}
        elif name == "state.pt":
            out[name] = torch.load(path, weights_only=True)["step"]
        else:
            out[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    ckpt = write_checkpoint(random_model(tiny_config()), root / "ckpt")
    traj, t = lotka_volterra.simulate(8, seed=0)
    lotka_volterra.save(root / "lv.h5", traj, t)
    argv = ["--model", str(ckpt), "--data", str(root / "lv.h5"), "--context", "48", "--batch", "2", "--rank", "2",
            "--steps", "2", "--eval-every", "2", "--eval-batches", "1", "--lm-head-bias", "--dropout", "0.1",
            "--schedule", "cosine", "--warmup", "1", "--no-progress"]
    with pytest.MonkeyPatch.context() as m:  # a leaked hook must not stop it either
        m.setattr(train, "on_step", None)
        train.main(argv + ["--out", str(root / "warm-up")])  # imports everything once (torch._dynamo takes seconds), not in every child
    whole = root / "whole" / "run"
    whole.parent.mkdir()
    exit, text = in_child(argv + ["--out", str(whole)], whole, log=root / "events.json")
    assert exit == 0, text
    events = json.loads((root / "events.json").read_text())
    return root, argv, outputs(whole), events


def first_difference(got, expected):
    """'key: got ... expected ...' for the first output that differs (None when none does): what a resume got wrong."""
    for key in sorted(set(got) | set(expected)):
        a, b = got.get(key, "<missing>"), expected.get(key, "<missing>")
        if a != b:
            return f"{key}: got {str(a)[:300]}, expected {str(b)[:300]}"
    return None


def resume(argv, run):
    """--resume; a run killed before args.json was written holds no run, and then starts again."""
    exit, text = in_child(["--out", str(run), "--resume", "--no-progress"], run)
    if exit == 2 and "holds no run to resume" in text:
        exit, text = in_child(argv + ["--out", str(run)], run)
    assert exit == 0, text


def test_every_kill_point_resumes_bit_identical(setup):
    root, argv, expected, events = setup
    points = [(n, "before") for n in range(1, len(events) + 1)] + \
             [(n, "torn") for n, (_, _, wrote) in enumerate(events, 1) if wrote]
    assert len(events) >= 50 and {"adapter/adapter_model.safetensors", "best/extra_parameters.safetensors",
                                  "state.pt", "loss.png"} <= set(expected)
    failures = []
    for n, how in points:
        run = root / f"k{n}{how[0]}" / "run"
        run.parent.mkdir()
        exit, text = in_child(argv + ["--out", str(run)], run, kill_at=n, how=how)
        assert exit == "killed", (n, how, events[n - 1], text)
        resume(argv, run)
        difference = first_difference(outputs(run), expected)
        if difference:
            failures.append((n, how, events[n - 1], difference))
        shutil.rmtree(run.parent)
    print(f"{len(points)} kill points ({len(events)} changes, {len(points) - len(events)} torn writes), "
          f"{len(points) - len(failures)} resumed bit-identical")
    assert not failures, f"{len(failures)} failed; the first: {failures[0]}"


def test_a_resume_killed_at_any_change_resumes_again(setup):
    """A second kill, during the resume's own repairs (log truncation, adapters rewritten), loses nothing."""
    root, argv, expected, events = setup
    torn_log = [n for n, (name, path, wrote) in enumerate(events, 1) if path == "metrics.jsonl" and wrote][-2]
    first = root / "first" / "run"  # killed halfway through the log line of the last step
    first.parent.mkdir()
    assert in_child(argv + ["--out", str(first)], first, kill_at=torn_log, how="torn")[0] == "killed"
    log = root / "resume-events.json"
    probe = root / "probe" / "run"
    shutil.copytree(first.parent, probe.parent)
    assert in_child(["--out", str(probe), "--resume", "--no-progress"], probe, log=log)[0] == 0
    resume_events = json.loads(log.read_text())
    first_new_line = next(i for i, (name, path, _) in enumerate(resume_events) if path == "metrics.jsonl" and name == "open-a")
    resume_events = resume_events[:first_new_line]  # its repairs; what follows is a run's, killed above
    points = [(n, "before") for n in range(1, len(resume_events) + 1)] + \
             [(n, "torn") for n, (_, _, wrote) in enumerate(resume_events, 1) if wrote]
    for n, how in points:
        run = root / f"r{n}{how[0]}" / "run"
        shutil.copytree(first.parent, run.parent)
        assert in_child(["--out", str(run), "--resume", "--no-progress"], run, kill_at=n, how=how)[0] == "killed"
        resume(argv, run)
        difference = first_difference(outputs(run), expected)
        assert not difference, (n, how, resume_events[n - 1], difference)
        shutil.rmtree(run.parent)
    print(f"{len(points)} kill points in a resume's repairs ({len(resume_events)} changes, "
          f"{len(points) - len(resume_events)} torn writes), all resumed again bit-identical")
