"""Loading Hugging Face Qwen2 checkpoints (safetensors) into qwen-min's Qwen2.

A checkpoint is a folder with config.json and either model.safetensors or shards listed in
model.safetensors.index.json. A hub id (e.g. "Qwen/Qwen2.5-0.5B-Instruct") is fetched into
the Hugging Face cache by huggingface_hub and read from there; once cached it loads offline.

The model is first built on the `meta` device (shapes, no memory), then each tensor is read
from disk, checked by name and shape, cast, and assigned in: peak memory is one copy of the
model, not two.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import Qwen2Config

HF_PREFIX = "model."  # transformers nests the network under `model.`; the head sits outside
CHECKPOINT_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                    "tokenizer_config.json", "generation_config.json"]


def resolve_checkpoint(path_or_hub_id) -> Path:
    """A local checkpoint folder, or the cached snapshot of a hub id (downloaded if needed)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_hub_id)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists()
    if not looks_like_hub_id:
        raise FileNotFoundError(f"Checkpoint folder {text} does not exist; pass a folder holding config.json and *.safetensors, or a hub id like Qwen/Qwen2.5-0.5B-Instruct.")
    from huggingface_hub import snapshot_download

    try:  # the cache first, so a cached model never touches the network
        return Path(snapshot_download(text, allow_patterns=CHECKPOINT_FILES, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(text, allow_patterns=CHECKPOINT_FILES))
    except Exception as e:
        raise FileNotFoundError(f"Could not find '{text}' locally or download it from the Hugging Face hub ({type(e).__name__}); check the id and your connection, or pass a local checkpoint folder.") from None


def safetensors_files(folder: Path) -> list:
    """The weight files of a checkpoint folder: one file, or the shards named by the index."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing from {folder}: {', '.join(missing)}.")
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"No model.safetensors or model.safetensors.index.json in {folder}; is this a Hugging Face safetensors checkpoint?")


def hf_name(name: str) -> str:
    """Our parameter name -> the checkpoint's (lm_head.weight stays, the rest gains `model.`)."""
    return name if name.startswith("lm_head.") else HF_PREFIX + name


def load_pretrained(model_cls, path_or_hub_id, dtype=torch.float32, device="cpu", lm_head_bias=False):
    folder = resolve_checkpoint(path_or_hub_id)
    cfg = Qwen2Config.from_json(folder / "config.json")
    with torch.device("meta"):
        model = model_cls(cfg)
    expected = {hf_name(n): p for n, p in model.named_parameters()}  # checkpoint name -> meta parameter
    loaded = {}
    for file in safetensors_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key == "lm_head.weight" and cfg.tie_embeddings:
                    continue  # some tied checkpoints store the (identical) head too; we reuse the embedding
                if key not in expected:
                    raise ValueError(f"{file.name} holds the tensor '{key}', which a Qwen2 model with this config.json does not have.")
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(expected[key].shape):
                    raise ValueError(f"Tensor '{key}' in {file.name} has shape {tuple(t.shape)}, but config.json implies {tuple(expected[key].shape)}.")
                loaded[key[len(HF_PREFIX):] if key.startswith(HF_PREFIX) else key] = t.to(device=device, dtype=dtype)
    missing = sorted(hf_name(n) for n in dict(model.named_parameters()) if n not in loaded)
    if missing:
        raise ValueError(f"The checkpoint in {folder} lacks {len(missing)} tensor(s) the model needs, e.g. {', '.join(missing[:3])}.")
    model.load_state_dict(loaded, strict=True, assign=True)
    # Buffers are not in the checkpoint: build the RoPE tables for real on the target device.
    model.rope = type(model.rope)(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=device)
    if lm_head_bias:
        model.add_lm_head_bias()
    return model.eval()


def save_pretrained(state_dict: dict, cfg: Qwen2Config, folder, copy_from=None) -> Path:
    """Writes a checkpoint transformers loads: config.json and model.safetensors (our parameter
    names, prefixed as transformers expects), plus the tokenizer files of `copy_from` if given.
    Written to a temporary folder first and renamed, so a crash leaves no half checkpoint."""
    folder = Path(folder)
    if "lm_head_bias" in state_dict:
        raise ValueError("transformers' Qwen2 has no lm_head bias, so a model trained with one cannot be exported in its layout; keep the adapter instead.")
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {hf_name(n): t.detach().contiguous().cpu() for n, t in state_dict.items()}
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict() | {"torch_dtype": dtype}, indent=2))
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if copy_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (Path(copy_from) / name).is_file():
                shutil.copy(Path(copy_from) / name, tmp / name)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder
