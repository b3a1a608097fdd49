"""Adapters on disk in peft's format, so they move between qwen-min and peft + transformers.

A folder holds `adapter_config.json` (peft's LoraConfig keys) and `adapter_model.safetensors`
with peft's tensor names:

    base_model.model.<module path in transformers>.lora_A.weight    (r, in)
    base_model.model.<module path in transformers>.lora_B.weight    (out, r)

`module_name` (default: the model's `checkpoint_name`, which Qwen2 has) maps our module paths to transformers' (for Qwen2: `layers.0.self_attn.q_proj` ->
`model.layers.0.self_attn.q_proj`); `extra` tensors (e.g. the coursework's lm_head bias, which
peft has no slot for) go to `extra_parameters.safetensors` beside them, which peft ignores.
"""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwen_min.errors import UserError
from qwen_min.files import atomic_folder, read_json_object
from qwen_min.weights import read_safetensors

from .inject import inject_lora, linear_names, lora_layers

PEFT_PREFIX = "base_model.model."
CONFIG, WEIGHTS, EXTRA = "adapter_config.json", "adapter_model.safetensors", "extra_parameters.safetensors"
MAX_RANK = 4096


def names_in_checkpoint(model, module_name=None):
    """How the model's module names read in a peft file: `module_name` if given, else the model's own
    `checkpoint_name` (a model that loads transformers checkpoints knows their names), else unchanged."""
    return module_name or getattr(model, "checkpoint_name", None) or (lambda name: name)


def save_adapter(model, folder, module_name=None, base_model_name_or_path=None, extra=None):
    """Writes the model's LoRA layers (and `extra` {name: tensor}) to `folder` in peft's format.

    The folder is the adapter's alone: it is written beside its place and swapped in whole
    (qwen_min.files.atomic_folder), so a kill leaves the previous adapter or the new one, and
    files of an earlier save (an extra_parameters file the new one lacks) never linger.
    A model with no LoRA layers but `extra` tensors (report A's ablation: only the lm_head bias
    trained) saves a rank-0 adapter: r = 0, no target modules, the tensors in extra_parameters.
    That one is qwen-min's own; peft has no rank 0, and no slot for the bias either way."""
    layers = lora_layers(model)
    if not layers and not extra:
        raise ValueError("The model has no LoRA layers to save.")
    first = next(iter(layers.values()), None)
    if len({(m.r, m.alpha) for m in layers.values()}) > 1:
        raise ValueError("peft's format needs one rank and alpha for all LoRA layers.")
    folder = Path(folder)
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in (CONFIG, WEIGHTS, EXTRA, "README.md")) if folder.is_dir() else []
    if foreign:
        raise UserError(f"{folder} holds files that are not an adapter's ({', '.join(foreign[:3])}), which saving an adapter "
                        "there would delete; choose a new or adapter-only folder.")
    module_name = names_in_checkpoint(model, module_name)
    tensors = {}
    for name, m in layers.items():
        key = PEFT_PREFIX + module_name(name)
        tensors[f"{key}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": first.r if first else 0, "lora_alpha": first.alpha if first else 0,
        "lora_dropout": getattr(first.dropout, "p", 0.0) if first else 0.0,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "inference_mode": True,
    }

    def write(tmp):
        save_file(tensors, str(tmp / WEIGHTS))
        if extra:
            save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(tmp / EXTRA))
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
    return atomic_folder(folder, write)


def read_adapter_config(folder) -> dict:
    """adapter_config.json of `folder`, checked: a LoRA adapter qwen-min can load (one rank, one alpha)."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise UserError(f"{folder} is not a LoRA adapter folder: it needs {CONFIG} and {WEIGHTS}.")
    path = folder / CONFIG
    config = read_json_object(path, "save the adapter again")

    def refuse(problem):
        return UserError(f"{path} {problem}; pass an adapter saved by qwen-min or peft's LoRA.")
    if config.get("peft_type", "LORA") != "LORA":
        raise refuse(f"describes a {config.get('peft_type')} adapter, and qwen-min loads LoRA only")
    for flag in ("use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise refuse(f"sets {flag}, which qwen-min's LoRA does not implement")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise refuse("gives per-module ranks or alphas, and qwen-min needs one rank and alpha")
    r, alpha, targets = config.get("r"), config.get("lora_alpha", config.get("r")), config.get("target_modules")
    if r == 0 and type(r) is int and targets == [] and (folder / EXTRA).is_file():  # rank 0: only extra tensors trained
        return config
    if type(r) is not int or not 1 <= r <= MAX_RANK:
        raise refuse(f"gives the rank r = {r!r}, not a whole number from 1 to {MAX_RANK}")
    if type(alpha) not in (int, float) or not (math.isfinite(alpha) and alpha > 0):
        raise refuse(f"gives lora_alpha = {alpha!r}, not a positive number")
    targets = [targets] if isinstance(targets, str) else targets
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise refuse("has no target_modules list of module names")
    return config | {"lora_alpha": alpha, "target_modules": targets}


def load_adapter(model, folder, module_name=None):
    """Injects LoRA as `folder`'s adapter_config.json describes and loads its weights.

    Returns the `extra` tensors saved beside it ({} when none). Whatever does not fit the model
    (unknown target modules, another rank or shape, missing tensors) is a UserError naming the folder."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    r, alpha = config["r"], config["lora_alpha"]
    if config.get("use_rslora"):
        alpha = alpha * r ** 0.5  # rsLoRA scales by alpha / sqrt(r), which is alpha' / r for alpha' = alpha sqrt(r)
    tensors = {k.replace(".default", ""): v for k, v in read_safetensors(folder / WEIGHTS)}
    targets = [t.rsplit(".", 1)[-1] for t in config["target_modules"]]
    unknown = sorted(set(targets) - linear_names(model))
    if unknown:
        raise UserError(f"{folder / CONFIG} targets {', '.join(unknown)}, which this model does not have; was it trained on another model?")
    if r:  # rank 0 injects nothing: its adapter is its extra tensors
        inject_lora(model, r=r, alpha=alpha, targets=targets)
    module_name = names_in_checkpoint(model, module_name)
    expected = {}
    for name, m in lora_layers(model).items():
        key = PEFT_PREFIX + module_name(name)
        expected[f"{key}.lora_A.weight"] = m.lora_A
        expected[f"{key}.lora_B.weight"] = m.lora_B
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unknown or missing:
        raise UserError(f"Adapter in {folder} does not fit this model: {len(missing)} LoRA tensor(s) missing "
                        f"(e.g. {missing[:1]}), {len(unknown)} unknown (e.g. {unknown[:1]}); was it trained on another model?")
    bad = next((k for k, p in expected.items() if tensors[k].shape != p.shape), None)
    if bad:
        raise UserError(f"Adapter tensor {bad} in {folder} has shape {tuple(tensors[bad].shape)}, but rank {r} on this model "
                        f"needs {tuple(expected[bad].shape)}; was it trained on another model?")
    with torch.no_grad():
        for key, p in expected.items():
            p.copy_(tensors[key])
    return dict(read_safetensors(folder / EXTRA)) if (folder / EXTRA).is_file() else {}
