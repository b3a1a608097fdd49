"""lora/layer.py: where LoRALinear's matrices live, its dropout module, its flags, and its two inits.

References are torch's own: nn.Linear's default init (kaiming uniform, a = sqrt(5): loralib's and
peft's lora_A init) and a plain normal draw of std 1/sqrt(in) (the coursework's), each drawn from
the same seed as the layer's; the meta device stands in for a GPU (no tensor there is on the CPU).
"""

import math

import torch
import torch.nn as nn

from lora import LoRALinear


def test_lora_matrices_live_on_the_base_layers_device_and_dtype():
    """A base on another device (meta, standing in for cuda) or dtype gets its A and B there too;
    left on the CPU, the first forward of a GPU model would fail."""
    layer = LoRALinear(nn.Linear(6, 5, device="meta"), r=2)
    assert layer.lora_A.device.type == "meta" and layer.lora_B.device.type == "meta"
    assert layer.lora_A.shape == (2, 6) and layer.lora_B.shape == (5, 2)
    layer = LoRALinear(nn.Linear(6, 5).to(torch.float64), r=3)
    assert layer.lora_A.dtype == torch.float64 and layer.lora_B.dtype == torch.float64
    assert layer.lora_A.device.type == "cpu" and layer.lora_B.device.type == "cpu"


def test_dropout_zero_is_no_dropout_module_and_train_mode_is_deterministic():
    g = torch.Generator().manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), r=2, alpha=6, dropout=0.0).train()
    assert type(layer.dropout) is nn.Identity
    assert "Dropout" not in repr(layer)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(5, 2, generator=g))
        x = torch.randn(4, 6, generator=g)
        expected = x @ layer.base.weight.T + layer.base.bias + 3.0 * (x @ layer.lora_A.T) @ layer.lora_B.T  # alpha/r = 3
        assert torch.allclose(layer(x), expected, atol=1e-5)
    with_dropout = LoRALinear(nn.Linear(6, 5), r=2, dropout=0.25)
    assert type(with_dropout.dropout) is nn.Dropout and with_dropout.dropout.p == 0.25


def test_a_new_layer_is_unmerged_and_says_so():
    layer = LoRALinear(nn.Linear(6, 5), r=2, alpha=6)
    assert layer.merged is False
    assert layer.extra_repr() == "r=2, alpha=6, merged=False"
    layer.merge()
    assert layer.merged is True and layer.extra_repr() == "r=2, alpha=6, merged=True"
    layer.unmerge()
    assert layer.merged is False and layer.extra_repr() == "r=2, alpha=6, merged=False"


def test_reset_lora_parameters_defaults_to_the_coursework_normal_init():
    """reset_lora_parameters() with no argument: A ~ N(0, 1/in) (drawn as torch draws a normal of that
    std from the same seed), B back to zero."""
    base = nn.Linear(64, 5)
    layer = LoRALinear(base, r=4, init="kaiming_uniform")
    with torch.no_grad():
        layer.lora_B.fill_(1.0)
    with torch.random.fork_rng():
        torch.manual_seed(11)
        layer.reset_lora_parameters()
        torch.manual_seed(11)
        expected = torch.empty(4, 64).normal_(0.0, 1 / math.sqrt(64))
    assert torch.allclose(layer.lora_A, expected, rtol=0, atol=1e-7)
    assert torch.equal(layer.lora_B, torch.zeros(5, 4))


def test_kaiming_uniform_init_is_torchs_nn_linear_default_init():
    """init="kaiming_uniform" draws A exactly as nn.Linear(in, r) draws its weight from the same seed
    (kaiming uniform with a = sqrt(5), bound 1/sqrt(in)); another `a` would scale every draw."""
    base = nn.Linear(256, 5)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        layer = LoRALinear(base, r=8, init="kaiming_uniform")
        torch.manual_seed(3)
        reference = nn.Linear(256, 8).weight.detach()
    assert torch.allclose(layer.lora_A, reference, rtol=0, atol=1e-7)
    bound = 1 / math.sqrt(256)
    assert layer.lora_A.abs().max().item() <= bound
    assert layer.lora_A.abs().max().item() > 0.97 * bound  # 2048 uniform draws reach the bound's last 3%
