"""Gradient accumulation: --batch stays the global batch, --micro-batch how many windows go through at
once; the losses, the adapter and the FLOPs spent are those of the run without it (float32 rounding)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import random_model, tiny_config, write_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(random_model(tiny_config()), tmp_path_factory.mktemp("tiny") / "ckpt")


def run(ckpt, out, *extra):
    summary = train.main(["--model", str(ckpt), "--n-series", "12", "--context", "48", "--batch", "4", "--rank", "4",
                          "--alpha", "8", "--lm-head-bias", "--steps", "6", "--lr", "1e-2", "--eval-every", "3",
                          "--eval-batches", "2", "--out", str(out), "--no-progress", *extra])
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return summary, lines, load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("micro", ["1", "3"])  # 3: chunks of 3 and 1 rows, of different lengths
def test_accumulated_micro_batches_train_as_the_whole_batch(ckpt, tmp_path, micro):
    whole, whole_lines, whole_adapter = run(ckpt, tmp_path / "whole")
    acc, acc_lines, acc_adapter = run(ckpt, tmp_path / "acc", "--micro-batch", micro)
    assert [(r["kind"], r["step"]) for r in acc_lines] == [(r["kind"], r["step"]) for r in whole_lines]
    for a, b in zip(acc_lines, whole_lines):
        assert a.get("loss", a.get("val_loss")) == pytest.approx(b.get("loss", b.get("val_loss")), rel=1e-5, abs=1e-6)
    assert whole_adapter.keys() == acc_adapter.keys()
    for k in whole_adapter:
        assert torch.allclose(acc_adapter[k], whole_adapter[k], rtol=1e-4, atol=1e-6), k
    # the same matmuls run (these windows are all full, so no chunk is cut shorter); the primitive count
    # differs only by how the weight gradients' sums are split (within a chunk, then across chunks)
    matmul = [sum(json.loads(line).get("matmul", 0) for line in open(out / "ledger.jsonl") if '"spent"' in line)
              for out in (tmp_path / "whole", tmp_path / "acc")]
    assert matmul[0] == matmul[1] > 0
    assert acc["flops_spent"] == pytest.approx(whole["flops_spent"], rel=1e-6)
    assert json.loads((tmp_path / "acc" / "args.json").read_text())["micro_batch"] == int(micro)


def test_a_micro_batch_larger_than_the_batch_is_refused(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--model", str(ckpt), "--batch", "4", "--micro-batch", "5"])
    assert "--micro-batch must be in 1..--batch" in capsys.readouterr().err


def test_an_accumulated_step_counts_each_chunk_and_one_optimizer_step(ckpt):
    import flops
    from qwen_min import Qwen2Config

    cfg = Qwen2Config.from_json(ckpt / "config.json")
    s = flops.Setup(cfg, flops.lora_targets("q,v", 4), lm_head_bias=True)
    # trained numbers by hand: per layer rank 4 on q (64 -> 64) and v (64 -> 32), and the 160-entry head bias
    p = cfg.n_layers * (4 * (64 + 64) + 4 * (64 + 32)) + 160
    assert (cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.vocab_size) == (64, 64, 32, 160)
    acc = flops.train_step_accumulated(s, [(1, 47), (2, 30), (1, 47)])
    assert acc["accumulate"].coursework == 2 * p  # two chunks' gradients added into .grad, one add per number
    assert acc["optimizer"] == flops.train_step(s, 4, 47)["optimizer"]  # one AdamW step, not three
    assert acc["forward"] == flops.train_step(s, 1, 47)["forward"] * 2 + flops.train_step(s, 2, 30)["forward"]
    assert flops.train_step_accumulated(s, [(4, 47)]) == flops.train_step(s, 4, 47)  # one chunk: the plain step


def test_the_plan_counts_each_validation_once_however_it_is_chunked(ckpt, tmp_path):
    plans = []
    for name, extra in (("whole", []), ("acc", ["--micro-batch", "1"])):
        run(ckpt, tmp_path / name, *extra)
        plans.append([json.loads(line) for line in open(tmp_path / name / "ledger.jsonl") if '"plan"' in line])
    assert [e["kind"] for e in plans[1]] == ["train", "eval"]
    assert plans[1][1]["flops"] == pytest.approx(plans[0][1]["flops"], rel=1e-6)  # the same windows validated
