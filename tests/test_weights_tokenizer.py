"""qwen_min.tokenizer's edges that test_tokenizer leaves open: full refusal sentences, the vocabulary
check at its boundary (added tokens included), and a tokenizer.json whose post-processor adds a BOS."""

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from conftest import random_model, tiny_config, write_checkpoint, write_tokenizer
from qwen_min import Tokenizer
from qwen_min.errors import UserError
from qwen_min.tokenizer import _first_line
from test_tokenizer import write_byte_level_bpe


def test_first_line_of_an_error_is_cut_to_100_characters_and_an_empty_one_gives_its_type():
    assert _first_line(ValueError("a" * 150 + "\nsecond line")) == "a" * 100
    assert _first_line(ValueError("  \n short  \nmore")) == "short  "  # the whole text is stripped, not the line
    assert _first_line(ValueError("")) == "ValueError"
    assert _first_line(KeyError("  ")) == "'  '"  # KeyError quotes its argument, so it is not blank


def test_an_unreadable_tokenizer_json_is_refused_in_one_whole_sentence(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": {"type": "BPE"}}')
    with pytest.raises(UserError) as e:
        Tokenizer(path)
    assert str(e.value).startswith(f"{path} is not a tokenizer.json the tokenizers package can read (")
    assert str(e.value).endswith("); restore the checkpoint's tokenizer.json.")


def test_characters_of_several_tokens_are_all_named_in_one_sentence(tmp_path):
    write_byte_level_bpe(tmp_path / "tokenizer.json")
    tok = Tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(UserError) as e:
        tok.character_ids("1\u00e9\U0001d11e")  # e-acute is 2 UTF-8 bytes, the G clef 4: both refused
    assert str(e.value) == ("This tokenizer does not give the character(s) '\u00e9\U0001d11e' one token each; "
                            "qwen-min needs a Qwen2 tokenizer, which does.")


def with_extra_special_token(folder):
    """conftest's tokenizer (ids 0..70) plus one added special token, which gets id 71."""
    tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(["<|extra|>"])
    tok.save(str(folder / "tokenizer.json"))
    assert tok.token_to_id("<|extra|>") == 71


@pytest.mark.parametrize("vocab_size, refused", [(71, True), (72, False)])
def test_the_vocabulary_check_counts_added_tokens_and_refuses_an_id_equal_to_vocab_size(tmp_path, vocab_size, refused):
    """An id equal to vocab_size already indexes past the embedding's last row (vocab_size - 1)."""
    folder = write_checkpoint(random_model(tiny_config(vocab_size=160)), tmp_path / "ckpt")
    with_extra_special_token(folder)
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(hf | {"vocab_size": vocab_size}))
    if refused:
        with pytest.raises(UserError) as e:
            Tokenizer.from_pretrained(folder)
        assert str(e.value) == (f"{folder / 'tokenizer.json'} has token ids up to 71, but config.json's vocab_size is 71; "
                                "the two files come from different models, so restore one of them.")
    else:
        assert Tokenizer.from_pretrained(folder).vocab_size == 72


def test_encode_adds_no_special_tokens_even_when_the_file_has_a_bos_template(tmp_path):
    """Qwen adds no BOS; a tokenizer.json whose post-processor would add one must not change encode."""
    path = tmp_path / "tokenizer.json"
    write_tokenizer(path)
    hf = HFTokenizer.from_file(str(path))
    hf.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    hf.save(str(path))
    assert hf.encode("1").ids == [0, 4]  # the template is live: "1" is id 4 in conftest's vocabulary
    tok = Tokenizer(path)
    assert tok.encode("12") == [4, 5]
    assert tok.encode_batch(["1", "2;"]) == [[4], [5, 15]]


def test_decode_keeps_special_tokens_when_asked(tmp_path):
    write_tokenizer(tmp_path / "tokenizer.json")
    tok = Tokenizer(tmp_path / "tokenizer.json")
    ids = [1, 4, 2]  # <|im_start|> 1 <|im_end|>
    assert tok.decode(ids) == "1"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>1<|im_end|>"
    assert tok.stop_ids == [2, 0]  # <|im_end|>, then <|endoftext|>
