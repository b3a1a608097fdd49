"""qwen_min.generate: KV-cached batched generation against transformers and its own options."""

import pytest
import torch

from conftest import hf_twin, random_model, tiny_config, write_checkpoint
from qwen_min import generate
from qwen_min.__main__ import main
from qwen_min.generate import pad_left, sample

ROWS = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22], [30, 31, 32, 33, 34]]


def test_greedy_equals_transformers_generate_ragged_batch():
    cfg = tiny_config(eos_token_id=999)  # no eos in the tiny vocab: every row runs the full length
    model = random_model(cfg)
    ids, mask = pad_left(ROWS, pad_id=0)
    ours = generate(model, ids, max_new_tokens=20, attention_mask=mask, stop_token_ids=[])
    ref = hf_twin(model).generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
    assert ours.shape == (3, ids.shape[1] + 20)
    assert torch.equal(ours, ref)


def test_batched_rows_equal_rows_generated_alone():
    model = random_model(tiny_config())
    batched = generate(model, ROWS, max_new_tokens=12, stop_token_ids=[])
    width = batched.shape[1] - 12
    for i, r in enumerate(ROWS):
        alone = generate(model, [r], max_new_tokens=12, stop_token_ids=[])
        assert batched[i, width - len(r):].tolist() == alone[0].tolist()


def test_stop_tokens_end_a_row_and_pad_the_rest():
    model = random_model(tiny_config())
    free = generate(model, ROWS, max_new_tokens=10, stop_token_ids=[])
    first = free[:, -10:]  # the tokens each row produces when nothing stops it
    stop_id = first[0, 3].item()  # row 0 stops at its 4th token (or earlier if the id repeats)
    out = generate(model, ROWS, max_new_tokens=10, stop_token_ids=[stop_id], pad_token_id=0)
    new = out[:, free.shape[1] - 10:]
    for row, ref in zip(new.tolist(), first.tolist()):
        if stop_id in ref:
            k = ref.index(stop_id)
            assert row[:k + 1] == ref[:k + 1] and all(t == 0 for t in row[k + 1:])
        else:
            assert row == ref[:len(row)]


def test_generation_ends_when_every_row_has_stopped():
    model = random_model(tiny_config())
    free = generate(model, ROWS, max_new_tokens=10, stop_token_ids=[])
    third = free[:, -8].tolist()  # the 3rd new token of each row
    out = generate(model, ROWS, max_new_tokens=10, stop_token_ids=third, pad_token_id=0)
    assert out.shape[1] <= free.shape[1] - 7  # no row ran past its 3rd token, so neither did the batch


def test_allowed_tokens_are_the_only_ones_produced():
    model = random_model(tiny_config())
    allowed = [3, 17, 42, 99]
    for temperature in (0.0, 1.5):
        out = generate(model, ROWS, max_new_tokens=15, temperature=temperature, seed=0,
                       allowed_token_ids=allowed, stop_token_ids=[])
        assert set(out[:, -15:].flatten().tolist()) <= set(allowed)
    greedy = generate(model, ROWS, max_new_tokens=15, allowed_token_ids=allowed, stop_token_ids=[])
    with torch.no_grad():  # greedy restricted = argmax over the allowed columns of the full logits
        logits = model(greedy[:1, :-1])[0, -15:]
    assert greedy[0, -15:].tolist() == [allowed[i] for i in logits[:, allowed].argmax(-1).tolist()]


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = random_model(tiny_config())
    a = generate(model, ROWS, max_new_tokens=12, temperature=1.0, seed=123, stop_token_ids=[])
    b = generate(model, ROWS, max_new_tokens=12, temperature=1.0, seed=123, stop_token_ids=[])
    c = generate(model, ROWS, max_new_tokens=12, temperature=1.0, seed=124, stop_token_ids=[])
    greedy = generate(model, ROWS, max_new_tokens=12, stop_token_ids=[])
    top1 = generate(model, ROWS, max_new_tokens=12, temperature=1.0, top_k=1, seed=5, stop_token_ids=[])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(top1, greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = {sample(logits, 1.0, top_p=0.7, generator=torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    draws = {sample(logits, 1.0, top_p=0.45, generator=torch.Generator().manual_seed(s)).item() for s in range(50)}
    assert draws == {0}


def test_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="at least one token"):
        pad_left([[1, 2], []], pad_id=0)


def test_command_line_generates_from_a_checkpoint_folder(tmp_path, capsys):
    folder = write_checkpoint(random_model(tiny_config(vocab_size=96)), tmp_path / "ckpt")
    main(["--model", str(folder), "--prompt", "1.2,3.4;", "--max-new-tokens", "8"])
    out = capsys.readouterr().out.strip("\n")
    assert 0 < len(out) <= 8  # one character per token in the tiny tokenizer, specials skipped
    with pytest.raises(SystemExit):
        main(["--model", str(folder), "--prompt", "x", "--top-p", "1.5"])


def test_samples_share_one_prefill_and_greedy_samples_agree():
    model = random_model(tiny_config())
    greedy = generate(model, ROWS, max_new_tokens=8, stop_token_ids=[])
    three = generate(model, ROWS, max_new_tokens=8, num_samples=3, stop_token_ids=[])
    assert three.shape == (9, greedy.shape[1]) and torch.equal(three, greedy.repeat_interleave(3, dim=0))
    hot = generate(model, ROWS, max_new_tokens=8, num_samples=4, temperature=2.0, seed=0, stop_token_ids=[])
    assert len({tuple(r) for r in hot[:4, -8:].tolist()}) > 1  # samples of one prompt differ
    assert all(torch.equal(hot[i, :-8], hot[4 * (i // 4), :-8]) for i in range(12))  # and share its prompt


def test_stop_after_ends_a_row_at_its_nth_occurrence_of_a_token():
    model = random_model(tiny_config())
    free = generate(model, ROWS, max_new_tokens=12, stop_token_ids=[])[:, -12:]
    target = free[0, 0].item()  # row 0 produces this first, so it ends after its 2nd occurrence
    out = generate(model, ROWS, max_new_tokens=12, stop_token_ids=[], stop_after=(target, 2), pad_token_id=0)
    new = out[:, len(ROWS[0]):]  # the longest prompt sets the padded width
    for row, ref in zip(new.tolist(), free.tolist()):
        hits = [i for i, t in enumerate(ref) if t == target]
        end = hits[1] + 1 if len(hits) >= 2 else len(row)
        assert row[:end] == ref[:end] and all(t == 0 for t in row[end:])
