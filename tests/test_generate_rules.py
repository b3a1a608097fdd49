"""qwen_min.generate: where its settings come from when the caller gives none (the model config's eos
and bos, a GenerationConfig's eos and pad), its refusals, and the sizes that sit on a boundary (a
penalty of 2, two samples, a prompt that fills the positions exactly). Expected values come from
transformers' `generate` on the same weights, or by hand."""

import pytest
import torch

from conftest import hf_twin, random_model, tiny_config
from qwen_min import GenerationConfig, generate
from qwen_min.generate import decoding, pad_left, sample, tokens_seen

ROWS = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22], [30, 31, 32, 33, 34]]


def free_run(n):
    """The tokens (3, n) each row of ROWS writes greedily when nothing stops it, by transformers."""
    model = random_model(tiny_config(eos_token_id=999))
    ids, mask = pad_left(ROWS, pad_id=0)
    out = hf_twin(model).generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                                  eos_token_id=None)
    return out[:, -n:]


def test_pad_left_by_hand():
    ids, mask = pad_left([[4, 5, 6], [7], [8, 9]], pad_id=3)
    assert ids.tolist() == [[4, 5, 6], [3, 3, 7], [3, 8, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert ids.dtype == mask.dtype == torch.long  # transformers' dtypes for input_ids and attention_mask
    for rows in ([], [[1, 2], []]):
        with pytest.raises(ValueError) as e:
            pad_left(rows, pad_id=0)
        assert str(e.value) == "Every prompt must hold at least one token."


def test_without_stop_ids_or_config_a_row_stops_at_the_model_configs_eos_and_pads_with_its_bos():
    free = free_run(10)
    eos = free[0, 3].item()  # row 0's 4th token
    model = random_model(tiny_config(eos_token_id=eos, bos_token_id=7))  # the same weights (same seed and shapes)
    assert eos != 7 and 7 not in free[:, :4].tolist()[0]
    out = generate(model, ROWS, max_new_tokens=10, use_generation_config=False, details=True)
    ids, mask = pad_left(ROWS, pad_id=7)
    theirs = hf_twin(model).generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                                     pad_token_id=7)
    assert out.tokens.tolist() == theirs.tolist()
    assert out.tokens[1, :5].tolist() == [7] * 5  # the prompts were left-padded with bos too
    ends = [row.index(eos) + 1 if eos in row else 10 for row in free.tolist()]
    assert out.lengths == ends and ends[0] == free[0].tolist().index(eos) + 1 <= 4
    row0 = out.tokens[0, 8:].tolist()
    assert row0[ends[0]:] == [7] * (len(row0) - ends[0])


def test_a_configs_eos_and_pad_win_over_the_model_configs():
    free = free_run(10)
    eos = free[1, 2].item()
    model = random_model(tiny_config(eos_token_id=free[0, 0].item(), bos_token_id=7))
    gc = GenerationConfig(eos_token_id=(eos, 998), pad_token_id=5)
    out = generate(model, ROWS, max_new_tokens=10, generation_config=gc, details=True)
    ends = [row.index(eos) + 1 if eos in row else 10 for row in free.tolist()]
    assert out.lengths == ends and ends[0] > 1  # row 0 ran past the model config's eos, its first token
    T = len(ROWS[0])
    for row, ref, end in zip(out.tokens[:, T:].tolist(), free.tolist(), ends):
        assert row[:end] == ref[:end] and row[end:] == [5] * (len(row) - end)
    assert out.tokens[1, :5].tolist() == [5] * 5


def test_a_penalty_of_two_equals_transformers():
    model = random_model(tiny_config(eos_token_id=999))
    ids, mask = pad_left(ROWS, pad_id=0)
    ours = generate(model, ids, 20, attention_mask=mask, repetition_penalty=2.0, stop_token_ids=[], pad_token_id=0)
    theirs = hf_twin(model).generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, repetition_penalty=2.0,
                                     pad_token_id=0, eos_token_id=None)
    assert ours.tolist() == theirs.tolist()
    assert ours[:, -20:].tolist() != free_run(20).tolist()


def test_a_penalty_without_an_attention_mask_equals_transformers():
    model = random_model(tiny_config(eos_token_id=999))
    ids = torch.tensor([ROWS[0]])
    ours = generate(model, ids, 20, repetition_penalty=1.5, stop_token_ids=[])
    theirs = hf_twin(model).generate(ids, max_new_tokens=20, do_sample=False, repetition_penalty=1.5, pad_token_id=0,
                                     eos_token_id=None)
    assert ours.tolist() == theirs.tolist()
    # a prompt without a mask is all real tokens
    assert tokens_seen(torch.tensor([[3, 1, 3]]), None, 5).tolist() == [[False, True, False, True, False]]


def test_two_samples_per_prompt_equal_transformers_num_return_sequences():
    model = random_model(tiny_config(eos_token_id=999))
    hf = hf_twin(model)
    ids, mask = pad_left(ROWS, pad_id=0)
    ours = generate(model, ids, 12, attention_mask=mask, temperature=1.5, seed=3, num_samples=2, stop_token_ids=[],
                    pad_token_id=0)
    torch.manual_seed(3)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=None,
                         top_p=1.0, num_return_sequences=2, pad_token_id=0, eos_token_id=None)
    assert ours.shape == (6, ids.shape[1] + 12) and ours.tolist() == theirs.tolist()
    greedy = generate(model, ids, 12, attention_mask=mask, num_samples=2, stop_token_ids=[], pad_token_id=0)
    assert greedy.tolist() == hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                          eos_token_id=None).repeat_interleave(2, dim=0).tolist()


def test_do_sample_from_the_config_or_a_keyword_samples_at_the_configs_temperature():
    model = random_model(tiny_config(eos_token_id=999))
    hf = hf_twin(model)
    ids, mask = pad_left(ROWS, pad_id=0)
    gc = GenerationConfig(do_sample=True, temperature=1.4)
    for kwargs in ({"generation_config": gc}, {"do_sample": True, "generation_config": GenerationConfig(temperature=1.4)}):
        ours = generate(model, ids, 12, attention_mask=mask, seed=11, stop_token_ids=[], pad_token_id=0, **kwargs)
        torch.manual_seed(11)
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=1.4, top_k=None,
                             top_p=1.0, pad_token_id=0, eos_token_id=None)
        assert ours.tolist() == theirs.tolist()
    # do_sample=False keeps a given temperature from sampling
    greedy = generate(model, ids, 12, attention_mask=mask, do_sample=False, temperature=1.4, seed=11, stop_token_ids=[],
                      pad_token_id=0)
    assert greedy[:, -12:].tolist() == free_run(12).tolist()


@pytest.mark.parametrize("kwargs, says", [
    ({"do_sample": True, "temperature": 0.0}, "Sampling needs a temperature > 0, got 0.0; pass do_sample=False for greedy decoding."),
    ({"generation_config": GenerationConfig(do_sample=True, temperature=0.0)}, "Sampling needs a temperature > 0, got 0.0;"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0 (1.0 is none), got 0.0."),
    ({"repetition_penalty": -1}, "repetition_penalty must be > 0 (1.0 is none), got -1.0."),
])
def test_impossible_settings_are_refused(kwargs, says):
    model = random_model(tiny_config())
    with pytest.raises(ValueError) as e:
        generate(model, ROWS, 4, **kwargs)
    assert says in str(e.value)


def test_input_ids_must_be_a_matrix():
    model = random_model(tiny_config())
    with pytest.raises(ValueError) as e:
        generate(model, torch.tensor([5, 6, 7]), 4)
    assert str(e.value) == "input_ids must be (batch, tokens), got shape (3,)."


def test_a_prompt_and_new_tokens_that_fill_the_positions_exactly_are_allowed():
    model = random_model(tiny_config(max_seq_len=16, eos_token_id=999))
    out = generate(model, [ROWS[2]], 11, stop_token_ids=[], details=True)  # 5 + 11 = 16
    assert out.tokens.shape == (1, 16) and out.lengths == [11] and out.active == [1] * 11
    with pytest.raises(ValueError) as e:
        generate(model, [ROWS[2]], 12, stop_token_ids=[])
    assert str(e.value) == ("5 prompt tokens plus max_new_tokens=12 exceed the model's 16 positions; "
                            "generate fewer tokens or shorten the prompt.")


def test_sample_turns_bfloat16_logits_into_float32_probabilities(monkeypatch):
    recorded, draw = [], torch.multinomial

    def spy(probs, num_samples, **kwargs):
        recorded.append(probs)
        return draw(probs, num_samples, **kwargs)

    monkeypatch.setattr(torch, "multinomial", spy)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    sample(logits.bfloat16(), 0.7, generator=torch.Generator().manual_seed(0))
    assert recorded[-1].dtype == torch.float32
    torch.testing.assert_close(recorded[-1], (logits / 0.7).softmax(-1), atol=1e-6, rtol=0)


def test_a_stop_token_still_ends_a_row_while_stop_after_counts():
    """Both rules at once, ends worked out by hand from the free run: a row ends at its first stop
    token or its 2nd `target`, whichever comes first."""
    free = free_run(12).tolist()
    target, stop = free[0][0], free[1][2]
    def end(row, rule):
        hits = [i for i, t in enumerate(row) if t == target]
        at_stop = row.index(stop) + 1 if stop in row else 12
        at_after = hits[1] + 1 if len(hits) >= 2 else 12
        return {"stop": at_stop, "after": at_after, "both": min(at_stop, at_after)}[rule]
    ends = [end(row, "both") for row in free]
    assert any(end(row, "stop") < end(row, "after") for row in free)  # the stop token decides some row
    assert any(end(row, "after") < end(row, "stop") for row in free)  # and the count another
    model = random_model(tiny_config(eos_token_id=999))
    out = generate(model, ROWS, 12, stop_token_ids=[stop], stop_after=(target, 2), pad_token_id=0, details=True)
    assert out.lengths == ends and out.active == [sum(e > j for e in ends) for j in range(max(ends))]


def test_a_one_token_prompt_equals_transformers():
    model = random_model(tiny_config(eos_token_id=999))
    ids = torch.tensor([[9], [40]])
    ours = generate(model, ids, 10, stop_token_ids=[], pad_token_id=0)
    theirs = hf_twin(model).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                     pad_token_id=0, eos_token_id=None)
    assert ours.tolist() == theirs.tolist()


def test_decoding_reads_the_config_it_is_given_unless_told_not_to():
    model = random_model(tiny_config(eos_token_id=4, bos_token_id=6))
    gc = GenerationConfig(do_sample=True, temperature=0.9, top_k=8, top_p=0.7, repetition_penalty=1.3,
                          eos_token_id=(2, 3), pad_token_id=5)
    assert decoding(model, gc) == gc
    neutral = GenerationConfig(do_sample=False, temperature=1.0, top_k=None, top_p=1.0, repetition_penalty=1.0,
                               eos_token_id=(4,), pad_token_id=6)  # the model config's eos and bos
    assert decoding(model, gc, use_generation_config=False) == neutral
    assert decoding(model, gc, temperature=0.0) == GenerationConfig(
        do_sample=False, temperature=0.0, top_k=8, top_p=0.7, repetition_penalty=1.3, eos_token_id=(2, 3), pad_token_id=5)


def test_sample_without_a_temperature_is_greedy():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, -1.0, 1.5]]).repeat(500, 1)  # softmax 0.04, 0.84, 0.11: T = 1 would stray
    assert sample(logits).tolist() == [1, 0] * 500
