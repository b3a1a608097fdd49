"""Qwen2.5's byte-level BPE tokenizer, read from tokenizer.json by the `tokenizers` package.

Qwen adds no BOS token: `encode` returns exactly the tokens of the text. Digits are split one
per token (0-9 -> ids 15..24), which is what makes LLMTIME's number-as-text encoding work.
"""

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from .config import Qwen2Config
from .errors import UserError
from .weights import resolve_checkpoint

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def _first_line(error) -> str:
    return str(error).strip().splitlines()[0][:100] if str(error).strip() else type(error).__name__


class Tokenizer:
    def __init__(self, tokenizer_file):
        path = Path(tokenizer_file)
        if not path.is_file():
            raise UserError(f"No tokenizer.json at {path}; pass a Qwen2 checkpoint folder that includes it.")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers package raises plain Exception for any file it cannot read
            raise UserError(f"{path} is not a tokenizer.json the tokenizers package can read ({_first_line(e)}); "
                            "restore the checkpoint's tokenizer.json.") from None
        ids = {t: self._tok.token_to_id(t) for t in (ENDOFTEXT, IM_START, IM_END)}
        if None in ids.values():
            raise UserError(f"{path} lacks Qwen's special tokens {ENDOFTEXT}, {IM_START}, {IM_END}; pass a Qwen2 checkpoint's tokenizer.json.")
        if [self.decode([i]) for i in self.character_ids("0123456789")] != list("0123456789"):
            raise UserError(f"{path} does not give each digit 0-9 a token of its own, which LLMTIME needs; pass a Qwen2 tokenizer.json.")
        self.pad_id = self.bos_id = ids[ENDOFTEXT]  # 151643
        self.im_start_id = ids[IM_START]  # 151644
        self.eos_id = self.im_end_id = ids[IM_END]  # 151645: an instruct model ends its turn with it
        self.vocab_size = self._tok.get_vocab_size()

    @classmethod
    def from_pretrained(cls, path_or_hub_id):
        """The tokenizer of a checkpoint folder or hub id, checked against its config.json's vocabulary."""
        folder = resolve_checkpoint(path_or_hub_id)
        tok = cls(folder / "tokenizer.json")
        if (folder / "config.json").is_file():
            vocab_size = Qwen2Config.from_json(folder / "config.json").vocab_size
            top = max(tok._tok.get_vocab(with_added_tokens=True).values())
            if top >= vocab_size:
                raise UserError(f"{folder / 'tokenizer.json'} has token ids up to {top}, but config.json's vocab_size is "
                                f"{vocab_size}; the two files come from different models, so restore one of them.")
        return tok

    @property
    def stop_ids(self):
        """Ids that end a generation: <|im_end|> and <|endoftext|>, as in Qwen's generation_config."""
        return [self.eos_id, self.pad_id]

    def encode(self, text: str) -> list:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts) -> list:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def character_ids(self, chars: str) -> list:
        """The id of each character alone, e.g. of "0123456789.,;" for LLMTIME's digits and separators.

        Encoding the string whole would not do: BPE merges neighbours (".," is one Qwen token)."""
        ids = [self.encode(c) for c in chars]
        bad = [c for c, i in zip(chars, ids) if len(i) != 1]
        if bad:
            raise UserError(f"This tokenizer does not give the character(s) {''.join(bad)!r} one token each; "
                            "qwen-min needs a Qwen2 tokenizer, which does.")
        return [i[0] for i in ids]

    @staticmethod
    def chat_prompt(messages, add_generation_prompt: bool = True) -> str:
        """The plain form of Qwen2.5's chat template (no tools).

        messages: [{"role": "system"|"user"|"assistant", "content": str}, ...]. Without a system
        message, Qwen's default one is inserted, as its template does.
        """
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not messages or messages[0]["role"] != "system":
            messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}] + list(messages)
        text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")
