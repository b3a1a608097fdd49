"""LoRA for any PyTorch model with named nn.Linear layers: layer, injection, peft-format adapters."""

from .inject import (ALL_LINEAR, DEFAULT_TARGETS, inject_lora, lora_layers, mark_only_lora_as_trainable, merge_lora,
                     merged_state_dict, parse_targets, unmerge_lora)
from .layer import LoRALinear
from .peft_format import load_adapter, save_adapter

__all__ = ["LoRALinear", "DEFAULT_TARGETS", "ALL_LINEAR", "parse_targets", "inject_lora", "lora_layers",
           "mark_only_lora_as_trainable", "merge_lora", "unmerge_lora", "merged_state_dict",
           "save_adapter", "load_adapter"]
