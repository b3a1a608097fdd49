"""qwen-min: Qwen2.5 from scratch in plain PyTorch.

    model = qwen_min.Qwen2.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
    tok = qwen_min.Tokenizer.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")
    ids = qwen_min.generate(model, torch.tensor([tok.encode("1.00,2.00;")]), max_new_tokens=20)
    gc = qwen_min.GenerationConfig.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")  # its generation_config.json
    ids = qwen_min.generate(model, [tok.encode("1.00,2.00;")], max_new_tokens=20, generation_config=gc, seed=0)
"""

from .config import Qwen2Config
from .generate import generate
from .generation_config import GenerationConfig
from .kv_cache import KVCache
from .model import Qwen2
from .tokenizer import Tokenizer

__all__ = ["Qwen2", "Qwen2Config", "Tokenizer", "KVCache", "GenerationConfig", "generate"]
