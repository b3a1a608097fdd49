"""qwen_min.config: every refusal's sentence and boundary, and every default of config.json's keys.

Expected values are written out by hand: the bounds from INT_FIELDS' comment, the defaults from
Qwen2.5-0.5B-Instruct's published config.json and transformers' Qwen2Config defaults.
"""

import json

import pytest

from conftest import tiny_config
from qwen_min import Qwen2Config
from qwen_min.errors import UserError

TAIL = "; fix the file or pass a Qwen2 checkpoint folder."


def hf(**update):
    """A complete tiny config.json, with keys changed (None removes a key)."""
    d = tiny_config().to_hf_dict() | update
    return {k: v for k, v in d.items() if v is not None}


def refusal(d, source="config.json"):
    with pytest.raises(UserError) as e:
        Qwen2Config.from_hf_dict(d) if source == "config.json" else Qwen2Config.from_hf_dict(d, source=source)
    return str(e.value)


def test_defaults_are_qwen2_5_0_5b():
    assert Qwen2Config().to_dict() == dict(
        vocab_size=151936, dim=896, hidden_dim=4864, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64,
        rope_theta=1000000.0, norm_eps=1e-6, max_seq_len=32768, tie_embeddings=True,
        bos_token_id=151643, eos_token_id=151645)


# (field, its config.json key, the largest value accepted)
BOUNDS = [("vocab_size", "vocab_size", 4194304), ("dim", "hidden_size", 65536), ("hidden_dim", "intermediate_size", 262144),
          ("n_layers", "num_hidden_layers", 1024), ("n_heads", "num_attention_heads", 1024),
          ("n_kv_heads", "num_key_value_heads", 1024), ("head_dim", "head_dim", 1024),
          ("max_seq_len", "max_position_embeddings", 2097152)]


@pytest.mark.parametrize("field, key, high", BOUNDS)
def test_whole_number_fields_accept_1_to_their_bound_and_refuse_beyond(field, key, high):
    ok = {"n_heads": dict(n_kv_heads=1), "n_kv_heads": dict(n_heads=1024)}.get(field, {})  # heads must divide
    assert getattr(tiny_config(**ok | {field: high}), field) == high
    if field != "head_dim":  # 1 is odd: refused for RoPE, below
        assert getattr(tiny_config(**{field: 1} | (dict(n_kv_heads=1) if field == "n_heads" else {})), field) == 1
    for bad in (0, high + 1, -1, 2.0, True, "8"):
        with pytest.raises(UserError) as e:
            tiny_config(**ok | {field: bad})
        assert str(e.value) == f"Qwen2Config: {key} must be a whole number from 1 to {high}, not {bad!r}."


def test_one_head_of_one_is_accepted():
    cfg = tiny_config(n_heads=1, n_kv_heads=1, head_dim=2)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (1, 1, 2)


@pytest.mark.parametrize("field, key", [("rope_theta", "rope_theta"), ("norm_eps", "rms_norm_eps")])
def test_positive_numbers_refuse_zero_negative_infinite_nan_and_non_numbers(field, key):
    assert getattr(tiny_config(**{field: 3}), field) == 3  # an int is a number
    assert getattr(tiny_config(**{field: 1e-30}), field) == 1e-30
    for bad in (0, 0.0, -1.0, float("inf"), float("nan"), True, "1e4", None):
        with pytest.raises(UserError) as e:
            tiny_config(**{field: bad})
        assert str(e.value) == f"Qwen2Config: {key} must be a positive number, not {bad!r}."


def test_tie_embeddings_must_be_a_bool():
    assert tiny_config(tie_embeddings=False).tie_embeddings is False
    for bad in (1, 0, "true", None):
        with pytest.raises(UserError) as e:
            tiny_config(tie_embeddings=bad)
        assert str(e.value) == f"Qwen2Config: tie_word_embeddings must be true or false, not {bad!r}."


@pytest.mark.parametrize("key", ["bos_token_id", "eos_token_id"])
def test_token_ids_are_whole_numbers_from_zero(key):
    assert getattr(tiny_config(**{key: 0}), key) == 0
    assert getattr(tiny_config(**{key: 5_000_000}), key) == 5_000_000  # no upper bound: any id
    for bad in (-1, 1.0, "1", None, [1]):
        with pytest.raises(UserError) as e:
            tiny_config(**{key: bad})
        assert str(e.value) == f"Qwen2Config: {key} must be a token id (a whole number >= 0), not {bad!r}."


def test_heads_divisibility_and_even_head_dim_messages():
    with pytest.raises(UserError) as e:
        tiny_config(n_heads=6, n_kv_heads=4)
    assert str(e.value) == "Qwen2Config: num_attention_heads (6) must be a multiple of num_key_value_heads (4)."
    assert tiny_config(n_heads=6, n_kv_heads=3).n_kv_heads == 3
    with pytest.raises(UserError) as e:
        tiny_config(head_dim=15)
    assert str(e.value) == "Qwen2Config: head_dim must be even for rotary embeddings, not 15."


def test_rope_table_bound_is_2_to_the_28_entries():
    assert tiny_config(max_seq_len=1 << 20, head_dim=256).max_seq_len == 1 << 20  # exactly 2^28: accepted
    with pytest.raises(UserError) as e:
        tiny_config(max_seq_len=(1 << 20) + 1, head_dim=256)
    assert str(e.value) == ("Qwen2Config: max_position_embeddings x head_dim = 268435712 is more than "
                            "qwen-min's RoPE tables hold (268435456).")


def test_to_hf_dict_is_transformers_keys_by_hand():
    cfg = Qwen2Config(vocab_size=157, dim=60, hidden_dim=97, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=10,
                      rope_theta=5000.0, norm_eps=1e-5, max_seq_len=99, tie_embeddings=False, bos_token_id=3, eos_token_id=4)
    assert cfg.to_hf_dict() == {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 157, "hidden_size": 60,
        "intermediate_size": 97, "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 2,
        "head_dim": 10, "hidden_act": "silu", "rope_theta": 5000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 99,
        "tie_word_embeddings": False, "use_sliding_window": False, "bos_token_id": 3, "eos_token_id": 4,
        "attention_dropout": 0.0}
    assert Qwen2Config.from_hf_dict(cfg.to_hf_dict()) == cfg
    import transformers  # and transformers reads the same numbers from it
    t = transformers.Qwen2Config(**cfg.to_hf_dict())
    assert (t.hidden_size, t.head_dim, t.num_key_value_heads, t.rms_norm_eps, t.tie_word_embeddings) == (60, 10, 2, 1e-5, False)


def test_absent_keys_take_transformers_defaults():
    d = {"vocab_size": 160, "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2, "num_attention_heads": 4}
    cfg = Qwen2Config.from_hf_dict(d)  # no model_type, hidden_act, use_sliding_window, rope, eps, ids, head_dim...
    assert cfg.to_dict() == dict(vocab_size=160, dim=64, hidden_dim=112, n_layers=2, n_heads=4, n_kv_heads=4, head_dim=16,
                                 rope_theta=10000.0, norm_eps=1e-6, max_seq_len=32768, tie_embeddings=True,
                                 bos_token_id=151643, eos_token_id=151645)
    assert type(cfg.rope_theta) is float and type(cfg.norm_eps) is float
    assert Qwen2Config.from_hf_dict(d | {"model_type": "qwen2", "use_sliding_window": False, "hidden_act": "silu",
                                         "rope_parameters": None, "rope_scaling": None}) == cfg


def test_nulls_and_lists_of_token_ids():
    assert Qwen2Config.from_hf_dict(hf(bos_token_id=None, eos_token_id=None)).bos_token_id == 151643
    assert Qwen2Config.from_hf_dict(hf(eos_token_id=None)).eos_token_id == 151645
    assert Qwen2Config.from_hf_dict(hf(eos_token_id=[7, 9])).eos_token_id == 7  # the first of Qwen's two
    assert refusal(hf(eos_token_id=[])) == "config.json: eos_token_id must be a token id (a whole number >= 0), not []" + TAIL


def test_rope_theta_nested_wins_over_flat_and_flat_over_default():
    assert Qwen2Config.from_hf_dict(hf(rope_theta=777.0)).rope_theta == 777.0
    nested = hf(rope_theta=777.0, rope_parameters={"rope_type": "default", "rope_theta": 12345})
    assert Qwen2Config.from_hf_dict(nested).rope_theta == 12345.0
    assert Qwen2Config.from_hf_dict(hf(rope_theta=777.0, rope_parameters={"rope_type": "default"})).rope_theta == 777.0
    assert Qwen2Config.from_hf_dict(hf(rope_theta=None, rope_parameters={})).rope_theta == 10000.0


def test_plain_rope_scaling_is_accepted():
    for scaling in ({"rope_type": "default"}, {"type": "default"}, {}):
        assert Qwen2Config.from_hf_dict(hf(rope_scaling=scaling)) == tiny_config()
    assert Qwen2Config.from_hf_dict(hf(rope_parameters={"rope_theta": 10000.0})) == tiny_config()  # no rope_type: default


@pytest.mark.parametrize("update, problem", [
    (dict(model_type="llama"), "describes a 'llama' model, and qwen-min implements 'qwen2' only"),
    (dict(use_sliding_window=True), "switches on sliding-window attention, which qwen-min does not implement (set use_sliding_window to false)"),
    (dict(hidden_act="gelu"), "asks for the activation 'gelu', and qwen-min implements SwiGLU with 'silu' only"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "asks for RoPE scaling {'type': 'linear', 'factor': 2.0}, and qwen-min implements plain RoPE only"),
    (dict(rope_scaling={"rope_type": "yarn"}), "asks for RoPE scaling {'rope_type': 'yarn'}, and qwen-min implements plain RoPE only"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1.0}),
     "asks for RoPE scaling {'rope_type': 'llama3', 'rope_theta': 1.0}, and qwen-min implements plain RoPE only"),
    (dict(rope_parameters=[1]), "gives rope_parameters or rope_scaling that are not JSON objects"),
    (dict(rope_scaling="linear"), "gives rope_parameters or rope_scaling that are not JSON objects"),
    (dict(num_key_value_heads=3), "num_attention_heads (4) must be a multiple of num_key_value_heads (3)"),
])
def test_unsupported_or_impossible_hf_configs_name_the_file_and_the_key(update, problem):
    assert refusal(hf(**update)) == f"config.json: {problem}" + TAIL
    assert refusal(hf(**update), source="some/dir/config.json") == f"some/dir/config.json: {problem}" + TAIL


@pytest.mark.parametrize("key", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"])
def test_each_required_key_is_named_when_missing(key):
    assert refusal(hf(**{key: None})) == f"config.json: lacks the key '{key}', which a Qwen2 config must have" + TAIL
    assert "lacks the key 'vocab_size'" in refusal(hf(vocab_size=None, num_attention_heads=None))  # the first, in order


def test_head_dim_given_wins_over_hidden_size_over_heads():
    assert Qwen2Config.from_hf_dict(hf(hidden_size=64, num_attention_heads=4, head_dim=32)).head_dim == 32  # not 64 / 4


def test_head_dim_absent_is_hidden_size_over_heads():
    assert Qwen2Config.from_hf_dict(hf(head_dim=None, hidden_size=60, num_attention_heads=6, num_key_value_heads=1)).head_dim == 10
    assert Qwen2Config.from_hf_dict(hf(head_dim=None, hidden_size=64, num_attention_heads=1, num_key_value_heads=1)).head_dim == 64
    for dim, heads in ((60, 8), (64.0, 4), (64, 4.0), (64, 0), (64, -4)):
        assert refusal(hf(head_dim=None, hidden_size=dim, num_attention_heads=heads)) == (
            f"config.json: has no head_dim and hidden_size ({dim!r}) is not a multiple of num_attention_heads ({heads!r})" + TAIL)


@pytest.mark.parametrize("value", [[1, 2], "qwen2", 42, None])
def test_a_config_that_is_no_object_is_refused_by_its_type(value):
    assert refusal(value) == f"config.json: holds a {type(value).__name__}, not a JSON object of Qwen2 settings" + TAIL


def test_from_json_names_the_path(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(UserError) as e:
        Qwen2Config.from_json(path)
    assert str(e.value) == (f"No config.json at {path}; pass a Qwen2 checkpoint folder "
                            "(config.json, model.safetensors, tokenizer.json).")
    path.write_text("{not json")
    with pytest.raises(UserError) as e:
        Qwen2Config.from_json(path)
    assert str(e.value).startswith(f"{path} is not valid JSON (") and str(e.value).endswith("); restore the checkpoint's config.json.")
    assert e.value.__cause__ is None and e.value.__suppress_context__
    path.write_bytes(b'{"a": "\xff"}')  # not UTF-8
    with pytest.raises(UserError, match="is not valid JSON"):
        Qwen2Config.from_json(path)
    path.write_text(json.dumps(hf(model_type="llama")))
    with pytest.raises(UserError) as e:
        Qwen2Config.from_json(str(path))  # a str path works too
    assert str(e.value) == f"{path}: describes a 'llama' model, and qwen-min implements 'qwen2' only" + TAIL
    path.write_text(json.dumps(hf()))
    assert Qwen2Config.from_json(path) == tiny_config()


def test_rope_scaling_without_a_type_is_plain_rope_as_in_transformers():
    """transformers 5 reads a scaling dict with neither rope_type nor type as rope_type 'default'."""
    assert Qwen2Config.from_hf_dict(hf(rope_scaling={"factor": 2.0})) == tiny_config()


def test_rope_parameters_with_the_older_type_key_are_refused():  # transformers 5 reads 'type' as rope_type there too
    # transformers.Qwen2Config(rope_parameters={"type": "linear", "factor": 2.0}).rope_parameters["rope_type"] == "linear"
    assert refusal(hf(rope_parameters={"type": "linear", "factor": 2.0})) == (
        "config.json: asks for RoPE scaling {'type': 'linear', 'factor': 2.0}, and qwen-min implements plain RoPE only" + TAIL)
