"""Next-token cross-entropy for causal language-model training.

Position t predicts token t+1, so logits[:, :-1] are scored against labels[:, 1:]. Labels of
-100 (padding) are skipped: they enter neither the sum nor the count.

`vocab_ids` restricts the softmax to a few tokens (e.g. the 13 digits and separators that LLMTIME
text is made of): only those rows of the output layer are computed, which skips most of the
151,936 x 896 head. Every label must then be one of those tokens.
"""

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from data.windows import IGNORE_INDEX  # -100: its one home is where the labels are made


def tokens_fed(window: int) -> int:
    """Tokens a training window of `window` tokens feeds the model: its last is only a target. The FLOP
    counts of a training step or a validation batch (train.py, evaluate.py, flops.py) start here."""
    return window - 1


def causal_lm_loss(model, input_ids, labels, vocab_ids=None):
    """input_ids, labels (B, T) -> mean cross-entropy (float32 scalar) over the scored tokens."""
    h = model.body(input_ids[:, :-1])  # (B, T-1, D), T-1 = tokens_fed(T); right padding cannot reach real tokens (causal)
    targets = labels[:, 1:]  # (B, T-1)
    if vocab_ids is not None:
        lookup = torch.full((model.config.vocab_size,), IGNORE_INDEX, dtype=torch.long, device=targets.device)
        lookup[vocab_ids] = torch.arange(len(vocab_ids), device=targets.device)
        real = targets != IGNORE_INDEX
        mapped = lookup[targets.clamp(min=0)]  # token id -> index into vocab_ids
        if (mapped[real] == IGNORE_INDEX).any():
            raise ValueError("A label lies outside the restricted vocabulary; restrict the loss only for text made of those tokens.")
        targets = torch.where(real, mapped, IGNORE_INDEX)
    logits = model.head(h, vocab_ids)  # (B, T-1, V) or (B, T-1, n)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def mean_cross_entropy(model, batches, vocab_ids=None, autocast=nullcontext):
    """Cross-entropy per scored token over (input_ids, labels) batches -> (mean, n_tokens).

    Each batch's mean is weighted by its scored tokens, so batches of different sizes count alike
    per token. The model runs in eval mode and is left in the mode it was in."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for input_ids, labels in batches:
        with autocast():
            loss = causal_lm_loss(model, input_ids, labels, vocab_ids)
        tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
        total, count = total + loss.item() * tokens, count + tokens
    model.train(was_training)
    return total / max(count, 1), count


@torch.no_grad()
def mean_of_batch_means(model, batches, autocast=nullcontext):
    """The plain mean of each batch's mean cross-entropy over (input_ids, labels) batches.

    Report A's test loss (its evaluate.py: batch 1, labels = input_ids): every window weighs the
    same however many real tokens it holds, and with labels = input_ids its padding is scored too.
    Our own convention is mean_cross_entropy (per token, padding masked)."""
    was_training = model.training
    model.eval()
    losses = []
    for input_ids, labels in batches:
        with autocast():
            losses.append(causal_lm_loss(model, input_ids, labels).item())
    model.train(was_training)
    return sum(losses) / max(len(losses), 1)
