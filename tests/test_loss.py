"""qwen_min.loss: shifted cross-entropy, padding skipped, optional restricted vocabulary."""

import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, tiny_config
from qwen_min.loss import causal_lm_loss

ALPHABET = torch.tensor([3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15])


def test_loss_is_shifted_and_skips_padding():
    model = random_model(tiny_config())
    ids = torch.randint(3, 16, (2, 9))
    labels = ids.clone()
    labels[1, 6:] = -100  # row 1: three padding positions
    with torch.no_grad():
        logits = model(ids)
    by_hand = torch.cat([F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none"),
                         F.cross_entropy(logits[1, :5], ids[1, 1:6], reduction="none")]).mean()
    with torch.no_grad():
        assert torch.allclose(causal_lm_loss(model, ids, labels), by_hand, atol=1e-6)
        ids[1, 6:] = 0  # whatever sits in the padding cannot change the loss
        assert torch.allclose(causal_lm_loss(model, ids, labels), by_hand, atol=1e-6)


def test_numeric_vocabulary_is_a_softmax_over_those_tokens_only():
    model = random_model(tiny_config())
    ids = ALPHABET[torch.randint(0, 13, (2, 10))]
    with torch.no_grad():
        logits = model(ids)[:, :-1, ALPHABET]  # (B, T-1, 13)
        targets = (ids[:, 1:, None] == ALPHABET).float().argmax(-1)
        by_hand = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        numeric = causal_lm_loss(model, ids, ids, ALPHABET)
        full = causal_lm_loss(model, ids, ids)
    assert torch.allclose(numeric, by_hand, atol=1e-6)
    assert numeric < full  # fewer competitors for every label
    with pytest.raises(ValueError, match="outside the restricted vocabulary"):
        causal_lm_loss(model, torch.tensor([[3, 100]]), torch.tensor([[3, 100]]), ALPHABET)
