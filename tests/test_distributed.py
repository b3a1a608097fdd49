"""train.py and evaluate.py under torchrun: two CPU processes (gloo) train and forecast as one process
does, resume after a kill, and only rank 0 writes. Each run is real: `python -m torch.distributed.run --standalone`, two ranks
talking over localhost (about 10 s per run on two cores)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import evaluate
import flops
import train
from conftest import random_model, tiny_config, write_checkpoint
from qwen_min.distributed import World

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(random_model(tiny_config()), tmp_path_factory.mktemp("tiny") / "ckpt")


def flags(ckpt, out, *extra):
    return ["--model", str(ckpt), "--n-series", "12", "--context", "48", "--batch", "4", "--rank", "4",
            "--eval-every", "5", "--eval-batches", "2", "--out", str(out), "--no-progress", "--steps", "15",
            "--lr", "5e-3", "--schedule", "cosine", "--warmup", "3", "--lm-head-bias", *extra]


def torchrun(n, report, flags, kill_at=None, script="train"):
    """train.py (or evaluate.py) in n processes (tests/torchrun_worker.py records rank 1's writes); -> CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           str(REPO / "tests" / "torchrun_worker.py"), script, str(report), *([str(kill_at)] if kill_at else []), "--", *flags]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def adapter(run, folder="adapter"):
    return load_file(str(run / folder / "adapter_model.safetensors")) | load_file(str(run / folder / "extra_parameters.safetensors"))


def losses(run):
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return [r.get("loss", r.get("val_loss")) for r in rows], [(r["kind"], r["step"]) for r in rows]


def rank_1_writes(report):
    return json.loads((report / "rank1.json").read_text())["writes_under_out"]


def test_two_processes_train_as_one_and_only_rank_0_writes(ckpt, tmp_path):
    """--batch 4 over 2 ranks (2 windows each), and with --micro-batch 1 (2 chunks each), give the
    losses and adapter of one process with --batch 4, to float32 rounding (the gradient sum's order)."""
    one = train.main(flags(ckpt, tmp_path / "one"))
    for name, extra in (("two", ()), ("two-micro", ("--micro-batch", "1"))):
        done = torchrun(2, tmp_path / f"report-{name}", flags(ckpt, tmp_path / name, *extra))
        assert done.returncode == 0, done.stderr[-2000:]
        run = tmp_path / name
        a, b = adapter(tmp_path / "one"), adapter(run)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
        (l1, keys1), (l2, keys2) = losses(tmp_path / "one"), losses(run)
        assert keys1 == keys2 and l2 == pytest.approx(l1, rel=1e-5)
        assert json.loads((run / "args.json").read_text())["world_size"] == 2
        summary = json.loads((run / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == one["steps"] == 15
        # every rank's FLOPs are counted: the same work as one process, give or take the per-chunk sums,
        # plus one AdamW step per rank
        assert one["flops_spent"] < summary["flops_spent"] < 1.002 * one["flops_spent"]
        assert rank_1_writes(tmp_path / f"report-{name}") == []  # it ran (its report exists) and wrote nothing under --out


def test_a_run_killed_under_two_processes_resumes_to_the_run_never_killed(ckpt, tmp_path):
    """Rank 0 is SIGKILLed after step 12 (its last checkpoint: step 10); torchrun then ends rank 1.
    Resumed under two processes, the run ends bit-identical to one never killed, dropout included:
    each rank's dropout draws come from (seed, step, rank), so no rank's RNG state needs saving."""
    whole = torchrun(2, tmp_path / "r-whole", flags(ckpt, tmp_path / "whole", "--dropout", "0.1"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = torchrun(2, tmp_path / "r-killed", flags(ckpt, tmp_path / "killed", "--dropout", "0.1"), kill_at=12)
    assert killed.returncode != 0
    assert torch.load(tmp_path / "killed" / "state.pt", weights_only=True)["step"] == 10
    resumed = torchrun(2, tmp_path / "r-resumed", ["--out", str(tmp_path / "killed"), "--resume", "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for folder in ("adapter", "best"):
        a, b = adapter(tmp_path / "whole", folder), adapter(tmp_path / "killed", folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "whole") == losses(tmp_path / "killed")
    assert rank_1_writes(tmp_path / "r-resumed") == []


def test_a_two_process_run_resumes_in_one_process_on_the_same_batches(ckpt, tmp_path):
    """Each step's global batch does not depend on the world size, so a run killed under two
    processes may resume in one: it ends equal, to float32 rounding, to the run never killed."""
    whole = torchrun(2, tmp_path / "r-whole", flags(ckpt, tmp_path / "whole"))
    killed = torchrun(2, tmp_path / "r-killed", flags(ckpt, tmp_path / "killed"), kill_at=12)
    assert whole.returncode == 0 and killed.returncode != 0
    train.main(["--out", str(tmp_path / "killed"), "--resume", "--no-progress"])
    a, b = adapter(tmp_path / "whole"), adapter(tmp_path / "killed")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "killed" / "args.json").read_text())["world_size"] == 1  # as it ended


def test_fewer_windows_than_processes_is_one_sentence(ckpt, tmp_path):
    done = torchrun(2, tmp_path / "r", flags(ckpt, tmp_path / "run", "--batch", "1"))
    assert done.returncode != 0
    assert "--batch 1 gives some of the 2 processes no window to train on; use --batch 2 or more." in done.stderr
    assert "UserError" not in done.stderr  # each rank prints the sentence, not a traceback (torchrun then adds its summary)


def test_ranks_take_contiguous_slices_covering_the_batch_once():
    idx = list(range(7))
    parts = [World(r, 3).shard(idx) for r in range(3)]
    assert parts == [[0, 1], [2, 3, 4], [5, 6]]
    assert World().shard(idx) == idx  # a world of one takes everything


def test_the_optimizer_is_counted_once_per_rank():
    s = flops.Setup(tiny_config(), flops.lora_targets("q,v", 4))
    one = flops.train_step_accumulated(s, [(2, 47), (2, 47)])
    two = flops.train_step_accumulated(s, [(2, 47), (2, 47)], replicas=2)
    assert two.coursework - one.coursework == flops.adamw(flops.trainable_parameters(s)).coursework > 0
    assert two["forward"].coursework == one["forward"].coursework and two["accumulate"].coursework == one["accumulate"].coursework


EVAL = ["--n-series", "24", "--k", "8", "--h", "4", "--context", "48", "--lv-iterations", "5", "--plots", "0",
        "--batch", "1", "--no-baselines", "--device", "cpu"]


def test_evaluate_py_shares_the_series_between_two_processes_and_resumes_after_a_kill(ckpt, tmp_path):
    """3 test series, one per decode batch: dealt to 2 ranks in 2 rounds. Killed after rank 0 journaled
    the first batch, then rerun, the 2-process evaluation writes the 1-process results.json."""
    evaluate.main(["--model", str(ckpt), *EVAL, "--out", str(tmp_path / "one")])
    flags_two = ["--model", str(ckpt), *EVAL, "--out", str(tmp_path / "two")]
    killed = torchrun(2, tmp_path / "r-killed", flags_two, kill_at=1, script="evaluate")
    assert killed.returncode != 0 and not (tmp_path / "two" / "results.json").exists()
    journal = (tmp_path / "two" / "journal.jsonl").read_text().splitlines()
    assert [json.loads(line).get("piece") for line in journal] == [None, "cross-entropy", "forecast rows 0-0"]
    again = torchrun(2, tmp_path / "r-again", flags_two, script="evaluate")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming the evaluation killed" in again.stderr
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert len(a["series"]["index"]) == 3 and a["tokens_generated"] > 0
    for key in ("series", "results", "repairs", "tokens_generated", "flops", "cross_entropy"):
        assert b[key] == a[key], key
    assert rank_1_writes(tmp_path / "r-again") == []
