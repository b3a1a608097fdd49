"""qwen_min/run_folder.py and qwen_min/checkpoint.py piece by piece, without training: what a run folder
may hold, how each piece refuses what train.py never writes (in whole sentences), and what a checkpoint
saves and puts back. tests/test_train.py runs them end to end; these pin each function's own promise
with values worked out here (mutation area train)."""

import json
import math
import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lora
from conftest import random_model, tiny_config, write_checkpoint
from data import llmtime
from qwen_min import Qwen2, checkpoint, run_folder
from qwen_min.errors import UserError
from qwen_min.weights import hf_name

# ---------------------------------------------------------------- making, opening, tidying a run folder


def test_create_says_whether_it_made_the_folder_and_refuses_a_file_or_an_unmakeable_place(tmp_path):
    run = tmp_path / "a" / "b" / "run"
    assert run_folder.create(run) is True and run.is_dir()  # parents made too
    assert run_folder.create(run) is False  # there already: a failed start must not remove it
    (tmp_path / "f").write_text("notes")
    with pytest.raises(UserError) as e:
        run_folder.create(tmp_path / "f")
    assert str(e.value) == f"--out {tmp_path / 'f'} is a file, not a folder; choose a folder for the run."
    with pytest.raises(UserError) as e:
        run_folder.create(tmp_path / "f" / "run")
    assert str(e.value) == f"cannot create the run folder --out {tmp_path / 'f' / 'run'} (Not a directory); choose another place."
    assert (tmp_path / "f").read_text() == "notes"


def test_tidy_finishes_or_undoes_every_folder_swap_and_removes_only_a_runs_temporary_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # adapter: killed between the two renames (a whole new version waits in adapter.tmp)
    (run / "adapter.tmp").mkdir()
    (run / "adapter.tmp" / "new").write_text("new")
    (run / "adapter.tmp" / ".complete").touch()
    (run / "adapter.old").mkdir()
    # best: killed while the new version was written (keep the previous one, in best.old)
    (run / "best.tmp").mkdir()
    (run / "best.old").mkdir()
    (run / "best.old" / "old").write_text("old")
    # merged and tensorboard: killed after the swap; their leftovers go
    for name in ("merged", "tensorboard"):
        (run / name).mkdir()
        (run / name / ".complete").touch()
        (run / f"{name}.old").mkdir()
    for name in ("state.pt", "metrics.jsonl", "args.json", "summary.json", "notes.txt"):
        (run / f"{name}.tmp").write_text("half")
    run_folder.tidy(run)
    assert (run / "adapter" / "new").read_text() == "new" and (run / "best" / "old").read_text() == "old"
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "best", "merged", "notes.txt.tmp", "tensorboard"]
    assert not any((run / name / ".complete").exists() for name in run_folder.RUN_FOLDERS)


def test_check_resumable_needs_args_json_and_says_whether_state_pt_is_there(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(UserError) as e:
        run_folder.check_resumable(run)
    assert str(e.value) == f"{run} holds no run to resume (no args.json); start it without --resume."
    (run / "args.json").mkdir()  # a folder is no args.json
    with pytest.raises(UserError, match="holds no run to resume"):
        run_folder.check_resumable(run)
    (run / "args.json").rmdir()
    (run / "args.json").write_text("{}")
    assert run_folder.check_resumable(run) is False  # killed before its first checkpoint: start over
    (run / "state.pt").write_bytes(b"x")
    assert run_folder.check_resumable(run) is True
    (run / "state.pt").unlink()
    (run / "state.pt").mkdir()
    with pytest.raises(UserError) as e:
        run_folder.check_resumable(run)
    assert str(e.value) == (f"{run / 'state.pt'} is not a file; delete it and pass --resume to start the run over "
                            "from its args.json, or choose another --out.")


def test_check_fresh_refuses_a_checkpoint_and_names_the_first_three_foreign_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("args.json", ".lock", "scaler.json", "metrics.jsonl", "ledger.jsonl", "loss.png", "summary.json"):
        (run / name).write_text("x")
    for name in ("adapter", "best", "merged", "tensorboard"):
        (run / name).mkdir()
    run_folder.check_fresh(run)  # all of it a run's: a fresh start may clear it
    for name in ("d.txt", "b.txt", "c.txt", "a.txt"):
        (run / name).write_text("mine")
    with pytest.raises(UserError) as e:
        run_folder.check_fresh(run)
    assert str(e.value) == f"--out {run} holds files that are not a run's (a.txt, b.txt, c.txt); choose a new or empty folder."
    (run / "state.pt").mkdir()  # any state.pt, even a folder, is a run to resume
    with pytest.raises(UserError) as e:
        run_folder.check_fresh(run)
    assert str(e.value) == f"{run} already holds a run; pass --resume to continue it or choose another --out."


def test_clear_removes_what_a_run_writes_and_keeps_args_json_the_lock_and_anything_else(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("args.json", ".lock", "notes.txt", "scaler.json", "metrics.jsonl", "ledger.jsonl", "state.pt", "loss.png",
                 "summary.json"):
        (run / name).write_text("x")
    for name in ("adapter", "best", "merged", "tensorboard", "mine"):
        (run / name).mkdir()
        (run / name / "f").write_text("x")
    run_folder.clear(run)
    assert sorted(p.name for p in run.iterdir()) == [".lock", "args.json", "mine", "notes.txt"]
    run_folder.clear(run)  # nothing left to remove: no error


@pytest.mark.parametrize("line, step", [
    ('{"kind": "train", "step": 7}', 7), ('{"step": -1}', -1), ('{"step": 0}', 0),
    ('{"step": 7.0}', math.inf), ('{"step": true}', math.inf), ('{"step": "7"}', math.inf), ('{"step": null}', math.inf),
    ('{"kind": "train"}', math.inf), ('{"kind": "train", "st', math.inf), ("", math.inf), ("[7]", math.inf), ('"step"', math.inf),
    ("7", math.inf),
])
def test_logged_step_reads_a_whole_lines_integer_step_and_calls_anything_else_infinite(line, step):
    assert run_folder.logged_step(line) == step


def test_drop_lines_after_keeps_the_lines_up_to_the_checkpoint_in_both_logs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    metrics = [{"kind": "train", "step": s} for s in (1, 2, 3, 4)] + [{"kind": "val", "step": 2}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics) + '{"kind": "train", "st')
    ledger = [{"step": 0}, {"step": -1}, {"step": 3}, {"step": 4}]
    (run / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ledger))
    run_folder.drop_lines_after(run, 3)
    assert (run / "metrics.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in metrics[:3] + metrics[4:])
    assert (run / "ledger.jsonl").read_text() == "".join(json.dumps(r) + "\n" for r in ledger[:3])
    (run / "ledger.jsonl").unlink()
    run_folder.drop_lines_after(run, 0)  # a log that is not there stays not there
    assert not (run / "ledger.jsonl").exists() and (run / "metrics.jsonl").read_text() == ""


# ---------------------------------------------------------------- reading a run back (evaluate.py, python -m qwen_min)

GOOD_ARGS = {"model": "Qwen/Qwen2.5-0.5B-Instruct", "data": None, "n_series": 1000, "seed": 0, "scaling": "global",
             "percentile": 95.0, "scale_target": 10, "decimals": 2, "context": 512, "lm_head_bias": False, "split": "ours",
             "rank": 8}


@pytest.mark.parametrize("changes", [
    {}, {"data": "lv.h5", "scaling": "per-series", "split": "report-a", "lm_head_bias": True, "decimals": 3},
    {"split": "report-b", "decimals": 1, "percentile": 90, "scale_target": 1.5},
])
def test_read_args_gives_back_what_train_py_wrote(tmp_path, changes):
    (tmp_path / "args.json").write_text(json.dumps(GOOD_ARGS | changes))
    assert run_folder.read_args(tmp_path) == GOOD_ARGS | changes
    assert run_folder.read_args(str(tmp_path)) == GOOD_ARGS | changes  # a path given as text


@pytest.mark.parametrize("key, value", [
    ("model", ""), ("model", 3), ("data", 5), ("n_series", 10.0), ("n_series", True), ("n_series", "10"), ("seed", None),
    ("seed", False), ("scaling", "local"), ("percentile", "95"), ("percentile", float("nan")), ("percentile", float("inf")),
    ("percentile", True), ("scale_target", None), ("scale_target", float("-inf")), ("decimals", 4), ("decimals", 0),
    ("decimals", 2.0), ("decimals", True), ("context", 512.0), ("context", "512"), ("lm_head_bias", 1), ("lm_head_bias", None),
    ("split", "report-c"), ("split", None),
])
def test_read_args_refuses_a_value_train_py_never_writes_naming_the_key(tmp_path, key, value):
    path = tmp_path / "args.json"
    path.write_text(json.dumps(GOOD_ARGS | {key: value}))
    with pytest.raises(UserError) as e:
        run_folder.read_args(tmp_path)
    assert str(e.value) == f"{path}: '{key}' is {json.loads(json.dumps(value))!r}, not a value train.py writes; restore the run's args.json."


def test_read_args_refuses_a_folder_without_args_json_or_with_one_naming_no_model(tmp_path):
    with pytest.raises(UserError) as e:
        run_folder.read_args(tmp_path)
    assert str(e.value) == f"{tmp_path} holds no args.json; pass a train.py run folder to --run."
    (tmp_path / "args.json").write_text(json.dumps({k: v for k, v in GOOD_ARGS.items() if k != "model"}))
    with pytest.raises(UserError) as e:
        run_folder.read_args(tmp_path)
    assert str(e.value) == (f"{tmp_path / 'args.json'} names no 'model'; restore the run's args.json "
                            "(train.py writes every flag there).")
    (tmp_path / "args.json").write_text("[1, 2]")
    with pytest.raises(UserError) as e:
        run_folder.read_args(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'args.json'} holds a JSON list, not an object; is {tmp_path} a train.py run folder?")
    (tmp_path / "args.json").write_text(json.dumps({"model": "m"}))  # keys a reader does not rely on may be absent
    assert run_folder.read_args(tmp_path) == {"model": "m"}


SCALER = {"level": 12.5, "percentile": 95.0, "target": 10.0, "per_series": False}


@pytest.mark.parametrize("changes", [{}, {"percentile": 100.0}, {"percentile": 0.5, "target": 1.0}, {"level": 3}, {"level": 0.25}])
def test_read_scaler_gives_back_the_global_scale(tmp_path, changes):
    d = SCALER | changes
    (tmp_path / "scaler.json").write_text(json.dumps(d | {"decimals": 2, "split_seed": 0}))  # train.py adds these two
    scaler = run_folder.read_scaler(tmp_path / "scaler.json")
    assert (float(scaler.level), scaler.percentile, scaler.target, scaler.per_series) == (d["level"], d["percentile"], d["target"], False)
    assert scaler.level.shape == () and scaler.transform(np.array([d["level"]])).tolist() == [d["target"]]


SCALER_REFUSAL = ("is not a global scaler train.py writes (a positive 'level', 'percentile', 'target', 'per_series' false); "
                  "restore it, or delete it to refit the scale on the run's train split.")


@pytest.mark.parametrize("text", [
    json.dumps(SCALER | {"per_series": True}), json.dumps(SCALER | {"level": [12.5]}), json.dumps(SCALER | {"level": [1.0, 2.0]}),
    json.dumps(SCALER | {"level": 0.0}), json.dumps(SCALER | {"level": -1.0}), json.dumps(SCALER | {"level": "x"}),
    json.dumps(SCALER | {"level": None}), json.dumps(SCALER | {"percentile": 0.0}), json.dumps(SCALER | {"percentile": 100.5}),
    json.dumps(SCALER | {"percentile": "p"}), json.dumps(SCALER | {"target": 0.0}), json.dumps(SCALER | {"target": -10.0}),
    json.dumps(SCALER | {"target": None}), json.dumps({k: v for k, v in SCALER.items() if k != "target"}),
    json.dumps(SCALER).replace("12.5", "Infinity"), json.dumps(SCALER).replace("12.5", "NaN"),
    json.dumps(SCALER).replace("10.0", "Infinity"), json.dumps(SCALER).replace("95.0", "NaN"),
    "[12.5]", "12.5", '"scaler"', "{not json", "", None, b"\xff\xfe",
])
def test_read_scaler_refuses_anything_but_a_positive_finite_global_scale(tmp_path, text):
    path = tmp_path / "scaler.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:  # None: no file at all
        path.write_text(text)
    with pytest.raises(UserError) as e:
        run_folder.read_scaler(path)
    assert str(e.value) == f"{path} {SCALER_REFUSAL}"


def test_read_scaler_reads_what_llmtime_writes(tmp_path):
    fitted = llmtime.Scaler.fit(np.arange(1.0, 101.0).reshape(10, 5, 2), percentile=90, target=4)
    (tmp_path / "scaler.json").write_text(json.dumps(fitted.to_dict()))
    read = run_folder.read_scaler(tmp_path / "scaler.json")
    assert float(read.level) == pytest.approx(90.1, rel=1e-12) and (read.percentile, read.target) == (90.0, 4.0)


def test_adapter_of_is_best_if_there_else_the_last_checkpoints(tmp_path):
    assert run_folder.adapter_of(str(tmp_path)) == tmp_path / "adapter"  # neither yet: the last checkpoint's place
    (tmp_path / "best").write_text("a file is no adapter folder")
    assert run_folder.adapter_of(tmp_path) == tmp_path / "adapter"
    (tmp_path / "best").unlink()
    (tmp_path / "best").mkdir()
    assert run_folder.adapter_of(str(tmp_path)) == tmp_path / "best"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(random_model(tiny_config()), tmp_path_factory.mktemp("tiny") / "ckpt")


def trained_adapter(folder, r=2, alpha=6.0, bias=True, seed=1):
    """An adapter on q and v with random A, B (and lm_head bias), saved to `folder`; returns its tensors
    by module: {"layers.0.self_attn.q_proj": (A, B), ...} and the bias (or None)."""
    model = random_model(tiny_config())
    if bias:
        model.add_lm_head_bias()
    lora.inject_lora(model, r=r, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or name == "lm_head_bias":
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    lora.save_adapter(model, folder, module_name=hf_name, extra={"lm_head_bias": model.lm_head_bias} if bias else None)
    ab = {name: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for name, m in lora.lora_layers(model).items()}
    return ab, model.lm_head_bias.detach().clone() if bias else None


def by_hand(ab, bias, scale):
    """The tiny base model with W + scale * B A written into each adapted layer by hand, and its head bias."""
    model = random_model(tiny_config())
    with torch.no_grad():
        for name, (A, B) in ab.items():
            model.get_submodule(name).weight += scale * B @ A
    return lambda ids: model(ids) + (0 if bias is None else bias)


IDS = torch.tensor([[5, 17, 3, 9, 40, 2, 11]])


def test_load_model_merges_the_adapter_and_its_head_bias_into_the_base(ckpt, tmp_path):
    ab, bias = trained_adapter(tmp_path / "adapter", r=2, alpha=6.0)
    net = run_folder.load_model(ckpt, tmp_path / "adapter", lm_head_bias=True)
    assert not net.training and net.lm_head_bias is not None
    assert all(m.merged for m in lora.lora_layers(net).values())
    with torch.no_grad():
        got, want = net(IDS), by_hand(ab, bias, 6.0 / 2)(IDS)
        assert (got - want).abs().max().item() <= 1e-5
        assert (got - random_model(tiny_config())(IDS)).abs().max().item() > 0.1  # the adapter matters
    base = run_folder.load_model(ckpt)
    assert not base.training and not lora.lora_layers(base) and base.lm_head_bias is None
    with torch.no_grad():
        assert torch.equal(base(IDS), random_model(tiny_config())(IDS))


def test_load_model_of_a_bfloat16_checkpoint_in_float32_merges_the_adapter_unrounded(tmp_path):
    """The real Qwen2.5 checkpoint is stored in bfloat16: loading it as float32 must load the adapter as float32 too
    (LoRA made in bfloat16 would round A and B before the merge)."""
    ckpt16 = write_checkpoint(random_model(tiny_config(), dtype=torch.bfloat16), tmp_path / "ckpt16")
    ab, _ = trained_adapter(tmp_path / "adapter", r=2, alpha=2.0, bias=False)
    net = run_folder.load_model(ckpt16, tmp_path / "adapter", dtype=torch.float32)
    model = Qwen2.from_pretrained(ckpt16, dtype=torch.float32)  # the stored base, exactly, in float32 (float32 RoPE tables)
    with torch.no_grad():
        for name, (A, B) in ab.items():
            model.get_submodule(name).weight += B @ A
        assert (net(IDS) - model(IDS)).abs().max().item() <= 1e-5
    assert {p.dtype for p in net.parameters()} == {torch.float32}


def test_load_model_with_a_head_bias_but_an_adapter_without_one_has_a_zero_bias(ckpt):
    net = run_folder.load_model(ckpt, None, lm_head_bias=True)
    assert torch.equal(net.lm_head_bias.detach(), torch.zeros(160))  # counted by the FLOPs of evaluate.py, adding nothing


def test_load_model_in_bfloat16_merges_in_float32_then_casts_every_tensor(ckpt, tmp_path):
    ab, bias = trained_adapter(tmp_path / "adapter", r=2, alpha=2.0, bias=False)
    net = run_folder.load_model(ckpt, tmp_path / "adapter", dtype=torch.bfloat16)
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        got, want = net(IDS).float(), by_hand(ab, None, 1.0)(IDS)
    assert (got - want).abs().max().item() <= 0.1 * want.abs().max().item()  # bf16 rounding, not another model
    assert net.lm_head_bias is None  # lm_head_bias=False by default


def test_set_extra_puts_the_head_bias_in_and_refuses_tensors_a_qwen2_has_no_place_for():
    model = random_model(tiny_config())
    run_folder.set_extra(model, {})
    assert model.lm_head_bias is None  # nothing carried, nothing added
    bias = torch.arange(160, dtype=torch.float32) / 10
    run_folder.set_extra(model, {"lm_head_bias": bias})
    assert torch.equal(model.lm_head_bias.detach(), bias)
    with pytest.raises(UserError) as e:
        run_folder.set_extra(model, {"lm_head_bias": bias, "z_extra": bias, "a_scale": bias})
    assert str(e.value) == ("The adapter carries a_scale, z_extra, which a Qwen2 model has no place for; "
                            "was it made by another program?")


class FakeGit:
    """Stands in for subprocess.run while provenance asks git: answers by the git subcommand."""

    def __init__(self, top, head="c0ffee" * 6 + "abcd", status="", fail=()):
        self.top, self.head, self.status, self.fail, self.calls = top, head, status, fail, []

    def __call__(self, argv, **kwargs):
        if argv[0] != "git":  # platform asks the system too
            return REAL_RUN(argv, **kwargs)
        self.calls.append((argv, kwargs))
        sub = " ".join(argv[3:])
        if sub in self.fail:
            if self.fail[sub] == "missing":
                raise FileNotFoundError("git")
            if self.fail[sub] == "timeout":
                raise subprocess.TimeoutExpired(argv, 10)
            return subprocess.CompletedProcess(argv, 128, "", "fatal")
        out = {"rev-parse --show-toplevel": f"{self.top}\n", "rev-parse HEAD": f"{self.head}\n",
               "status --porcelain": self.status}[sub]
        return subprocess.CompletedProcess(argv, 0, out, "")


REAL_RUN = subprocess.run
REPO = run_folder.Path(run_folder.__file__).resolve().parent.parent


@pytest.mark.parametrize("status, changed", [
    ("", False), ("?? notes.txt\n?? runs/x/\n", False), ("?? study.py\n", True), (" M train.py\n", True),
    ("?? notes.txt\nA  data/new.h5\n", True),
])
def test_provenance_names_this_checkouts_commit_and_whether_files_differ(monkeypatch, status, changed):
    git = FakeGit(REPO, status=status)
    monkeypatch.setattr(subprocess, "run", git)
    p = run_folder.provenance()
    assert p["commit"] == git.head and p["uncommitted_changes"] is changed
    assert [argv for argv, _ in git.calls] == [["git", "-C", str(REPO), *sub] for sub in
                                               (["rev-parse", "--show-toplevel"], ["rev-parse", "HEAD"], ["status", "--porcelain"])]
    assert all(kw == {"capture_output": True, "text": True, "timeout": 10} for _, kw in git.calls)
    assert p["device"].startswith("cpu (") and p["torch"] == torch.__version__ and p["numpy"] == np.__version__
    assert p["torch_threads"] == torch.get_num_threads() and p["python"].count(".") == 2 and p["platform"]


@pytest.mark.parametrize("git", [
    FakeGit("/somewhere/else"),  # a checkout that merely contains a copy of qwen-min
    FakeGit(REPO, fail={"rev-parse --show-toplevel": "missing"}),  # no git on this machine
    FakeGit(REPO, fail={"rev-parse --show-toplevel": "exit"}),  # not a git checkout
    FakeGit(REPO, fail={"rev-parse --show-toplevel": "timeout"}),
    FakeGit(REPO, fail={"rev-parse HEAD": "exit"}),  # a checkout with no commit yet
])
def test_provenance_names_no_commit_outside_a_checkout_of_qwen_min(monkeypatch, git):
    monkeypatch.setattr(subprocess, "run", git)
    p = run_folder.provenance("cpu")
    assert p["commit"] is None and p["uncommitted_changes"] is None
    assert not any(argv[3:] == ["status", "--porcelain"] for argv, _ in git.calls)  # no commit: nothing to differ from


@pytest.mark.parametrize("how", ["exit", "timeout"])
def test_provenance_with_a_failing_status_names_the_commit_and_does_not_know_of_changes(monkeypatch, how):
    git = FakeGit(REPO, fail={"status --porcelain": how})
    monkeypatch.setattr(subprocess, "run", git)
    p = run_folder.provenance()
    assert p["commit"] == git.head and p["uncommitted_changes"] is None


# ---------------------------------------------------------------- the checkpoint

def tiny_run(tmp_path, bias=True):
    """A tiny model with LoRA (q, v) trainable, an AdamW that has taken one step, and a run folder."""
    model = random_model(tiny_config(), lm_head_bias=bias)
    lora.inject_lora(model, r=2, alpha=4.0)
    lora.mark_only_lora_as_trainable(model, also=("lm_head_bias",))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model(IDS).square().mean().backward()
    optimizer.step()
    run = tmp_path / "run"
    run.mkdir(parents=True, exist_ok=True)
    return model, optimizer, run


def test_a_fresh_loop_state_and_one_read_from_a_checkpoint():
    fresh = checkpoint.LoopState()
    assert (fresh.step, fresh.best_val, fresh.bad_evals, fresh.spent, fresh.best) == (0, math.inf, 0, 0.0, None)
    assert type(fresh.spent) is float and type(fresh.step) is int
    best = {"x": torch.ones(2)}
    state = {"step": 7, "best_val": 1.5, "bad_evals": 2, "spent": 3e9, "best": best, "trainable": {}, "rng": None}
    loop = checkpoint.LoopState.of(state)
    assert (loop.step, loop.best_val, loop.bad_evals, loop.spent, loop.best) == (7, 1.5, 2, 3e9, best)


def test_trainable_is_the_tensors_training_changes_detached(tmp_path):
    model, _, _ = tiny_run(tmp_path)
    t = checkpoint.trainable(model)
    names = ([f"layers.{i}.self_attn.{p}_proj.lora_{m}" for i in range(2) for p in "qv" for m in "AB"]) + ["lm_head_bias"]
    assert sorted(t) == sorted(names)
    assert all(not x.requires_grad for x in t.values())
    assert all(x.data_ptr() == dict(model.named_parameters())[n].data_ptr() for n, x in t.items())  # the tensors, not copies


def test_state_of_holds_what_continuing_needs(tmp_path):
    model, optimizer, _ = tiny_run(tmp_path)
    loop = checkpoint.LoopState(step=4, best_val=2.5, bad_evals=1, spent=1e6, best={"a": torch.zeros(1)})
    rng = torch.get_rng_state()
    state = checkpoint.state_of(model, optimizer, loop)
    assert state.keys() == checkpoint.STATE_KEYS
    assert (state["step"], state["best_val"], state["bad_evals"], state["spent"], state["best"]) == (4, 2.5, 1, 1e6, loop.best)
    assert torch.equal(state["rng"], rng) and state["cuda_rng"] is None  # no GPU here
    assert state["trainable"].keys() == checkpoint.trainable(model).keys()
    assert state["optimizer"]["state"][0]["step"].item() == 1  # the optimizer's own state, one step taken


def test_commit_syncs_the_logs_it_counts_on_then_writes_state_pt_whole(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    events = []
    monkeypatch.setattr(checkpoint, "sync", lambda path: events.append(("sync", path.name, (run / "state.pt").exists())))
    (run / "metrics.jsonl").write_text("{}\n")
    checkpoint.commit(run, {"step": 3})
    assert events == [("sync", "metrics.jsonl", False)]  # ledger.jsonl is not there yet: nothing to sync
    (run / "ledger.jsonl").write_text("{}\n")
    checkpoint.commit(run, {"step": 4})
    assert events[1:] == [("sync", "metrics.jsonl", True), ("sync", "ledger.jsonl", True)]
    assert torch.load(run / "state.pt", weights_only=True) == {"step": 4}
    assert sorted(p.name for p in run.iterdir()) == ["ledger.jsonl", "metrics.jsonl", "state.pt"]


def saved_state(tmp_path, **changes):
    model, optimizer, run = tiny_run(tmp_path)
    loop = checkpoint.LoopState(step=3, best_val=1.25, bad_evals=1, spent=2.0e6,
                                best={n: t.clone() + 1 for n, t in checkpoint.trainable(model).items()})
    state = checkpoint.state_of(model, optimizer, loop) | changes
    torch.save(state, run / "state.pt")
    return model, optimizer, run, state


def test_load_state_gives_back_a_checkpoint_that_fits(tmp_path):
    model, _, run, state = saved_state(tmp_path)
    got = checkpoint.load_state(run, model)
    assert (got["step"], got["best_val"], got["bad_evals"], got["spent"]) == (3, 1.25, 1, 2.0e6)
    assert all(torch.equal(got["trainable"][n], t) for n, t in state["trainable"].items())
    assert all(torch.equal(got["best"][n], t) for n, t in state["best"].items())
    _, _, run2, _ = saved_state(tmp_path / "2", best=None, best_val=float("inf"), spent=0)  # before any validation; int FLOPs
    assert checkpoint.load_state(run2, model)["best"] is None


NOT_A_CHECKPOINT = ("is not a checkpoint of this run (its keys or tensors do not fit the model); delete it and pass --resume "
                    "to start the run over from its args.json, or choose another --out.")


@pytest.mark.parametrize("change", [
    "no rng", "no spent", "trainable missing one", "trainable one more", "trainable wrong shape", "trainable not a tensor",
    "trainable a list", "best wrong shape", "best missing one", "rng a list", "step a float", "step a bool", "bad_evals a float",
    "best_val a string", "spent None", "a list",
])
def test_load_state_refuses_a_checkpoint_that_does_not_fit_the_model(tmp_path, change):
    model, _, run, state = saved_state(tmp_path)
    first = sorted(state["trainable"])[0]
    bad = {
        "no rng": lambda s: {k: v for k, v in s.items() if k != "rng"},
        "no spent": lambda s: {k: v for k, v in s.items() if k != "spent"},
        "trainable missing one": lambda s: s | {"trainable": {k: v for k, v in s["trainable"].items() if k != first}},
        "trainable one more": lambda s: s | {"trainable": s["trainable"] | {"x.lora_A": torch.zeros(2)}},
        "trainable wrong shape": lambda s: s | {"trainable": s["trainable"] | {first: torch.zeros(3, 3)}},
        "trainable not a tensor": lambda s: s | {"trainable": s["trainable"] | {first: [0.0]}},
        "trainable a list": lambda s: s | {"trainable": list(s["trainable"].values())},
        "best wrong shape": lambda s: s | {"best": s["best"] | {first: torch.zeros(1)}},
        "best missing one": lambda s: s | {"best": {k: v for k, v in s["best"].items() if k != first}},
        "rng a list": lambda s: s | {"rng": s["rng"].tolist()},
        "step a float": lambda s: s | {"step": 3.0},
        "step a bool": lambda s: s | {"step": True},
        "bad_evals a float": lambda s: s | {"bad_evals": 1.0},
        "best_val a string": lambda s: s | {"best_val": "1.25"},
        "spent None": lambda s: s | {"spent": None},
        "a list": lambda s: [s["step"]],
    }[change](state)
    torch.save(bad, run / "state.pt")
    with pytest.raises(UserError) as e:
        checkpoint.load_state(run, model)
    assert str(e.value) == f"{run / 'state.pt'} {NOT_A_CHECKPOINT}"


class Opaque:
    """Any object a crafted state.pt could hold beside its tensors (weights_only refuses to build it)."""


@pytest.mark.parametrize("content, error", [(b"", "EOFError"), (b"\x00garbage" * 10, "UnpicklingError"), (None, "FileNotFoundError"),
                                            (b"PK\x03\x04broken zip", "RuntimeError"), ("object", "UnpicklingError")])
def test_load_state_calls_a_damaged_file_damaged_naming_the_error(tmp_path, content, error):
    model, _, run = tiny_run(tmp_path)
    if content == "object":
        torch.save({"step": 1, "x": Opaque()}, run / "state.pt")
    elif content is not None:
        (run / "state.pt").write_bytes(content)
    with pytest.raises(UserError) as e:
        checkpoint.load_state(run, model)
    assert str(e.value) == f"{run / 'state.pt'} is damaged or holds more than tensors and plain data ({error}); {checkpoint.FIX}."
    assert checkpoint.FIX == "delete it and pass --resume to start the run over from its args.json, or choose another --out"


def test_restore_puts_tensors_optimizer_and_random_state_back(tmp_path):
    model, optimizer, run, state = saved_state(tmp_path)
    expected_draw = torch.rand(5)  # what the generator gives next from the saved state
    other, other_opt, _ = tiny_run(tmp_path / "other")
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.fill_(7.0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    try:
        checkpoint.restore(state, other, other_opt, run)
        assert torch.equal(torch.rand(5), expected_draw)
    finally:
        torch.set_rng_state(before)
    params = dict(other.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in state["trainable"].items())
    assert params["layers.0.self_attn.q_proj.base.weight"].ne(7.0).all()  # frozen weights untouched
    a, b = other_opt.state_dict(), state["optimizer"]
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][i][k], b["state"][i][k]) for i in b["state"] for k in b["state"][i])


@pytest.mark.parametrize("change", ["optimizer of another shape", "rng not a state"])
def test_restore_refuses_an_optimizer_or_rng_state_that_does_not_fit(tmp_path, change):
    model, optimizer, run, state = saved_state(tmp_path)
    if change == "optimizer of another shape":
        state["optimizer"]["param_groups"][0]["params"] = state["optimizer"]["param_groups"][0]["params"][:-1]
    else:
        state["rng"] = torch.zeros(3, dtype=torch.float32)
    before = torch.get_rng_state()
    try:
        with pytest.raises(UserError) as e:
            checkpoint.restore(state, model, optimizer, run)
    finally:
        torch.set_rng_state(before)
    error = "ValueError" if change == "optimizer of another shape" else "TypeError"
    assert str(e.value) == (f"{run / 'state.pt'} holds an optimizer or RNG state that does not fit this run ({error}); "
                            "delete it and pass --resume to start the run over from its args.json.")


def test_restore_puts_the_cuda_random_state_back_only_where_a_gpu_is_and_it_was_saved(tmp_path, monkeypatch):
    """Checked with a stand-in for torch.cuda: this machine may have no GPU (a GPU run of train.py checks it for real)."""
    model, optimizer, run, state = saved_state(tmp_path)
    put = []
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", put.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    rng = torch.get_rng_state()
    try:
        for gpu, saved in [(False, ["gpu 0 state"]), (True, None), (False, None), (True, ["gpu 0 state"]),
                           (True, ["gpu 0 state", "gpu 1 state"])]:
            monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
            checkpoint.restore(state | {"cuda_rng": saved}, model, optimizer, run)
    finally:
        torch.set_rng_state(rng)
    # a GPU here and a state saved; saved on two GPUs, resumed where one is seen: the first GPU's state
    assert put == [["gpu 0 state"], ["gpu 0 state"]]


def adapter_tensors(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_save_adapter_writes_given_tensors_and_leaves_the_model_as_it_was(tmp_path):
    model, _, run = tiny_run(tmp_path)
    current = {n: t.clone() for n, t in checkpoint.trainable(model).items()}
    other = {n: torch.full_like(t, 0.5) for n, t in current.items()}
    checkpoint.save_adapter(model, run / "best", "the/base", other)
    assert all(torch.equal(t, current[n]) for n, t in checkpoint.trainable(model).items())  # put back
    saved = adapter_tensors(run / "best")
    assert len(saved) == 8 and all(torch.equal(t, torch.full_like(t, 0.5)) for t in saved.values())
    assert torch.equal(load_file(str(run / "best" / "extra_parameters.safetensors"))["lm_head_bias"], torch.full((160,), 0.5))
    assert json.loads((run / "best" / "adapter_config.json").read_text())["base_model_name_or_path"] == "the/base"
    checkpoint.save_adapter(model, run / "adapter", "the/base")  # no tensors given: the model's own
    q = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.equal(adapter_tensors(run / "adapter")[q], current["layers.0.self_attn.q_proj.lora_B"])
    plain, _, run2 = tiny_run(tmp_path / "plain", bias=False)
    checkpoint.save_adapter(plain, run2 / "adapter", "b")
    assert not (run2 / "adapter" / "extra_parameters.safetensors").exists()  # no head bias, no extra file


def test_save_adapter_puts_the_model_back_even_when_writing_fails(tmp_path):
    model, _, run = tiny_run(tmp_path)
    current = {n: t.clone() for n, t in checkpoint.trainable(model).items()}
    (run / "best").mkdir()
    (run / "best" / "thesis.tex").write_text("mine")  # saving would delete it: refused
    with pytest.raises(UserError):
        checkpoint.save_adapter(model, run / "best", "b", {n: t + 1 for n, t in current.items()})
    assert all(torch.equal(t, current[n]) for n, t in checkpoint.trainable(model).items())


def test_write_adapters_and_save_make_adapter_and_best_from_the_state(tmp_path):
    model, optimizer, run = tiny_run(tmp_path)
    q = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    now = checkpoint.trainable(model)["layers.0.self_attn.q_proj.lora_B"].clone()
    (run / "best").mkdir()
    (run / "best" / "adapter_model.safetensors").write_text("stale")
    checkpoint.write_adapters(model, run, {"best": None}, "base")
    assert not (run / "best").exists() and torch.equal(adapter_tensors(run / "adapter")[q], now)
    best = {n: t + 2 for n, t in checkpoint.trainable(model).items()}
    checkpoint.save(run, model, optimizer, checkpoint.LoopState(step=9, best_val=0.5, best=best), "base")
    assert torch.equal(adapter_tensors(run / "best")[q], now + 2) and torch.equal(adapter_tensors(run / "adapter")[q], now)
    state = checkpoint.load_state(run, model)
    assert (state["step"], state["best_val"]) == (9, 0.5) and torch.equal(state["best"]["layers.0.self_attn.q_proj.lora_B"], now + 2)
