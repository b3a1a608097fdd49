"""Reading a train.py run folder back: its flags, its scale, its adapter, the model they make.

A run folder (docs/train.md, "What a run folder promises") holds:

    args.json      every flag of the run (the recipe: model, data, split, scaling, LoRA)
    scaler.json    the global scale fit on the training split (llmtime.Scaler.to_dict)
    best/          the adapter with the best validation loss, in peft's format
    adapter/       the adapter of the last checkpoint

evaluate.py and `python -m qwen_min` read runs through here, so both see the same run. Anything
that is not what train.py writes is a UserError naming the file and what to do.
"""

import json
import math
from pathlib import Path

import torch

from data import llmtime, splits

from .errors import UserError
from .model import Qwen2


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
    try:
        args = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path} is not valid JSON; is {run} a train.py run folder?") from None
    if not isinstance(args, dict):
        raise UserError(f"{path} holds a JSON {type(args).__name__}, not the object train.py writes; is {run} a train.py run folder?")
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
    status = git("status", "--porcelain") if commit else ""
    changed = [line for line in status.splitlines() if not line.startswith("??") or line.endswith(".py")]
    dev = torch.device(device)
    return {"commit": commit, "uncommitted_changes": bool(changed) if commit else None,
            "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.machine()})",
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
