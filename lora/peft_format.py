"""Adapters on disk in peft's format, so they move between qwen-min and peft + transformers.

A folder holds `adapter_config.json` (peft's LoraConfig keys) and `adapter_model.safetensors`
with peft's tensor names:

    base_model.model.<module path in transformers>.lora_A.weight    (r, in)
    base_model.model.<module path in transformers>.lora_B.weight    (out, r)

`module_name` maps our module paths to transformers' (for Qwen2: `layers.0.self_attn.q_proj` ->
`model.layers.0.self_attn.q_proj`); `extra` tensors (e.g. the coursework's lm_head bias, which
peft has no slot for) go to `extra_parameters.safetensors` beside them, which peft ignores.
"""

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .inject import inject_lora, lora_layers

PEFT_PREFIX = "base_model.model."
CONFIG, WEIGHTS, EXTRA = "adapter_config.json", "adapter_model.safetensors", "extra_parameters.safetensors"


def _atomic_save(tensors: dict, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def save_adapter(model, folder, module_name=lambda n: n, base_model_name_or_path=None, extra=None):
    """Writes the model's LoRA layers (and `extra` {name: tensor}) to `folder` in peft's format."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("The model has no LoRA layers to save.")
    first = next(iter(layers.values()))
    if len({(m.r, m.alpha) for m in layers.values()}) != 1:
        raise ValueError("peft's format needs one rank and alpha for all LoRA layers.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in layers.items():
        key = PEFT_PREFIX + module_name(name)
        tensors[f"{key}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": getattr(first.dropout, "p", 0.0),
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "inference_mode": True,
    }
    _atomic_save(tensors, folder / WEIGHTS)
    if extra:
        _atomic_save({k: v.detach().contiguous().cpu() for k, v in extra.items()}, folder / EXTRA)
    else:
        (folder / EXTRA).unlink(missing_ok=True)  # never leave an earlier save's extras behind
    tmp = folder / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, folder / CONFIG)
    return folder


def read_adapter_config(folder) -> dict:
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} is not a LoRA adapter folder: it needs {CONFIG} and {WEIGHTS}.")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / CONFIG} is not valid JSON ({e}).") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder} holds a {config.get('peft_type')} adapter; only LoRA is supported.")
    for flag in ("use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise ValueError(f"{folder}/{CONFIG} sets {flag}, which qwen-min's LoRA does not implement.")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{folder}/{CONFIG} gives per-module ranks or alphas; qwen-min needs one rank and alpha.")
    return config


def load_adapter(model, folder, module_name=lambda n: n):
    """Injects LoRA as `folder`'s adapter_config.json describes and loads its weights.

    Returns the `extra` tensors saved beside it ({} when none)."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    targets = config["target_modules"]
    targets = [targets] if isinstance(targets, str) else targets
    r, alpha = config["r"], config.get("lora_alpha", config["r"])
    if config.get("use_rslora"):
        alpha = alpha * r ** 0.5  # rsLoRA scales by alpha / sqrt(r), which is alpha' / r for alpha' = alpha sqrt(r)
    inject_lora(model, r=r, alpha=alpha, targets=[t.rsplit(".", 1)[-1] for t in targets])
    tensors = {k.replace(".default", ""): v for k, v in load_file(str(folder / WEIGHTS)).items()}
    layers = lora_layers(model)
    expected = {}
    for name, m in layers.items():
        key = PEFT_PREFIX + module_name(name)
        expected[f"{key}.lora_A.weight"] = m.lora_A
        expected[f"{key}.lora_B.weight"] = m.lora_B
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unknown or missing:
        raise ValueError(f"Adapter in {folder} does not fit this model: "
                         f"{len(missing)} LoRA tensor(s) missing (e.g. {missing[:1]}), {len(unknown)} unknown (e.g. {unknown[:1]}).")
    with torch.no_grad():
        for key, p in expected.items():
            if tensors[key].shape != p.shape:
                raise ValueError(f"Adapter tensor {key} has shape {tuple(tensors[key].shape)}, the model expects {tuple(p.shape)}.")
            p.copy_(tensors[key])
    extra_file = folder / EXTRA
    return load_file(str(extra_file)) if extra_file.is_file() else {}
