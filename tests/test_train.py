"""train.py end to end on a tiny random checkpoint: learning, outputs, resume, budget, bad flags."""

import json
import pickle
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import lora
import train
from conftest import hf_twin, random_model, tiny_config, write_checkpoint
from qwen_min import Qwen2, Qwen2Config, Tokenizer
from qwen_min.errors import UserError
from qwen_min.files import FolderLock
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
    made_by = json.loads((run / "summary.json").read_text())["provenance"]  # what produced it, for a reader later
    assert made_by["torch"] == torch.__version__ and made_by["torch_threads"] == torch.get_num_threads()
    assert made_by["device"].startswith("cpu") and summary["wall_s"] > 0
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


def first_batch(monkeypatch):
    """Records the first training batch train.py scores, and the dtypes it scores it with."""
    seen = {}
    real = train.causal_lm_loss

    def recording(model, ids, labels, vocab_ids=None):
        if not seen:
            lora_dtypes = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
            seen.update(ids=ids.clone(), labels=labels.clone(), base=model.embed_tokens.weight.dtype,
                        lora=lora_dtypes, autocast=torch.is_autocast_enabled("cpu"))
        return real(model, ids, labels, vocab_ids)
    monkeypatch.setattr(train, "causal_lm_loss", recording)
    return seen


def base_logits(ids):
    """transformers' logits of the tiny checkpoint's base model (the `ckpt` fixture), float32."""
    with torch.no_grad():
        return hf_twin(random_model(tiny_config()))(ids).logits


def test_bfloat16_precision_trains_with_float32_adapters(ckpt, tmp_path, monkeypatch):
    """Step 1's loss is the base model's (B = 0): computed in bf16 it is near the float32 loss of
    the same batch, but not equal to it, as an ignored --precision would leave it."""
    batch = first_batch(monkeypatch)
    run = tmp_path / "run"
    summary = train.main(run_args(ckpt, run, "--steps", "3", "--dtype", "bfloat16", "--lr", "1e-2"))
    assert summary["steps"] == 3
    assert batch["base"] == torch.bfloat16 and batch["lora"] == {torch.float32} and batch["autocast"]
    ids, labels = batch["ids"], batch["labels"]
    fp32 = F.cross_entropy(base_logits(ids[:, :-1]).flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100).item()
    step1 = records(run, "train")[0]["loss"]
    assert abs(step1 - fp32) <= 0.002 * fp32  # bf16 rounding (measured: 0.011%, 6e-4)
    assert abs(step1 - fp32) > 1e-4  # float32 gives it to 1e-6
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


def test_numeric_vocabulary_loss_trains(ckpt, tmp_path, monkeypatch):
    """--vocab numeric: the softmax runs over the 13 LLMTIME tokens only. Step 1's loss (the base
    model's, B = 0 and the head bias 0) is worked out by hand over those 13 columns."""
    batch = first_batch(monkeypatch)
    run = tmp_path / "run"
    train.main(run_args(ckpt, run, "--steps", "20", "--lr", "1e-2", "--vocab", "numeric", "--lm-head-bias"))
    losses = [r["loss"] for r in records(run, "train")]
    assert sum(losses[-5:]) < sum(losses[:5])
    ids, labels = batch["ids"], batch["labels"]
    logits = base_logits(ids[:, :-1])  # (B, T-1, 160)
    columns = list(range(3, 16))  # "0123456789.,;" in conftest's tokenizer: 3 specials, then "0"-"9" 3-12, "." 13, "," 14, ";" 15
    targets = labels[:, 1:]
    assert set(targets[targets != -100].tolist()) <= set(columns)
    restricted = torch.where(targets == -100, -100, targets - 3)  # token id -> column among the 13
    numeric = F.cross_entropy(logits[..., columns].flatten(0, 1), restricted.flatten(), ignore_index=-100).item()
    full = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100).item()
    assert losses[0] == pytest.approx(numeric, abs=1e-5)
    assert full > numeric + 0.1  # the full vocabulary's loss is far off: the test tells the two apart


# ---------------------------------------------------------------- errors a user can cause: one sentence each

def one_sentence(text):
    return "\n" not in text.strip() and text.strip().endswith(".") and "Traceback" not in text


@pytest.mark.parametrize("flags, message", [
    (["--rank", "0"], "--rank"),
    (["--targets", "q,lm_head"], "--targets: unknown LoRA target 'lm_head'"),
    (["--targets", "none"], "--targets names no layer"),
    (["--stride", "100"], "--stride"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-1e-4"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "1e38"], "--lr"),  # AdamW's step size overflowed float32 inside torch
    (["--resume"], "--resume needs --out"),
    (["--device", "gpu"], "unknown --device"),
    (["--warmup", "-1"], "--warmup"),  # it made the learning rate negative
    (["--patience", "-1"], "--patience"),  # it stopped the run at once
    (["--alpha", "0"], "--alpha"),
    (["--alpha", "-8"], "--alpha"),
    (["--alpha", "nan"], "--alpha"),
    (["--batch", "0"], "--batch"),
    (["--steps", "0"], "--steps"),
    (["--seed", "-1"], "--seed"),
    (["--grad-clip", "nan"], "--grad-clip"),  # it switched clipping off
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--scale-target", "inf"], "--scale-target"),
    (["--dropout", "1"], "--dropout"),
    (["--flops-budget", "nan"], "--flops-budget"),
])
def test_nonsense_flags_get_one_clear_error(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--context", "48", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err.splitlines()[-1] and "Traceback" not in err


def test_bad_paths_end_in_one_sentence_without_traceback(ckpt, tmp_path):
    (tmp_path / "a-file").write_text("x")
    for flags, message in [(["--data", str(tmp_path / "missing.h5")], "missing.h5"),
                           (["--model", str(tmp_path / "nowhere")], "nowhere"),
                           (["--out", str(tmp_path / "a-file")], "is a file"),
                           (["--flops-budget", "1000"], "smaller than one training step")]:
        out = subprocess.run([sys.executable, str(train.__file__), "--model", str(ckpt), "--context", "48",
                              "--out", str(tmp_path / "r"), *flags], capture_output=True, text=True)
        assert out.returncode == 2 and out.stderr.startswith("error: ") and message in out.stderr, out.stderr
        assert one_sentence(out.stderr)
        assert not (tmp_path / "r").exists()  # a failed start leaves no folder behind


def test_too_few_trajectories_for_validation_is_refused(ckpt, tmp_path):
    from data import lotka_volterra

    traj, t = lotka_volterra.simulate(3, seed=0)
    lotka_volterra.save(tmp_path / "three.h5", traj, t)
    with pytest.raises(UserError, match="three.h5 gives 3 trajectories, too few for a validation split"):
        train.main(run_args(ckpt, tmp_path / "run", "--data", str(tmp_path / "three.h5")))


def test_resume_without_a_run_and_overwriting_a_run_are_refused(ckpt, tmp_path):
    with pytest.raises(UserError, match="holds no run to resume"):
        train.main(["--out", str(tmp_path / "nothing"), "--resume"])
    assert not (tmp_path / "nothing").exists()
    train.main(run_args(ckpt, tmp_path / "run", "--steps", "1"))
    with pytest.raises(UserError, match="already holds a run"):
        train.main(run_args(ckpt, tmp_path / "run", "--steps", "1"))


def test_out_that_is_a_file_or_cannot_be_made_is_refused(ckpt, tmp_path):
    (tmp_path / "f").write_text("notes")
    with pytest.raises(UserError, match="is a file, not a folder"):
        train.main(run_args(ckpt, tmp_path / "f"))
    with pytest.raises(UserError, match="cannot create the run folder"):
        train.main(run_args(ckpt, tmp_path / "f" / "run"))
    assert (tmp_path / "f").read_text() == "notes"


def test_a_fresh_start_refuses_a_folder_holding_other_files_and_touches_none(ckpt, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    (mine / "best").mkdir()
    (mine / "notes.tmp").write_text("y")
    with pytest.raises(UserError, match=r"holds files that are not a run's \(notes.tmp, thesis.tex\)"):
        train.main(run_args(ckpt, mine, "--steps", "1"))
    assert sorted(p.name for p in mine.iterdir()) == [".lock", "best", "notes.tmp", "thesis.tex"]


def test_context_longer_than_the_models_positions_is_refused_before_any_window(ckpt, tmp_path, monkeypatch):
    def no_windows(*a, **k):
        raise AssertionError("windows were built")
    monkeypatch.setattr(train.windows, "dataset_windows", no_windows)
    with pytest.raises(UserError, match="--context 257 is longer than the 256 positions") as e:  # tiny_config: max_seq_len 256
        train.main(run_args(ckpt, tmp_path / "run", "--context", "257"))
    assert one_sentence(str(e.value)) and not (tmp_path / "run").exists()
    monkeypatch.setattr(train, "physical_memory", lambda: 1000)  # bytes: less than one 48-token window per series
    with pytest.raises(UserError, match="would take over"):
        train.main(run_args(ckpt, tmp_path / "run"))


def test_budget_smaller_than_one_step_is_refused_and_the_folder_stays_usable(ckpt, tmp_path):
    run = tmp_path / "run"
    probe = train.main(run_args(ckpt, tmp_path / "probe", "--steps", "1", "--eval-every", "1"))
    ledger = [json.loads(line) for line in open(tmp_path / "probe" / "ledger.jsonl")]
    full_step = next(r["flops"] for r in ledger if r["source"] == "plan" and r["kind"] == "train")  # 1 step, full windows
    one_val = next(r["flops"] for r in ledger if r["source"] == "spent" and r["kind"] == "eval")
    with pytest.raises(UserError, match=r"smaller than one training step \(") as e:
        train.main(run_args(ckpt, run, "--steps", "1", "--flops-budget", str(0.5 * (full_step + one_val))))
    assert f"{full_step + one_val:.3g} FLOPs" in str(e.value) and "0.5 of it" in str(e.value)
    assert not run.exists()
    run.mkdir()  # a folder the user made stays, and a fresh start in it works
    with pytest.raises(UserError):
        train.main(run_args(ckpt, run, "--steps", "1", "--flops-budget", "1000"))
    assert run.is_dir() and train.main(run_args(ckpt, run, "--steps", "1"))["steps"] == probe["steps"] == 1


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "holds a JSON list, not an object; restore it or start a new run in another folder."),
    ("{not json", "is not valid JSON (Expecting property name"),
    ("", "is not valid JSON (Expecting value"),
    ('{"rank": 8}', "lacks the flag"),
    (None, "gives 'rank' the value '4'"),  # the run's own args.json with rank written as a string
    ("rank0", "--rank must be at least 1"),
])
def test_args_json_that_train_py_did_not_write_is_refused(ckpt, tmp_path, content, message):
    run = tmp_path / "run"
    train.main(run_args(ckpt, run, "--steps", "1"))
    saved = json.loads((run / "args.json").read_text())
    if content is None:
        content = json.dumps(saved | {"rank": "4"})
    elif content == "rank0":
        content = json.dumps(saved | {"rank": 0})
    (run / "args.json").write_text(content)
    with pytest.raises(UserError, match=re.escape(message)) as e:
        train.main(["--out", str(run), "--resume", "--no-progress"])
    assert str(run / "args.json") in str(e.value) and one_sentence(str(e.value))


class Payload:
    """Unpickling this would create a file: it stands for any code a crafted state.pt could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted(kind, state_file, marker):
    good = state_file.read_bytes()
    if kind == "empty":
        state_file.write_bytes(b"")
    elif kind == "truncated":
        state_file.write_bytes(good[:len(good) // 2])
    elif kind == "garbage":
        state_file.write_bytes(b"\x00garbage" * 100)
    elif kind == "pickle":
        state_file.write_bytes(pickle.dumps({"step": Payload(marker)}, protocol=2))
    elif kind == "torch.save of an object":
        torch.save({"step": 1, "trainable": Payload(marker)}, state_file)
    elif kind == "another run's":
        state = torch.load(state_file, weights_only=True)
        state["trainable"] = {k + ".x": v for k, v in state["trainable"].items()}
        torch.save(state, state_file)
    elif kind == "missing keys":
        torch.save({"step": 3}, state_file)
    elif kind == "a folder":
        state_file.unlink()
        state_file.mkdir()
    elif kind == "a step that is not a number":
        torch.save(torch.load(state_file, weights_only=True) | {"step": "3"}, state_file)


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "pickle", "torch.save of an object", "another run's", "missing keys",
                                  "a step that is not a number", "a folder"])
def test_a_damaged_or_crafted_state_pt_is_refused_and_runs_no_code(ckpt, tmp_path, kind):
    run, marker = tmp_path / "run", tmp_path / "code-ran"
    train.main(run_args(ckpt, run, "--steps", "2", "--lr", "1e-2"))
    crafted(kind, run / "state.pt", marker)
    with pytest.raises(UserError, match="state.pt") as e:
        train.main(["--out", str(run), "--resume", "--no-progress"])
    assert not marker.exists() and one_sentence(str(e.value))
    assert "delete it and pass --resume" in str(e.value)


def test_without_its_state_pt_a_run_starts_over_from_args_json(ckpt, tmp_path):
    flags = ("--steps", "4", "--lr", "1e-2", "--dropout", "0.1")
    train.main(run_args(ckpt, tmp_path / "whole", *flags))
    train.main(run_args(ckpt, tmp_path / "run", *flags))
    (tmp_path / "run" / "state.pt").unlink()
    train.main(["--out", str(tmp_path / "run"), "--resume", "--no-progress"])
    for name in ("adapter/adapter_model.safetensors", "best/adapter_model.safetensors"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "run" / name).read_bytes()
    assert len(records(tmp_path / "run", "train")) == 4


def test_nan_weights_are_blamed_on_the_checkpoint_not_the_learning_rate(tmp_path):
    """qwen_min.weights refuses them at load; train.py must not reach its learning-rate advice."""
    model = random_model(tiny_config())
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    broken = write_checkpoint(model, tmp_path / "broken")
    with pytest.raises(UserError, match="NaN") as e:
        train.main(run_args(broken, tmp_path / "run", "--steps", "3"))
    assert "layers.1.mlp.up_proj.weight" in str(e.value) and "--lr" not in str(e.value) and one_sentence(str(e.value))
    assert not (tmp_path / "run").exists()


def test_lora_weights_gone_nan_are_blamed_on_the_learning_rate(ckpt, tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step

    def step_into_nan(self, *args, **kwargs):  # what too large a learning rate ends in
        out = real_step(self, *args, **kwargs)
        if self.state[self.param_groups[0]["params"][0]]["step"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step_into_nan)
    with pytest.raises(UserError, match="lower --lr") as e:
        train.main(run_args(ckpt, tmp_path / "run", "--steps", "20"))
    assert "the loss became nan at step 3: the LoRA weights hold NaN" in str(e.value) and one_sentence(str(e.value))
    assert "--model" not in str(e.value)


def launch(*argv):
    return subprocess.Popen([sys.executable, str(train.__file__), *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_until_locked(run, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with FolderLock(run):
                pass
        except UserError:
            return
        time.sleep(0.2)
    raise AssertionError(f"the first process never held the lock: {process.stderr.read() if process.poll() is not None else ''}")


def test_two_processes_on_one_run_folder_the_second_gets_one_sentence(ckpt, tmp_path):
    run = tmp_path / "run"
    train.main(run_args(ckpt, run, "--steps", "2"))
    first = launch("--out", str(run), "--resume", "--steps", "1000000", "--no-progress")
    try:
        wait_until_locked(run, first)
        for argv in (["--out", str(run), "--resume", "--no-progress"], run_args(ckpt, run, "--steps", "2")):
            second = subprocess.run([sys.executable, str(train.__file__), *argv], capture_output=True, text=True)
            assert second.returncode == 2 and "in use by another qwen-min process" in second.stderr, second.stderr
            assert second.stderr.startswith("error: ") and one_sentence(second.stderr)
    finally:
        first.kill()  # SIGKILL, mid-run: the lock goes with the process
        first.wait()
    saved = torch.load(run / "state.pt", weights_only=True)["step"]
    summary = train.main(["--out", str(run), "--resume", "--steps", str(saved + 3), "--no-progress"])
    steps = [r["step"] for r in records(run, "train")]
    assert summary["steps"] == saved + 3 and steps == list(range(1, saved + 4))  # one process's log, no step twice


def test_split_report_a_trains_on_report_a_training_rows_only(ckpt):
    """--split report-a: report A's own split (numpy's legacy shuffle, seed 42, 70/15/15 by int()),
    so evaluate.py --preset report-a later tests on series the run never trained on."""
    args = train.parse_args(run_args(ckpt, "unused", "--n-series", "20", "--split", "report-a"))
    _, _, _, split = train.build_data(args, Tokenizer.from_pretrained(ckpt), Qwen2Config.from_json(ckpt / "config.json"))
    order = np.random.RandomState(42).permutation(20)  # np.random.seed(42); np.random.shuffle(arange(20))
    assert split.train.tolist() == order[:14].tolist() and split.val.tolist() == order[14:17].tolist()
    assert split.test.tolist() == order[17:].tolist()
    default = train.build_data(train.parse_args(run_args(ckpt, "unused", "--n-series", "20")),
                               Tokenizer.from_pretrained(ckpt), Qwen2Config.from_json(ckpt / "config.json"))[3]
    assert sorted(default.test.tolist()) != sorted(split.test.tolist())  # the flag changed which series are held out


# ---------------------------------------------------------------- the schedule (issue 11): batch order, learning rate, final validation

def test_every_epoch_visits_every_window_once_in_a_new_order():
    n, batch, seed = 12, 4, 0  # 3 steps per epoch
    epochs = [np.concatenate([train.batch_indices(s, n, batch, seed) for s in range(3 * e, 3 * e + 3)]) for e in range(4)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(n))  # a permutation: each window once
    assert len({tuple(order.tolist()) for order in epochs}) == 4  # four epochs, four orders
    assert [train.batch_indices(s, n, batch, seed).tolist() for s in range(6)] == [  # recomputable: what --resume needs
        train.batch_indices(s, n, batch, seed).tolist() for s in range(6)]
    assert not np.array_equal(epochs[0], np.concatenate([train.batch_indices(s, n, batch, 1) for s in range(3)]))  # --seed matters
    # 14 windows in batches of 4: 3 steps an epoch, 12 distinct windows, 2 left for another epoch
    uneven = np.concatenate([train.batch_indices(s, 14, 4, seed) for s in range(3)])
    assert len(set(uneven.tolist())) == 12 and set(uneven.tolist()) <= set(range(14))


def test_learning_rate_warms_up_from_lr_over_warmup_not_from_zero():
    """Linear warm-up over W steps: step s (from 0) gets lr (s + 1) / W, so the first step already learns;
    cosine then decays from lr to 10% of it at --steps (train.py --help)."""
    from argparse import Namespace

    constant = Namespace(lr=1e-3, warmup=4, steps=20, schedule="constant")
    assert [train.learning_rate(s, constant) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert train.learning_rate(0, Namespace(lr=1e-3, warmup=0, steps=20, schedule="constant")) == 1e-3
    cosine = Namespace(lr=1e-3, warmup=4, steps=20, schedule="cosine")
    assert [train.learning_rate(s, cosine) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    # after warm-up, 16 steps of decay: progress (s - 4) / 16
    for s, lr in [(4, 1e-3), (8, 1e-3 * (0.1 + 0.45 * (1 + 0.5 ** 0.5))), (12, 0.55e-3), (20, 1e-4), (30, 1e-4)]:
        assert train.learning_rate(s, cosine) == pytest.approx(lr, rel=1e-9), s
    assert train.learning_rate(0, Namespace(lr=1e-3, warmup=0, steps=20, schedule="cosine")) == pytest.approx(1e-3)


def test_a_run_reshuffles_each_epoch_warms_up_from_step_one_and_validates_at_its_last_step(ckpt, tmp_path, monkeypatch):
    """What a run really does: the windows each step trained on, the lr it logged, the steps it validated at."""
    flags = ["--n-series", "4", "--context", "200"]
    args = train.parse_args(run_args(ckpt, "unused") + flags)
    n = len(train.build_data(args, Tokenizer.from_pretrained(ckpt), Qwen2Config.from_json(ckpt / "config.json"))[0].input_ids)
    batch = n // 2  # 2 steps an epoch
    assert batch >= 4, n
    seen, real_build, real_to_batch = [], train.build_data, train.to_batch

    def build_data(*a, **k):
        out = real_build(*a, **k)
        seen.append(out[0])  # the training windows
        return out

    def to_batch(w, idx, device):
        if seen and w is seen[0]:
            seen.append(np.asarray(idx).tolist())
        return real_to_batch(w, idx, device)
    monkeypatch.setattr(train, "build_data", build_data)
    monkeypatch.setattr(train, "to_batch", to_batch)
    run = tmp_path / "run"  # 5 steps, validation every 2: at 0 (the base model), 2, 4, and 5, the last
    train.main(run_args(ckpt, run, *flags, "--batch", str(batch), "--steps", "5", "--eval-every", "2",
                        "--warmup", "3", "--lr", "3e-3", "--patience", "0"))
    steps = seen[1:]
    assert len(steps) == 5 and all(len(s) == batch for s in steps)
    epoch0, epoch1 = steps[0] + steps[1], steps[2] + steps[3]
    for epoch in (epoch0, epoch1):
        assert len(set(epoch)) == 2 * batch and set(epoch) <= set(range(n))  # every window at most once; all when n is even
    assert epoch0 != epoch1  # reshuffled
    assert [r["step"] for r in records(run, "val")] == [0, 2, 4, 5]
    assert [r["lr"] for r in records(run, "train")] == pytest.approx([1e-3, 2e-3, 3e-3, 3e-3, 3e-3])


def test_log_tensorboard_mirrors_metrics_jsonl_and_a_resume_drops_what_a_kill_left(ckpt, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train.main(run_args(ckpt, run, "--steps", "4", "--lr", "1e-2", "--log", "tensorboard"))

    def scalars():
        events = EventAccumulator(str(run / "tensorboard"))
        events.Reload()
        return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

    tb = scalars()
    train_rows, val_rows = records(run, "train"), records(run, "val")
    assert tb["train/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train_rows]
    assert tb["train/lr"] == [(r["step"], pytest.approx(r["lr"], rel=1e-6)) for r in train_rows]
    assert tb["val/loss"] == [(r["step"], pytest.approx(r["val_loss"], rel=1e-6)) for r in val_rows]
    assert [s for s, _ in tb["val/loss"]] == [0, 4]
    # resume to 6 steps: steps 5 and 6 appear once each, after the first run's 1-4
    train.main(["--out", str(run), "--resume", "--steps", "6", "--no-progress"])
    assert [s for s, _ in scalars()["train/loss"]] == [1, 2, 3, 4, 5, 6]


def test_on_validation_sees_each_validation_at_its_flops_and_can_stop_the_run(ckpt, tmp_path):
    seen = []

    def on_validation(step, val_loss, spent):
        seen.append((step, val_loss, spent))
        return step == 10  # stop after the second validation past the baseline

    run = tmp_path / "run"
    summary = train.main(run_args(ckpt, run, "--steps", "30"), on_validation=on_validation)
    val = records(run, "val")
    assert [(r["step"], r["val_loss"], r["flops"]) for r in val] == seen  # what metrics.jsonl records, as it happens
    assert [s for s, _, _ in seen] == [0, 5, 10]
    assert summary["steps"] == 10 and summary["stop_reason"] == "pruned" and summary["flops_spent"] == seen[-1][2]
    state = torch.load(run / "state.pt", weights_only=True)
    assert state["step"] == 10  # the checkpoint a pruned run leaves is its last step's
