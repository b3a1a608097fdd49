"""train.py end to end on a tiny random checkpoint: learning, outputs, resume, budget, bad flags."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lora
import train
from conftest import random_model, tiny_config, write_checkpoint
from qwen_min import Qwen2
from qwen_min.errors import UserError
from qwen_min.weights import hf_name


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(random_model(tiny_config()), tmp_path_factory.mktemp("tiny") / "ckpt")


def run_args(ckpt, out, *extra):
    return ["--model", str(ckpt), "--n-series", "12", "--context", "48", "--batch", "4", "--rank", "4",
            "--eval-every", "5", "--eval-batches", "2", "--out", str(out), "--no-progress", *extra]


def records(run, kind):
    return [json.loads(line) for line in open(run / "metrics.jsonl") if json.loads(line)["kind"] == kind]


def test_training_lowers_the_loss_and_writes_every_output(ckpt, tmp_path):
    run = tmp_path / "run"
    summary = train.main(run_args(ckpt, run, "--steps", "30", "--lr", "1e-2", "--lm-head-bias"))
    train_loss = [r["loss"] for r in records(run, "train")]
    val_loss = [r["val_loss"] for r in records(run, "val")]
    assert len(train_loss) == 30 and len(val_loss) == 7  # the base model at step 0, then every 5 steps
    assert sum(train_loss[-5:]) / 5 < 0.8 * sum(train_loss[:5]) / 5
    assert min(val_loss) < val_loss[0] and summary["best_val_loss"] == min(val_loss)
    for name in ("args.json", "scaler.json", "ledger.jsonl", "state.pt", "loss.png", "summary.json",
                 "adapter/adapter_model.safetensors", "best/adapter_config.json"):
        assert (run / name).is_file(), name
    ledger = [json.loads(line) for line in open(run / "ledger.jsonl")]
    spent = sum(r["flops"] for r in ledger if r["source"] == "spent")
    planned = sum(r["flops"] for r in ledger if r["source"] == "plan")
    assert abs(spent - summary["flops_spent"]) <= 1e-6 * spent
    assert 0.5 * planned < spent <= planned  # the plan assumes full windows; batches cut trailing padding
    # the saved adapter is the trained one: loading it reproduces a trained model's logits
    model = Qwen2.from_pretrained(ckpt, lm_head_bias=True)
    extra = lora.load_adapter(model, run / "adapter", module_name=hf_name)
    assert "lm_head_bias" in extra and extra["lm_head_bias"].abs().sum() > 0
    assert any(t.abs().sum() > 0 for k, t in load_file(str(run / "adapter/adapter_model.safetensors")).items() if "lora_B" in k)


def test_killed_and_resumed_run_ends_identical_to_an_uninterrupted_one(ckpt, tmp_path, monkeypatch):
    flags = ("--steps", "15", "--lr", "5e-3", "--dropout", "0.1", "--schedule", "cosine", "--warmup", "3", "--lm-head-bias")
    whole = train.main(run_args(ckpt, tmp_path / "whole", *flags))

    def kill(step):
        if step == 12:  # two steps after the checkpoint at step 10: their logs must be dropped on resume
            raise KeyboardInterrupt
    monkeypatch.setattr(train, "on_step", kill)
    with pytest.raises(KeyboardInterrupt):
        train.main(run_args(ckpt, tmp_path / "killed", *flags))
    monkeypatch.setattr(train, "on_step", None)
    assert torch.load(tmp_path / "killed" / "state.pt", weights_only=True)["step"] == 10
    resumed = train.main(["--out", str(tmp_path / "killed"), "--resume", "--no-progress"])
    for folder in ("adapter", "best"):
        for name in ("adapter_model.safetensors", "extra_parameters.safetensors"):
            a, b = (load_file(str(tmp_path / run / folder / name)) for run in ("whole", "killed"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for kind in ("train", "val"):
        strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]
        assert strip(records(tmp_path / "whole", kind)) == strip(records(tmp_path / "killed", kind))
    ledgers = [(tmp_path / run / "ledger.jsonl").read_text().replace(f'"stage": "{run}"', "") for run in ("whole", "killed")]
    assert ledgers[0] == ledgers[1] and ledgers[0].count("\n") == 2 + 15 + 4  # plan, steps, validations
    assert whole["flops_spent"] == resumed["flops_spent"] and whole["best_val_loss"] == resumed["best_val_loss"]


def test_resume_can_extend_a_run_but_not_change_what_it_is(ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    train.main(run_args(ckpt, run, "--steps", "5"))
    with pytest.raises(UserError, match="--rank cannot change"):
        train.main(["--out", str(run), "--resume", "--rank", "2"])
    summary = train.main(["--out", str(run), "--resume", "--steps", "10", "--no-progress"])
    assert summary["steps"] == 10 and len(records(run, "train")) == 10
    assert json.loads((run / "args.json").read_text())["steps"] == 10


def test_resuming_an_early_stopped_run_trains_no_further(ckpt, tmp_path):
    run = tmp_path / "run"
    first = train.main(run_args(ckpt, run, "--steps", "50", "--lr", "1e-12", "--eval-every", "2", "--patience", "1"))
    again = train.main(["--out", str(run), "--resume", "--no-progress"])
    assert first["stop_reason"] == again["stop_reason"] == "early stopping"
    assert again["steps"] == first["steps"] and again["flops_spent"] == first["flops_spent"]


def test_bfloat16_precision_trains_with_float32_adapters(ckpt, tmp_path):
    run = tmp_path / "run"
    summary = train.main(run_args(ckpt, run, "--steps", "3", "--precision", "bf16", "--lr", "1e-2"))
    assert summary["steps"] == 3 and all(r["loss"] == r["loss"] for r in records(run, "train"))  # finite, not NaN
    tensors = load_file(str(run / "adapter/adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_export_merged_checkpoint_loads_in_transformers(ckpt, tmp_path):
    transformers = pytest.importorskip("transformers")
    run = tmp_path / "run"
    train.main(run_args(ckpt, run, "--steps", "5", "--lr", "1e-2", "--export-merged"))
    model = Qwen2.from_pretrained(ckpt)
    lora.load_adapter(model, run / "best", module_name=hf_name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-5
        assert not torch.allclose(model(ids), Qwen2.from_pretrained(ckpt)(ids), atol=1e-4)  # the adapter mattered
    assert (run / "merged" / "tokenizer.json").is_file()


def test_flops_budget_ends_the_run_cleanly(ckpt, tmp_path):
    run = tmp_path / "run"
    probe = train.main(run_args(ckpt, tmp_path / "probe", "--steps", "1"))
    per_step = probe["flops_spent"]  # one step and two validations (the base model's and the step's)
    summary = train.main(run_args(ckpt, run, "--steps", "50", "--flops-budget", str(7.5 * per_step)))
    assert summary["stop_reason"] == "flops budget" and 0 < summary["flops_spent"] <= 7.5 * per_step
    assert summary["steps"] >= 5 and (run / "adapter/adapter_model.safetensors").is_file()


def test_early_stopping_after_patience_evaluations_without_improvement(ckpt, tmp_path):
    run = tmp_path / "run"  # lr 1e-12: the adapter cannot improve on the base model's validation loss
    summary = train.main(run_args(ckpt, run, "--steps", "50", "--lr", "1e-12", "--eval-every", "2", "--patience", "3"))
    val = records(run, "val")
    assert summary["stop_reason"] == "early stopping" and summary["steps"] == 6
    assert [r["best"] for r in val] == [True, False, False, False]


def test_numeric_vocabulary_loss_trains(ckpt, tmp_path):
    run = tmp_path / "run"
    train.main(run_args(ckpt, run, "--steps", "20", "--lr", "1e-2", "--vocab", "numeric", "--lm-head-bias"))
    losses = [r["loss"] for r in records(run, "train")]
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.parametrize("flags, message", [
    (["--rank", "0"], "--rank"),
    (["--targets", "q,lm_head"], "unknown --targets"),
    (["--stride", "100"], "--stride"),
    (["--lr", "nan"], "--lr"),
    (["--resume"], "--resume needs --out"),
    (["--device", "gpu"], "unknown --device"),
])
def test_nonsense_flags_get_one_clear_error(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--context", "48", *flags])
    assert message in capsys.readouterr().err


def test_bad_paths_end_in_one_sentence_without_traceback(ckpt, tmp_path):
    import subprocess
    import sys

    for flags, message in [(["--data", str(tmp_path / "missing.h5")], "missing.h5"),
                           (["--model", str(tmp_path / "nowhere")], "does not exist")]:
        out = subprocess.run([sys.executable, str(train.__file__), "--model", str(ckpt), "--context", "48", "--out", str(tmp_path / "r"), *flags],
                             capture_output=True, text=True)
        assert out.returncode != 0 and "Traceback" not in out.stderr
        assert out.stderr.startswith("error: ") and message in out.stderr and out.stderr.count("\n") == 1


def test_too_few_trajectories_for_validation_is_refused(ckpt, tmp_path):
    from data import lotka_volterra

    traj, t = lotka_volterra.simulate(3, seed=0)
    lotka_volterra.save(tmp_path / "three.h5", traj, t)
    with pytest.raises(UserError, match="too few for a validation split"):
        train.main(run_args(ckpt, tmp_path / "run", "--data", str(tmp_path / "three.h5")))


def test_resume_without_a_run_and_overwriting_a_run_are_refused(ckpt, tmp_path):
    with pytest.raises(UserError, match="no state.pt"):
        train.main(["--out", str(tmp_path / "nothing"), "--resume"])
    train.main(run_args(ckpt, tmp_path / "run", "--steps", "1"))
    with pytest.raises(UserError, match="already holds a run"):
        train.main(run_args(ckpt, tmp_path / "run", "--steps", "1"))
