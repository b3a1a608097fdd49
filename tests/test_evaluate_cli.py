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
    class Merging:
        def character_ids(self, chars):
            raise ValueError("merged")
    with pytest.raises(UserError) as e:
        evaluate.alphabet_ids(Merging())
    assert str(e.value) == "this tokenizer does not give one token per digit and separator; pass --unrestricted."

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


def test_compare_of_a_zero_first_value_shows_no_change_and_warns_on_unlike_protocols(tmp_path):
    a = write(tmp_path, "a.json", result("base", 0.0, 0.0, h=3))
    b = write(tmp_path, "b.json", result("other", 1.0, 0.5, h=7, seed=1))
    text = evaluate.compare([a, b])
    assert "| MAE | 0 | 1 | - |" in text and "| R2 | 0 | 0.5 | - |" in text
    assert [line.split(" |")[0] for line in text.splitlines() if line.startswith("| step ")] == [
        f"| step {s} {sp} MAE" for s in (1, 3) for sp in ("prey", "predator")]  # up to the shorter horizon
    assert text.endswith("\nwarning: the files differ in protocol, k, h, data, split, test series or scaling; the numbers are not "
                         "like for like.")
    for key, value in [("protocol", "report-b"), ("k", 49), ("scaling", "per-series"), ("data", "x.h5"), ("n_series", 5),
                       ("decimals", 3)]:
        c = write(tmp_path, "c.json", result("c", 1.0, 0.5, h=3) | {"config": result("c", 1.0, 0.5, h=3)["config"] | {key: value}})
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
