"""Reliability: every file a user can point qwen-min at, damaged, fed to every entry point that reads it.

Each case copies a good input (a tiny checkpoint, a sharded one, a trajectory file, a finished run
folder, its adapter, an evaluation's results.json, a FLOP ledger), damages one file in it
(truncated, emptied, garbled, or wrong in a way only that kind of file can be), and calls an entry
point's `main(argv)` in-process through `qwen_min.errors.run_cli`, as `python train.py ...` runs it.
The outcome is classified:

    clean       SystemExit(2) and exactly one stderr line starting "error:" that names the file
                (or argparse's usage error, also exit 2)
    traceback   any other exception: a bug, whatever the input
    silent      main returned although an error was due
    ok          main returned, and no error was due (the control cases and harmless damage)

Every case must come out clean (or ok where marked). Cases that fail because of an entry point
another file owns are marked xfail(strict=True) with that file as the reason, so they turn into
failures the moment the owner fixes them. `python -m pytest -q tests/test_reliability.py` prints the
counts; docs/reliability.md has the figures and what they promise.
"""

import json
import pickle
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import evaluate
import flops
import train
from conftest import REPO, random_model, tiny_config, write_checkpoint
from data import h5file, llmtime, lotka_volterra
from qwen_min.__main__ import main as qwen_min_main
from qwen_min.errors import UserError, run_cli

ENTRY_POINTS = {"train.py": train.main, "evaluate.py": evaluate.main, "flops.py": flops.main,
                "python -m qwen_min": qwen_min_main}

# ---------------------------------------------------------------- the good inputs, built once


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Paths of good inputs every case copies from: checkpoints, data, a run folder, results."""
    root = tmp_path_factory.mktemp("good")
    model = random_model(tiny_config(vocab_size=96, dim=32, hidden_dim=48, n_layers=1, n_heads=2, n_kv_heads=1,
                                     head_dim=16, max_seq_len=128))
    ckpt = write_checkpoint(model, root / "ckpt")
    (ckpt / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [2, 0], "pad_token_id": 0}))
    sharded = write_checkpoint(model, root / "sharded", shards=2)
    traj, time = lotka_volterra.simulate(12, seed=0)
    h5file.save(root / "data.h5", traj, time)
    run = root / "run"
    run_cli(train.main, ["--model", str(ckpt), "--n-series", "8", "--context", "32", "--batch", "2", "--rank", "2",
                         "--steps", "2", "--eval-every", "1", "--eval-batches", "1", "--out", str(run), "--no-progress"])
    results = root / "eval"
    run_cli(evaluate.main, ["--model", str(ckpt), *EVAL_FAST, "--out", str(results)])
    return dict(ckpt=ckpt, sharded=sharded, h5=root / "data.h5", run=run, results=results / "results.json")


TRAIN_FAST = ["--n-series", "8", "--context", "32", "--batch", "2", "--rank", "2", "--steps", "1", "--eval-every", "1",
              "--eval-batches", "1", "--no-progress"]
EVAL_FAST = ["--n-series", "12", "--k", "4", "--h", "2", "--limit", "1", "--context", "32", "--no-baselines", "--plots", "0"]
CHAT_FAST = ["--prompt", "1.0,2.0;", "--max-new-tokens", "2", "--device", "cpu"]


# ---------------------------------------------------------------- damage, one function per way


def truncated(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def emptied(path):
    path.write_bytes(b"")


def garbled(path):
    rng = random.Random(path.name)  # the same garbage every run
    path.write_bytes(bytes(rng.randrange(256) for _ in range(max(256, min(path.stat().st_size, 4096)))))


def a_folder(path):
    path.unlink()
    path.mkdir()


def removed(path):
    path.unlink()


def text(content):
    return lambda path: path.write_text(content)


def json_edit(edit):
    def damage(path):
        obj = json.loads(path.read_text())
        path.write_text(json.dumps(edit(obj)))
    return damage


def with_keys(**change):
    return json_edit(lambda obj: obj | change)


def without(*keys):
    return json_edit(lambda obj: {k: v for k, v in obj.items() if k not in keys})


def tensors_edit(edit):
    def damage(path):
        sd = load_file(str(path))
        edit(sd)
        save_file(sd, str(path))
    return damage


def set_tensor(name, make):
    return tensors_edit(lambda sd: sd.update({name: make(sd[name])}))


def poisoned(value):
    def make(t):
        t = t.clone()
        t.view(-1)[0] = value
        return t
    return make


def h5(traj=None, time=None, drop=None):
    """Rewrites the trajectory file with `traj` / `time` replaced (functions of the good arrays)."""
    def damage(path):
        good_traj, good_time = h5file.load(path)
        datasets = {"trajectories": traj(good_traj) if traj else good_traj, "time": time(good_time) if time else good_time}
        path.unlink()
        with h5py.File(path, "w") as f:
            for name, data in datasets.items():
                if name != drop:
                    f.create_dataset(name, data=data)
    return damage


def header_length_beyond_file(path):
    data = path.read_bytes()
    path.write_bytes((len(data) * 10).to_bytes(8, "little") + data[8:])


def header_not_json(path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    path.write_bytes(data[:8] + b"[" * n + data[8 + n:])


class Evil:
    """Unpickling this touches the file named by MARKER: proof that loading ran code from the file."""

    def __reduce__(self):
        return Path.touch, (Path(MARKER[0]),)


MARKER = [""]


def crafted_pickle(path):
    MARKER[0] = str(path.parent / "pwned")
    torch.save({"step": 1, "payload": Evil()}, path)


# ---------------------------------------------------------------- the cases


@dataclass
class Case:
    kind: str  # the file kind, e.g. "config.json"
    how: str  # the damage, in words
    damage: object  # function(path) that does it
    entry: str  # one of ENTRY_POINTS
    expect: str = "clean"  # or "ok": no error is due
    owner: str = None  # the file whose fix this case waits for (xfail), None when it passes

    @property
    def id(self):
        return f"{self.entry}|{self.kind}|{self.how}"


@dataclass
class Target:
    """Where a file kind lives in the good inputs, and how each entry point is pointed at it."""
    base: str  # key of `good` to copy
    file: str  # path inside the copy ("" when the copy is the file itself)
    argv: dict = field(default_factory=dict)  # entry -> function(copy, tmp) -> argv


def ckpt_argv(key):
    return {
        "train.py": lambda c, tmp: ["--model", str(c), *TRAIN_FAST, "--out", str(tmp / "run")],
        "evaluate.py": lambda c, tmp: ["--model", str(c), *EVAL_FAST, "--out", str(tmp / "eval")],
        "python -m qwen_min": lambda c, tmp: ["--model", str(c), *CHAT_FAST],
    }


TARGETS = {
    "config.json": Target("ckpt", "config.json", ckpt_argv("ckpt") | {
        "flops.py": lambda c, tmp: ["--model", str(c / "config.json"), "--steps", "1", "--context", "32"]}),
    "model.safetensors": Target("ckpt", "model.safetensors", ckpt_argv("ckpt")),
    "model.safetensors.index.json": Target("sharded", "model.safetensors.index.json", ckpt_argv("sharded")),
    "tokenizer.json": Target("ckpt", "tokenizer.json", ckpt_argv("ckpt")),
    "generation_config.json": Target("ckpt", "generation_config.json", {
        "python -m qwen_min": lambda c, tmp: ["--model", str(c), *CHAT_FAST]}),
    "trajectories .h5": Target("h5", "", {
        "train.py": lambda c, tmp: ["--model", str(tmp.parent / "ckpt"), "--data", str(c), *TRAIN_FAST, "--out", str(tmp / "run")],
        "evaluate.py": lambda c, tmp: ["--model", str(tmp.parent / "ckpt"), "--data", str(c), *EVAL_FAST, "--out", str(tmp / "eval")]}),
    "adapter_config.json": Target("run", "best/adapter_config.json", {
        "evaluate.py": lambda c, tmp: ["--model", str(tmp.parent / "ckpt"), "--adapter", str(c / "best"), *EVAL_FAST,
                                       "--out", str(tmp / "eval")]}),
    "adapter_model.safetensors": Target("run", "best/adapter_model.safetensors", {
        "evaluate.py": lambda c, tmp: ["--model", str(tmp.parent / "ckpt"), "--adapter", str(c / "best"), *EVAL_FAST,
                                       "--out", str(tmp / "eval")]}),
    "args.json": Target("run", "args.json", {
        "train.py": lambda c, tmp: ["--out", str(c), "--resume", "--no-progress"],
        "evaluate.py": lambda c, tmp: ["--run", str(c), "--k", "4", "--h", "2", "--limit", "1", "--no-baselines",
                                       "--plots", "0", "--out", str(tmp / "eval")]}),
    "state.pt": Target("run", "state.pt", {"train.py": lambda c, tmp: ["--out", str(c), "--resume", "--no-progress"]}),
    "scaler.json": Target("run", "scaler.json", {
        "evaluate.py": lambda c, tmp: ["--run", str(c), "--k", "4", "--h", "2", "--limit", "1", "--no-baselines",
                                       "--plots", "0", "--out", str(tmp / "eval")]}),
    "results.json": Target("results", "", {"evaluate.py": lambda c, tmp: ["--compare", str(tmp.parent / "results.json"), str(c)]}),
    "ledger.jsonl": Target("run", "ledger.jsonl", {
        "flops.py": lambda c, tmp: ["--steps", "1", "--context", "32", "--ledger", str(c / "ledger.jsonl")]}),
}

GENERIC = [("truncated", truncated), ("empty", emptied), ("garbage", garbled), ("a folder", a_folder), ("missing", removed)]
Q = "model.layers.0.self_attn.q_proj"
A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
SPECIFIC = {
    "config.json": [
        ("a list", text("[1, 2]")), ("null", text("null")), ("0 kv heads", with_keys(num_key_value_heads=0)),
        ("negative vocab", with_keys(vocab_size=-96)), ("hidden_size a string", with_keys(hidden_size="32")),
        ("heads not dividing hidden", with_keys(head_dim=None, hidden_size=33)), ("missing a key", without("num_hidden_layers")),
        ("huge positions", with_keys(max_position_embeddings=10**12)), ("huge vocab", with_keys(vocab_size=10**11)),
        ("layers a float", with_keys(num_hidden_layers=1.5)), ("tie a string", with_keys(tie_word_embeddings="no")),
        ("kv heads not dividing heads", with_keys(num_key_value_heads=3)), ("rope scaling", with_keys(rope_scaling={"rope_type": "yarn"})),
        ("vocab off by one", with_keys(vocab_size=97)),  # a sound config that the weights contradict
    ],
    "model.safetensors": [
        ("header length beyond the file", header_length_beyond_file), ("header not JSON", header_not_json),
        ("a tensor missing", tensors_edit(lambda sd: sd.pop(f"{Q}.weight"))),
        ("a tensor of the wrong shape", set_tensor(f"{Q}.weight", lambda t: t[:-1])),
        ("integer weights", set_tensor(f"{Q}.weight", lambda t: t.round().to(torch.int32))),
        ("NaN weights", set_tensor(f"{Q}.weight", poisoned(float("nan")))),
        ("inf weights", set_tensor("model.norm.weight", poisoned(float("inf")))),
        ("an unknown tensor", tensors_edit(lambda sd: sd.update({"model.extra.weight": torch.zeros(3)}))),
    ],
    "model.safetensors.index.json": [
        ("a list", text("[]")), ("no weight_map", text('{"metadata": {}}')),
        ("a shard path outside the folder", json_edit(lambda o: o | {"weight_map": {k: "../" + v for k, v in o["weight_map"].items()}})),
        ("a missing shard", json_edit(lambda o: o | {"weight_map": {k: "model-gone.safetensors" for k in o["weight_map"]}})),
        ("shard names not strings", json_edit(lambda o: o | {"weight_map": {k: 7 for k in o["weight_map"]}})),
    ],
    "tokenizer.json": [
        ("a list", text("[1, 2]")), ("an object that is not a tokenizer", text('{"model": {"type": "BPE"}}')),
        ("no special tokens", json_edit(lambda o: o | {"added_tokens": [], "model": o["model"] | {
            "vocab": {k: v for k, v in o["model"]["vocab"].items() if not k.startswith("<|")}}})),
        ("no digit 7", json_edit(lambda o: o | {"model": o["model"] | {"vocab": {k: v for k, v in o["model"]["vocab"].items() if k != "7"}}})),
        ("ids beyond the model's vocabulary", json_edit(lambda o: o | {"model": o["model"] | {"vocab": o["model"]["vocab"] | {"~": 500}}})),
    ],
    "generation_config.json": [
        ("a list", text("[1]")), ("temperature a string", with_keys(do_sample=True, temperature="hot")),
        ("beam search", with_keys(num_beams=4)), ("negative top_p", with_keys(do_sample=True, top_p=-0.5)),
    ],
    "trajectories .h5": [
        ("no trajectories", h5(drop="trajectories")), ("no time", h5(drop="time")),
        ("three species", h5(traj=lambda t: np.concatenate([t, t[..., :1]], -1))), ("2-D", h5(traj=lambda t: t[..., 0])),
        ("integer populations", h5(traj=lambda t: (t * 100).astype(np.int64))), ("NaN", h5(traj=lambda t: np.where(t > 1.5, np.nan, t))),
        ("inf", h5(traj=lambda t: np.where(t > 1.5, np.inf, t))), ("negative", h5(traj=lambda t: -t)),
        ("no trajectories inside", h5(traj=lambda t: t[:0])), ("time decreasing", h5(time=lambda s: s[::-1].copy())),
        ("time of the wrong length", h5(time=lambda s: s[:-1])), ("strings", h5(traj=lambda t: np.full(t.shape, b"x"))),
        ("two trajectories", h5(traj=lambda t: t[:2])),  # too few for a train / validation / test split
    ],
    "adapter_config.json": [
        ("a list", text("[]")), ("rank 0", with_keys(r=0)), ("rank a string", with_keys(r="2")),
        ("rank that does not match the tensors", with_keys(r=3)), ("alpha a string", with_keys(lora_alpha="x")),
        ("unknown target modules", with_keys(target_modules=["qkv_proj"])), ("no target modules", with_keys(target_modules=[])),
        ("not LoRA", with_keys(peft_type="IA3")),
    ],
    "adapter_model.safetensors": [
        ("header not JSON", header_not_json), ("a tensor missing", tensors_edit(lambda sd: sd.pop(A0))),
        ("a tensor of another rank", set_tensor(A0, lambda t: torch.cat([t, t]))),
        ("integer weights", set_tensor(A0, lambda t: t.to(torch.int16))), ("NaN weights", set_tensor(A0, poisoned(float("nan")))),
    ],
    "args.json": [
        ("a list", text("[]")), ("no keys", text("{}")), ("rank a string", with_keys(rank="two")),
        ("a model that is gone", with_keys(model="/nonexistent/ckpt")), ("context a list", with_keys(context=[32])),
    ],
    "state.pt": [
        ("a crafted pickle", crafted_pickle), ("a list", lambda p: torch.save([1, 2, 3], p)),
        ("a dict missing keys", lambda p: torch.save({"step": 1}, p)), ("plain pickle, not torch", lambda p: p.write_bytes(pickle.dumps({"step": 1}))),
    ],
    "scaler.json": [("a list", text("[]")), ("negative level", with_keys(level=-1.0)), ("no keys", text("{}"))],
    "results.json": [
        ("a list", text("[]")), ("no config", without("config")), ("no results", without("results")),
        ("h a string", json_edit(lambda o: o | {"config": o["config"] | {"h": "2"}})),
        ("overall missing", json_edit(lambda o: o | {"results": {"model": {}}})),
    ],
    "ledger.jsonl": [("a line not JSON", text('{"stage": "x"}\nnot json\n')), ("a list line", text("[1]\n"))],
}
# Damage after which no error is due, by design: no generation_config.json means greedy decoding; a run
# without state.pt (killed before its first checkpoint) starts over from args.json; without scaler.json
# evaluate.py refits the same scaler on the run's split; a ledger's torn last line is what a kill leaves.
HARMLESS = {("ledger.jsonl", "empty"), ("ledger.jsonl", "missing"), ("ledger.jsonl", "truncated"),
            ("generation_config.json", "missing"), ("generation_config.json", "a folder"), ("state.pt", "missing"),
            ("scaler.json", "missing"), ("scaler.json", "a folder")}
# (entry, kind, how) that this entry point has no reason to refuse.
NOT_DUE = {("evaluate.py", "args.json", "rank a string"),  # evaluate.py does not read the run's rank
           ("evaluate.py", "trajectories .h5", "two trajectories")}  # its test split still holds one series
# What a clean error may name instead of the damaged file: the missing thing itself.
ALSO_NAMED = {"a model that is gone": "/nonexistent/ckpt"}
NOT_READ = {("flops.py", "config.json", "vocab off by one")}  # flops.py reads no weights to contradict it

# (entry, kind, how) -> the file whose fix the case waits for, found by running this suite; the lead
# removes an entry when its owner's fix lands (the strict xfail then fails, as a reminder).
OWNERS = {}  # (entry point, file kind, damage) -> "owner: what is still wrong"; strict xfail until fixed


def all_cases():
    cases = []
    for kind, target in TARGETS.items():
        for how, damage in GENERIC + SPECIFIC.get(kind, []):
            for entry in target.argv:
                if (entry, kind, how) in NOT_READ:
                    continue
                expect = "ok" if (kind, how) in HARMLESS or (entry, kind, how) in NOT_DUE else "clean"
                cases.append(Case(kind, how, damage, entry, expect, OWNERS.get((entry, kind, how))))
    for kind, target in TARGETS.items():  # controls: the good inputs themselves run through
        for entry in target.argv:
            cases.append(Case(kind, "good (control)", lambda path: None, entry, "ok", OWNERS.get((entry, kind, "good (control)"))))
    return cases


CASES = all_cases()


def outcome(entry, argv, capsys):
    """(class, detail): how the entry point ended, as a user running it would see."""
    capsys.readouterr()
    try:
        run_cli(ENTRY_POINTS[entry], argv)
    except SystemExit as e:
        err = capsys.readouterr().err.strip().splitlines()
        if e.code == 2 and len(err) == 1 and err[0].startswith("error: "):
            return "clean", err[0]
        if e.code == 2 and err and err[0].startswith("usage:") and ": error: " in err[-1]:
            return "clean", err[-1]
        return "unclean exit", f"exit {e.code!r}, stderr {err[-3:]}"
    except Exception as e:  # noqa: BLE001 -- classifying every exception is the point
        return "traceback", f"{type(e).__name__}: {str(e)[:300]}"
    return "ok", ""


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=pytest.mark.xfail(strict=True, reason=f"owner: {c.owner}")
                                                if c.owner else ()) for c in CASES])
def test_damaged_input(case, good, tmp_path, capsys):
    target = TARGETS[case.kind]
    shutil.copytree(good["ckpt"], tmp_path / "ckpt")  # the entry points' other inputs, whole
    shutil.copy(good["results"], tmp_path / "results.json")
    work = tmp_path / "case"
    work.mkdir()
    source = good[target.base]
    copy = work / source.name
    (shutil.copytree if source.is_dir() else shutil.copy)(source, copy)
    if target.base == "run":  # the run's args.json names the checkpoint it was trained from
        args = json.loads((copy / "args.json").read_text())
        (copy / "args.json").write_text(json.dumps(args | {"model": str(tmp_path / "ckpt")}))
    path = copy / target.file if target.file else copy
    case.damage(path)
    result, detail = outcome(case.entry, target.argv[case.entry](copy, work), capsys)
    if case.expect == "ok":
        assert result == "ok", f"{case.id}: {result}: {detail}"
        return
    assert result == "clean", f"{case.id}: {'silent' if result == 'ok' else result}: {detail}"
    named = {Path(case.kind).name, path.name, path.parent.name, ALSO_NAMED.get(case.how, path.name)}  # the file, or its folder
    assert any(n in detail for n in named), f"{case.id}: the error does not name the file: {detail}"
    if case.how == "a crafted pickle":
        assert not (path.parent / "pwned").exists(), "loading state.pt ran code from the file"


# ---------------------------------------------------------------- properties of the LLMTIME encoding

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

values_2d = st.integers(1, 12).flatmap(lambda n: st.lists(
    st.tuples(st.floats(0, 9999.49, allow_nan=False), st.floats(0, 9999.49, allow_nan=False)), min_size=n, max_size=n))


@settings(max_examples=200, deadline=None)
@given(values_2d, st.integers(0, 4))
def test_encode_then_decode_gives_the_rounded_values(rows, decimals):
    values = np.array(rows)
    decoded = llmtime.decode(llmtime.encode(values, decimals), decimals=decimals)
    assert decoded.issues == {}
    # within half a unit of the last decimal (plus float noise): the rounding, and nothing else
    assert np.abs(decoded.values - values).max() <= 0.5 * 10.0 ** -decimals + 1e-9 * max(1.0, values.max())


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("0123456789.,;- \nx"), max_size=60), st.one_of(st.none(), st.integers(0, 8)))
def test_decode_never_raises_and_never_returns_nan(text, n_steps):
    decoded = llmtime.decode(text, n_steps=n_steps)
    assert np.isfinite(decoded.values).all() and decoded.values.shape[1:] == (2,)
    assert n_steps is None or decoded.values.shape == (n_steps, 2)
    assert all(count > 0 for count in decoded.issues.values())


positive_series = st.integers(1, 5).flatmap(lambda n: st.lists(st.floats(1e-3, 1e4), min_size=2 * n * 3, max_size=2 * n * 3)
                                           .map(lambda v: np.array(v).reshape(n, 3, 2)))


@settings(max_examples=200, deadline=None)
@given(positive_series, st.floats(1, 100), st.floats(0.1, 1000), st.booleans())
def test_scaler_maps_the_percentile_to_the_target_and_back(data, percentile, target, per_series):
    scaler = llmtime.Scaler.fit(data, percentile, target, per_series)
    scaled = scaler.transform(data)
    # the percentile of the scaled data is the target (np.percentile is linear in a positive scale)
    levels = np.percentile(scaled.reshape(len(data), -1), percentile, axis=1) if per_series else np.percentile(scaled, percentile)
    assert np.allclose(levels, target, rtol=1e-9)
    assert np.allclose(scaler.inverse(scaled), data, rtol=1e-12)
    again = llmtime.Scaler.from_dict(json.loads(json.dumps(scaler.to_dict())))  # as a run folder keeps it
    assert np.array_equal(again.transform(data), scaled)


def test_one_outlier_trajectory_does_not_silently_flatten_the_rest():
    """A single series at 1e9 makes a global scale write every other series as 0.00: warn or refuse."""
    traj, _ = lotka_volterra.simulate(20, seed=0)
    traj = traj.astype(np.float64)
    traj[3] = 1e9
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            scaler = llmtime.Scaler.fit(traj)
        except (UserError, ValueError):
            return  # refused: fine
    flat = llmtime.encode(scaler.transform(traj[0]), 2)
    assert set(flat) <= set("0.,;")  # the premise: series 0 really is written as zeros
    assert caught, "a global scale that writes other series as 0.00 must warn"


# ---------------------------------------------------------------- flag ranges

# (entry, flag, a value outside its range): every one must be refused before anything runs
BAD_FLAGS = [
    ("train.py", "--warmup", "-1"), ("train.py", "--patience", "-1"), ("train.py", "--alpha", "0"), ("train.py", "--alpha", "-2"),
    ("train.py", "--rank", "0"), ("train.py", "--lr", "nan"), ("train.py", "--lr", "-1e-4"), ("train.py", "--batch", "0"),
    ("train.py", "--steps", "0"), ("train.py", "--context", "2"), ("train.py", "--dropout", "1"), ("train.py", "--grad-clip", "-1"),
    ("train.py", "--weight-decay", "-0.1"), ("train.py", "--flops-budget", "0"), ("train.py", "--percentile", "0"),
    ("train.py", "--scale-target", "-1"), ("train.py", "--n-series", "1"), ("train.py", "--eval-every", "0"),
    ("train.py", "--context", "100000"),  # longer than the model's 128 positions
    ("evaluate.py", "--k", "0"), ("evaluate.py", "--h", "-1"), ("evaluate.py", "--samples", "0"), ("evaluate.py", "--temperature", "-1"),
    ("evaluate.py", "--top-p", "0"), ("evaluate.py", "--top-k", "0"), ("evaluate.py", "--limit", "0"), ("evaluate.py", "--batch", "0"),
    ("evaluate.py", "--context", "100000"),
    ("flops.py", "--context", "1"), ("flops.py", "--batch", "0"), ("flops.py", "--rank", "-1"), ("flops.py", "--steps", "-1"),
    ("flops.py", "--flops-budget", "0"), ("flops.py", "--flops-budget", "nan"),
    ("python -m qwen_min", "--max-new-tokens", "0"), ("python -m qwen_min", "--temperature", "-1"),
    ("python -m qwen_min", "--top-p", "1.5"), ("python -m qwen_min", "--top-k", "-1"),
    ("python -m qwen_min", "--repetition-penalty", "0"),
]
FLAG_OWNERS = {}  # (entry, flag, value) -> owner, from the suite's own run


@pytest.mark.parametrize("entry, flag, value", [
    pytest.param(*f, marks=pytest.mark.xfail(strict=True, reason=f"owner: {FLAG_OWNERS[f]}") if f in FLAG_OWNERS else ())
    for f in BAD_FLAGS])
def test_a_flag_out_of_range_is_refused_in_one_line(good, tmp_path, capsys, entry, flag, value):
    base = {"train.py": ["--model", str(good["ckpt"]), *TRAIN_FAST, "--out", str(tmp_path / "run")],
            "evaluate.py": ["--model", str(good["ckpt"]), *EVAL_FAST, "--out", str(tmp_path / "eval")],
            "flops.py": ["--steps", "1", "--context", "32"],
            "python -m qwen_min": ["--model", str(good["ckpt"]), *CHAT_FAST]}[entry]
    result, detail = outcome(entry, base + [f"{flag}={value}"], capsys)
    assert result == "clean", f"{entry} {flag}={value}: {'silent' if result == 'ok' else result}: {detail}"
    assert flag in detail, f"the error does not name {flag}: {detail}"
    assert not (tmp_path / "run").exists(), "a refused start left a run folder behind"


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([("--warmup", -1), ("--patience", -1), ("--rank", 0), ("--batch", 0), ("--steps", 0),
                        ("--eval-every", 0), ("--eval-batches", 0)]), st.integers(1, 10**9))
def test_train_refuses_every_integer_below_a_flags_range(flag_low, below):
    """Property: for each integer flag of train.py, every value under its lowest allowed one is refused."""
    flag, low = flag_low
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--n-series", "8", f"{flag}={low - below}"])
    assert e.value.code == 2


def test_docs_figures_are_this_suites():
    """A doc-sync check, not a check of qwen-min: docs/reliability.md prints this suite's case table
    and its total, so a case added or dropped without the docs following fails here."""
    doc = (REPO / "docs" / "reliability.md").read_text()
    table = case_table().split("\n\n")[0]
    assert table in doc, "docs/reliability.md's table is stale: paste `PYTHONPATH=. .venv/bin/python tests/test_reliability.py`"
    n_bad = sum(c.expect == "clean" for c in CASES) + len(BAD_FLAGS)
    assert f"every one of the {n_bad} bad inputs" in doc


def case_table() -> str:
    """Markdown: bad inputs by file kind and entry point (the figures in docs/reliability.md)."""
    bad = [c for c in CASES if c.expect == "clean"]
    head = "| file | " + " | ".join(ENTRY_POINTS) + " | all |"
    rows = [head, "|---" * (len(ENTRY_POINTS) + 2) + "|"]
    for label, count in [(k, lambda e, k=k: sum(c.kind == k and c.entry == e for c in bad)) for k in TARGETS] + [
            ("flags out of range", lambda e: sum(f[0] == e for f in BAD_FLAGS)),
            ("**total**", lambda e: sum(c.entry == e for c in bad) + sum(f[0] == e for f in BAD_FLAGS))]:
        counts = [count(e) for e in ENTRY_POINTS]
        rows.append(f"| {label} | " + " | ".join(str(n) if n else "" for n in counts) + f" | {sum(counts)} |")
    waiting = sum(bool(c.owner) for c in bad) + len(FLAG_OWNERS)
    rows.append(f"\n{len(bad) + len(BAD_FLAGS)} bad inputs, {waiting} waiting on another file's fix (xfail); "
                f"{sum(c.expect == 'ok' for c in CASES)} cases where no error is due (controls and harmless damage).")
    return "\n".join(rows)


if __name__ == "__main__":  # PYTHONPATH=. .venv/bin/python tests/test_reliability.py: the table of cases, not run
    print(case_table())
