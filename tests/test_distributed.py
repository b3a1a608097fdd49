"""train.py and evaluate.py under torchrun: two CPU processes (gloo) train and forecast as one process
does, resume after a kill, and only rank 0 writes. Each run is real: `python -m torch.distributed.run --standalone`, two ranks
talking over localhost (about 10 s per run on two cores)."""

import contextlib
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
    report = json.loads((tmp_path / "r-again" / "rank1.json").read_text())
    assert report["decoded"] == [1]  # of the two batches left after the kill, rank 1 decoded one


def summed_gradients(rank, store, batch, scored, out):
    """One of two gloo processes: its half of the batch through train.accumulate, then sum_gradients."""
    import torch.distributed as dist

    import lora
    from conftest import random_lora
    from qwen_min import distributed

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    world = World(rank, 2)
    torch.manual_seed(0)
    model = random_model(tiny_config())
    lora.inject_lora(model, r=4)
    random_lora(model)  # B != 0, so A gets a gradient too
    params = [model.get_parameter(n) for n in lora.mark_only_lora_as_trainable(model)]
    ids, labels = batch
    mine = world.shard(list(range(len(ids))))
    chunks = [(ids[i:i + 1], labels[i:i + 1]) for i in mine]  # micro-batches of one window
    loss = train.accumulate(model, chunks, None, contextlib.nullcontext, scored)
    distributed.sum_gradients(params, world)
    total = distributed.sum_over_ranks([loss], world)[0]
    torch.save({"grads": [p.grad for p in params], "loss": total}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_summed_gradients_of_two_processes_are_the_whole_batchs(tmp_path):
    """The gradient itself, not only what AdamW makes of it (AdamW ignores a constant factor): two
    gloo processes, each with two windows of different lengths in micro-batches of one, sum to the
    gradient of one process on all four windows at once, and their weighted losses to its loss."""
    import lora
    from conftest import random_lora
    from qwen_min.loss import causal_lm_loss

    torch.manual_seed(1)
    ids = torch.randint(3, 150, (4, 12))
    labels = ids.clone()
    labels[0, 9:] = labels[2, 5:] = -100  # padding: the ranks score different numbers of tokens
    scored = int((labels[:, 1:] != -100).sum())
    torch.multiprocessing.spawn(summed_gradients, args=(tmp_path / "store", (ids, labels), scored, tmp_path), nprocs=2)
    torch.manual_seed(0)
    model = random_model(tiny_config())
    lora.inject_lora(model, r=4)
    random_lora(model)
    params = [model.get_parameter(n) for n in lora.mark_only_lora_as_trainable(model)]
    loss = causal_lm_loss(model, ids, labels)
    loss.backward()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["loss"] == pytest.approx(loss.item(), rel=1e-6)
        for p, g in zip(params, got["grads"]):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
    assert max(p.grad.abs().max().item() for p in params) > 1e-3  # gradients that could be wrong


def test_a_gpu_run_needs_a_gpu_per_process_and_no_fixed_index(monkeypatch):
    from qwen_min.distributed import check_gpus

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_gpus("cuda", World(1, 2, 1)) is None and check_gpus("cpu", World(3, 4, 3)) is None
    assert check_gpus("cuda:0", World()) is None  # one process may take any GPU
    assert check_gpus("cuda:1", World(0, 2, 0)) == ("--device cuda:1 would put every process on one GPU; under torchrun pass "
                                                    "--device cuda (each process takes GPU LOCAL_RANK)")
    assert check_gpus("cuda", World(2, 3, 2)) == ("torchrun started more processes on this machine than its 2 GPU(s); "
                                                  "use --nproc-per-node 2")
