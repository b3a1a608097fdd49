"""train.py's flags and small pieces, without training: --help, every default, each flag's limits on both
sides in whole sentences, a saved args.json's checks on --resume, the NaN advice, the validation subset,
the FLOP budget's arithmetic, the data refusals and the merged export's notes (mutation area train).
Expected values are written here by hand; tests/test_train.py runs the loop end to end."""

import argparse
import json
import math

import numpy as np
import pytest
import torch

import flops
import train
from conftest import random_model, tiny_config, write_checkpoint
from qwen_min import Qwen2Config, Tokenizer
from qwen_min.errors import UserError

# Each flag's help, a phrase of it at least: what a user reads to choose a value.
HELP = [
    "LoRA fine-tuning of Qwen2.5 on Lotka-Volterra trajectories (LLMTIME text).",
    "--model MODEL checkpoint folder or hub id (default: Qwen/Qwen2.5-0.5B-Instruct)",
    "--rank RANK LoRA rank r",
    "--alpha ALPHA LoRA alpha (default: = rank, scale 1)",
    "--dropout DROPOUT LoRA dropout (default: 0.0)",
    "--targets TARGETS layers LoRA adapts: a comma list of q,k,v,o,gate,up,down, peft's names (q_proj,v_proj), or all-linear (default: q,v)",
    "--lm-head-bias also train a bias on the output layer (the coursework's)",
    "--data DATA h5 file in the coursework layout (default: simulate)",
    "--n-series N_SERIES trajectories to simulate when no --data (default: 1000)",
    "--decimals {1,2,3} decimals per value in the LLMTIME text (default: 2)",
    "--scaling {global,per-series} one scale for all series (fit on the training split) or one per series (default: global)",
    "--percentile PERCENTILE percentile of the values that maps to --scale-target (default: 95.0)",
    "--scale-target SCALE_TARGET the percentile maps to this value (default: 10.0)",
    "--context CONTEXT tokens per training window (at most the model's positions) (default: 512)",
    "--stride STRIDE window stride (default: context / 2)",
    "--lr LR peak learning rate (AdamW) (default: 0.0001)",
    "--batch BATCH windows per",
    "--steps STEPS optimizer steps in all (raise it with --resume to train on) (default: 2000)",
    "--weight-decay WEIGHT_DECAY AdamW weight decay on the LoRA weights (default: 0.0)",
    "--schedule {constant,cosine} cosine: linear warm-up then cosine decay to 10% (default: constant)",
    "--warmup WARMUP warm-up steps (default: 0)",
    "--grad-clip GRAD_CLIP max gradient norm (0 = off) (default: 1.0)",
    "--vocab {full,numeric} numeric: softmax over the 13 LLMTIME tokens only (default: full)",
    "--eval-every EVAL_EVERY steps between validation losses (and at the last step) (default: 100)",
    "--eval-batches EVAL_BATCHES validation batches, a fixed subset (default: 10)",
    "--patience PATIENCE evaluations without improvement before stopping (0 = never) (default: 5)",
    "--flops-budget FLOPS_BUDGET stop before spending more FLOPs than this (coursework convention) (default: 1e+17)",
    "--dtype {float32,bfloat16} the base model's weights and activations; LoRA stays float32 (default: bfloat16 on CUDA, float32 on CPU)",
    "--device DEVICE default: cuda if available, else cpu",
    "--seed SEED seed for data, split, initialisation and batch order (default: 0)",
    "--split {ours,report-a,report-b} ours: 70/15/15 by --seed; report-a / report-b: that report's split of the coursework file, "
    "so evaluate.py --preset of the same name tests on series the run never saw (default: ours)",
    "--out OUT run folder (default: runs/<time>)",
    "--resume continue the run in --out from its last checkpoint",
    "--log {none,tensorboard} tensorboard: also write loss, lr, tokens/s, FLOPs and validation to <out>/tensorboard "
    "(metrics.jsonl is always written and stays the record) (default: none)",
    "--no-progress no progress bar: plain log lines (step, loss, lr, tokens/s, FLOPs) every 30 s, as when output is not a terminal",
    "--export-merged at the end, also write the best adapter merged into a full checkpoint (<out>/merged) that transformers loads",
    "--config FILE flag values from a TOML, YAML or JSON file (a run's args.json relaunches it); flags given here override the file's",
]
GROUPS = ["model and LoRA:", "data:", "optimisation:", "validation, budget and run:"]


def test_help_says_what_each_flag_does_and_groups_them(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for line in HELP:
        assert line in text, line
    assert [text.index(g) for g in GROUPS] == sorted(text.index(g) for g in GROUPS)
    assert "--precision" not in text  # the old name is hidden


DEFAULTS = dict(model="Qwen/Qwen2.5-0.5B-Instruct", rank=8, alpha=None, dropout=0.0, targets="q,v", lm_head_bias=False, data=None,
                n_series=1000, decimals=2, scaling="global", percentile=95.0, scale_target=10.0, context=512, stride=256, lr=1e-4,
                batch=4, steps=2000, weight_decay=0.0, schedule="constant", warmup=0, grad_clip=1.0, vocab="full", eval_every=100,
                eval_batches=10, patience=5, flops_budget=1e17, dtype="float32", device="cpu", seed=0, split="ours",
                resume=False, log="none", no_progress=False, export_merged=False, config=None, given=[])


def test_every_default_as_documented(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = vars(train.parse_args([]))
    out = args.pop("out")
    assert {k: args[k] for k in DEFAULTS} == DEFAULTS
    assert out.startswith("runs/") and len(out) == len("runs/20261126-070000")  # runs/<time>
    given = train.parse_args(["--rank", "4", "--out", "x", "--lr", "0.01"]).given
    assert given == ["lr", "out", "rank"]  # the flags given, sorted: what a --resume may be asked to change


@pytest.mark.parametrize("flags, stride", [(["--context", "9"], 4), (["--context", "48"], 24), (["--context", "8", "--stride", "3"], 3)])
def test_stride_defaults_to_half_the_context(flags, stride):
    assert train.parse_args(flags).stride == stride


def test_the_device_decides_the_default_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = train.parse_args([])
    assert (args.device, args.dtype) == ("cuda", "bfloat16")
    assert train.parse_args(["--device", "cuda:1"]).dtype == "bfloat16"
    assert train.parse_args(["--device", "cpu"]).dtype == "float32"
    assert train.parse_args(["--dtype", "float32"]).dtype == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (train.parse_args([]).device, train.parse_args(["--dtype", "bfloat16"]).dtype) == ("cpu", "bfloat16")


@pytest.mark.parametrize("old, new", [("fp32", "float32"), ("bf16", "bfloat16")])
def test_precision_is_the_old_name_of_dtype(old, new, capsys):
    assert train.parse_args(["--precision", old]).dtype == new
    assert "--precision" in capsys.readouterr().err  # named as old


def flag_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1].split(": error: ", 1)[1]


@pytest.mark.parametrize("flags, message", [
    (["--alpha", "0"], "--alpha must be a positive number (the LoRA scale is alpha / rank)"),
    (["--alpha", "inf"], "--alpha must be a positive number (the LoRA scale is alpha / rank)"),
    (["--dropout", "-0.01"], "--dropout must be in [0, 1)"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--targets", ","], "--targets names no layer; give some of q,k,v,o,gate,up,down or all-linear"),
    (["--n-series", "3"], "--n-series must be at least 4 (train, validation and test need trajectories)"),
    (["--percentile", "0"], "need 0 < --percentile <= 100 and a positive, finite --scale-target"),
    (["--percentile", "100.01"], "need 0 < --percentile <= 100 and a positive, finite --scale-target"),
    (["--scale-target", "0"], "need 0 < --percentile <= 100 and a positive, finite --scale-target"),
    (["--scale-target", "inf"], "need 0 < --percentile <= 100 and a positive, finite --scale-target"),
    (["--context", "7"], "--context must be at least 8 tokens"),
    (["--context", "8", "--stride", "0"], "--stride must be in 1..--context"),
    (["--context", "8", "--stride", "9"], "--stride must be in 1..--context"),
    (["--lr", "0"], "--lr must be a positive number up to 1 (AdamW's steps are about --lr in size)"),
    (["--lr", "1.001"], "--lr must be a positive number up to 1 (AdamW's steps are about --lr in size)"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--weight-decay=-1e-9"], "--weight-decay must be a number >= 0"),
    (["--weight-decay", "inf"], "--weight-decay must be a number >= 0"),
    (["--warmup", "-1"], "--warmup must be 0 or more steps (a negative warm-up would make the learning rate negative)"),
    (["--grad-clip", "-0.5"], "--grad-clip must be a number >= 0 (0 = off)"),
    (["--grad-clip", "inf"], "--grad-clip must be a number >= 0 (0 = off)"),
    (["--eval-every", "0"], "--eval-every and --eval-batches must be at least 1"),
    (["--eval-batches", "0"], "--eval-every and --eval-batches must be at least 1"),
    (["--patience", "-1"], "--patience must be 0 (never stop early) or a number of evaluations"),
    (["--flops-budget", "0"], "--flops-budget must be positive"),
    (["--seed", "-1"], "--seed must be 0 or more"),
    (["--resume"], "--resume needs --out, the folder of the run to continue"),
    (["--device", "tpu"], "unknown --device 'tpu'; use cpu, cuda or cuda:N"),
])
def test_each_flag_limit_is_one_sentence(flags, message, capsys):
    assert flag_error(flags, capsys) == message


def test_cuda_asked_for_without_a_gpu_is_refused(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert flag_error(["--device", "cuda"], capsys) == "--device cuda was asked for, but this PyTorch sees no CUDA GPU"


@pytest.mark.parametrize("flags", [
    ["--alpha", "1e-9"], ["--alpha", "16"], ["--dropout", "0"], ["--dropout", "0.99"], ["--n-series", "4"], ["--percentile", "100"],
    ["--percentile", "0.001"], ["--scale-target", "1e-6"], ["--context", "8"], ["--context", "8", "--stride", "8"],
    ["--context", "8", "--stride", "1"], ["--lr", "1"], ["--batch", "1"], ["--steps", "1"], ["--weight-decay", "0"],
    ["--warmup", "0"], ["--grad-clip", "0"], ["--eval-every", "1", "--eval-batches", "1"], ["--patience", "0"],
    ["--flops-budget", "1e-3"], ["--seed", "0"], ["--targets", "all-linear"], ["--resume", "--out", "somewhere"],
])
def test_each_flag_at_its_limit_is_accepted(flags):
    train.parse_args(flags)


def test_flag_problem_of_sound_flags_is_none_and_names_the_first_problem():
    args = train.parse_args([])
    assert train.flag_problem(args) is None
    both = argparse.Namespace(**vars(args) | {"batch": 0, "steps": 0})
    assert train.flag_problem(both) == "--batch must be at least 1"  # the first, in the order of the checks
    unknown = argparse.Namespace(**vars(args) | {"targets": "q,lm_head"})
    assert train.flag_problem(unknown).startswith("--targets: unknown LoRA target 'lm_head'")


# ---------------------------------------------------------------- a saved args.json, on --resume

def saved(**changes):
    """The args.json train.py writes for its defaults."""
    args = vars(train.parse_args(["--out", "run"]))
    return {k: v for k, v in args.items() if k not in ("resume", "given", "config")} | changes


def test_the_args_json_train_py_writes_passes_its_own_check():
    assert train.saved_flag_problem(saved(), train.build_parser()) is None
    assert train.saved_flag_problem(saved(alpha=16.0, data="lv.h5", stride=7, lr=1), train.build_parser()) is None  # an int for a float


@pytest.mark.parametrize("changes, problem", [
    (dict(rank=8.0), "gives 'rank' the value 8.0, which train.py never writes"),
    (dict(rank=True), "gives 'rank' the value True, which train.py never writes"),
    (dict(lr="1e-4"), "gives 'lr' the value '1e-4', which train.py never writes"),
    (dict(lr=True), "gives 'lr' the value True, which train.py never writes"),
    (dict(model=3), "gives 'model' the value 3, which train.py never writes"),
    (dict(model=None), "gives 'model' the value None, which train.py never writes"),  # its default is not None
    (dict(lm_head_bias=1), "gives 'lm_head_bias' the value 1, which train.py never writes"),
    (dict(scaling="local"), "gives 'scaling' the value 'local', which train.py never writes"),
    (dict(decimals=4), "gives 'decimals' the value 4, which train.py never writes"),
    (dict(steps=0), "--steps must be at least 1"),
])
def test_a_saved_flag_of_the_wrong_type_or_value_is_named(changes, problem):
    assert train.saved_flag_problem(saved(**changes), train.build_parser()) == problem


def test_a_saved_args_json_lacking_a_flag_is_named():
    flags = saved()
    del flags["warmup"]
    assert train.saved_flag_problem(flags, train.build_parser()) == "lacks the flag 'warmup'"


def resume_args(run, *flags):
    return train.parse_args(["--out", str(run), "--resume", *flags])


def test_resumed_args_keep_the_saved_run_and_take_only_what_a_resume_may_change(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    old = saved(rank=4, steps=10, lr=0.01, out=str(run))
    del old["split"], old["log"]  # runs made before --split and --log
    (run / "args.json").write_text(json.dumps(old))
    args = train.resumed_args(resume_args(run, "--steps", "20", "--patience", "2", "--log", "none"), run)
    assert (args.rank, args.steps, args.lr, args.patience, args.split, args.log) == (4, 20, 0.01, 2, "ours", "none")
    assert args.resume is True and args.out == str(run) and args.given == ["log", "out", "patience", "resume", "steps"]
    moved = train.resumed_args(resume_args(run, "--steps", "30"), run)  # args.json names the run's old place: the folder moved
    assert moved.out == str(run) and old["out"] == str(run) and moved.steps == 30
    (run / "args.json").write_text(json.dumps(old | {"out": "where/it/was"}))
    assert train.resumed_args(resume_args(run), run).out == str(run)
    (tmp_path / "more.json").write_text(json.dumps({"steps": 40}))  # flags from a file: the file itself is no flag of the run
    assert train.resumed_args(resume_args(run, "--config", str(tmp_path / "more.json")), run).steps == 40
    same = train.resumed_args(resume_args(run, "--rank", "4"), run)  # a flag given with the saved value changes nothing
    assert same.rank == 4
    for flag, value in [("--rank", "2"), ("--context", "64"), ("--seed", "1"), ("--batch", "3"), ("--n-series", "30")]:
        with pytest.raises(UserError) as e:
            train.resumed_args(resume_args(run, flag, value), run)
        assert str(e.value).startswith(f"--resume continues the saved run, so {flag} cannot change; only --steps, --lr, "
                                       "--patience, --flops-budget, --device, --no-progress, --export-merged, --log")
        assert str(e.value).endswith(" can.")


@pytest.mark.parametrize("old, new", [("fp32", "float32"), ("bf16", "bfloat16")])
def test_a_run_saved_with_precision_resumes_with_its_dtype(tmp_path, old, new):
    run = tmp_path / "run"
    run.mkdir()
    flags = saved(out=str(run))
    del flags["dtype"]
    (run / "args.json").write_text(json.dumps(flags | {"precision": old}))
    assert train.resumed_args(resume_args(run), run).dtype == new


def test_a_broken_saved_args_json_is_refused_naming_the_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(json.dumps(saved(rank="4")))
    with pytest.raises(UserError) as e:
        train.resumed_args(resume_args(run), run)
    assert str(e.value) == (f"{run / 'args.json'}: gives 'rank' the value '4', which train.py never writes; "
                            "restore it or start a new run in another folder.")


# ---------------------------------------------------------------- NaN advice

def nan_in(model, name):
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[0] = float("nan")


def test_a_non_finite_loss_is_blamed_on_what_holds_the_nan():
    import lora

    model = random_model(tiny_config())
    lora.inject_lora(model, r=2)
    lora.mark_only_lora_as_trainable(model)
    args = argparse.Namespace(model="ckpt/x")
    resume = "--resume with a lower --lr continues from the last checkpoint"
    assert train.nonfinite(model, True) == [] and train.nonfinite(model, False) == []
    assert train.why_not_finite(model, "the loss became nan", 0, args) == (
        "the loss became nan before any update, with finite weights: the model overflows on this data; try --dtype float32.")
    assert train.why_not_finite(model, "the loss became inf", 7, args) == (
        f"the loss became inf at step 7 with finite weights: the updates have grown too large; {resume}.")
    nan_in(model, "layers.1.self_attn.v_proj.lora_B")
    nan_in(model, "layers.0.self_attn.q_proj.lora_A")
    assert train.nonfinite(model, True) == ["layers.0.self_attn.q_proj.lora_A", "layers.1.self_attn.v_proj.lora_B"]
    assert train.why_not_finite(model, "the loss became nan", 0, args) == (
        f"the loss became nan at step 0: the LoRA weights hold NaN or inf (e.g. layers.0.self_attn.q_proj.lora_A) after too "
        f"large updates; {resume}.")
    nan_in(model, "norm.weight")
    assert train.nonfinite(model, False) == ["norm.weight"]
    assert train.why_not_finite(model, "the validation loss became nan", 3, args) == (
        "the validation loss became nan at step 3: the base weights of --model ckpt/x hold NaN or inf (e.g. norm.weight); "
        "repair or replace the checkpoint.")


# ---------------------------------------------------------------- validation subset, FLOP budget, memory

def test_the_validation_subset_is_the_first_eval_batches_batches():
    val = argparse.Namespace(input_ids=np.zeros((7, 5)))
    subset = lambda eval_batches, batch: [i.tolist() for i in train.eval_indices(val, argparse.Namespace(eval_batches=eval_batches, batch=batch, micro_batch=None))]
    assert subset(2, 3) == [[0, 1, 2], [3, 4, 5]]
    assert subset(5, 3) == [[0, 1, 2], [3, 4, 5], [6]]  # fewer windows than asked for: all, the last batch short
    assert subset(1, 10) == [[0, 1, 2, 3, 4, 5, 6]]
    assert subset(3, 1) == [[0], [1], [2]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(random_model(tiny_config()), tmp_path_factory.mktemp("tiny") / "ckpt")


def test_the_budget_counts_what_flops_py_counts_for_each_shape(ckpt):
    args = train.parse_args(["--model", str(ckpt), "--context", "48", "--batch", "4", "--rank", "4", "--targets", "q,v",
                             "--flops-budget", "1e12", "--eval-every", "5", "--steps", "12"])
    cfg = Qwen2Config.from_json(ckpt / "config.json")
    budget = train.Budget(args, cfg, [(4, 48), (3, 30)])
    setup = flops.Setup(cfg, flops.lora_targets("q,v", 4), False, None, "fused")
    step = lambda B, T: flops.train_step(setup, B, T).coursework
    fwd = lambda B, T: flops.forward_with_loss(setup, B, T).coursework
    assert budget.eval == fwd(4, 47) + fwd(3, 29)  # a window of T tokens feeds T - 1
    assert budget.first_step(args) == step(4, 47)  # no validation at step 1
    one = train.parse_args(["--model", str(ckpt), "--context", "48", "--rank", "4", "--eval-every", "1"])
    assert train.Budget(one, cfg, [(4, 48)]).first_step(one) == step(4, 47) + fwd(4, 47)
    single = train.parse_args(["--model", str(ckpt), "--context", "48", "--rank", "4", "--steps", "1"])
    assert train.Budget(single, cfg, [(4, 48)]).first_step(single) == step(4, 47) + fwd(4, 47)
    limit = 1e12
    assert budget.affords(limit - 100 - budget.eval, 100, True) and not budget.affords(limit - 99 - budget.eval, 100, True)
    assert budget.affords(limit - 100, 100, False) and not budget.affords(limit - 99, 100, False)
    numeric = train.parse_args(["--model", str(ckpt), "--context", "48", "--rank", "4", "--vocab", "numeric", "--lm-head-bias"])
    head = flops.Setup(cfg, flops.lora_targets("q,v", 4), True, 13, "fused")
    assert train.Budget(numeric, cfg, [(4, 48)]).eval == flops.forward_with_loss(head, 4, 47).coursework


def planned(ckpt, tmp_path, steps):
    """The ledger's plan rows of a run of `steps` steps, validating every 5 over 2 batches (full, and one of 40 tokens)."""
    args = train.parse_args(["--model", str(ckpt), "--context", "48", "--batch", "4", "--rank", "4", "--eval-every", "5",
                             "--steps", str(steps)])
    cfg = Qwen2Config.from_json(ckpt / "config.json")
    budget = train.Budget(args, cfg, [(4, 48), (4, 40)])
    ledger = flops.Ledger(tmp_path / "ledger.jsonl", budget=args.flops_budget)
    budget.record_plan(ledger, "run", args)
    setup = flops.Setup(cfg, flops.lora_targets("q,v", 4), False, None, "fused")
    return [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()], setup


def test_the_budget_records_the_whole_run_as_planned(ckpt, tmp_path):
    rows, setup = planned(ckpt, tmp_path, 10)
    fwd = lambda B, T: flops.forward_with_loss(setup, B, T).coursework
    assert [(r["stage"], r["kind"], r["source"], r["step"]) for r in rows] == [("run", "train", "plan", 0), ("run", "eval", "plan", 0)]
    assert rows[0]["flops"] == 10 * flops.train_step(setup, 4, 47).coursework
    # validations at steps 5 and 10, each planned as 2 full batches of 48 tokens, and the step-0 baseline as it will run
    assert rows[1]["flops"] == pytest.approx(2 * 2 * fwd(4, 47) + fwd(4, 47) + fwd(4, 39), rel=1e-12)


def test_the_plan_counts_the_validation_at_the_last_step(ckpt, tmp_path):
    rows, setup = planned(ckpt, tmp_path, 12)
    fwd = lambda B, T: flops.forward_with_loss(setup, B, T).coursework
    assert rows[1]["flops"] == pytest.approx(3 * 2 * fwd(4, 47) + fwd(4, 47) + fwd(4, 39), rel=1e-12)  # steps 5, 10, 12


def test_physical_memory_is_infinite_where_the_os_does_not_say(monkeypatch):
    assert 2**20 < train.physical_memory() < math.inf

    def unknown(name):
        raise ValueError(name)
    monkeypatch.setattr(train.os, "sysconf", unknown)
    assert train.physical_memory() == math.inf


def test_cpu_matmul_rate_times_eight_square_matmuls_of_1024_after_a_warm_up(monkeypatch):
    made, products = [], []

    class Matrix:  # stands in for torch's tensors: records its shape and each product
        def __init__(self, *shape):
            self.shape = shape
            made.append(shape)

        def __matmul__(self, other):
            products.append((self.shape, other.shape))

    clock = iter([10.0, 14.0])
    monkeypatch.setattr(train.torch, "randn", Matrix)
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock))
    assert train.cpu_matmul_rate() == 2 * 1024**3 * 8 / 4.0
    assert made == [(1024, 1024), (1024, 1024)] and products == [((1024, 1024), (1024, 1024))] * 9  # 1 + 8


def test_build_data_refuses_too_few_windows_for_a_batch(ckpt):
    args = train.parse_args(["--model", str(ckpt), "--n-series", "4", "--context", "200", "--batch", "64"])
    with pytest.raises(UserError) as e:
        train.build_data(args, Tokenizer.from_pretrained(ckpt), Qwen2Config.from_json(ckpt / "config.json"))
    assert str(e.value).startswith("--n-series 4 gives only ") and str(e.value).endswith(
        " training windows for --batch 64; use more data or a smaller batch.")


def test_build_data_refuses_windows_that_would_not_fit_in_memory(ckpt, monkeypatch):
    args = train.parse_args(["--model", str(ckpt), "--n-series", "20", "--context", "48"])
    # 14 train + 3 validation series (70/15/15 of 20), each at least one window of 3 int64 rows of 48 tokens: 19584 bytes
    need = 17 * 48 * 3 * 8
    tok, cfg = Tokenizer.from_pretrained(ckpt), Qwen2Config.from_json(ckpt / "config.json")
    monkeypatch.setattr(train, "physical_memory", lambda: 2 * need)
    train.build_data(args, tok, cfg)  # exactly half the memory: allowed
    monkeypatch.setattr(train, "physical_memory", lambda: 2 * need - 1)
    with pytest.raises(UserError) as e:
        train.build_data(args, tok, cfg)
    assert str(e.value) == ("token windows of --context 48 for 17 trajectories would take over 0 GiB of memory; use a shorter "
                            "--context or less data.")


def test_build_data_windows_validation_without_overlap_and_training_at_the_stride(ckpt):
    args = train.parse_args(["--model", str(ckpt), "--n-series", "8", "--context", "48", "--stride", "12"])
    tok, cfg = Tokenizer.from_pretrained(ckpt), Qwen2Config.from_json(ckpt / "config.json")
    train_w, val_w, scaler, split = train.build_data(args, tok, cfg)
    from data import windows

    traj = train.Recipe.of(args).trajectories()[0]
    want_scale = np.percentile(traj[split.train], 95)
    assert float(scaler.level) == pytest.approx(want_scale, rel=1e-12)
    val_scaled = traj[split.val] * 10 / want_scale
    by_hand = windows.dataset_windows(val_scaled, tok, 48, 48, 2, tok.pad_id)
    assert np.array_equal(val_w.input_ids, by_hand.input_ids)
    by_hand = windows.dataset_windows(traj[split.train] * 10 / want_scale, tok, 48, 12, 2, tok.pad_id)
    assert np.array_equal(train_w.input_ids, by_hand.input_ids)


def test_export_merged_says_why_it_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    train.export_merged(run, argparse.Namespace(lm_head_bias=True))
    assert capsys.readouterr().err == ("note: --export-merged skipped: transformers' Qwen2 has no lm_head bias; "
                                       "use the adapter in best/.\n")
    train.export_merged(run, argparse.Namespace(lm_head_bias=False))
    assert capsys.readouterr().err == "note: --export-merged skipped: no validation finished, so there is no best adapter.\n"
    assert list(run.iterdir()) == []


# ---------------------------------------------------------------- the logs, the loss plot, what a run says

class Recorder:
    """Stands in for qwen_min.scalars.Scalars: what Log writes to TensorBoard, and how it was opened."""

    def __init__(self, folder, enabled=True, purge_step=None):
        self.folder, self.enabled, self.purge_step, self.rows, self.closed = folder, enabled, purge_step, [], False

    def add(self, tag, value, step):
        self.rows.append((tag, value, step))

    def close(self):
        self.closed = True


def test_log_writes_each_step_and_validation_to_metrics_the_ledger_tensorboard_and_the_screen(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "Scalars", Recorder)
    run = tmp_path / "run7"
    run.mkdir()
    ledger = flops.Ledger(run / "ledger.jsonl")
    args = argparse.Namespace(steps=10, no_progress=True, log="tensorboard")
    log = train.Log(run, ledger, args, 2, resuming=True)
    assert (log.scalars.folder, log.scalars.enabled, log.scalars.purge_step) == (run / "tensorboard", True, 3)
    log.step(3, 1.23456, 1e-3, 1234.4, 5e9, 7.0)
    log.validation(3, 0.5, True, 6e9, 2.0)
    log.validation(4, 0.75, False, 7e9, 2.0)
    log.close()
    assert [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] == [
        {"kind": "train", "step": 3, "loss": 1.23456, "lr": 1e-3, "tokens_per_s": 1234.4, "flops": 5e9},
        {"kind": "val", "step": 3, "val_loss": 0.5, "best": True, "flops": 6e9},
        {"kind": "val", "step": 4, "val_loss": 0.75, "best": False, "flops": 7e9}]
    assert [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()] == [
        {"stage": "run7", "kind": "train", "source": "spent", "flops": 7.0, "step": 3},
        {"stage": "run7", "kind": "eval", "source": "spent", "flops": 2.0, "step": 3},
        {"stage": "run7", "kind": "eval", "source": "spent", "flops": 2.0, "step": 4}]
    assert log.scalars.rows == [("train/loss", 1.23456, 3), ("train/lr", 1e-3, 3), ("train/tokens_per_s", 1234.4, 3),
                                ("flops/spent", 5e9, 3), ("val/loss", 0.5, 3), ("flops/spent", 6e9, 3), ("val/loss", 0.75, 4),
                                ("flops/spent", 7e9, 4)] and log.scalars.closed
    out, err = capsys.readouterr()
    assert out == "step 3: validation loss 0.5000 (best)\nstep 4: validation loss 0.7500\n"
    assert err.startswith("train: 3/10 step (30%)") and err.rstrip().endswith("| loss 1.2346 lr 1.00e-03 tok_s 1234 flops 5.00e+09")
    fresh = train.Log(run, ledger, argparse.Namespace(steps=10, no_progress=True, log="none"), 0, resuming=False)
    assert (fresh.scalars.enabled, fresh.scalars.purge_step) == (False, None)
    fresh.close()


@pytest.mark.filterwarnings("ignore:No artists with labels")  # the empty plot's legend has nothing to name
def test_the_loss_plot_shows_each_train_step_and_validation_of_metrics_jsonl(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    run = tmp_path / "myrun"
    run.mkdir()
    rows = [{"kind": "val", "step": 0, "val_loss": 3.0}, {"kind": "train", "step": 1, "loss": 2.5},
            {"kind": "train", "step": 2, "loss": 2.0}, {"kind": "val", "step": 2, "val_loss": 2.25}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "train", "st')
    figures, real_close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), real_close(fig)))
    train.plot_losses(run, run / "loss.png")
    (ax,) = figures[0].axes
    lines = {line.get_label(): line.get_xydata().tolist() for line in ax.get_lines()}
    assert lines == {"train": [[1, 2.5], [2, 2.0]], "validation": [[0, 3.0], [2, 2.25]]}
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("step", "cross-entropy per token", "myrun")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "validation"]
    train_line, val_line = ax.get_lines()  # the look it was designed with: thin faint steps, validations as dots
    assert (train_line.get_linewidth(), train_line.get_alpha(), val_line.get_marker(), val_line.get_linestyle()) == (0.8, 0.7, "o", "-")
    assert tuple(figures[0].get_size_inches()) == (7, 4)
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and list(run.glob("*.tmp")) == []
    (run / "metrics.jsonl").unlink()
    train.plot_losses(run, run / "empty.png")  # killed before its first step: an empty plot, no error
    assert not figures[1].axes[0].get_lines() and (run / "empty.png").is_file()


class FakeBudget:
    """What announce reads of a Budget: one full step's FLOPs."""

    def step(self, B, T):
        return argparse.Namespace(coursework=2.5e12)

    def full_step(self, args):
        return argparse.Namespace(coursework=2.5e12)


def test_announce_says_what_will_run_and_warns_of_a_real_model_on_a_cpu(monkeypatch, capsys):
    monkeypatch.setattr(train, "cpu_matmul_rate", lambda: 1e11)
    params = [torch.zeros(3, 4), torch.zeros(1000)]
    w = lambda n: argparse.Namespace(input_ids=np.zeros((n, 8)))
    args = argparse.Namespace(batch=4, context=512, flops_budget=1e17, device="cpu", steps=2000)
    train.announce(args, argparse.Namespace(n_layers=24), params, w(1234), w(56), FakeBudget(), 560)
    out, err = capsys.readouterr()
    assert out == ("2 trainable tensors, 1,012 parameters; 1234 training windows of 512 tokens, 56 validation; 2.5e+12 FLOPs per "
                   "full step, budget 1e+17\n")
    assert err == ("warning: training on CPU: at least 25 s per step at this CPU's matmul rate (measured runs take about 1.5x "
                   "that), 10.0 h or more for the run; use a CUDA GPU for real runs.\n")  # 25 s x 1440 steps left
    train.announce(args, argparse.Namespace(n_layers=11), params, w(1), w(1), FakeBudget(), 0)  # a tiny model: no warning
    train.announce(argparse.Namespace(**vars(args) | {"device": "cuda"}), argparse.Namespace(n_layers=24), params, w(1), w(1),
                   FakeBudget(), 0)
    assert capsys.readouterr().err == ""
    train.announce(args, argparse.Namespace(n_layers=12), params, w(1), w(1), FakeBudget(), 0)
    assert capsys.readouterr().err.startswith("warning: training on CPU: at least 25 s per step")


class Calls:
    """Records each call of log.validation (what validate reports)."""

    def __init__(self):
        self.calls = []

    def validation(self, *a):
        self.calls.append(a)


def test_validate_keeps_the_best_adapter_counts_bad_validations_and_says_when_to_stop():
    from qwen_min.checkpoint import LoopState

    model = torch.nn.Linear(2, 1)
    model.bias.requires_grad_(False)
    budget = argparse.Namespace(eval=10.0)
    loop, log = LoopState(step=4, spent=100.0), Calls()
    args = argparse.Namespace(patience=2, model="m")
    with torch.no_grad():
        model.weight.fill_(1.0)
    assert train.validate(loop, model, lambda: 2.0, budget, log, args) == (2.0, False)  # the first: an improvement on inf
    assert (loop.best_val, loop.bad_evals, loop.spent) == (2.0, 0, 110.0) and list(loop.best) == ["weight"]
    with torch.no_grad():
        model.weight.fill_(5.0)
    assert torch.equal(loop.best["weight"], torch.ones(1, 2))  # a copy, not the live tensor
    assert train.validate(loop, model, lambda: 2.0, budget, log, args) == (2.0, False)  # equal is no improvement
    assert (loop.best_val, loop.bad_evals) == (2.0, 1) and torch.equal(loop.best["weight"], torch.ones(1, 2))
    assert train.validate(loop, model, lambda: 3.0, budget, log, args) == (3.0, True)  # the 2nd without: stop
    assert train.validate(loop, model, lambda: 1.5, budget, log, args) == (1.5, False)
    assert (loop.best_val, loop.bad_evals, loop.spent) == (1.5, 0, 140.0) and torch.equal(loop.best["weight"], torch.full((1, 2), 5.0))
    assert log.calls == [(4, 2.0, True, 110.0, 10.0), (4, 2.0, False, 120.0, 10.0), (4, 3.0, False, 130.0, 10.0),
                         (4, 1.5, True, 140.0, 10.0)]
    never = argparse.Namespace(patience=0, model="m")
    loop.bad_evals = 99
    assert train.validate(loop, model, lambda: 9.0, budget, log, never) == (9.0, False)  # --patience 0: never stop early
    with pytest.raises(UserError) as e:
        train.validate(loop, model, lambda: float("nan"), budget, log, args)
    assert str(e.value) == ("the validation loss became nan at step 4 with finite weights: the updates have grown too large; "
                            "--resume with a lower --lr continues from the last checkpoint.")


def test_finish_plots_exports_when_asked_and_writes_the_summary(tmp_path, monkeypatch, capsys):
    from qwen_min.checkpoint import LoopState

    done = []
    monkeypatch.setattr(train, "plot_losses", lambda run, path: done.append(("plot", path)))
    monkeypatch.setattr(train, "export_merged", lambda run, args: done.append(("export", run)))
    monkeypatch.setattr(train.run_folder, "provenance", lambda device: {"device": device})
    clock = iter([105.0])
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock))
    run = tmp_path / "run"
    run.mkdir()
    args = argparse.Namespace(export_merged=True, flops_budget=4e9, device="cpu")
    summary = train.finish(run, args, LoopState(step=30, best_val=1.23456, spent=1e9), "early stopping", 100.0)
    assert done == [("plot", run / "loss.png"), ("export", run)]
    assert summary == {"steps": 30, "stop_reason": "early stopping", "best_val_loss": 1.23456, "flops_spent": 1e9,
                       "flops_budget": 4e9, "budget_used": 0.25, "run": str(run), "wall_s": 5.0, "provenance": {"device": "cpu"},
                       "world_size": 1}
    assert json.loads((run / "summary.json").read_text()) == summary
    assert capsys.readouterr().out == (f"done after 30 steps (early stopping): best validation loss 1.2346, 1e+09 FLOPs (25.00% of "
                                       f"the budget); adapter in {run / 'best'}\n")
    clock = iter([1.0])
    train.finish(run, argparse.Namespace(export_merged=False, flops_budget=4e9, device="cpu"), LoopState(), "steps", 0.0)
    assert done[2:] == [("plot", run / "loss.png")]  # no export unless asked for


class PlanBudget:
    """What start_or_resume asks of a Budget: the least a run spends, and the plan it records."""

    def __init__(self):
        self.plans = []

    def first_step(self, args):
        return 100.0

    def record_plan(self, ledger, name, args):
        self.plans.append((ledger.budget, name))


def test_a_fresh_start_clears_the_folder_and_writes_args_scaler_and_plan(tmp_path):
    from data import llmtime

    run = tmp_path / "run"
    run.mkdir()
    for name in ("metrics.jsonl", "state.pt.tmp", "summary.json"):
        (run / name).write_text("an earlier start's")
    (run / "best").mkdir()
    args = argparse.Namespace(flops_budget=99.0, batch=4, context=48, decimals=3, seed=7, resume=False, given=["seed"], config=None,
                              rank=2)
    scaler = llmtime.Scaler(np.asarray(12.5), 95.0, 10.0, False)
    budget = PlanBudget()
    with pytest.raises(UserError) as e:
        train.start_or_resume(args, run, False, None, None, scaler, budget)
    assert str(e.value) == ("--flops-budget 99 is smaller than one training step (100 FLOPs at --batch 4 --context 48, 0.99 of it); "
                            "raise it to at least 100.")
    args.flops_budget = 100.0  # exactly one step: allowed
    loop, ledger = train.start_or_resume(args, run, False, None, None, scaler, budget)
    assert (loop.step, loop.best_val, loop.bad_evals, loop.spent, loop.best) == (0, math.inf, 0, 0.0, None)
    assert sorted(p.name for p in run.iterdir()) == ["args.json", "scaler.json", "state.pt.tmp"]  # tidy() takes the .tmp
    assert json.loads((run / "args.json").read_text()) == {"flops_budget": 100.0, "batch": 4, "context": 48, "decimals": 3,
                                                           "seed": 7, "rank": 2}
    assert json.loads((run / "scaler.json").read_text()) == {"level": 12.5, "percentile": 95.0, "target": 10.0, "per_series": False,
                                                             "decimals": 3, "split_seed": 7}
    assert budget.plans == [(100.0, "run")] and ledger.path == run / "ledger.jsonl"


def test_a_resume_restores_the_checkpoint_drops_later_lines_and_rewrites_the_adapters(tmp_path, capsys):
    import lora
    from qwen_min import checkpoint

    model = random_model(tiny_config())
    lora.inject_lora(model, r=2)
    lora.mark_only_lora_as_trainable(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    run = tmp_path / "run"
    run.mkdir()
    best = {n: p.detach() + 1 for n, p in model.named_parameters() if p.requires_grad}
    rng = torch.get_rng_state()
    checkpoint.save(run, model, optimizer, checkpoint.LoopState(step=6, best_val=0.123456, bad_evals=1, spent=5e6, best=best), "b")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s}) + "\n" for s in range(1, 9)))
    (run / "ledger.jsonl").write_text(json.dumps({"step": 0, "stage": "run", "kind": "train", "source": "plan", "flops": 9e9}) + "\n" +
                                      json.dumps({"step": 7, "stage": "run", "kind": "train", "source": "spent", "flops": 1.0}) + "\n")
    import shutil
    shutil.rmtree(run / "best")  # a kill left it behind state.pt
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.fill_(3.0)
    args = argparse.Namespace(flops_budget=1e10, model="b", resume=True, given=[], config=None, steps=9)
    try:
        loop, ledger = train.start_or_resume(args, run, True, model, optimizer, None, None)
    finally:
        torch.set_rng_state(rng)
    assert (loop.step, loop.best_val, loop.bad_evals, loop.spent) == (6, 0.123456, 1, 5e6)
    assert capsys.readouterr().out == f"resuming {run} at step 6 (best validation loss 0.1235)\n"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert ledger.total("plan") == 9e9 and ledger.total("spent") == 0  # the spending up to the checkpoint
    assert (run / "best" / "adapter_model.safetensors").is_file() and not (run / "scaler.json").exists()
    assert json.loads((run / "args.json").read_text()) == {"flops_budget": 1e10, "model": "b", "steps": 9}
    assert all(p.ne(3.0).all() for p in model.parameters() if p.requires_grad)  # the checkpoint's tensors are back


def test_export_merged_folds_the_best_adapter_into_a_float32_checkpoint(tmp_path, capsys):
    """The base may be stored in bfloat16 (the real Qwen2.5 is): the merge runs in float32 on the CPU and is written so."""
    import lora
    from safetensors.torch import load_file

    from qwen_min.weights import hf_name

    ckpt16 = write_checkpoint(random_model(tiny_config(), dtype=torch.bfloat16), tmp_path / "ckpt16")
    model = random_model(tiny_config())
    lora.inject_lora(model, r=2, alpha=4.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in lora.lora_layers(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g))
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    run = tmp_path / "run"
    lora.save_adapter(model, run / "best", module_name=hf_name)
    train.export_merged(run, argparse.Namespace(lm_head_bias=False, model=str(ckpt16)))
    assert capsys.readouterr().out == f"merged checkpoint written to {run / 'merged'}\n"
    merged = load_file(str(run / "merged" / "model.safetensors"))
    assert {t.dtype for t in merged.values()} == {torch.float32}
    stored = load_file(str(ckpt16 / "model.safetensors"))["model.layers.1.self_attn.q_proj.weight"]
    q = lora.lora_layers(model)["layers.1.self_attn.q_proj"]
    want = stored.float() + 2.0 * q.lora_B @ q.lora_A  # alpha / r = 2
    assert (merged["model.layers.1.self_attn.q_proj.weight"] - want).abs().max().item() <= 1e-6
