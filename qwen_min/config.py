"""The Qwen2 configuration: the handful of numbers that fix the network's shapes.

Read from a checkpoint's `config.json` (Hugging Face key names) with `Qwen2Config.from_json`.
Features of the Qwen2 family that qwen-min does not implement (sliding-window attention,
RoPE scaling, activations other than SiLU) are refused with a clear error rather than
silently computed wrong.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path


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
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}.")

    @classmethod
    def from_hf_dict(cls, hf: dict) -> "Qwen2Config":
        """Builds the config from the keys of a Hugging Face Qwen2 `config.json`."""
        model_type = hf.get("model_type", "qwen2")
        if model_type != "qwen2":
            raise ValueError(f"config.json describes a '{model_type}' model; qwen-min implements 'qwen2' only.")
        if hf.get("use_sliding_window", False):
            raise ValueError("config.json switches on sliding-window attention, which qwen-min does not implement; set use_sliding_window to false.")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json asks for the activation '{act}'; qwen-min implements SwiGLU with 'silu' only.")
        # transformers >= 5 may nest rope settings in `rope_parameters`; older files keep them flat.
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ValueError(f"config.json asks for RoPE scaling {scaling}; qwen-min implements plain RoPE only.")
        try:
            n_heads = hf["num_attention_heads"]
            dim = hf["hidden_size"]
            eos = hf.get("eos_token_id", cls.eos_token_id)
            return cls(
                vocab_size=hf["vocab_size"],
                dim=dim,
                hidden_dim=hf["intermediate_size"],
                n_layers=hf["num_hidden_layers"],
                n_heads=n_heads,
                n_kv_heads=hf.get("num_key_value_heads", n_heads),
                head_dim=hf.get("head_dim") or dim // n_heads,
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                max_seq_len=hf.get("max_position_embeddings", 32768),
                tie_embeddings=hf.get("tie_word_embeddings", True),
                bos_token_id=hf.get("bos_token_id", cls.bos_token_id),
                eos_token_id=eos[0] if isinstance(eos, list) else eos,
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks the key {e}, which a Qwen2 config must have.") from None

    @classmethod
    def from_json(cls, path) -> "Qwen2Config":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No config.json at {path}; pass a Qwen2 checkpoint folder.")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}).") from None
        return cls.from_hf_dict(hf)

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
