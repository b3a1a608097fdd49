"""evaluate.py's flags and small pieces, without a model: --help, the defaults and their order (flag > run >
preset > default), every refusal in whole sentences, the results folder and its journal settings, the
decode batches and how their records are gathered, the JSON and markdown of results, --compare
(mutation area evaluate). Expected values are written here by hand; test_evaluate.py and
test_evaluate_oracle.py run the whole path."""

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate
from qwen_min.errors import UserError
from qwen_min.files import Journal

HELP = [
    "Forecasting evaluation of Qwen2.5 (+ LoRA) on Lotka-Volterra trajectories.",
    "--run RUN a train.py run folder: its model, adapter (best/), data, split and scaling",
    "--model MODEL checkpoint folder or hub id (default: the run's, else Qwen/Qwen2.5-0.5B-Instruct)",
    "--adapter ADAPTER LoRA adapter folder, ours or peft's (default: RUN/best, else RUN/adapter, else none)",
    "--no-adapter evaluate the base model even with --run",
    "--lm-head-bias the model has an lm_head bias (in the adapter)",
    "--dtype {float32,bfloat16} weights and activations (bfloat16 is for GPUs) (default: float32)",
    "--device DEVICE default: cuda if available, else cpu",
    "protocol and data (default: ours, with the run's data, else the simulator):",
    "--preset {report-a,report-b,tutt,wang} a published protocol as its authors' code ran it, quirks included (tutt and wang "
    "are the old names of report-a and report-b). report-a: report A as run:",
    "Without --preset: k whole steps -> h",
    "--score FILE score forecasts made elsewhere, without a model: .json or .npz with `forecast` (N, h, 2) [prey, predator] "
    "in the protocol's units, optional `truth` (N, h, 2) and `series` (row indices into the data file)",
    "--data DATA h5 file in the coursework layout",
    "--n-series N_SERIES trajectories to simulate without --data",
    "--seed SEED split (and simulation) seed",
    "--split {ours,report-a,report-b} which split's test series the default protocol scores (default: the run's, else ours; "
    "a preset uses its report's)",
    "--scaling {global,per-series} (default: the run's, else global; a preset uses its report's)",
    "--percentile PERCENTILE (default: the run's, else 95; a preset uses its report's)",
    "--scale-target SCALE_TARGET (default: the run's, else 10; a preset uses its report's)",
    "--decimals {1,2,3} (default: the run's, else 2; a preset uses its report's)",
    "--context CONTEXT tokens per cross-entropy window",
    "--k K context steps in the prompt",
    "--h H steps to forecast",
    "--limit LIMIT evaluate only the first LIMIT test series",
    "decoding (the report presets decode with the checkpoint's generation_config.json):",
    "--samples SAMPLES forecasts per series; > 1 samples and takes the median (report-b: the mean, as it did) (default: 1)",
    "--temperature TEMPERATURE default: 0 (greedy) for 1 sample, 0.7 for more",
    "--top-k TOP_K sample from the k likeliest tokens (default: none; a preset: the generation config's)",
    "--top-p TOP_P nucleus sampling in (0, 1] (default: none; a preset: the generation config's)",
    "--sample-seed SAMPLE_SEED seed of the sampled forecasts (default: 0)",
    "--unrestricted let the model emit any token (default: digits and separators)",
    "--batch BATCH sequences decoded at once (series x samples) (default: 20)",
    "--out OUT a new folder for results.json and plots (default: RUN/eval/<protocol>-<adapter>, else evals/<label>-<protocol>; "
    "time-stamped when taken)",
    "--label LABEL name of this model in tables (default: the adapter's run, or 'base')",
    "--no-ce skip the cross-entropy",
    "--no-baselines skip the persistence and fitted-LV baselines",
    "--lv-iterations LV_ITERATIONS Nelder-Mead iterations of the LV baseline fit (default: 150)",
    "--plots PLOTS series in forecasts.png (0 = no plots) (default: 4)",
    "--compare RESULTS [RESULTS ...] print two or more results.json side by side, then exit",
    "--log {none,tensorboard} tensorboard: also write the overall metrics as TensorBoard scalars (RUN/tensorboard with --run, "
    "else OUT/tensorboard), at the run's last step (default: none)",
    "--config FILE flag values from a TOML, YAML or JSON file; flags given here override the file's",
]


def test_help_says_what_each_flag_does(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for line in HELP:
        assert line in text, line
    for group in ("model:", "output:"):
        assert f" {group} " in text


@pytest.fixture
def here(tmp_path, monkeypatch):
    """Runs the test in an empty working directory: without --out, evaluate.py makes evals/<label>-<protocol> there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(evaluate.run_folder, "provenance", lambda device="cpu": {"commit": "c" * 40})
    return tmp_path


def test_every_default_of_our_protocol(here):
    args = evaluate.parse_args([])
    want = dict(protocol="ours", model="Qwen/Qwen2.5-0.5B-Instruct", data=None, n_series=1000, seed=0, k=50, h=50, scaling="global",
                percentile=95.0, scale_target=10.0, decimals=2, context=512, lm_head_bias=False, split="ours", samples=1,
                temperature=0.0, top_k=None, top_p=None, sample_seed=0, unrestricted=False, batch=20, label="base", no_ce=False,
                no_baselines=False, lv_iterations=150, plots=4, log="none", dtype="float32", device="cpu", adapter=None, run=None,
                no_adapter=False, limit=None, score=None, preset=None, out="evals/base-ours")
    assert {k: getattr(args, k) for k in want} == want
    assert (here / "evals" / "base-ours").is_dir()  # claimed by making it
    assert evaluate.parse_args(["--samples", "3"]).temperature == 0.7
    assert evaluate.parse_args(["--samples", "3", "--temperature", "0.2"]).temperature == 0.2


@pytest.mark.parametrize("preset, protocol, fixed", [
    ("report-a", "report-a", dict(k=49, h=50, scaling="global", percentile=90.0, scale_target=10.0, decimals=2, seed=42, context=768,
                                  split="report-a", no_ce=False)),
    ("tutt", "report-a", dict(k=49, h=50, seed=42, split="report-a")),
    ("report-b", "report-b", dict(k=51, h=20, scaling="per-series", percentile=95.0, scale_target=1.0, decimals=2, seed=42,
                                  context=512, split="report-b", no_ce=True)),  # report B published no test cross-entropy
    ("wang", "report-b", dict(k=51, h=20, split="report-b", no_ce=True)),
])
def test_a_preset_fixes_its_reports_protocol_and_leaves_decoding_to_the_generation_config(here, preset, protocol, fixed):
    args = evaluate.parse_args(["--preset", preset])
    assert args.protocol == protocol and {k: getattr(args, k) for k in fixed} == fixed
    assert (args.temperature, args.top_k, args.top_p) == (None, None, None)
    assert args.out == f"evals/base-{protocol}"


def flag_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1].split(": error: ", 1)[1]


@pytest.mark.parametrize("flags, message", [
    (["--preset", "report-b", "--k", "7"], "--k is fixed by --preset report-b, which runs its report's protocol as it was run "
                                           "(k 51); leave it out, or evaluate without --preset"),
    (["--preset", "tutt", "--scale-target", "3"], "--scale-target is fixed by --preset report-a, which runs its report's "
                                                  "protocol as it was run (scale_target 10.0); leave it out, or evaluate without --preset"),
    (["--preset", "report-a", "--top-k", "3"], "--top-k is fixed by --preset report-a: it decodes with the checkpoint's "
                                               "generation_config.json, as its report did; leave it out"),
    (["--preset", "report-b", "--temperature", "0.5"], "--temperature is fixed by --preset report-b: it decodes with the "
                                                       "checkpoint's generation_config.json, as its report did; leave it out"),
    (["--preset", "report-b", "--unrestricted"], "--preset report-b already decodes over the full vocabulary; leave out --unrestricted"),
    (["--preset", "report-a", "--samples", "2"], "--preset report-a decodes greedily (its tables are greedy); leave out --samples"),
    (["--score", "f.npz", "--adapter", "a"], "--score scores forecasts from a file and loads no model; leave out --run and --adapter"),
    (["--adapter", "nowhere"], "adapter folder nowhere does not exist"),
    (["--k", "0"], "--k and --h must be at least 1"),
    (["--h", "0"], "--k and --h must be at least 1"),
    (["--samples", "0"], "--samples and --batch must be at least 1"),
    (["--batch", "0"], "--samples and --batch must be at least 1"),
    (["--temperature", "-0.1"], "--temperature must be >= 0"),
    (["--samples", "2", "--temperature", "0"], "--samples > 1 needs --temperature > 0 (greedy samples are all equal)"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.01"], "--top-p must be in (0, 1]"),
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--percentile", "0"], "need 0 < --percentile <= 100 and --scale-target > 0"),
    (["--percentile", "100.5"], "need 0 < --percentile <= 100 and --scale-target > 0"),
    (["--scale-target", "0"], "need 0 < --percentile <= 100 and --scale-target > 0"),
    (["--seed", "-1"], "--seed must be >= 0 and --n-series >= 1"),
    (["--n-series", "0"], "--seed must be >= 0 and --n-series >= 1"),
    (["--context", "1"], "--context must be at least 2 tokens"),
    (["--plots", "-1"], "--plots and --lv-iterations must be >= 0"),
    (["--lv-iterations", "-1"], "--plots and --lv-iterations must be >= 0"),
    (["--sample-seed", "-1"], "--sample-seed must be >= 0"),
    (["--compare", "a.json"], "--compare needs two or more results.json files"),
])
def test_each_refusal_is_one_sentence(here, flags, message, capsys):
    assert flag_error(flags, capsys) == message


@pytest.mark.parametrize("flags", [
    ["--k", "1", "--h", "1"], ["--samples", "1", "--batch", "1"], ["--temperature", "0"], ["--samples", "2", "--temperature", "1e-6"],
    ["--top-p", "1"], ["--top-p", "1e-6"], ["--top-k", "1"], ["--limit", "1"], ["--percentile", "100"], ["--scale-target", "1e-9"],
    ["--seed", "0", "--n-series", "1"], ["--context", "2"], ["--plots", "0", "--lv-iterations", "0"], ["--sample-seed", "0"],
    ["--preset", "report-b", "--samples", "3"],
])
def test_each_flag_at_its_limit_is_accepted(here, flags):
    evaluate.parse_args(flags)


def test_compare_parses_without_resolving_anything(here):
    args = evaluate.parse_args(["--compare", "a.json", "b.json"])
    assert args.compare == ["a.json", "b.json"] and not hasattr(args, "protocol") and not (here / "evals").exists()


def write_run(folder, **changes):
    args = {"model": "ckpt", "data": None, "n_series": 24, "seed": 3, "scaling": "per-series", "percentile": 90.0, "scale_target": 1.0,
            "decimals": 1, "context": 40, "lm_head_bias": False, "split": "ours"} | changes
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "args.json").write_text(json.dumps(args))
    return folder


def test_a_run_gives_its_flags_and_adapter_and_refuses_another_split_or_encoding(here, capsys):
    run = write_run(here / "run")
    (run / "adapter").mkdir()
    args = evaluate.parse_args(["--run", str(run)])
    assert (args.model, args.n_series, args.seed, args.scaling, args.percentile, args.scale_target, args.decimals, args.context) == (
        "ckpt", 24, 3, "per-series", 90.0, 1.0, 1, 40)
    assert args.adapter == str(run / "adapter") and args.label == "run" and args.trained_on == ("ours", 3)
    assert args.out == str(run / "eval" / "ours-adapter")
    (run / "best").mkdir()
    assert evaluate.parse_args(["--run", str(run)]).adapter == str(run / "best")
    assert evaluate.parse_args(["--run", str(run), "--seed", "3", "--context", "64"]).context == 64  # the run's own seed may be given
    nothing = evaluate.parse_args(["--run", str(run), "--no-adapter", "--label", "x"])
    assert nothing.adapter is None and nothing.out == str(run / "eval" / "ours-base")
    for flag, value, key in [("--seed", "4", "seed"), ("--decimals", "2", "decimals"), ("--n-series", "30", "n_series"),
                             ("--percentile", "95", "percentile"), ("--scaling", "global", "scaling"), ("--split", "report-a", "split")]:
        assert flag_error(["--run", str(run), flag, value], capsys) == (
            f"--{key.replace('_', '-')} differs from the run's; its test split and encoding are fixed by the run (train.py's "
            "args.json), so evaluate it without that flag")


def test_a_run_evaluated_under_a_preset_is_warned_about_its_encoding(here, capsys):
    run = write_run(here / "run", scaling="global", percentile=95.0, scale_target=10.0, decimals=2)
    capsys.readouterr()
    evaluate.parse_args(["--run", str(run), "--preset", "report-a", "--no-adapter"])
    assert capsys.readouterr().err == ("warning: the run was trained on global scaling (P95.0 -> 10.0, 2 decimals), but --preset "
                                       "report-a encodes as its report did; its model reads an encoding it was not trained on.\n")
    same = write_run(here / "same", scaling="per-series", percentile=95.0, scale_target=1.0, decimals=2)
    evaluate.parse_args(["--run", str(same), "--preset", "report-b", "--no-adapter"])
    assert "warning" not in capsys.readouterr().err  # report B's own encoding: nothing to warn about


def test_a_run_folder_that_is_not_one_is_refused_without_its_full_stop(here, capsys):
    (here / "empty").mkdir()
    assert flag_error(["--run", str(here / "empty")], capsys) == f"{here / 'empty'} holds no args.json; pass a train.py run folder to --run"


def test_the_label_names_the_adapters_run_or_the_score_file(here):
    (here / "runs" / "r7" / "best").mkdir(parents=True)
    assert evaluate.parse_args(["--adapter", str(here / "runs" / "r7" / "best")]).label == "r7"
    assert evaluate.parse_args(["--score", "forecasts.npz"]).label == "forecasts"
    assert evaluate.parse_args(["--score", "forecasts.npz"]).settings is None  # --score decodes nothing: no journal
    assert evaluate.parse_args(["--label", "mine"]).out == "evals/mine-ours"


def test_an_out_holding_results_or_a_file_is_refused(here, capsys):
    (here / "done").mkdir()
    (here / "done" / "results.json").write_text("{}")
    assert flag_error(["--out", "done"], capsys) == ("--out done already holds an evaluation's results.json; choose a new folder "
                                                     "(or leave out --out: each evaluation then gets its own)")
    (here / "f").write_text("x")
    assert flag_error(["--out", "f"], capsys) == "--out f is a file, not a folder; choose a folder for results.json"


def test_journal_settings_are_what_decides_the_results(here):
    (here / "ad").mkdir()
    (here / "ad" / "b.bin").write_bytes(b"\x00\x01")
    (here / "ad" / "a.json").write_text("{}")
    (here / "ad" / "sub").mkdir()  # a folder inside: not hashed
    (here / "ad" / "sub" / "x").write_text("ignored")
    digest = hashlib.sha256(b"a.json\0{}" + b"b.bin\0\x00\x01").hexdigest()
    assert evaluate.folder_sha256(here / "ad") == digest
    args = evaluate.parse_args(["--adapter", "ad", "--k", "5", "--out", "o", "--label", "l", "--plots", "0", "--no-baselines"])
    s = args.settings
    assert s["adapter_sha256"] == digest and s["commit"] == "c" * 40 and s["k"] == 5 and s["adapter"] == "ad"
    assert not set(s) & {"out", "label", "log", "plots", "config", "compare", "no_baselines", "lv_iterations"}
    assert json.loads(json.dumps(s)) == s  # as the journal stores it
    assert evaluate.parse_args(["--out", "o2"]).settings["adapter_sha256"] is None


def test_default_out_takes_a_fresh_folder_or_resumes_an_unfinished_one_with_the_same_settings(here):
    first = evaluate.parse_args([])
    assert first.out == "evals/base-ours"
    (here / "evals" / "base-ours" / "results.json").write_text("{}")  # finished
    second = evaluate.parse_args([])
    assert Path(second.out).parent == Path("evals") and Path(second.out).name.startswith("base-ours-2")  # base-ours-<time stamp>
    stamp = Path(second.out).name.removeprefix("base-ours-")
    assert len(stamp) == len("20261126-070000")
    third = evaluate.parse_args([])
    assert third.out == f"{second.out}-2"  # the same second: a count after the stamp
    Journal(Path(third.out) / evaluate.JOURNAL, third.settings).add("cross-entropy", {"mean": 1.0})  # killed midway
    assert evaluate.parse_args([]).out == third.out  # same settings: resumed there
    assert evaluate.parse_args(["--k", "7"]).out not in (third.out, second.out, first.out)  # other settings: a new folder


def test_an_empty_default_folder_left_by_a_failed_start_is_used(here):
    (here / "evals" / "base-ours").mkdir(parents=True)
    assert evaluate.parse_args([]).out == "evals/base-ours"
    (here / "evals" / "base-ours" / "x").write_text("not empty")
    assert evaluate.parse_args([]).out != "evals/base-ours"


def test_a_results_folder_that_cannot_be_made_is_one_sentence(here):
    (here / "evals").write_text("a file where the folder should go")
    with pytest.raises(UserError) as e:
        evaluate.parse_args([])
    assert str(e.value) == "cannot create the results folder evals/base-ours (Not a directory); give --out."


# ---------------------------------------------------------------- decode batches and their records

def test_decode_batches_decodes_consecutive_rows_and_takes_journaled_batches_from_the_journal(tmp_path):
    seen = []

    def decode(rows):
        seen.append(list(rows))
        return {"rows": list(rows)}
    assert evaluate.decode_batches(7, 3, decode) == [{"rows": [0, 1, 2]}, {"rows": [3, 4, 5]}, {"rows": [6]}]
    journal = Journal(tmp_path / "journal.jsonl", {"s": 1})
    journal.add("forecast rows 3-5", {"rows": "from the journal"})
    seen.clear()
    records = evaluate.decode_batches(7, 3, decode, journal)
    assert records == [{"rows": [0, 1, 2]}, {"rows": "from the journal"}, {"rows": [6]}] and seen == [[0, 1, 2], [6]]
    assert set(journal.done) == {"forecast rows 0-2", "forecast rows 3-5", "forecast rows 6-6"}
    again = Journal(tmp_path / "journal.jsonl", {"s": 1})  # a rerun reads every piece back
    seen.clear()
    assert evaluate.decode_batches(7, 3, decode, again) == records and seen == []


def test_gathered_stacks_the_batches_values_and_adds_their_counts():
    records = [{"values": np.full((2, 1, 3, 2), 1.0).tolist(), "tokens": 10, "flops": 1.5, "repaired": 1, "repairs": {"empty": 1}},
               {"values": np.full((1, 1, 3, 2), 2.0).tolist(), "tokens": 4, "flops": 2.25, "repaired": 2,
                "repairs": {"empty": 2, "stray": 5}}]
    values, tokens, spent, repaired, repairs = evaluate.gathered(records)
    assert values.dtype == np.float64 and values.shape == (3, 1, 3, 2) and values[:2].max() == 1 and values[2].min() == 2
    assert (tokens, spent, repaired, repairs) == (14, 3.75, 3, {"empty": 3, "stray": 5})


def test_the_token_budget_and_the_positions_it_needs():
    tasks = [SimpleNamespace(prompt_ids=np.zeros(30), context=np.zeros((5, 2))), SimpleNamespace(prompt_ids=np.zeros(44),
                                                                                                  context=np.zeros((4, 2)))]
    assert evaluate.token_budget(tasks, 3) == 39  # the longest step, 11 tokens (44 / 4), plus 2 of slack, times 3
    model = SimpleNamespace(config=SimpleNamespace(max_seq_len=100))
    evaluate.check_positions(model, 61, 39)  # exactly the 100 positions
    with pytest.raises(UserError) as e:
        evaluate.check_positions(model, 62, 39)
    assert str(e.value) == ("prompts of 62 tokens plus 39 new tokens exceed the model's 100 positions; use a model with more "
                            "positions (under our protocol: or lower --k or --h).")


def test_a_tokenizer_without_one_token_per_character_is_refused():
    class Merging:  # raises as qwen_min.Tokenizer.character_ids does
        def character_ids(self, chars):
            raise UserError("This tokenizer does not give the character(s) '.,' one token each.")
    with pytest.raises(UserError) as e:
        evaluate.alphabet_ids(Merging())
    assert str(e.value) == "this tokenizer does not give one token per digit and separator; pass --unrestricted."
    assert evaluate.draft_of(SimpleNamespace(no_draft=False, device="cpu"), Merging()) is None  # decode without guesses

    class One:
        def character_ids(self, chars):
            return [ord(c) for c in chars]
    assert evaluate.alphabet_ids(One()) == [ord(c) for c in "0123456789.,;"]


# ---------------------------------------------------------------- results.json's values and the screen report

def test_to_json_makes_numpy_plain_and_non_finite_null():
    x = {"a": np.array([1.5, np.nan]), "b": (np.float32(2.5), np.int64(3), float("inf")), "c": [np.float64(-np.inf), "s", None, 4],
         "d": {"e": np.array([[1, 2]], dtype=np.int32)}, "f": True}
    out = evaluate.to_json(x)
    assert out == {"a": [1.5, None], "b": [2.5, 3, None], "c": [None, "s", None, 4], "d": {"e": [[1, 2]]}, "f": True}
    assert type(out["b"][1]) is int and type(out["b"][0]) is float and type(out["d"]["e"][0][0]) is int
    assert json.dumps(out)  # valid JSON: no NaN


@pytest.mark.parametrize("x, digits, text", [(None, 4, "-"), (float("nan"), 4, "-"), (float("inf"), 4, "-"), (1.234567, 4, "1.235"),
                                             (1234567.0, 4, "1.235e+06"), (0.5, 4, "0.5"), (2, 4, "2"), (1.234567, 2, "1.2")])
def test_fmt(x, digits, text):
    assert evaluate.fmt(x, digits) == text


def overall(**values):
    return {key: 1.0 for _, key in evaluate.OVERALL_ROWS} | values


def per_step(h, mae, se=0.25):
    s = {"mean": [mae] * h, "se": [se] * h}
    return {"mae": {"prey": s, "predator": s}, "mape": {"prey": s, "predator": s}}


def result(label, mae, r2, h=50, ce=2.0, crps=None, **config):
    model = {"overall": overall(mae=mae, r2=r2), "per_step": per_step(h, mae)}
    if crps is not None:
        model["probabilistic"] = {"crps": crps, "coverage_50": 0.5, "coverage_90": 0.875}
    c = {"label": label, "protocol": "ours", "k": 50, "h": h, "scaling": "global", "data": None, "seed": 0, "n_series": 1000,
         "decimals": 2} | config
    return {"config": c, "cross_entropy": {"mean": ce} if ce is not None else None, "results": {"model": model},
            "series": {"index": [1, 2]}}


def write(tmp_path, name, res):
    (tmp_path / name).write_text(json.dumps(res))
    return tmp_path / name


def test_compare_puts_each_metric_side_by_side_with_its_change(tmp_path):
    a = write(tmp_path, "a.json", result("base", 2.0, 0.5, ce=2.0, crps=0.4))
    b = write(tmp_path, "b.json", result("tuned", 0.5, 0.75, ce=1.0, crps=0.1))
    c = write(tmp_path, "c.json", result("worse", 3.0, -0.5, ce=None))
    lines = evaluate.compare([a, b, c]).splitlines()
    assert lines[:2] == ["| metric | base | tuned | vs base | worse | vs base |", "|---|---|---|---|---|---|"]
    assert lines[2] == "| cross-entropy | 2 | 1 | +50.0% | - | - |"
    assert "| MAE | 2 | 0.5 | +75.0% | 3 | -50.0% |" in lines and "| R2 | 0.5 | 0.75 | +50.0% | -0.5 | -200.0% |" in lines
    assert "| MSE | 1 | 1 | +0.0% | 1 | +0.0% |" in lines
    assert "| CRPS | 0.4 | 0.1 | +75.0% | - | - |" in lines and not any("coverage" in line for line in lines)
    steps = [line.split(" |")[0] for line in lines if line.startswith("| step ")]
    assert steps == [f"| step {s} {sp} MAE" for s in (1, 5, 10, 20, 30, 40, 49, 50) for sp in ("prey", "predator")]
    assert lines[-1].startswith("| step 50 predator MAE | 2 | 0.5 | +75.0% | 3 | -50.0% |")


def test_compare_reads_each_step_at_its_own_index_and_a_missing_first_value_as_no_change(tmp_path):
    a, b = result("base", 1.0, 0.5, h=5, ce=None), result("tuned", 1.0, 0.5, h=5, ce=1.5)
    for r, scale in ((a, 1.0), (b, 0.5)):  # step s's MAE: s / 10, times 1 or 0.5
        r["results"]["model"]["per_step"]["mae"] = {sp: {"mean": [scale * s / 10 for s in range(1, 6)], "se": [0.0] * 5}
                                                    for sp in ("prey", "predator")}
    lines = evaluate.compare([write(tmp_path, "a.json", a), write(tmp_path, "b.json", b)]).splitlines()
    assert "| cross-entropy | - | 1.5 | - |" in lines
    assert [line for line in lines if line.startswith("| step ")] == [
        "| step 1 prey MAE | 0.1 | 0.05 | +50.0% |", "| step 1 predator MAE | 0.1 | 0.05 | +50.0% |",
        "| step 5 prey MAE | 0.5 | 0.25 | +50.0% |", "| step 5 predator MAE | 0.5 | 0.25 | +50.0% |"]


def test_compare_of_a_zero_first_value_shows_no_change_and_warns_on_unlike_protocols(tmp_path):
    a = write(tmp_path, "a.json", result("base", 0.0, 0.0, h=3))
    b = write(tmp_path, "b.json", result("other", 1.0, 0.5, h=7, seed=1))
    text = evaluate.compare([a, b])
    assert "| MAE | 0 | 1 | - |" in text and "| R2 | 0 | 0.5 | - |" in text
    assert [line.split(" |")[0] for line in text.splitlines() if line.startswith("| step ")] == [
        f"| step {s} {sp} MAE" for s in (1, 3) for sp in ("prey", "predator")]  # up to the shorter horizon
    assert text.endswith("\nwarning: the files differ in protocol, k, h, data, split, test series or scaling; the numbers are not "
                         "like for like.")
    for key, value in [("protocol", "report-b"), ("k", 49), ("h", 4), ("scaling", "per-series"), ("data", "x.h5"), ("seed", 1),
                       ("n_series", 5), ("decimals", 3)]:
        c = write(tmp_path, "c.json", result("c", 1.0, 0.5, h=4) | {"config": result("c", 1.0, 0.5, h=3)["config"] | {key: value}})
        assert "not like for like" in evaluate.compare([write(tmp_path, "d.json", result("d", 1.0, 0.5, h=3)), c]), key
    other_series = result("e", 1.0, 0.5, h=3) | {"series": {"index": [2, 1]}}
    assert "not like for like" in evaluate.compare([write(tmp_path, "d.json", result("d", 1.0, 0.5, h=3)),
                                                    write(tmp_path, "e.json", other_series)])
    assert "not like for like" not in evaluate.compare([write(tmp_path, "d.json", result("d", 1.0, 0.5, h=3)),
                                                        write(tmp_path, "f.json", result("f", 2.0, 0.5, h=3))])


@pytest.mark.parametrize("change", [
    lambda r: r["config"].update(label=3), lambda r: r["config"].update(h="50"), lambda r: r["config"].update(h=0),
    lambda r: r["results"]["model"].update(overall=[1]), lambda r: r["results"]["model"]["per_step"]["mae"]["predator"].update(mean=[1]),
    lambda r: r.update(cross_entropy=[2.0]), lambda r: r["results"]["model"].update(probabilistic=1.0),
    lambda r: r["results"].pop("model"), lambda r: r.pop("config"), lambda r: r["config"].pop("label"),
    lambda r: r["results"]["model"]["per_step"]["mae"].pop("prey"),
])
def test_read_results_refuses_what_compare_cannot_read_in_one_sentence(tmp_path, change):
    res = result("x", 1.0, 0.5)
    change(res)
    path = write(tmp_path, "r.json", res)
    with pytest.raises(UserError) as e:
        evaluate.read_results(path)
    assert str(e.value) == (f"--compare {path} is not a results.json written by evaluate.py (unreadable, or missing its config, "
                            "label or model results); pass the results.json of an evaluation.")


def test_read_results_reads_an_evaluations_file_and_refuses_unreadable_ones(tmp_path):
    res = result("x", 1.0, 0.5, ce=None)
    assert evaluate.read_results(write(tmp_path, "r.json", res)) == res
    for content in (b"\xff\xfe", b"{", b"[]", b"null"):
        (tmp_path / "bad.json").write_bytes(content)
        with pytest.raises(UserError, match="is not a results.json written by evaluate.py"):
            evaluate.read_results(tmp_path / "bad.json")
    with pytest.raises(UserError, match="is not a results.json written by evaluate.py"):
        evaluate.read_results(tmp_path / "missing.json")


def test_config_of_is_every_flag_and_what_the_run_adds(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    args = SimpleNamespace(k=5, protocol="report-a", compare=None, settings={"x": 1}, label="m")
    assert evaluate.config_of(args, 7) == {"k": 5, "protocol": "report-a", "label": "m", "n_test": 7, "units": "scaled",
                                           "torch_threads": 3}
    assert evaluate.config_of(SimpleNamespace(protocol="ours"), 2)["units"] == "original"


def test_seen_in_training_counts_scored_series_the_run_trained_or_validated_on():
    from data.recipe import Recipe

    split = Recipe(split="ours", seed=0).split_of(40)
    test = np.concatenate([split.train[:3], split.val[:2], split.test[:4]])
    args = SimpleNamespace(trained_on=("ours", 0), no_adapter=False)
    assert evaluate.seen_in_training(args, 40, test) == 5
    assert evaluate.seen_in_training(SimpleNamespace(trained_on=("ours", 0), no_adapter=True), 40, test) == 0  # the base model
    assert evaluate.seen_in_training(SimpleNamespace(no_adapter=False), 40, test) == 0  # no run


def step_table(h, base):
    """Per-step means base + step / 100 (se step / 1000, the last one None) for both metrics and species."""
    s = {"mean": [base + (j + 1) / 100 for j in range(h)], "se": [(j + 1) / 1000 for j in range(h - 1)] + [None]}
    return {m: {sp: s for sp in ("prey", "predator")} for m in ("mae", "mape")}


def screen_result(protocol="ours", samples=3, h=3, ce=True):
    model_overall = dict(mse=0.5, rmse=0.70711, mae=0.25, r2=0.9, nrmse=12.5, mape=3.25, wape=4.5)
    model = {"overall": model_overall, "per_step": step_table(h, 0.1)}
    if samples > 1:
        model["probabilistic"] = {"crps": 0.125, "coverage_50": 0.5, "coverage_90": 0.875}
    persistence = {"overall": {k: 2 * v for k, v in model_overall.items()}, "per_step": step_table(h, 0.5)}
    return {"config": {"label": "tuned", "protocol": protocol, "n_test": 6, "k": 5, "h": h, "samples": samples},
            "cross_entropy": {"convention": "per token, padding masked", "mean": 1.234567, "windows": 7} if ce else None,
            "results": {"model": model, "persistence": persistence},
            "repairs": {"forecasts_repaired": 2, "forecasts": 18, "by_kind": {"empty": 2}},
            "timing": {"total_s": 12.34, "cross_entropy_s": 1.06, "forecast_s": 10.0, "baselines_s": 0.54},
            "tokens_generated": 1234, "flops": {"cross_entropy": 1.5e9, "generate": 2.25e10}}


def test_markdown_of_our_protocol_line_by_line():
    assert evaluate.markdown(screen_result()).splitlines() == [
        "## tuned: protocol ours, 6 test series, 5 -> 3 steps, 3 samples, original units",
        "",
        "cross-entropy (test, per token, padding masked): 1.2346 over 7 windows",
        "",
        "| metric | model | persistence |",
        "|---|---|---|",
        "| MSE | 0.5 | 1 |",
        "| RMSE | 0.7071 | 1.414 |",
        "| MAE | 0.25 | 0.5 |",
        "| R2 | 0.9 | 1.8 |",
        "| NRMSE % | 12.5 | 25 |",
        "| MAPE % | 3.25 | 6.5 |",
        "| WAPE % | 4.5 | 9 |",
        "| CRPS | 0.125 | - |",
        "| coverage 50% | 0.5 | - |",
        "| coverage 90% | 0.875 | - |",
        "",
        "repaired forecasts: 2 of 18 {'empty': 2}",
        "",
        "| step | prey MAE | predator MAE | prey MAPE % | predator MAPE % |",
        "|---|---|---|---|---|",
        "| 1 | 0.11 ± 0.001 | 0.11 ± 0.001 | 0.11 ± 0.001 | 0.11 ± 0.001 |",
        "| 3 | 0.13 ± - | 0.13 ± - | 0.13 ± - | 0.13 ± - |",
        "",
        "time: 12.3 s (cross-entropy 1.1 s, forecasts 10.0 s for 1234 tokens, baselines 0.5 s)",
        "FLOPs (flops.py, coursework convention): cross-entropy 1.5e+09, forecasts 2.25e+10",
    ]
    assert evaluate.markdown(screen_result(samples=2)).splitlines()[0].endswith("-> 3 steps, 2 samples, original units")


def test_markdown_greedy_without_cross_entropy_flops_or_repairs_and_every_table_step():
    res = screen_result(samples=1, h=50, ce=False) | {"flops": None, "truth_check": {"summary": "series: the protocol's test series"}}
    res["repairs"] = {"forecasts_repaired": 0, "forecasts": 6, "by_kind": {}}
    del res["timing"]["cross_entropy_s"], res["timing"]["forecast_s"]  # --score: neither ran
    lines = evaluate.markdown(res).splitlines()
    assert lines[0] == "## tuned: protocol ours, 6 test series, 5 -> 50 steps, greedy, original units"
    assert lines[1:4] == ["", "| metric | model | persistence |", "|---|---|---|"]
    assert not any(line.startswith(("| CRPS", "| coverage", "cross-entropy", "FLOPs")) for line in lines)
    assert "repaired forecasts: 0 of 6 " in lines
    assert [line.split(" |")[0] for line in lines if line[:3] in ("| 1", "| 2", "| 3", "| 4", "| 5")] == [
        "| 1", "| 5", "| 10", "| 20", "| 30", "| 40", "| 49", "| 50"]
    assert "| 49 | 0.59 ± 0.049 | 0.59 ± 0.049 | 0.59 ± 0.049 | 0.59 ± 0.049 |" in lines
    assert lines[-3:] == ["series: the protocol's test series", "",
                          "time: 12.3 s (cross-entropy 0.0 s, forecasts 0.0 s for 1234 tokens, baselines 0.5 s)"]


def test_markdown_of_report_b_leads_with_its_published_metrics():
    res = screen_result(protocol="report-b", samples=1, h=20, ce=False)
    res["results"]["model"]["published"] = {"overall": dict(mse=0.5, rmse=0.75, mae=0.25, r2=0.875, nrmse=12.5, mape=3.5,
                                                            avg_uncertainty=0.0625)}
    res["results"]["persistence"]["published"] = {"overall": dict(mse=1.5, rmse=1.25, mae=1.0, r2=0.5, nrmse=25.0, mape=7.0)}
    lines = evaluate.markdown(res).splitlines()
    assert lines[:14] == [
        "## tuned: protocol report-b, 6 test series, 5 -> 20 steps, greedy, original units", "",
        "report B's metrics (scikit-learn, original units):", "",
        "| metric | model | persistence |", "|---|---|---|",
        "| MSE | 0.5 | 1.5 |", "| RMSE | 0.75 | 1.25 |", "| MAE | 0.25 | 1 |", "| R2 | 0.875 | 0.5 |", "| NRMSE % | 12.5 | 25 |",
        "| MAPE % | 3.5 | 7 |", "| Avg. Unc. | 0.0625 | - |", ""]
    del res["results"]["model"]["published"]["overall"]["avg_uncertainty"]
    assert not any(line.startswith("| Avg. Unc.") for line in evaluate.markdown(res).splitlines())  # no samples: no row


def test_markdown_of_report_a_prints_its_table_by_0_based_horizon_index():
    res = screen_result(protocol="report-a", samples=1, h=50)
    published = {m: {sp: {"mean": [j / 1000 for j in range(50)], "se": [j / 10000 for j in range(49)] + [None]}
                     for sp in ("prey", "predator")} for m in ("mae", "mape")}
    res["results"]["model"]["published"] = {"per_step": published}
    lines = evaluate.markdown(res).splitlines()
    start = lines.index("report A's table (scaled units; step = horizon index, 0-based; mean ± standard error):")
    assert lines[start + 1:start + 12] == [
        "", "| step | prey MAE | predator MAE | prey MAPE % | predator MAPE % |", "|---|---|---|---|---|",
        "| 1 | 0.001 ± 0.000 | 0.001 ± 0.000 | 0.001 ± 0.000 | 0.001 ± 0.000 |",
        "| 5 | 0.005 ± 0.001 | 0.005 ± 0.001 | 0.005 ± 0.001 | 0.005 ± 0.001 |",
        "| 10 | 0.010 ± 0.001 | 0.010 ± 0.001 | 0.010 ± 0.001 | 0.010 ± 0.001 |",
        "| 20 | 0.020 ± 0.002 | 0.020 ± 0.002 | 0.020 ± 0.002 | 0.020 ± 0.002 |",
        "| 30 | 0.030 ± 0.003 | 0.030 ± 0.003 | 0.030 ± 0.003 | 0.030 ± 0.003 |",
        "| 40 | 0.040 ± 0.004 | 0.040 ± 0.004 | 0.040 ± 0.004 | 0.040 ± 0.004 |",
        "| 49 | 0.049 ± - | 0.049 ± - | 0.049 ± - | 0.049 ± - |", ""]
    assert lines[0].endswith(", scaled units") and "| 50 |" not in " ".join(lines)  # no per-step table of ours after it


# ---------------------------------------------------------------- the cross-entropy, by hand

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import random_model, tiny_config, write_checkpoint
    from qwen_min import Tokenizer

    ckpt = write_checkpoint(random_model(tiny_config()), tmp_path_factory.mktemp("tiny") / "ckpt")
    return random_model(tiny_config()), Tokenizer.from_pretrained(ckpt)


def scored_logits(model, ids):
    """(logits of positions 0..T-2, their next tokens) of one row: what a causal LM is scored on."""
    with torch.no_grad():
        return model(ids[None, :-1])[0], ids[1:]


def test_cross_entropy_is_per_scored_token_over_all_windows_with_padding_masked(tiny):
    import torch.nn.functional as F

    from data import windows

    model, tok = tiny
    scaled = np.array([[[1.25, 0.5]] * 9, [[3.0, 2.5]] * 9, [[0.75, 0.25]] * 9])  # (3, 9, 2)
    args = SimpleNamespace(context=30, decimals=2, batch=2, device="cpu")
    w = windows.dataset_windows(scaled, tok, 30, 30, 2, tok.pad_id)
    total, count = 0.0, 0
    for ids, labels in zip(w.input_ids, w.labels):  # window by window, padding cut by hand
        n = int((ids != tok.pad_id).sum()) if tok.pad_id not in ids[:1] else len(ids)
        logits, _ = scored_logits(model, torch.from_numpy(ids[:n]))
        target = torch.from_numpy(labels[1:n])
        keep = target != -100
        total += F.cross_entropy(logits[keep], target[keep], reduction="sum").item()
        count += int(keep.sum())
    got = evaluate.cross_entropy(model, tok, scaled, args)
    assert got["windows"] == len(w.input_ids) >= 3 and got["tokens"] == count
    assert got["mean"] == pytest.approx(total / count, rel=1e-5)
    assert got["convention"] == "per token, padding masked"
    import flops

    setup = flops.Setup(model.config)
    shapes = [windows.batch(w, slice(s, s + 2))[0].shape for s in range(0, len(w.input_ids), 2)]
    assert got["flops"] == sum(flops.forward_with_loss(setup, B, T - 1).coursework for B, T in shapes)


def test_report_a_cross_entropy_scores_padding_and_averages_window_means(tiny):
    import torch.nn.functional as F

    import flops

    model, tok = tiny
    texts = ["1.25,0.50;3.00,2.50;" * 2, "0.75,0.25;"]  # 40 and 10 characters, one token each
    args = SimpleNamespace(context=16, device="cpu")
    rows = []  # 16-token windows every 16 tokens, right-padded; labels = the ids, padding included
    for t in texts:
        ids = tok.encode(t)
        for start in range(0, len(ids), 16):
            piece = ids[start:start + 16]
            rows.append(piece + [tok.pad_id] * (16 - len(piece)))
    means = []
    for r in rows:
        logits, target = scored_logits(model, torch.tensor(r))
        means.append(F.cross_entropy(logits, target).item())
    got = evaluate.cross_entropy_report_a(model, tok, texts, args)
    assert got["windows"] == len(rows) == 4 and got["tokens"] == 4 * 15
    assert got["mean"] == pytest.approx(sum(means) / len(means), rel=1e-5)
    assert got["flops"] == 4 * flops.forward_with_loss(flops.Setup(model.config), 1, 15).coursework
    assert got["convention"] == "report A: padding counted, mean of per-window means"


# ---------------------------------------------------------------- series, --score, results, the run's scalars

def write_lv(path, n, steps):
    """n series of `steps` steps with known values: series r, step j = (r + 1 + j / 8, 2 + j / 4)."""
    from data import lotka_volterra

    j = np.arange(steps)
    traj = np.stack([np.stack([r + 1 + j / 8, 2 + j / 4], axis=1) for r in range(n)])
    lotka_volterra.save(path, traj, np.linspace(0.0, 1.0, steps))
    return traj


def test_load_series_refuses_more_steps_than_a_trajectory_has_and_an_empty_test_split(here):
    write_lv(here / "lv.h5", 20, 12)
    args = evaluate.parse_args(["--data", "lv.h5", "--k", "5", "--h", "7", "--no-ce"])
    traj, times, split, test = evaluate.load_series(args)
    assert traj.shape == (20, 12, 2) and traj.dtype == np.float64 and test.tolist() == split.test.tolist() and len(test) == 3
    with pytest.raises(UserError) as e:
        evaluate.load_series(evaluate.parse_args(["--data", "lv.h5", "--k", "5", "--h", "8"]))
    assert str(e.value) == "--k 5 + --h 8 exceeds the 12 steps of each trajectory; lower --k or --h."
    assert evaluate.load_series(evaluate.parse_args(["--data", "lv.h5", "--k", "5", "--h", "7", "--limit", "2"]))[3].tolist() == \
        test[:2].tolist()
    with pytest.raises(UserError) as e:
        evaluate.load_series(evaluate.parse_args(["--n-series", "1", "--k", "5", "--h", "5"]))
    assert str(e.value) == "the test split is empty; use more trajectories (--n-series or --data)."


def test_report_a_needs_one_step_more_than_k_plus_h(here):
    write_lv(here / "short.h5", 20, 99)
    with pytest.raises(UserError) as e:
        evaluate.load_series(evaluate.parse_args(["--data", "short.h5", "--preset", "report-a"]))
    assert str(e.value) == "--k 49 + --h 50 exceeds the 99 steps of each trajectory; lower --k or --h."
    write_lv(here / "long.h5", 20, 100)
    evaluate.load_series(evaluate.parse_args(["--data", "long.h5", "--preset", "report-a"]))  # its truth drops the last step


def test_series_of_our_protocol_are_truth_and_context_in_original_units(here):
    traj = write_lv(here / "lv.h5", 20, 12)
    args = evaluate.parse_args(["--data", "lv.h5", "--k", "5", "--h", "4"])
    s = evaluate.Series(args, traj, [3, 11])
    assert s.rows.dtype == np.int64 and s.rows.tolist() == [3, 11] and s.unit == 1.0
    np.testing.assert_array_equal(s.truth, traj[[3, 11], 5:9])
    np.testing.assert_array_equal(s.context, traj[[3, 11], :5])
    np.testing.assert_array_equal(s.context_original, traj[[3, 11], :5])


def test_series_of_report_a_are_in_its_scaled_units(here):
    from data import protocols

    traj = write_lv(here / "lv.h5", 20, 100)
    args = evaluate.parse_args(["--data", "lv.h5", "--preset", "report-a"])
    s = evaluate.Series(args, traj, [2])
    alpha = np.percentile(traj, 90) / 10  # P90 of the whole file -> 10
    assert s.unit == pytest.approx(1 / alpha, rel=1e-12)
    np.testing.assert_allclose(s.context, traj[[2], :49] / alpha, rtol=1e-12)
    np.testing.assert_allclose(s.truth, np.round(traj[[2], 49:99] / alpha, 2), atol=1e-9)  # its text's two decimals
    assert s.texts == [protocols.report_a_text(protocols.report_a_scaled(traj)[0][2])]


def score_file(path, forecast, truth=None, series=None):
    arrays = {"forecast": forecast} | ({"truth": truth} if truth is not None else {}) | ({"series": series} if series is not None else {})
    np.savez(path, **arrays)
    return path


def test_score_scores_a_files_forecasts_against_the_protocols_test_series(here):
    traj = write_lv(here / "lv.h5", 20, 12)
    base = ["--data", "lv.h5", "--k", "5", "--h", "4", "--no-baselines", "--plots", "0"]
    test = evaluate.load_series(evaluate.parse_args(base + ["--out", "probe"]))[3]
    truth = traj[test, 5:9]
    res = evaluate.main(base + ["--score", str(score_file(here / "f.npz", truth + 0.5)), "--out", "a"])
    assert res["results"]["model"]["overall"]["mae"] == pytest.approx(0.5, rel=1e-12)
    assert res["truth_check"] == {"same_series": True, "in_test_split": 3,
                                  "summary": "series: the protocol's test series (3 of 3 in it) of lv.h5"}
    assert res["repairs"] == {"forecasts_repaired": 0, "forecasts": 3, "by_kind": {}} and res["tokens_generated"] == 0
    assert res["cross_entropy"] is None and res["flops"] is None and res["config"]["label"] == "f"
    assert json.loads((here / "a" / "results.json").read_text())["truth_check"]["same_series"] is True
    # other rows, named, with a truth that is not the protocol's
    rows = np.array([r for r in range(20) if r not in test][:2] + [int(test[0])])
    res = evaluate.main(base + ["--score", str(score_file(here / "g.npz", traj[rows, 5:9], traj[rows, 5:9] + 0.25, rows)),
                                "--out", "b"])
    check = res["truth_check"]
    assert (check["same_series"], check["in_test_split"], check["truth_given"], check["truth_matches_protocol"]) == (False, 1, True, False)
    assert check["truth_max_abs_difference"] == pytest.approx(0.25, rel=1e-12)
    assert check["summary"] == ("series: NOT the protocol's test series (1 of 3 in it) of lv.h5; scored against the file's truth, "
                                "which does NOT match the protocol's truth for those rows (largest difference 0.25)")
    assert res["results"]["model"]["overall"]["mae"] == pytest.approx(0.25, rel=1e-12)  # scored against the file's truth
    res = evaluate.main(base + ["--score", str(score_file(here / "h.npz", truth, truth + 1e-9)), "--out", "c"])
    assert res["truth_check"]["truth_matches_protocol"] is True and "which matches the protocol's truth" in res["truth_check"]["summary"]
    with pytest.raises(UserError) as e:
        evaluate.main(base + ["--score", str(score_file(here / "i.npz", truth[:2])), "--out", "d"])
    assert str(e.value) == (f"--score {here / 'i.npz'} holds 2 forecasts but protocol ours scores 3 test series; add `series` (the "
                            "data rows forecast) or forecast exactly those series, in order.")


def test_score_without_data_names_the_simulated_trajectories(here):
    args = ["--n-series", "20", "--k", "5", "--h", "4", "--no-baselines", "--plots", "0"]
    traj, _, _, test = evaluate.load_series(evaluate.parse_args(args + ["--out", "probe"]))
    res = evaluate.main(args + ["--score", str(score_file(here / "f.npz", traj[test, 5:9])), "--out", "a"])
    assert res["truth_check"]["summary"] == "series: the protocol's test series (3 of 3 in it) of 20 simulated trajectories (no --data)"


def test_main_says_when_out_cannot_be_made(here):
    (here / "f").write_text("x")
    with pytest.raises(UserError) as e:
        evaluate.main(["--n-series", "20", "--out", "f/sub"])
    assert str(e.value) == "cannot create --out f/sub (Not a directory); choose another folder."


def test_results_score_the_kept_series_and_name_the_lost_ones():
    truth = np.arange(3 * 2 * 2, dtype=np.float64).reshape(3, 2, 2) + 1
    series = SimpleNamespace(rows=np.array([7, 8, 9]), truth=truth, context=np.zeros((3, 4, 2)))
    args = SimpleNamespace(protocol="ours")
    model = truth + np.array([0.5, 0.0])
    samples = np.stack([model, model + 1, model - 1], axis=1)  # (3, S=3, 2, 2)
    kept = np.array([True, False, True])
    scores, out = evaluate.results(args, series, {"model": model, "persistence": truth}, samples, kept)
    assert out["index"].tolist() == [7, 9] and out["lost"].tolist() == [8]
    np.testing.assert_array_equal(out["target"], truth[[0, 2]])
    assert scores["model"]["overall"]["mae"] == pytest.approx(0.25) and scores["persistence"]["overall"]["mae"] == 0
    assert "probabilistic" in scores["model"] and "probabilistic" not in scores["persistence"]  # samples are the model's only
    q = out["quantiles"]
    assert q["levels"] == (0.05, 0.25, 0.5, 0.75, 0.95) and q["values"].shape == (5, 2, 2, 2)
    np.testing.assert_allclose(q["values"][2], model[kept])  # the median of {m, m + 1, m - 1}
    np.testing.assert_allclose(q["values"][0], model[kept] - 0.9)  # 5%: 0.1 of the way from m - 1 to m
    _, greedy = evaluate.results(args, series, {"model": model}, samples[:, :1])
    assert greedy["quantiles"] is None and greedy["lost"] == [] and greedy["index"].tolist() == [7, 8, 9]


def test_baselines_are_in_the_protocols_units_or_left_out():
    from data import baselines

    ctx = np.array([[[1.0, 2.0], [1.5, 2.5], [2.0, 2.25]]])
    series = SimpleNamespace(context_original=ctx, unit=0.5)
    args = SimpleNamespace(no_baselines=False, h=2, lv_iterations=3)
    times = np.linspace(0, 1, 5)
    got = evaluate.baseline_forecasts(args, series, times)
    np.testing.assert_array_equal(got["persistence"], np.full((1, 2, 2), [1.0, 1.125]))  # the last context step, times the unit
    np.testing.assert_allclose(got["lotka_volterra"], baselines.lotka_volterra(ctx, times, 2, 3) * 0.5, rtol=1e-12)
    assert evaluate.baseline_forecasts(SimpleNamespace(no_baselines=True), series, times) == {}


class Recorder:
    """Stands in for qwen_min.scalars.Scalars: records (tag, value, step) and where it writes."""
    made = []

    def __init__(self, where):
        self.where, self.rows, self.closed = where, [], False
        Recorder.made.append(self)

    def add(self, tag, value, step):
        self.rows.append((tag, value, step))

    def close(self):
        self.closed = True


def test_log_scalars_tags_each_metric_at_the_runs_last_step(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "Scalars", Recorder)
    Recorder.made.clear()
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"steps": 12}))
    res = {"results": {"model": {"overall": {"mae": 0.5, "r2": None, "n": 3}}, "persistence": {"overall": {"mae": 1.5}}},
           "cross_entropy": {"mean": 2.25}}
    args = SimpleNamespace(run=str(run), out=str(tmp_path / "o"), protocol="ours", adapter=str(run / "best"))
    evaluate.log_scalars(args, res)
    (rec,) = Recorder.made
    assert rec.where == run / "tensorboard" and rec.closed
    assert rec.rows == [("eval/ours-best/model/mae", 0.5, 12), ("eval/ours-best/model/n", 3, 12),
                        ("eval/ours-best/persistence/mae", 1.5, 12), ("eval/ours-best/cross_entropy", 2.25, 12)]
    (run / "summary.json").write_text("{not json")  # a run still training: step 0
    evaluate.log_scalars(SimpleNamespace(**vars(args) | {"adapter": None}), res | {"cross_entropy": None})
    assert Recorder.made[1].rows[0] == ("eval/ours-base/model/mae", 0.5, 0) and len(Recorder.made[1].rows) == 3
    evaluate.log_scalars(SimpleNamespace(run=None, out=str(tmp_path / "o"), protocol="report-b", adapter=None), res)
    assert Recorder.made[2].where == tmp_path / "o" / "tensorboard" and Recorder.made[2].rows[0][::2] == ("eval/report-b-base/model/mae", 0)


@pytest.mark.filterwarnings("ignore:No artists with labels")
def test_the_plots_show_context_truth_forecasts_bands_and_error_by_step(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, h = 3, 2
    context = [[[1.0, 2.0], [1.5, 2.5], [2.0, 3.0]], [[4.0, 5.0], [4.5, 5.5], [5.0, 6.0]], [[7.0, 8.0]] * 3]
    target = [[[2.5, 3.5], [3.0, 4.0]], [[5.5, 6.5], [6.0, 7.0]], [[7.0, 8.0]] * 2]
    model = [[[2.25, 3.25], [2.75, 3.75]], [[5.25, 6.25], [5.75, 6.75]], [[7.0, 8.0]] * 2]
    quantiles = (np.array(model)[None] + np.arange(-2, 3)[:, None, None, None] * 0.125).tolist()  # (5, N, h, 2)
    mae = {sp: {"mean": [0.25, 0.5], "se": [0.125, None]} for sp in ("prey", "predator")}
    res = {"config": {"k": k, "h": h, "protocol": "ours"},
           "series": {"index": [11, 22, 33], "context": context, "target": target, "quantiles": {"values": quantiles},
                      "forecasts": {"model": model, "persistence": [[c[-1]] * h for c in context]}},
           "results": {"model": {"per_step": {"mae": mae}}, "persistence": {"per_step": {"mae": mae}}}}
    figures, real_close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), real_close(fig)))
    evaluate.plot(res, tmp_path, 2)
    assert (tmp_path / "forecasts.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "error_vs_horizon.png").is_file()
    series, errors = figures
    axes = series.axes
    assert len(axes) == 4  # 2 series (of 3) x 2 species
    for i in range(2):
        for j, species in enumerate(("prey", "predator")):
            ax = axes[2 * i + j]
            assert ax.get_title() == f"series {(11, 22)[i]}, {species}"
            lines = [(line.get_label(), line.get_xydata().tolist()) for line in ax.get_lines()]
            c = np.array(context[i])[:, j]
            assert lines[0][1] == [[0, c[0]], [1, c[1]], [2, c[2]]]
            assert lines[1] == ("truth", [[3, target[i][0][j]], [4, target[i][1][j]]])
            assert lines[2] == ("model", [[3, model[i][0][j]], [4, model[i][1][j]]])
            assert lines[3] == ("persistence", [[3, c[2]], [4, c[2]]])
            bands = [b.get_label() for b in ax.collections]
            assert bands == ["5-95%", "25-75%"]
            outer = ax.collections[0].get_paths()[0].vertices[:, 1]  # the 5-95% band: from q5 up to q95
            assert outer.min() == pytest.approx(min(model[i][0][j], model[i][1][j]) - 0.25)
            assert outer.max() == pytest.approx(max(model[i][0][j], model[i][1][j]) + 0.25)
            inner = ax.collections[1].get_paths()[0].vertices[:, 1]
            assert inner.max() == pytest.approx(max(model[i][0][j], model[i][1][j]) + 0.125)
    assert axes[0].get_legend() is not None and all(ax.get_legend() is None for ax in axes[1:])
    prey, predator = errors.axes
    for ax, species in ((prey, "prey"), (predator, "predator")):
        assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == (species, "forecast step", "MAE (original units)")
        assert [(line.get_label(), line.get_xydata().tolist()) for line in ax.get_lines()] == [
            ("model", [[1, 0.25], [2, 0.5]]), ("persistence", [[1, 0.25], [2, 0.5]])]
        band = ax.collections[0].get_paths()[0].vertices[:, 1]
        assert band.min() == pytest.approx(0.125) and band.max() == pytest.approx(0.375)  # mean -/+ se; no se at step 2
    assert prey.get_legend() is not None and predator.get_legend() is None


def test_the_reports_decode_with_the_generation_config_and_its_eos_tokens(tiny, monkeypatch):
    from conftest import fake_generation

    model, tok = tiny
    calls = []

    def fake_generate(model, prompts, max_new, **kw):
        calls.append((len(prompts), max_new, kw))
        n = kw["num_samples"]
        return fake_generation([p for p in prompts for _ in range(n)], [[5, 6, 7][: 1 + i % 3] for i in range(len(prompts) * n)],
                               tok.pad_id, True)
    monkeypatch.setattr(evaluate, "generate", fake_generate)
    gc = evaluate.GenerationConfig(eos_token_id=(2, 0))
    prompts = [[3, 4], [5, 6, 7]]
    new, cost, produced = evaluate.generate_as_transformers(model, prompts, 9, gc, tok, n_samples=2, seed=5)
    assert new.shape == (2, 2, 3) and new[0, 1].tolist() == [5, 6, tok.pad_id] and produced == 1 + 2 + 3 + 1
    _, max_new, kw = calls[0]
    assert max_new == 9 and kw["do_sample"] is True and kw["generation_config"] is gc and kw["stop_token_ids"] == [2, 0]
    assert (kw["num_samples"], kw["seed"], kw["pad_token_id"], kw["details"]) == (2, 5, tok.pad_id, True)
    assert cost > 0
    evaluate.generate_as_transformers(model, prompts, 9, evaluate.GenerationConfig(), tok)
    assert calls[1][2]["do_sample"] is False and calls[1][2]["stop_token_ids"] == list(tok.stop_ids)  # no eos in the config


def test_report_b_seeds_each_decode_batch_by_its_first_row(tiny, monkeypatch, tmp_path):
    from conftest import fake_generation

    model, tok = tiny
    seeds = []

    def fake_generate(model, prompts, max_new, **kw):
        seeds.append((len(prompts), kw["seed"], max_new))
        text = tok.encode("1.0,2.0;" * 3)
        return fake_generation([p for p in prompts for _ in range(kw["num_samples"])], [text] * (len(prompts) * kw["num_samples"]),
                               tok.pad_id, True)
    monkeypatch.setattr(evaluate, "generate", fake_generate)
    args = SimpleNamespace(h=3, samples=2, sample_seed=10, batch=5, no_draft=False, device="cpu")
    contexts = np.full((5, 4, 2), 2.0)
    values, repairs, n_tokens, spent = evaluate.forecast_report_b(model, tok, contexts, args, evaluate.GenerationConfig())
    assert seeds == [(2, 10, 130), (2, 12, 130), (1, 14, 130)]  # 5 // 2 series a batch; (h + 10) x 10 new tokens, as report B
    assert values.shape == (5, 2, 3, 2) and repairs == {"forecasts_repaired": 0, "forecasts": 10, "by_kind": {}}
    assert n_tokens == 10 * len(tok.encode("1.0,2.0;" * 3)) and spent > 0
    short = []

    def one_pair(model, prompts, max_new, **kw):  # one step of three: two zero-padded steps per forecast
        short.append(kw["seed"])
        n = len(prompts) * kw["num_samples"]
        return fake_generation([p for p in prompts for _ in range(kw["num_samples"])], [tok.encode("1.0,2.0;")] * n, tok.pad_id, True)
    monkeypatch.setattr(evaluate, "generate", one_pair)
    from qwen_min.files import Journal

    journal = Journal(tmp_path / "journal.jsonl", {"s": 1})
    values, repairs, _, _ = evaluate.forecast_report_b(model, tok, contexts, args, evaluate.GenerationConfig(), journal)
    assert repairs == {"forecasts_repaired": 10, "forecasts": 10, "by_kind": {"zero_padded_steps": 20}}
    assert (values[:, :, 1:] == 0).all() and list(journal.done) == ["forecast rows 0-1", "forecast rows 2-3", "forecast rows 4-4"]


def write_flat(path, n, steps, top):
    """n series of `steps` steps, all 0 but step 6's prey, which is `top`: the largest truth value of ours at --k 5."""
    from data import lotka_volterra

    traj = np.zeros((n, steps, 2))
    traj[:, 6, 0] = top
    lotka_volterra.save(path, traj, np.linspace(0.0, 1.0, steps))
    return traj


@pytest.mark.parametrize("top, gap, matches", [
    (1.0, 1.5e-6, False),  # the tolerance is 1e-6 times the largest truth value, or 1e-6 below 1
    (1.0, 1e-6, True),
    (8.0, 8 * 1e-6, True),  # exactly at the tolerance: matches
    (8.0, 9 * 1e-6, False),
])
def test_score_calls_the_files_truth_the_protocols_within_a_millionth_of_its_largest_value(here, top, gap, matches):
    traj = write_flat(here / "lv.h5", 20, 12, top)
    base = ["--data", "lv.h5", "--k", "5", "--h", "4", "--no-baselines", "--plots", "0"]
    test = evaluate.load_series(evaluate.parse_args(base + ["--out", "probe"]))[3]
    truth = traj[test, 5:9]
    given = truth.copy()
    given[0, 0, 1] += gap  # a predator value of 0 in the protocol's truth
    res = evaluate.main(base + ["--score", str(score_file(here / "f.npz", truth, given)), "--out", "a"])
    assert res["truth_check"]["truth_matches_protocol"] is matches and res["truth_check"]["truth_max_abs_difference"] == gap


def test_score_refuses_series_outside_the_data_and_scores_the_baselines_too(here):
    traj = write_lv(here / "lv.h5", 20, 12)
    base = ["--data", "lv.h5", "--k", "5", "--h", "4", "--plots", "0", "--lv-iterations", "2"]
    with pytest.raises(UserError, match=r"`series` must name distinct rows in 0\.\.19 of the data file"):
        evaluate.main(base + ["--score", str(score_file(here / "f.npz", traj[:2, 5:9], series=np.array([3, 20]))), "--out", "a"])
    import time

    before = time.perf_counter()
    res = evaluate.main(base + ["--score", str(score_file(here / "g.npz", traj[[3, 4], 5:9], series=np.array([3, 4]))), "--out", "b"])
    took = time.perf_counter() - before
    assert res["config"]["n_test"] == 2 and res["series"]["index"] == [3, 4]
    assert 0 <= res["timing"]["baselines_s"] <= res["timing"]["total_s"] <= took  # durations of this call, not clock readings
    np.testing.assert_array_equal(res["series"]["forecasts"]["persistence"], np.repeat(traj[[3, 4], 4:5], 4, axis=1))
    assert res["results"]["persistence"]["overall"]["mae"] == pytest.approx(np.abs(traj[[3, 4], 5:9] - traj[[3, 4], 4:5]).mean())
    assert set(res["results"]) == {"model", "persistence", "lotka_volterra"}


@pytest.mark.filterwarnings("ignore:No artists with labels")
def test_the_plots_style_and_a_single_series(tmp_path, monkeypatch):
    """The look the figures were designed with (black context, dotted truth, two shaded bands, 11 inches wide),
    and one series (a grid of one row) plots as well as several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    res = {"config": {"k": 2, "h": 1, "protocol": "report-a"},
           "series": {"index": [5], "context": [[[1.0, 2.0], [1.5, 2.5]]], "target": [[[2.0, 3.0]]],
                      "quantiles": {"values": [[[[1.0, 2.0]]]] * 5}, "forecasts": {"model": [[[2.0, 3.0]]], "lv": [[[2.5, 3.5]]]}},
           "results": {"model": {"per_step": {"mae": {sp: {"mean": [0.5], "se": [None]} for sp in ("prey", "predator")}}}}}
    figures, real_close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), real_close(fig)))
    evaluate.plot(res, tmp_path, 4)
    series, errors = figures
    assert tuple(series.get_size_inches()) == pytest.approx((11, 2.4)) and len(series.axes) == 2  # one series: one row
    assert tuple(errors.get_size_inches()) == pytest.approx((11, 3.5))
    context, truth, model, lv = series.axes[0].get_lines()
    assert (to_rgba(context.get_color()), context.get_linewidth(), context.get_linestyle()) == (to_rgba("k"), 1, "-")
    assert (to_rgba(truth.get_color()), truth.get_linewidth(), truth.get_linestyle()) == (to_rgba("k"), 1, ":")
    assert (to_rgba(model.get_color()), model.get_linewidth(), model.get_linestyle()) == (to_rgba("C0"), 1.3, "-")
    assert (to_rgba(lv.get_color()), lv.get_linewidth(), lv.get_linestyle()) == (to_rgba("C1"), 0.9, "--")
    outer, inner = series.axes[0].collections
    assert outer.get_alpha() == 0.2 and inner.get_alpha() == 0.3
    assert tuple(outer.get_facecolor()[0][:3]) == tuple(to_rgba("C0")[:3]) == tuple(inner.get_facecolor()[0][:3])
    band = errors.axes[0].collections[0]
    assert band.get_alpha() == 0.2 and errors.axes[0].get_ylabel() == "MAE (scaled units)"
    assert series.axes[0].title.get_fontsize() == 9 and [t.get_fontsize() for t in series.axes[0].get_legend().get_texts()] == [7] * 5
    for name, size in (("forecasts.png", (1210, 264)), ("error_vs_horizon.png", (1210, 385))):  # inches x 110 dpi
        head = (tmp_path / name).read_bytes()[16:24]  # the PNG header's width and height
        assert (int.from_bytes(head[:4], "big"), int.from_bytes(head[4:], "big")) == size, name
