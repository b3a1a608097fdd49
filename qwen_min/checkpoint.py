"""A training run's checkpoint: state.pt, the commit point, and the adapters written from it.

state.pt holds what continuing a run exactly needs: the trained tensors, the best ones so far, the
optimizer, the RNG states and the loop's counters (STATE_KEYS). It is written last (after the logs
it counts on reach the disk) and renamed into place, so a kill leaves either the old checkpoint or
the new one. adapter/ (the last checkpoint's) and best/ (the lowest validation loss) are written from
it, and rewritten from it on --resume: after a kill they always agree with the state that continues.
A resume also drops the log lines written after the checkpoint (run_folder.drop_lines_after).
"""

import pickle
import shutil
import zipfile
from dataclasses import dataclass

import torch

from .errors import UserError
from .files import atomic_write, sync

STATE_KEYS = {"step", "trainable", "best", "optimizer", "rng", "cuda_rng", "best_val", "bad_evals", "spent"}
FIX = "delete it and pass --resume to start the run over from its args.json, or choose another --out"


@dataclass
class LoopState:
    """What the training loop carries from step to step, and a checkpoint keeps beside the tensors."""
    step: int = 0
    best_val: float = float("inf")  # the lowest validation loss so far
    bad_evals: int = 0  # validations since it last fell (for --patience)
    spent: float = 0.0  # FLOPs so far, coursework convention
    best: dict | None = None  # the trained tensors at best_val; None before the first validation

    @classmethod
    def of(cls, state):
        return cls(**{k: state[k] for k in ("step", "best_val", "bad_evals", "spent", "best")})


def trainable(model) -> dict:
    """The tensors training changes (the LoRA matrices, the coursework's lm_head bias), by name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def state_of(model, optimizer, loop: LoopState) -> dict:
    """A checkpoint: the loop's state, the trained tensors, the optimizer, the RNGs."""
    return {"step": loop.step, "trainable": trainable(model), "best": loop.best, "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "best_val": loop.best_val, "bad_evals": loop.bad_evals, "spent": loop.spent}


def commit(run, state):
    """Writes state.pt, the commit point of a checkpoint: first the logs it counts on reach the disk."""
    for name in ("metrics.jsonl", "ledger.jsonl"):
        if (run / name).exists():
            sync(run / name)
    atomic_write(run / "state.pt", lambda tmp: torch.save(state, tmp))


def load_state(run, model) -> dict:
    """The checkpoint in run/state.pt, loaded as tensors and plain data only (never arbitrary objects),
    and checked to fit `model`'s trained tensors."""
    path = run / "state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # RNG states must stay on the CPU
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path} is damaged or holds more than tensors and plain data ({type(e).__name__}); {FIX}.") from None
    shapes = {n: p.shape for n, p in trainable(model).items()}

    def fits(tensors):
        return isinstance(tensors, dict) and tensors.keys() == shapes.keys() and all(
            isinstance(t, torch.Tensor) and t.shape == shapes[n] for n, t in tensors.items())
    if not (isinstance(state, dict) and STATE_KEYS <= state.keys() and fits(state["trainable"])
            and (state["best"] is None or fits(state["best"])) and isinstance(state["rng"], torch.Tensor)
            and all(type(state[k]) is int for k in ("step", "bad_evals"))
            and all(type(state[k]) in (int, float) for k in ("best_val", "spent"))):
        raise UserError(f"{path} is not a checkpoint of this run (its keys or tensors do not fit the model); {FIX}.")
    return state


def restore(state, model, optimizer, run):
    """Puts a checkpoint's tensors, optimizer and RNG states back."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in state["trainable"]:
                p.copy_(state["trainable"][name])
    try:
        optimizer.load_state_dict(state["optimizer"])  # moves its tensors to the parameters' device
        torch.set_rng_state(state["rng"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{run / 'state.pt'} holds an optimizer or RNG state that does not fit this run ({type(e).__name__}); "
                        "delete it and pass --resume to start the run over from its args.json.") from None
    if state["cuda_rng"] is not None and torch.cuda.is_available():  # as many GPUs as this machine shows
        torch.cuda.set_rng_state_all(state["cuda_rng"][: torch.cuda.device_count()])


def save_adapter(model, folder, base, tensors=None):
    """Writes the model's adapter to `folder` (peft format, swapped in whole), or `tensors`' if given;
    `base` is the checkpoint it adapts (adapter_config.json's base_model_name_or_path)."""
    import lora  # the adapter format lives with LoRA; a checkpoint only chooses which tensors to write

    params = dict(model.named_parameters())
    current = {n: params[n].detach().clone() for n in tensors or {}}
    extra = {"lm_head_bias": model.lm_head_bias} if model.lm_head_bias is not None else None
    try:
        with torch.no_grad():
            for n, t in (tensors or {}).items():
                params[n].copy_(t)
        lora.save_adapter(model, folder, base_model_name_or_path=base, extra=extra)  # under peft's names
    finally:
        with torch.no_grad():
            for n, t in current.items():
                params[n].copy_(t)


def write_adapters(model, run, state, base):
    """adapter/ and best/ as the committed state says (best/ only once a validation has run)."""
    save_adapter(model, run / "adapter", base)
    if state["best"] is None:
        shutil.rmtree(run / "best", ignore_errors=True)
    else:
        save_adapter(model, run / "best", base, state["best"])


def save(run, model, optimizer, loop: LoopState, base):
    """A whole checkpoint: state.pt committed, then adapter/ and best/ written from it."""
    state = state_of(model, optimizer, loop)
    commit(run, state)
    write_adapters(model, run, state, base)
