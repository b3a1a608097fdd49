"""qwen_min.loss: shifted cross-entropy, padding skipped, optional restricted vocabulary."""

import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, tiny_config
from lora import inject_lora, lora_layers
from qwen_min.loss import causal_lm_loss, mean_cross_entropy, mean_of_batch_means

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


def _two_batches():
    """Batch 1: 2 rows x 9 tokens, one row half padding (8 + 3 = 11 scored labels); batch 2: 1 row x 4 tokens (3)."""
    g = torch.Generator().manual_seed(3)
    ids1, ids2 = torch.randint(3, 16, (2, 9), generator=g), torch.randint(3, 16, (1, 4), generator=g)
    labels1 = ids1.clone()
    labels1[1, 4:] = -100
    return [(ids1, labels1), (ids2, ids2.clone())]


def _per_token_losses(model, batches):
    """Every scored label's cross-entropy, one batch at a time, padding dropped by hand: a list of (n_b,) tensors."""
    out = []
    with torch.no_grad():
        for ids, labels in batches:
            logits = model(ids)[:, :-1]  # (B, T-1, V)
            targets = labels[:, 1:]
            keep = targets != -100
            out.append(F.cross_entropy(logits[keep], targets[keep], reduction="none"))
    return out


def test_mean_cross_entropy_weights_batches_by_their_scored_tokens():
    model = random_model(tiny_config())
    inject_lora(model, r=2, dropout=0.5)  # dropout: a result computed in train mode would differ
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.normal_(generator=torch.Generator().manual_seed(5))
    batches = _two_batches()
    per_batch = _per_token_losses(model.eval(), batches)
    model.train()
    assert [len(t) for t in per_batch] == [11, 3]
    every_token = torch.cat(per_batch).mean().item()  # one mean over the 14 scored tokens
    of_means = (per_batch[0].mean() + per_batch[1].mean()).item() / 2
    assert abs(every_token - of_means) > 1e-3  # the two conventions differ on these batches
    mean, n = mean_cross_entropy(model, batches)
    assert n == 14 and mean == pytest.approx(every_token, abs=1e-5)
    assert model.training  # left in the mode it was in
    assert mean_of_batch_means(model, batches) == pytest.approx(of_means, abs=1e-5)
    assert model.training
    # report A's convention: batch 1, labels = input_ids, so its padding (token 0 here) is scored too
    padded = torch.tensor([[5, 6, 7, 0, 0, 0], [8, 9, 10, 11, 12, 13]])
    report_a = [(row[None], row[None].clone()) for row in padded]
    with torch.no_grad():
        per_window = [F.cross_entropy(model.eval()(row[None])[0, :-1], row[1:]).item() for row in padded]  # 5 labels each
    model.train()
    assert mean_of_batch_means(model, report_a) == pytest.approx(sum(per_window) / 2, abs=1e-5)
    model.eval()
    mean_cross_entropy(model, batches)
    assert not model.training


def test_mean_cross_entropy_over_a_restricted_vocabulary_and_no_batches():
    model = random_model(tiny_config())
    g = torch.Generator().manual_seed(4)
    batches = [(ALPHABET[torch.randint(0, 13, (2, 7), generator=g)],) * 2, (ALPHABET[torch.randint(0, 13, (1, 5), generator=g)],) * 2]
    with torch.no_grad():
        losses = []
        for ids, _ in batches:
            logits = model(ids)[:, :-1, ALPHABET]  # (B, T-1, 13)
            targets = (ids[:, 1:, None] == ALPHABET).float().argmax(-1)
            losses.append(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none"))
    mean, n = mean_cross_entropy(model, batches, vocab_ids=ALPHABET)
    assert n == 12 + 4 and mean == pytest.approx(torch.cat(losses).mean().item(), abs=1e-5)
    assert mean_cross_entropy(model, []) == (0.0, 0)


RESTRICTED_ERROR = ("A label lies outside the restricted vocabulary; "
                    "restrict the loss only for text made of those tokens.")


def _restricted_by_hand(model, ids, labels, vocab):
    """Cross-entropy over the columns `vocab` of the full logits, scored labels only, targets
    looked up by a Python dict: the restricted loss computed without the code's lookup table."""
    index = {int(t): j for j, t in enumerate(vocab)}
    with torch.no_grad():
        logits = model(ids)[:, :-1][..., vocab]  # (B, T-1, n)
    targets = labels[:, 1:]
    keep = targets != -100
    mapped = torch.tensor([index[int(t)] for t in targets[keep]])
    return F.cross_entropy(logits[keep], mapped)


def test_restricted_vocabulary_scores_token_id_zero_and_skips_padding():
    """Token 0 is a label like any other (the lookup clamps only the -100 padding to a valid
    index); padding labels are skipped with a restricted vocabulary as without one."""
    model = random_model(tiny_config())
    vocab = torch.tensor([0, 5, 7, 9])  # 1 is not in it: a clamp to 1 would find no label there
    ids = torch.tensor([[5, 0, 7, 0, 9, 0], [0, 9, 0, 5, 7, 5]])
    labels = ids.clone()
    labels[1, 4:] = -100  # row 1: two padding positions
    by_hand = _restricted_by_hand(model, ids, labels, vocab)  # 5 + 3 labels
    with torch.no_grad():
        got = causal_lm_loss(model, ids, labels, vocab)
    assert got.dtype == torch.float32 and got.shape == ()
    assert torch.allclose(got, by_hand, atol=1e-6)
    # the same numbers through the full head differ: the restriction is not a no-op here
    with torch.no_grad():
        assert abs(causal_lm_loss(model, ids, labels).item() - by_hand.item()) > 1e-3


def test_restricted_vocabulary_refuses_an_outside_label_with_its_sentence():
    model = random_model(tiny_config())
    vocab = torch.tensor([0, 5, 7])
    ids = torch.tensor([[5, 0, 7]])
    with pytest.raises(ValueError) as e:
        causal_lm_loss(model, ids, torch.tensor([[5, 0, 8]]), vocab)  # 8 is outside
    assert str(e.value) == RESTRICTED_ERROR
    with pytest.raises(ValueError) as e:
        causal_lm_loss(model, ids, torch.tensor([[5, 1, 7]]), vocab)  # 1 is outside, 0 is not
    assert str(e.value) == RESTRICTED_ERROR
    # an outside token where the label is padding is fine: padding is never looked up
    with torch.no_grad():
        got = causal_lm_loss(model, torch.tensor([[5, 0, 150]]), torch.tensor([[5, 0, -100]]), vocab)
    assert torch.allclose(got, _restricted_by_hand(model, torch.tensor([[5, 0, 150]]), torch.tensor([[5, 0, -100]]), vocab), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_restricted_vocabulary_on_cuda():
    """The lookup table is built on the labels' device (on CPU alone a wrong device cannot show)."""
    model = random_model(tiny_config())
    vocab = torch.tensor([0, 5, 7, 9])
    ids = torch.tensor([[5, 0, 7, 0, 9, 0]])
    labels = ids.clone()
    labels[0, 4:] = -100
    by_hand = _restricted_by_hand(model, ids, labels, vocab)
    with torch.no_grad():
        got = causal_lm_loss(model.cuda(), ids.cuda(), labels.cuda(), vocab.cuda())
    assert got.device.type == "cuda" and torch.allclose(got.cpu(), by_hand, atol=1e-5)
