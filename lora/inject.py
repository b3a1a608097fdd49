"""Putting LoRA into a model by module name, and choosing what trains.

Knows nothing about Qwen beyond names: any nn.Linear whose own name (the last part of its dotted
path) is in `targets` is wrapped in a LoRALinear. Qwen2's names are q_proj, k_proj, v_proj, o_proj
(attention) and gate_proj, up_proj, down_proj (MLP); the coursework adapts q_proj and v_proj.
"""

import torch.nn as nn

from qwen_min.errors import UserError

from .layer import LoRALinear

DEFAULT_TARGETS = ("q_proj", "v_proj")
TIED_HEAD_NAMES = ("lm_head", "embed_tokens")
# The linear layers of a Llama-family block (Qwen2's), in order; peft's "all-linear" is these.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_targets(text: str) -> tuple:
    """A --targets value -> module names: short ("q,v"), peft's ("q_proj,v_proj") or "all-linear".

    "none" (or nothing) -> (). Anything else is a ValueError naming the choices."""
    if text.strip() in ("", "none"):
        return ()
    if text.strip() == "all-linear":
        return ALL_LINEAR
    names = []
    for t in filter(None, (t.strip() for t in text.split(","))):
        name = t if t.endswith("_proj") else f"{t}_proj"
        if name not in ALL_LINEAR:
            raise ValueError(f"unknown LoRA target '{t}'; use some of q,k,v,o,gate,up,down (or peft's q_proj, ...), "
                             "all-linear, or none")
        if name not in names:
            names.append(name)
    return tuple(names)


def inject_lora(model: nn.Module, r: int, alpha: float = None, dropout: float = 0.0,
                targets=DEFAULT_TARGETS, init: str = "kaiming_normal") -> list:
    """Wraps every nn.Linear named in `targets` with LoRA (in place); returns the wrapped names."""
    targets = tuple(targets)
    refused = [t for t in targets if t in TIED_HEAD_NAMES]
    if refused:
        raise UserError(f"LoRA on {refused[0]} is refused: Qwen2.5's output head is tied to the token embedding, "
                         "so adapting it would also change the input embedding (and merging would clobber it).")
    unknown = sorted(set(targets) - linear_names(model))
    if unknown:
        raise UserError(f"The model has no nn.Linear named {', '.join(unknown)}; choose LoRA targets from {', '.join(sorted(linear_names(model)))}.")
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                layer = LoRALinear(child, r, alpha, dropout, init).train(child.training)  # eval stays eval
                setattr(module, child_name, layer)
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    return wrapped


def linear_names(model: nn.Module) -> set:
    """The own names (last part of the dotted path) of the model's nn.Linear layers not yet wrapped in LoRA."""
    wrapped = {n + ".base" for n in lora_layers(model)}
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in wrapped}


def lora_layers(model: nn.Module) -> dict:
    """name -> LoRALinear for every LoRA layer in the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_only_lora_as_trainable(model: nn.Module, also=()) -> list:
    """Freezes everything except lora_A, lora_B and the parameters named in `also` (e.g. a head bias).

    Returns the names of the trainable parameters."""
    trainable = []
    for name, p in model.named_parameters():
        keep = name.rsplit(".", 1)[-1] in ("lora_A", "lora_B") or name in also
        p.requires_grad_(keep)
        if keep:
            trainable.append(name)
    return trainable


def merge_lora(model: nn.Module):
    for m in lora_layers(model).values():
        m.merge()
    return model


def unmerge_lora(model: nn.Module):
    for m in lora_layers(model).values():
        m.unmerge()
    return model


def merged_state_dict(model: nn.Module) -> dict:
    """The base model's state dict with every LoRA update folded into its weight, under the
    original parameter names (`x.q_proj.weight`, not `x.q_proj.base.weight`). The model itself
    is not touched."""
    plain, drop = {}, set()  # LoRA's names -> (the plain layer's name, the layer whose update it gets)
    for path, m in lora_layers(model).items():
        at = f"{path}." if path else ""  # "" when the model is itself one LoRALinear
        plain[at + "base.weight"] = (at + "weight", None if m.merged else m)
        plain[at + "base.bias"] = (at + "bias", None)
        drop |= {at + "lora_A", at + "lora_B"}
    sd = {}
    for name, t in model.state_dict().items():
        if name in drop:
            continue
        new, layer = plain.get(name, (name, None))
        if layer is not None:
            t = t + layer.delta_weight().to(t.dtype)
        sd[new] = t.detach().clone()
    return sd
