"""The Qwen2 configuration: the handful of numbers that fix the network's shapes.

Read from a checkpoint's `config.json` (Hugging Face key names) with `Qwen2Config.from_json`.
Features of the Qwen2 family that qwen-min does not implement (sliding-window attention,
RoPE scaling, activations other than SiLU) are refused with a clear error rather than
silently computed wrong.
"""

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

from .errors import UserError
from .files import read_json_object

# Field -> (its key in config.json, the largest value accepted). The bounds sit far above any Qwen2
# (the 72B model: hidden 8192, 80 layers, 152k vocabulary, 131k positions) and far below sizes
# whose tables alone would take many GB, so a typo fails here rather than in an allocation.
INT_FIELDS = {
    "vocab_size": ("vocab_size", 1 << 22),
    "dim": ("hidden_size", 1 << 16),
    "hidden_dim": ("intermediate_size", 1 << 18),
    "n_layers": ("num_hidden_layers", 1024),
    "n_heads": ("num_attention_heads", 1024),
    "n_kv_heads": ("num_key_value_heads", 1024),
    "head_dim": ("head_dim", 1024),
    "max_seq_len": ("max_position_embeddings", 1 << 21),
}
MAX_ROPE_TABLE = 1 << 28  # max_seq_len * head_dim: the RoPE cos table is 1 GB in float32 at this size


@dataclass
class Qwen2Config:
    vocab_size: int = 151936
    dim: int = 896  # width of the residual stream (HF: hidden_size)
    hidden_dim: int = 4864  # width of the SwiGLU MLP (HF: intermediate_size)
    n_layers: int = 24
    n_heads: int = 14  # query heads
    n_kv_heads: int = 2  # key/value heads; n_heads // n_kv_heads queries share each
    head_dim: int = 64
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-6
    max_seq_len: int = 32768  # RoPE table length (HF: max_position_embeddings)
    tie_embeddings: bool = True  # lm_head reuses embed_tokens.weight
    bos_token_id: int = 151643
    eos_token_id: int = 151645

    def __post_init__(self):
        problem = self.problem()
        if problem:
            raise UserError(f"Qwen2Config: {problem}.")

    def problem(self):
        """What makes this config impossible to build, in config.json's words; None when it is sound."""
        for name, (key, high) in INT_FIELDS.items():
            value = getattr(self, name)
            if type(value) is not int or not 1 <= value <= high:  # bool is an int subclass: refuse it too
                return f"{key} must be a whole number from 1 to {high}, not {value!r}"
        for name, key in (("rope_theta", "rope_theta"), ("norm_eps", "rms_norm_eps")):
            value = getattr(self, name)
            if type(value) not in (int, float) or not (math.isfinite(value) and value > 0):
                return f"{key} must be a positive number, not {value!r}"
        if type(self.tie_embeddings) is not bool:
            return f"tie_word_embeddings must be true or false, not {self.tie_embeddings!r}"
        for key in ("bos_token_id", "eos_token_id"):
            if type(getattr(self, key)) is not int or getattr(self, key) < 0:
                return f"{key} must be a token id (a whole number >= 0), not {getattr(self, key)!r}"
        if self.n_heads % self.n_kv_heads:
            return f"num_attention_heads ({self.n_heads}) must be a multiple of num_key_value_heads ({self.n_kv_heads})"
        if self.head_dim % 2:
            return f"head_dim must be even for rotary embeddings, not {self.head_dim}"
        if self.max_seq_len * self.head_dim > MAX_ROPE_TABLE:
            return (f"max_position_embeddings x head_dim = {self.max_seq_len * self.head_dim} is more than "
                    f"qwen-min's RoPE tables hold ({MAX_ROPE_TABLE})")
        return None

    @classmethod
    def from_hf_dict(cls, hf: dict, source="config.json") -> "Qwen2Config":
        """Builds the config from the keys of a Hugging Face Qwen2 `config.json` (read from `source`)."""
        def refuse(problem):
            return UserError(f"{source}: {problem}; fix the file or pass a Qwen2 checkpoint folder.")

        if not isinstance(hf, dict):
            raise refuse(f"holds a {type(hf).__name__}, not a JSON object of Qwen2 settings")
        model_type = hf.get("model_type", "qwen2")
        if model_type != "qwen2":
            raise refuse(f"describes a '{model_type}' model, and qwen-min implements 'qwen2' only")
        if hf.get("use_sliding_window", False):
            raise refuse("switches on sliding-window attention, which qwen-min does not implement (set use_sliding_window to false)")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise refuse(f"asks for the activation '{act}', and qwen-min implements SwiGLU with 'silu' only")
        # transformers >= 5 may nest rope settings in `rope_parameters`; older files keep them flat.
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or rope  # either may ask for scaling: checked below
        if not isinstance(rope, dict) or not isinstance(scaling or {}, dict):
            raise refuse("gives rope_parameters or rope_scaling that are not JSON objects")
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise refuse(f"asks for RoPE scaling {scaling}, and qwen-min implements plain RoPE only")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise refuse(f"lacks the key '{missing[0]}', which a Qwen2 config must have")
        n_heads, dim = hf["num_attention_heads"], hf["hidden_size"]
        head_dim = hf.get("head_dim")
        if head_dim is None:  # transformers' rule: the heads split the residual width
            if type(dim) is not int or type(n_heads) is not int or n_heads < 1 or dim % n_heads:
                raise refuse(f"has no head_dim and hidden_size ({dim!r}) is not a multiple of num_attention_heads ({n_heads!r})")
            head_dim = dim // n_heads
        bos, eos = hf.get("bos_token_id"), hf.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos  # Qwen's instruct configs list two
        kw = dict(
            vocab_size=hf["vocab_size"], dim=dim, hidden_dim=hf["intermediate_size"], n_layers=hf["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads", n_heads), head_dim=head_dim,
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)), norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_seq_len=hf.get("max_position_embeddings", 32768), tie_embeddings=hf.get("tie_word_embeddings", True),
            bos_token_id=cls.bos_token_id if bos is None else bos, eos_token_id=cls.eos_token_id if eos is None else eos,
        )
        problem = cls.problem(SimpleNamespace(**kw))  # checked before building, to name the file
        if problem:
            raise refuse(problem)
        return cls(**kw | {k: float(kw[k]) for k in ("rope_theta", "norm_eps")})

    @classmethod
    def from_json(cls, path) -> "Qwen2Config":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"No config.json at {path}; pass a Qwen2 checkpoint folder (config.json, model.safetensors, tokenizer.json).")
        return cls.from_hf_dict(read_json_object(path, "restore the checkpoint's config.json"), source=path)

    def to_hf_dict(self) -> dict:
        """The same config under Hugging Face's key names (for exported checkpoints and tests)."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "use_sliding_window": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "attention_dropout": 0.0,
        }

    def to_dict(self) -> dict:
        return asdict(self)
