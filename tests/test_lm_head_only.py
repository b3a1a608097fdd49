"""Report A's ablation: LoRA off (--rank 0), only the coursework's lm_head bias trained, saved as a
rank-0 adapter and loaded back (evaluate.py, python -m qwen_min) as the base model plus that bias."""

import json

import pytest
import torch

import lora
import train
from conftest import random_model, tiny_config, write_checkpoint
from qwen_min import Qwen2, run_folder
from qwen_min.errors import UserError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(random_model(tiny_config()), tmp_path_factory.mktemp("tiny") / "ckpt")


def test_rank_0_trains_only_the_lm_head_bias_and_its_adapter_is_base_plus_bias(ckpt, tmp_path):
    run = tmp_path / "run"
    summary = train.main(["--model", str(ckpt), "--n-series", "12", "--context", "48", "--batch", "4", "--rank", "0",
                          "--lm-head-bias", "--steps", "10", "--lr", "1e-1", "--eval-every", "5", "--eval-batches", "2",
                          "--out", str(run), "--no-progress"])
    val = [json.loads(line)["val_loss"] for line in open(run / "metrics.jsonl") if json.loads(line)["kind"] == "val"]
    assert summary["best_val_loss"] < val[0]  # the bias alone lowers the loss
    state = torch.load(run / "state.pt", weights_only=True)
    assert list(state["trainable"]) == ["lm_head_bias"]  # nothing else was trained
    config = json.loads((run / "best" / "adapter_config.json").read_text())
    assert config["r"] == 0 and config["target_modules"] == []
    base = Qwen2.from_pretrained(ckpt).eval()
    tuned = run_folder.load_model(str(ckpt), run / "best", lm_head_bias=True)
    assert not lora.lora_layers(tuned)  # no LoRA layer was injected
    ids = torch.tensor([[5, 9, 3, 7, 1]])
    with torch.no_grad():  # the base model's logits plus the best bias, by hand
        expected = base(ids) + state["best"]["lm_head_bias"]
        assert torch.allclose(tuned(ids), expected, atol=1e-5)
        assert not torch.allclose(tuned(ids), base(ids), atol=1e-3)


def test_rank_0_without_the_lm_head_bias_would_train_nothing_and_is_refused(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--model", str(ckpt), "--rank", "0"])
    assert "--rank must be at least 1, or 0 with --lm-head-bias" in capsys.readouterr().err


def test_a_rank_0_adapter_loads_only_with_its_bias_and_no_targets(ckpt, tmp_path):
    model = Qwen2.from_pretrained(ckpt, lm_head_bias=True)
    with torch.no_grad():
        model.lm_head_bias.copy_(torch.arange(model.config.vocab_size, dtype=torch.float32))
    lora.save_adapter(model, tmp_path / "a", extra={"lm_head_bias": model.lm_head_bias})
    fresh = Qwen2.from_pretrained(ckpt)
    extra = lora.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(extra["lm_head_bias"], torch.arange(model.config.vocab_size, dtype=torch.float32))
    assert not lora.lora_layers(fresh)
    with pytest.raises(ValueError, match="no LoRA layers to save"):
        lora.save_adapter(Qwen2.from_pretrained(ckpt), tmp_path / "b")  # nothing at all to save
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(config | {"target_modules": ["q_proj"]}))  # rank 0 with targets: not ours
    with pytest.raises(UserError, match="gives the rank r = 0"):
        lora.load_adapter(Qwen2.from_pretrained(ckpt), tmp_path / "a")
    path.write_text(json.dumps(config))
    (tmp_path / "a" / "extra_parameters.safetensors").unlink()  # rank 0 without its bias: nothing to load
    with pytest.raises(UserError, match="gives the rank r = 0"):
        lora.load_adapter(Qwen2.from_pretrained(ckpt), tmp_path / "a")
