"""A train.py run folder: what it holds, how a run makes it, and how a reader gets a run back.

A run folder (docs/train.md, "What a run folder promises") holds:

    args.json      every flag of the run (the recipe: model, data, split, scaling, LoRA)
    scaler.json    the global scale fit on the training split (llmtime.Scaler.to_dict)
    metrics.jsonl  a line per step and per validation; ledger.jsonl, FLOPs planned and spent
    state.pt       the checkpoint that --resume continues (qwen_min/checkpoint.py)
    best/          the adapter with the best validation loss, in peft's format
    adapter/       the adapter of the last checkpoint
    loss.png, summary.json at the end; merged/ and tensorboard/ when asked for

It survives a kill at any instant: every file is written whole and renamed into place
(qwen_min/files.py), a lock makes the folder one process's, and whatever a kill leaves half done is
finished or undone when the folder is next opened (`tidy`). evaluate.py and `python -m qwen_min`
read runs through here, so both see the same run. Anything that is not what train.py writes is a
UserError naming the file and what to do.
"""

import json
import math
import shutil
from pathlib import Path

import torch

from data import llmtime, splits

from .errors import UserError
from .files import atomic_write_text, clean_leftovers, read_json_object, recover_folder
from .model import Qwen2

# What a run folder holds; a fresh start clears these (args.json is replaced, not removed).
RUN_FILES = ("scaler.json", "metrics.jsonl", "ledger.jsonl", "state.pt", "loss.png", "summary.json")
RUN_FOLDERS = ("adapter", "best", "merged", "tensorboard")
OWN = {"args.json", ".lock", *RUN_FILES, *RUN_FOLDERS}


# ---------------------------------------------------------------- making and opening one

def create(run) -> bool:
    """Creates the folder; True if it was not there, so that a start failing early can remove it again."""
    if run.exists() and not run.is_dir():
        raise UserError(f"--out {run} is a file, not a folder; choose a folder for the run.")
    try:
        run.mkdir(parents=True)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        raise UserError(f"cannot create the run folder --out {run} ({e.strerror}); choose another place.") from None


def tidy(run):
    """Leftovers of a kill at any instant: folder swaps finished or undone, temporary files removed."""
    for name in RUN_FOLDERS:
        recover_folder(run / name)
    clean_leftovers(run, names=OWN)


def check_resumable(run) -> bool:
    """Whether the run in `run` continues from state.pt (False: killed before its first checkpoint,
    so it starts over from args.json)."""
    if (run / "state.pt").exists() and not (run / "state.pt").is_file():
        raise UserError(f"{run / 'state.pt'} is not a file; delete it and pass --resume to start the run over "
                        "from its args.json, or choose another --out.")
    if not (run / "args.json").is_file():
        raise UserError(f"{run} holds no run to resume (no args.json); start it without --resume.")
    return (run / "state.pt").is_file()


def check_fresh(run):
    """A new run may start here: no checkpoint, and nothing that is not a run's (which clear() would delete)."""
    if (run / "state.pt").exists():
        raise UserError(f"{run} already holds a run; pass --resume to continue it or choose another --out.")
    foreign = sorted(p.name for p in run.iterdir() if p.name not in OWN)
    if foreign:
        raise UserError(f"--out {run} holds files that are not a run's ({', '.join(foreign[:3])}); choose a new or empty folder.")


def clear(run):
    """A fresh start in a folder holding no checkpoint: what an earlier start wrote goes."""
    for name in RUN_FILES:
        (run / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(run / name, ignore_errors=True)


def logged_step(line):
    """The step of a log line; infinite for a line a kill cut short, so that it is dropped."""
    try:
        step = json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
    return step if type(step) is int else math.inf


def drop_lines_after(run, step):
    """On resume: the log lines a killed run wrote after its checkpoint at `step` go."""
    for path in (run / "metrics.jsonl", run / "ledger.jsonl"):
        if path.exists():
            keep = [line for line in path.read_text().splitlines() if logged_step(line) <= step]
            atomic_write_text(path, "".join(line + "\n" for line in keep))


# ---------------------------------------------------------------- reading one back

def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
    return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)


# What train.py writes for each key a reader relies on.
ARG_CHECKS = {"model": lambda x: isinstance(x, str) and x, "data": lambda x: x is None or isinstance(x, str),
              "n_series": _is_int, "seed": _is_int, "scaling": lambda x: x in ("global", "per-series"),
              "percentile": _is_number, "scale_target": _is_number, "decimals": lambda x: x in (1, 2, 3) and _is_int(x),
              "context": _is_int, "lm_head_bias": lambda x: isinstance(x, bool),
              "split": lambda x: x in ("ours", *splits.REPORT_SPLITS)}


def read_args(run) -> dict:
    """RUN/args.json as a dict, its keys type-checked."""
    path = Path(run) / "args.json"
    if not path.is_file():
        raise UserError(f"{run} holds no args.json; pass a train.py run folder to --run.")
    args = read_json_object(path, f"is {run} a train.py run folder?")
    if "model" not in args:
        raise UserError(f"{path} names no 'model'; restore the run's args.json (train.py writes every flag there).")
    bad = next((k for k, ok in ARG_CHECKS.items() if k in args and not ok(args[k])), None)
    if bad:
        raise UserError(f"{path}: '{bad}' is {args[bad]!r}, not a value train.py writes; restore the run's args.json.")
    return args


def read_scaler(path) -> llmtime.Scaler:
    """A run's scaler.json, checked: a positive global scale."""
    try:
        scaler = llmtime.Scaler.from_dict(json.loads(Path(path).read_text()))
        ok = (not scaler.per_series and scaler.level.shape == () and math.isfinite(scaler.level) and scaler.level > 0
              and 0 < scaler.percentile <= 100 and math.isfinite(scaler.target) and scaler.target > 0)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise UserError(f"{path} is not a global scaler train.py writes (a positive 'level', 'percentile', 'target', "
                        "'per_series' false); restore it, or delete it to refit the scale on the run's train split.")
    return scaler


def adapter_of(run) -> Path:
    """The adapter a run is judged by: best/ (lowest validation loss), else the last checkpoint's adapter/."""
    run = Path(run)
    return run / "best" if (run / "best").is_dir() else run / "adapter"


def load_model(model, adapter=None, dtype=torch.float32, device="cpu", lm_head_bias=False):
    """The base checkpoint with `adapter` (ours or peft's) merged in, in eval mode: the model to forecast with."""
    import lora  # the adapter is wired onto the model here, at the level of the scripts

    net = Qwen2.from_pretrained(model, dtype=dtype, device=device, lm_head_bias=lm_head_bias)
    if adapter:
        set_extra(net, lora.load_adapter(net, adapter))
        lora.merge_lora(net.to(dtype))
    return net.to(device).eval()


def set_extra(model, extra):
    """Puts the tensors an adapter carries beside its LoRA matrices (lora.load_adapter's return) into the
    model: the coursework's lm_head bias, which peft's format has no slot for."""
    unknown = sorted(set(extra) - {"lm_head_bias"})
    if unknown:
        raise UserError(f"The adapter carries {', '.join(unknown)}, which a Qwen2 model has no place for; was it made by another program?")
    if "lm_head_bias" in extra:
        with torch.no_grad():
            model.add_lm_head_bias().copy_(extra["lm_head_bias"])


def provenance(device="cpu") -> dict:
    """What produced a result, for summary.json and results.json: versions, the code's commit (None outside a
    git checkout of qwen-min) and whether files differed from it (an untracked .py counts), the device, threads.
    The flags themselves are recorded beside it (args.json, results.json's config)."""
    import platform
    import subprocess

    import numpy

    repo = Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):  # no git here
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")  # this checkout, not one that merely contains a copy of it
    commit = git("rev-parse", "HEAD") if top and Path(top).resolve() == repo else None
    status = git("status", "--porcelain") if commit else None  # None too when git status fails
    changed = None if status is None else any(not line.startswith("??") or line.endswith(".py") for line in status.splitlines())
    dev = torch.device(device)
    return {"commit": commit, "uncommitted_changes": changed,
            "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.machine()})",
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
