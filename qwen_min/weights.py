"""Loading Hugging Face Qwen2 checkpoints (safetensors) into qwen-min's Qwen2.

A checkpoint is a folder with config.json and either model.safetensors or shards listed in
model.safetensors.index.json. A hub id (e.g. "Qwen/Qwen2.5-0.5B-Instruct") is fetched into
the Hugging Face cache by huggingface_hub and read from there; once cached it loads offline.

The model is first built on the `meta` device (shapes, no memory), then each tensor is read
from disk, checked (name, shape, a floating dtype, finite values), cast, and assigned in: peak
memory is one copy of the model, not two. Whatever is wrong with a checkpoint a user points at
(a missing or damaged file, a config or shard index that does not add up) is a UserError whose
message names the file.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import Qwen2Config
from .errors import UserError
from .files import atomic_folder

HF_PREFIX = "model."  # transformers nests the network under `model.`; the head sits outside
INDEX = "model.safetensors.index.json"
CHECKPOINT_FILES = ["config.json", "*.safetensors", INDEX, "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names; integer "weights" are refused, never cast


def resolve_checkpoint(path_or_hub_id) -> Path:
    """A local checkpoint folder, or the cached snapshot of a hub id (downloaded if needed)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_hub_id)
    if path.exists():
        raise UserError(f"{text} is a file, not a checkpoint folder; pass the folder that holds config.json and model.safetensors.")
    if text.count("/") != 1 or text.startswith((".", "/", "~")):  # not shaped like a hub id "owner/name"
        raise UserError(f"Checkpoint folder {text} does not exist; pass a folder holding config.json and *.safetensors, or a hub id like Qwen/Qwen2.5-0.5B-Instruct.")
    from huggingface_hub import snapshot_download

    try:  # the cache first, so a cached model never touches the network
        return Path(snapshot_download(text, allow_patterns=CHECKPOINT_FILES, local_files_only=True))
    except Exception:  # the hub raises many types for "not cached"; the download below says what failed
        pass
    try:
        return Path(snapshot_download(text, allow_patterns=CHECKPOINT_FILES))
    except Exception as e:
        raise UserError(f"Could not find '{text}' in the Hugging Face cache or download it ({type(e).__name__}); download it while online "
                        f"(huggingface-cli download {text}) or pass a local checkpoint folder.") from None


def safetensors_files(folder: Path) -> list:
    """The weight files of a checkpoint folder: one file, or the shards named by the index."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (ValueError, AttributeError):  # not JSON, or JSON that is not an object
            weight_map = None
        shards = sorted(set(map(str, weight_map.values()))) if isinstance(weight_map, dict) else []
        if not shards or any(Path(s).name != s or not s.endswith(".safetensors") for s in shards):
            raise UserError(f"{index} is not a safetensors index (a JSON object whose 'weight_map' maps tensors to .safetensors "
                            "files in the same folder); restore it, or delete it if model.safetensors holds every weight.")
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise UserError(f"{index} names shards that are missing from {folder}: {', '.join(missing)}; download them again.")
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise UserError(f"No model.safetensors or {INDEX} in {folder}; pass a Hugging Face safetensors checkpoint folder.")


def read_safetensors(file, shapes=None, skip=()):
    """Yields (name, tensor) for every tensor in a safetensors file, each checked first.

    A damaged file, a tensor that is not floating point, one whose shape differs from
    `shapes[name]` or whose name `shapes` lacks (when `shapes` is given), and NaN or infinite
    values are refused with a UserError naming the file. Names in `skip` are passed over unread.
    Only safetensors are read: nothing in the file can run code.
    """
    try:
        f = safe_open(str(file), framework="pt", device="cpu")  # checks the header, data offsets included
    except (SafetensorError, OSError) as e:
        raise UserError(f"{file} is not a readable safetensors file ({e}); download or write it again.") from None
    with f:
        for key in f.keys():
            if key in skip:
                continue
            view = f.get_slice(key)  # dtype and shape, before any data is read
            if view.get_dtype() not in FLOAT_DTYPES:
                raise UserError(f"Tensor '{key}' in {file} holds {view.get_dtype()} numbers, not floating-point weights; "
                                "pass the file of a trained model.")
            if shapes is not None and key not in shapes:
                raise UserError(f"{file} holds the tensor '{key}', which the model does not have; are the weights and the config from the same model?")
            if shapes is not None and tuple(view.get_shape()) != tuple(shapes[key]):
                raise UserError(f"Tensor '{key}' in {file} has shape {tuple(view.get_shape())}, but the config implies "
                                f"{tuple(shapes[key])}; are the weights and the config from the same model?")
            t = f.get_tensor(key)
            if t.numel() and not torch.isfinite(torch.stack(torch.aminmax(t))).all():  # NaN and inf reach min or max; 8x faster than isfinite(t)
                raise UserError(f"Tensor '{key}' in {file} holds NaN or infinite values; the file is damaged, so download or write it again.")
            yield key, t


def hf_name(name: str) -> str:
    """Our parameter name -> the checkpoint's (lm_head.weight stays, the rest gains `model.`)."""
    return name if name.startswith("lm_head.") else HF_PREFIX + name


def load_pretrained(model_cls, path_or_hub_id, dtype=torch.float32, device="cpu", lm_head_bias=False):
    folder = resolve_checkpoint(path_or_hub_id)
    cfg = Qwen2Config.from_json(folder / "config.json")
    with torch.device("meta"):
        model = model_cls(cfg)
    shapes = {hf_name(n): p.shape for n, p in model.named_parameters()}  # checkpoint name -> shape
    # Some tied checkpoints store the (identical) head too; we reuse the embedding.
    skip = ("lm_head.weight",) if cfg.tie_embeddings else ()
    loaded = {}
    for file in safetensors_files(folder):
        for key, t in read_safetensors(file, shapes, skip):
            name = key.removeprefix(HF_PREFIX)
            if name in loaded:
                raise UserError(f"The tensor '{key}' appears in two of {folder}'s shards; restore the checkpoint.")
            loaded[name] = t.to(device=device, dtype=dtype)
    missing = sorted(hf_name(n) for n in dict(model.named_parameters()) if n not in loaded)
    if missing:
        raise UserError(f"The checkpoint in {folder} lacks {len(missing)} tensor(s) the model needs, e.g. {', '.join(missing[:3])}; "
                        "is its config.json from another model?")
    model.load_state_dict(loaded, strict=True, assign=True)
    # Buffers are not in the checkpoint: build the RoPE tables for real on the target device.
    model.rope = type(model.rope)(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=device)
    if lm_head_bias:
        model.add_lm_head_bias()
    return model.eval()


def save_pretrained(state_dict: dict, cfg: Qwen2Config, folder, copy_from=None) -> Path:
    """Writes a checkpoint transformers loads: config.json and model.safetensors (our parameter
    names, prefixed as transformers expects), plus the tokenizer files of `copy_from` if given.
    The folder is swapped in whole (qwen_min.files.atomic_folder): a kill leaves no half checkpoint."""
    if "lm_head_bias" in state_dict:
        raise UserError("transformers' Qwen2 has no lm_head bias, so a model trained with one cannot be exported in its layout; keep the adapter instead.")
    tensors = {hf_name(n): t.detach().contiguous().cpu() for n, t in state_dict.items()}
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")

    def write(tmp):
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict() | {"torch_dtype": dtype}, indent=2))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json") if copy_from else ():
            if (Path(copy_from) / name).is_file():
                shutil.copy(Path(copy_from) / name, tmp / name)
    return atomic_folder(folder, write)
