"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update.

         x ──────────── W (frozen, out x in) ───────────┐
         │                                              (+) ─> y = W x + b + (alpha/r) B A x
         └─ dropout ─> A (r x in) ─> * alpha/r ─> B (out x r) ┘

B starts at zero, so a fresh adapter leaves the model exactly as it was; only A and B (r * (in + out)
numbers instead of in * out) are trained. `merge()` folds B A into W for fast inference and
`unmerge()` takes it out again; both are explicit and idempotent (no side effect of `eval()`).
A and B may be kept in float32 while a bfloat16 base computes in bfloat16 (mixed-precision
training): the branch casts its input to their dtype and its output back.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float = None, dropout: float = 0.0, init: str = "kaiming_normal"):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {r}.")
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.r, self.alpha = r, float(alpha if alpha is not None else r)  # coursework: alpha defaults to r
        self.scaling = self.alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=w.dtype, device=w.device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=w.dtype, device=w.device))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._weight_before_merge = None  # kept only for low-precision bases, where W + d - d != W
        self.reset_lora_parameters(init)

    def reset_lora_parameters(self, init: str = "kaiming_normal"):
        """A random, B zero. kaiming_normal: the coursework starter (std 1/sqrt(in));
        kaiming_uniform: loralib's and peft's default (bound 1/sqrt(in))."""
        with torch.no_grad():
            if init == "kaiming_normal":
                nn.init.kaiming_normal_(self.lora_A, nonlinearity="linear")
            elif init == "kaiming_uniform":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                raise ValueError(f"Unknown LoRA init '{init}'; use 'kaiming_normal' or 'kaiming_uniform'.")
            self.lora_B.zero_()

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def delta_weight(self):  # (out, in): the update B A * alpha/r that merge() adds to W
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x):  # (..., in) -> (..., out)
        y = self.base(x)
        if self.merged:
            return y
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A) * self.scaling  # (..., r); scale r numbers, not out
        return y + F.linear(h, self.lora_B).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            w = self.base.weight
            if w.dtype != torch.float32:  # bf16 rounding would make unmerge inexact: keep the original
                self._weight_before_merge = w.clone()
            w += self.delta_weight().to(w.dtype)
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            if self._weight_before_merge is not None:
                self.base.weight.copy_(self._weight_before_merge)
                self._weight_before_merge = None
            else:
                self.base.weight -= self.delta_weight()
            self.merged = False
        return self

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha:g}, merged={self.merged}"
