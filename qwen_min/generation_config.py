"""A checkpoint's decoding defaults, read from its generation_config.json.

Qwen2.5-0.5B-Instruct ships one: sample (do_sample true) at temperature 0.7 from the top 20
tokens and the top 80% of probability, divide the logits of tokens already seen by 1.1
(repetition_penalty), and stop at <|im_end|> or <|endoftext|>. transformers loads this file with
the weights and `model.generate` starts from it; qwen-min reads it with
`GenerationConfig.from_pretrained(folder_or_hub_id)` and hands it to `qwen_min.generate`, whose
keyword arguments override it field by field (see qwen_min/generate.py).

A missing file gives the neutral config (greedy, no penalty). A file that omits a field gets
transformers' global default for it (top_k 50, top_p 1.0, temperature 1.0, penalty 1.0), as in
transformers. Fields that would make transformers decode differently in ways qwen-min does not
implement (beam search, n-gram bans, min length, ...) are refused, not silently ignored;
length fields (max_length, max_new_tokens) are ignored: qwen_min.generate always takes
max_new_tokens from its caller.
"""

import math
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .files import read_json_object

FILE = "generation_config.json"
# transformers' values for fields a generation_config.json leaves out (GenerationConfig._get_default_generation_params)
FILE_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}
# Fields whose non-neutral values change transformers' tokens and that qwen-min does not implement.
UNSUPPORTED = {"num_beams": (None, 1), "num_beam_groups": (None, 1), "penalty_alpha": (None,),
               "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0),
               "encoder_repetition_penalty": (None, 1.0), "min_length": (None, 0), "min_new_tokens": (None, 0),
               "typical_p": (None, 1.0), "min_p": (None,), "top_h": (None,), "epsilon_cutoff": (None, 0.0),
               "eta_cutoff": (None, 0.0), "bad_words_ids": (None,), "suppress_tokens": (None,),
               "begin_suppress_tokens": (None,), "sequence_bias": (None,), "forced_bos_token_id": (None,),
               "forced_eos_token_id": (None,), "exponential_decay_length_penalty": (None,),
               "guidance_scale": (None, 1.0), "renormalize_logits": (None, False), "watermarking_config": (None,)}


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding defaults. The defaults here are neutral: greedy, no penalty, no top-k/top-p.

    eos_token_id: ids that end a row (None: the model config's eos); pad_token_id fills finished
    rows and left padding (None: the model config's bos). top_k 0 / None and top_p 1.0 switch
    those filters off; temperature, top_k and top_p act only when do_sample is true.
    """
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: tuple | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_pretrained(cls, path_or_hub_id) -> "GenerationConfig":
        """The generation_config.json of a checkpoint folder or hub id; neutral when it has none."""
        from .weights import resolve_checkpoint

        return cls.from_json(resolve_checkpoint(path_or_hub_id) / FILE)

    @classmethod
    def from_json(cls, path) -> "GenerationConfig":
        """Reads and checks one generation_config.json; a missing file gives the neutral config."""
        path = Path(path)
        if not path.is_file():
            return cls()
        fix = "fix or delete it (without it decoding is greedy with no repetition penalty)"
        return cls.from_dict(read_json_object(path, fix), source=path)

    @classmethod
    def from_dict(cls, data: dict, source="generation config") -> "GenerationConfig":
        """Builds and checks a config from transformers' key names, filling absent keys with its defaults."""
        def bad(key, want):
            return UserError(f"{source}: '{key}' must be {want}, not {data[key]!r}; fix or delete the file.")

        for key, neutral in UNSUPPORTED.items():
            if key in data and data[key] not in neutral:
                raise UserError(f"{source} sets '{key}' to {data[key]!r}, which qwen-min's generate does not implement; remove it to decode as transformers would without it.")
        d = {k: data.get(k) if data.get(k) is not None else v for k, v in FILE_DEFAULTS.items()}
        if not isinstance(d["do_sample"], bool):
            raise bad("do_sample", "true or false")
        for key in ("temperature", "top_p", "repetition_penalty"):
            if not is_number(d[key]):
                raise bad(key, "a number")
        if not (is_int(d["top_k"]) and d["top_k"] >= 0):
            raise bad("top_k", "an integer >= 0")
        if d["temperature"] < 0 or (d["do_sample"] and d["temperature"] == 0):
            raise bad("temperature", "a number > 0 when do_sample is true (>= 0 otherwise)")
        if not 0 < d["top_p"] <= 1:
            raise bad("top_p", "a number in (0, 1]")
        if d["repetition_penalty"] <= 0:
            raise bad("repetition_penalty", "a number > 0 (1.0 means no penalty)")
        eos, pad = data.get("eos_token_id"), data.get("pad_token_id")
        eos_ids = [eos] if is_int(eos) else eos
        if eos is not None and not (isinstance(eos_ids, list) and eos_ids and all(is_int(i) and i >= 0 for i in eos_ids)):
            raise bad("eos_token_id", "a token id or a non-empty list of token ids")
        if pad is not None and not (is_int(pad) and pad >= 0):
            raise bad("pad_token_id", "a token id")
        return cls(do_sample=d["do_sample"], temperature=float(d["temperature"]), top_k=d["top_k"],
                   top_p=float(d["top_p"]), repetition_penalty=float(d["repetition_penalty"]),
                   eos_token_id=None if eos is None else tuple(eos_ids), pad_token_id=pad)


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true is not a token id


def is_number(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)
