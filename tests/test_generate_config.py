"""qwen_min.generation_config: which generation_config.json files are read, with which values, and
which are refused. Expected values come from transformers (its own defaults, its meaning of each
field) or by hand; tests/test_generate.py decodes with the configs against transformers."""

import json

import pytest

from qwen_min import GenerationConfig
from qwen_min.errors import UserError

# The value of each field transformers does not implement here that makes it do nothing in transformers
# (beam search of one beam, an n-gram ban of size 0, a penalty of 1, guidance of scale 1, ...), besides null,
# and a value that changes its tokens.
NEUTRAL_AND_ACTIVE = {
    "num_beams": (1, 4), "num_beam_groups": (1, 2), "penalty_alpha": (None, 0.6), "no_repeat_ngram_size": (0, 3),
    "encoder_no_repeat_ngram_size": (0, 2), "encoder_repetition_penalty": (1.0, 1.2), "min_length": (0, 5),
    "min_new_tokens": (0, 3), "typical_p": (1.0, 0.9), "min_p": (None, 0.1), "top_h": (None, 0.5),
    "epsilon_cutoff": (0.0, 3e-4), "eta_cutoff": (0.0, 3e-4), "bad_words_ids": (None, [[5]]),
    "suppress_tokens": (None, [5]), "begin_suppress_tokens": (None, [5]), "sequence_bias": (None, [[[5], -1.0]]),
    "forced_bos_token_id": (None, 3), "forced_eos_token_id": (None, 3),
    "exponential_decay_length_penalty": (None, [5, 1.5]), "guidance_scale": (1.0, 1.5),
    "renormalize_logits": (False, True), "watermarking_config": (None, {"greenlist_ratio": 0.25}),
}


def read(tmp_path, fields):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps(fields))
    return GenerationConfig.from_json(path)


def test_fields_left_out_or_null_take_transformers_own_defaults(tmp_path):
    from transformers import GenerationConfig as HFGenerationConfig

    hf = HFGenerationConfig._get_default_generation_params()
    want = GenerationConfig(do_sample=hf["do_sample"], temperature=hf["temperature"], top_k=hf["top_k"],
                            top_p=hf["top_p"], repetition_penalty=hf["repetition_penalty"])
    assert want == GenerationConfig(do_sample=False, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0)
    assert read(tmp_path, {}) == want
    nulls = {k: None for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                               "eos_token_id", "pad_token_id")}
    assert read(tmp_path, nulls) == want
    # each field alone changes only itself
    assert read(tmp_path, {"temperature": 0.3}) == GenerationConfig(temperature=0.3, top_k=50)
    assert read(tmp_path, {"top_p": 0.5}) == GenerationConfig(top_p=0.5, top_k=50)
    assert read(tmp_path, {"repetition_penalty": 1.3}) == GenerationConfig(repetition_penalty=1.3, top_k=50)
    assert read(tmp_path, {"do_sample": True}) == GenerationConfig(do_sample=True, top_k=50)


def test_a_missing_file_is_the_neutral_config(tmp_path):
    assert GenerationConfig.from_json(tmp_path / "generation_config.json") == GenerationConfig()
    assert GenerationConfig() == GenerationConfig(do_sample=False, temperature=1.0, top_k=None, top_p=1.0,
                                                  repetition_penalty=1.0, eos_token_id=None, pad_token_id=None)


@pytest.mark.parametrize("key", sorted(NEUTRAL_AND_ACTIVE))
def test_unimplemented_fields_are_accepted_when_neutral_and_refused_when_active(tmp_path, key):
    from transformers import GenerationConfig as HFGenerationConfig

    neutral, active = NEUTRAL_AND_ACTIVE[key]
    hf_default = HFGenerationConfig._get_default_generation_params().get(key, getattr(HFGenerationConfig(), key))
    for value in {json.dumps(v): v for v in (None, neutral, hf_default)}.values():  # transformers' default does nothing
        assert read(tmp_path, {key: value, "top_k": 7}) == GenerationConfig(top_k=7)
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({key: active}))
    with pytest.raises(UserError) as e:
        GenerationConfig.from_json(path)
    assert str(e.value) == (f"{path} sets '{key}' to {active!r}, which qwen-min's generate does not implement; "
                            "remove it to decode as transformers would without it.")


@pytest.mark.parametrize("fields, want", [
    ({"temperature": 0}, GenerationConfig(temperature=0.0, top_k=50)),  # greedy may say 0
    ({"top_k": 0}, GenerationConfig(top_k=0)),  # 0 switches top-k off
    ({"top_p": 1}, GenerationConfig(top_k=50, top_p=1.0)),
    ({"top_p": 1e-6}, GenerationConfig(top_k=50, top_p=1e-6)),
    ({"repetition_penalty": 0.5}, GenerationConfig(top_k=50, repetition_penalty=0.5)),  # < 1 favours repeats, allowed
    ({"do_sample": True, "temperature": 1e-3}, GenerationConfig(do_sample=True, temperature=1e-3, top_k=50)),
    ({"eos_token_id": 7}, GenerationConfig(top_k=50, eos_token_id=(7,))),
    ({"eos_token_id": 0}, GenerationConfig(top_k=50, eos_token_id=(0,))),
    ({"eos_token_id": [7, 0, 9]}, GenerationConfig(top_k=50, eos_token_id=(7, 0, 9))),
    ({"pad_token_id": 0}, GenerationConfig(top_k=50, pad_token_id=0)),
    ({"pad_token_id": 12}, GenerationConfig(top_k=50, pad_token_id=12)),
    ({"max_new_tokens": 5, "max_length": 9, "bos_token_id": 3}, GenerationConfig(top_k=50)),  # length fields ignored
])
def test_boundary_values_are_read(tmp_path, fields, want):
    got = read(tmp_path, fields)
    assert got == want
    assert all(type(getattr(got, k)) is float for k in ("temperature", "top_p", "repetition_penalty"))


@pytest.mark.parametrize("fields, key, want", [
    ({"temperature": float("inf")}, "temperature", "a number"),
    ({"top_p": float("nan")}, "top_p", "a number"),
    ({"top_p": True}, "top_p", "a number"),
    ({"temperature": "0.7"}, "temperature", "a number"),
    ({"top_k": True}, "top_k", "an integer >= 0"),
    ({"top_k": "5"}, "top_k", "an integer >= 0"),
    ({"do_sample": 1}, "do_sample", "true or false"),
    ({"top_p": 1.0000001}, "top_p", "a number in (0, 1]"),
    ({"top_p": -0.5}, "top_p", "a number in (0, 1]"),
    ({"temperature": -1e-9}, "temperature", "a number > 0 when do_sample is true (>= 0 otherwise)"),
    ({"repetition_penalty": -1e-9}, "repetition_penalty", "a number > 0 (1.0 means no penalty)"),
    ({"eos_token_id": True}, "eos_token_id", "a token id or a non-empty list of token ids"),
    ({"eos_token_id": -1}, "eos_token_id", "a token id or a non-empty list of token ids"),
    ({"eos_token_id": [3, -1]}, "eos_token_id", "a token id or a non-empty list of token ids"),
    ({"eos_token_id": [3, True]}, "eos_token_id", "a token id or a non-empty list of token ids"),
    ({"eos_token_id": [3, 4.0]}, "eos_token_id", "a token id or a non-empty list of token ids"),
    ({"eos_token_id": {"a": 1}}, "eos_token_id", "a token id or a non-empty list of token ids"),
    ({"pad_token_id": True}, "pad_token_id", "a token id"),
    ({"pad_token_id": 2.0}, "pad_token_id", "a token id"),
    ({"pad_token_id": [2]}, "pad_token_id", "a token id"),
])
def test_bad_values_are_refused_naming_the_file_the_key_and_the_value(tmp_path, fields, key, want):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps(fields))
    with pytest.raises(UserError) as e:
        GenerationConfig.from_json(path)
    assert str(e.value) == f"{path}: '{key}' must be {want}, not {fields[key]!r}; fix or delete the file."


def test_from_dict_names_its_source_or_says_generation_config():
    with pytest.raises(UserError) as e:
        GenerationConfig.from_dict({"top_k": -1})
    assert str(e.value) == "generation config: 'top_k' must be an integer >= 0, not -1; fix or delete the file."
    with pytest.raises(UserError) as e:
        GenerationConfig.from_dict({"num_beams": 3})
    assert str(e.value).startswith("generation config sets 'num_beams' to 3, which")


def test_unreadable_files_get_the_whole_sentence(tmp_path):
    path = tmp_path / "generation_config.json"
    path.write_text("[1, 2]")
    with pytest.raises(UserError) as e:
        GenerationConfig.from_json(path)
    assert str(e.value) == (f"{path} holds a JSON list, not an object; "
                            "fix or delete it (without it decoding is greedy with no repetition penalty).")
    path.write_text("{")
    with pytest.raises(UserError) as e:
        GenerationConfig.from_json(path)
    message = str(e.value)
    assert message.startswith(f"{path} is not valid JSON (") and message.endswith(
        "); fix or delete it (without it decoding is greedy with no repetition penalty).")
    assert e.value.__cause__ is None and e.value.__suppress_context__  # `from None`: one sentence, no chained traceback
    path.write_text('{"top_k": 3}', encoding="utf-8")
    assert GenerationConfig.from_pretrained(tmp_path) == GenerationConfig(top_k=3)  # a folder: its generation_config.json
