"""qwen_min.tokenizer on a tiny offline tokenizer.json; the real one is in test_real_weights.py."""

import json

import pytest

from conftest import write_tokenizer
from qwen_min import Tokenizer
from qwen_min.errors import UserError


def test_encode_decode_and_special_tokens(tmp_path):
    write_tokenizer(tmp_path / "tokenizer.json")
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.pad_id, tok.im_start_id, tok.eos_id) == (0, 1, 2)
    ids = tok.encode("1.5,2;")
    assert len(ids) == 6 and tok.decode(ids) == "1.5,2;"
    prompt = tok.chat_prompt("hi")
    assert prompt == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                      "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(prompt)
    assert ids.count(tok.im_start_id) == 3 and ids.count(tok.im_end_id) == 2  # specials are single tokens
    assert tok.decode(ids) == "system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\nuser\nhi\nassistant\n"
    assert tok.encode_batch(["1", "22"]) == [tok.encode("1"), tok.encode("22")]


def test_character_ids_are_the_ids_of_each_character(tmp_path):
    write_tokenizer(tmp_path / "tokenizer.json")
    tok = Tokenizer.from_pretrained(tmp_path)
    # conftest's vocabulary: 3 special tokens, then "0123456789.,;:" from id 3
    assert tok.character_ids("01;") == [3, 4, 15]
    assert tok.character_ids("0123456789.,;") == list(range(3, 16))


def write_byte_level_bpe(path):
    """A tiny byte-level BPE tokenizer.json, as Qwen's is: one token per byte, and one merge, ".,"
    (Qwen has it too). Returns its vocabulary."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()) + [".,"])}
    tok = HFTokenizer(models.BPE(vocab, [(".", ",")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.save(str(path))
    return vocab


def test_character_ids_encode_each_character_alone_and_refuse_multi_token_characters(tmp_path):
    """Byte-level BPE merges ".," into one token, so the ids must come character by character;
    a character of several bytes is several tokens, which LLMTIME decoding cannot use: refused."""
    vocab = write_byte_level_bpe(tmp_path / "tokenizer.json")
    tok = Tokenizer(tmp_path / "tokenizer.json")
    assert tok.encode("1.,2") == [vocab["1"], vocab[".,"], vocab["2"]]  # the merge is real
    assert tok.character_ids("1.,2") == [vocab["1"], vocab["."], vocab[","], vocab["2"]]
    assert len(tok.encode("\U0001d11e")) == 4  # the G clef: 4 UTF-8 bytes, no merges
    with pytest.raises(UserError, match="does not give the character\\(s\\) '\U0001d11e' one token each"):
        tok.character_ids("1\U0001d11e")


def test_own_system_prompt_replaces_the_default():
    text = Tokenizer.chat_prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], add_generation_prompt=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"


def test_missing_or_foreign_tokenizer_is_refused(tmp_path):
    with pytest.raises(UserError, match="No tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    write_tokenizer(tmp_path / "tokenizer.json")
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|im_end|>"]
    spec["model"]["vocab"].pop("<|im_end|>")
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="special tokens"):
        Tokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("text, match", [
    ("", "EOF while parsing"),
    ("{\"model\": ", "EOF while parsing"),
    ("[1, 2]", "expected struct Tokenizer"),
    ('{"a": 1}', "line 1"),
    ('{"model": {"type": "BPE"}}', "Missing vocab"),
])
def test_a_file_that_is_not_a_tokenizer_is_named(tmp_path, text, match):
    (tmp_path / "tokenizer.json").write_text(text)
    with pytest.raises(UserError, match=f"{tmp_path / 'tokenizer.json'} is not a tokenizer.json .*{match}"):
        Tokenizer(tmp_path / "tokenizer.json")


def test_binary_garbage_is_refused(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(bytes(range(256)))
    with pytest.raises(UserError, match="valid UTF-8"):
        Tokenizer(tmp_path / "tokenizer.json")


def test_a_tokenizer_without_single_digit_tokens_is_refused(tmp_path):
    write_tokenizer(tmp_path / "tokenizer.json")
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["model"]["vocab"].pop("7")  # "7" now reads as the unknown token, <|endoftext|>
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="does not give each digit 0-9 a token of its own"):
        Tokenizer(tmp_path / "tokenizer.json")


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(tmp_path):
    """Ids beyond config.json's vocab_size would index past the embedding: refuse the pair up front."""
    from conftest import random_model, tiny_config, write_checkpoint

    folder = write_checkpoint(random_model(tiny_config(vocab_size=160)), tmp_path / "ckpt")
    assert Tokenizer.from_pretrained(folder).vocab_size == 3 + 68  # specials + characters of conftest's tokenizer
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(hf | {"vocab_size": 50}))
    with pytest.raises(UserError, match="has token ids up to 70, but config.json's vocab_size is 50"):
        Tokenizer.from_pretrained(folder)

