"""evaluate.py on a tiny random model: decoding rules, batching, repairs, the run folder, the report."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate
import lora
from conftest import fake_generation, random_model, tiny_config, write_checkpoint
from data import llmtime, metrics, protocols, splits
from qwen_min import Tokenizer, generate
from qwen_min.errors import UserError, run_cli
from qwen_min.files import FolderLock
from qwen_min.weights import hf_name

FAST = ["--n-series", "24", "--k", "8", "--h", "4", "--context", "48", "--lv-iterations", "5", "--plots", "0"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(random_model(tiny_config()), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tok(ckpt):
    return Tokenizer.from_pretrained(ckpt)


def prompts(tok):
    return [tok.encode(t) for t in ("1.25,0.50;1.30,0.45;", "2.00,1.00;", "0.10,0.20;0.30,0.40;0.50,0.60;")]


def test_restricted_decoding_never_leaves_the_allowed_tokens(ckpt, tok):
    model = random_model(tiny_config())
    allowed = evaluate.alphabet_ids(tok)
    for temperature, samples in ((0.0, 1), (1.5, 4)):  # greedy, and hot sampling that would stray
        new = evaluate.generate_forecasts(model, prompts(tok), 3, 40, tok.encode(";")[0], samples, temperature, seed=0,
                                          allowed_token_ids=allowed, pad_id=tok.pad_id)
        assert new.shape[:2] == (3, samples)
        assert set(new.flatten().tolist()) <= set(allowed) | {tok.pad_id}
    free = evaluate.generate_forecasts(model, prompts(tok), 3, 40, tok.encode(";")[0], 4, 1.5, seed=0, pad_id=tok.pad_id)
    assert not set(free.flatten().tolist()) <= set(allowed) | {tok.pad_id}  # unrestricted, it does stray


def test_batched_forecasts_equal_one_by_one_and_qwen_min_generate(tok):
    model = random_model(tiny_config(), seed=1)  # seed 0 only ever writes '3'
    allowed = tok.encode(";0123")
    free = [generate(model, [p], 30, allowed_token_ids=allowed, stop_token_ids=[])[0, len(p):].tolist() for p in prompts(tok)]

    def second(row, token):  # length of a forecast that stops after its 2nd `token`
        hits = [i for i, t in enumerate(row) if t == token]
        return hits[1] + 1 if len(hits) > 1 else len(row)
    # Use as the step separator a token on which the rows stop at different steps, so rows leave the batch early.
    sep = next(t for t in allowed if len({second(r, t) for r in free}) > 1 and min(second(r, t) for r in free) < 30)
    batched = evaluate.generate_forecasts(model, prompts(tok), 2, 30, sep, allowed_token_ids=allowed, pad_id=tok.pad_id)
    for i, p in enumerate(prompts(tok)):
        alone = evaluate.generate_forecasts(model, [p], 2, 30, sep, allowed_token_ids=allowed, pad_id=tok.pad_id)
        row = [t for t in batched[i, 0].tolist() if t != tok.pad_id]
        assert row == [t for t in alone[0, 0].tolist() if t != tok.pad_id]
        assert row == free[i][:second(free[i], sep)]  # qwen_min.generate's tokens, cut after the 2nd separator


def test_samples_share_one_prefill_correctly(tok):
    model = random_model(tiny_config())
    args = (prompts(tok), 2, 25, tok.encode(";")[0])
    one = evaluate.generate_forecasts(model, *args, n_samples=1, pad_id=tok.pad_id)
    three = evaluate.generate_forecasts(model, *args, n_samples=3, pad_id=tok.pad_id)  # greedy: 3 equal copies
    assert torch.equal(three, one.expand(-1, 3, -1))


def test_garbage_output_is_repaired_and_counted_not_raised(ckpt, tmp_path):
    res = evaluate.main(["--model", str(ckpt), *FAST, "--unrestricted", "--samples", "3", "--out", str(tmp_path)])
    r = res["repairs"]
    assert r["forecasts"] == res["config"]["n_test"] * 3 and r["forecasts_repaired"] > 0 and r["by_kind"]
    assert all(np.isfinite(v) for v in res["results"]["model"]["overall"].values() if v is not None)
    p = res["results"]["model"]["probabilistic"]
    assert 0 <= p["coverage_50"] <= p["coverage_90"] <= 1 and p["crps"] >= 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert np.array(saved["series"]["quantiles"]["values"]).shape == (5, res["config"]["n_test"], 4, 2)


def test_results_json_is_consistent_with_its_own_forecasts(ckpt, tmp_path):
    evaluate.main(["--model", str(ckpt), *FAST, "--out", str(tmp_path), "--plots", "2"])
    res = json.loads((tmp_path / "results.json").read_text())
    s = res["series"]
    truth = np.array(s["target"])
    for name in ("model", "persistence", "lotka_volterra"):
        again = metrics.point_metrics(np.array(s["forecasts"][name]), truth)
        assert again["mae"] == pytest.approx(res["results"][name]["overall"]["mae"])
    assert res["cross_entropy"]["tokens"] > 0 and res["cross_entropy"]["mean"] > 0
    assert (tmp_path / "forecasts.png").stat().st_size > 0 and (tmp_path / "error_vs_horizon.png").stat().st_size > 0


def test_presets_and_flags_resolve_in_order():
    b = evaluate.parse_args(["--preset", "wang"])  # the old name of report-b
    assert (b.protocol, b.k, b.h, b.seed, b.no_ce) == ("report-b", 51, 20, 42, True)
    a = evaluate.parse_args(["--preset", "report-a"])
    assert (a.protocol, a.k, a.h, a.percentile, a.context) == ("report-a", 49, 50, 90.0, 768)
    assert evaluate.parse_args([]).protocol == "ours" and evaluate.parse_args(["--h", "7"]).h == 7
    assert evaluate.parse_args(["--samples", "5"]).temperature == 0.7
    for flags in (["--samples", "5", "--temperature", "0"], ["--preset", "report-b", "--h", "7"],
                  ["--preset", "report-a", "--samples", "3"], ["--preset", "report-b", "--top-p", "0.5"]):
        with pytest.raises(SystemExit):
            evaluate.parse_args(flags)


def test_a_runs_global_scaler_is_read_from_its_scaler_json(ckpt, tmp_path):
    import train

    run = tmp_path / "run"
    train.main(["--model", str(ckpt), "--n-series", "12", "--context", "48", "--steps", "1", "--eval-batches", "1",
                "--out", str(run), "--no-progress"])
    args = evaluate.parse_args(["--run", str(run), "--k", "6", "--h", "3"])
    traj, _, split, test = evaluate.load_series(args)
    prompt, ce = evaluate.scalers(args, traj, split, test)
    saved = json.loads((run / "scaler.json").read_text())
    assert prompt is ce and float(prompt.level) == pytest.approx(saved["level"], rel=1e-12)
    assert float(prompt.level) == pytest.approx(np.percentile(traj[split.train], 95), rel=1e-12)  # same as a refit


def test_per_series_prompts_are_scaled_on_the_context_only():
    args = evaluate.parse_args(["--scaling", "per-series", "--scale-target", "1", "--k", "51", "--h", "20", "--n-series", "20"])
    traj, _, split, test = evaluate.load_series(args)
    prompt, ce = evaluate.scalers(args, traj, split, test)
    np.testing.assert_allclose(prompt.level, np.percentile(traj[test, :51].reshape(len(test), -1), 95, axis=1))
    glob = evaluate.parse_args(["--n-series", "20"])
    prompt, _ = evaluate.scalers(glob, traj, split, test)
    assert prompt.level == pytest.approx(np.percentile(traj[split.train], 95))  # fit on train, as train.py


def test_run_folder_gives_model_adapter_data_and_scaling(ckpt, tok, tmp_path):
    model = random_model(tiny_config())  # the checkpoint's weights
    model.add_lm_head_bias()
    lora.inject_lora(model, r=2)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name == "lm_head_bias":
                p.normal_(0, 0.3)  # a trained-looking adapter: it changes the outputs
    run = tmp_path / "run"
    lora.save_adapter(model, run / "best", module_name=hf_name, extra={"lm_head_bias": model.lm_head_bias})
    (run / "args.json").write_text(json.dumps({"model": str(ckpt), "data": None, "n_series": 24, "seed": 3,
                                               "scaling": "per-series", "percentile": 90.0, "scale_target": 1.0,
                                               "decimals": 1, "context": 40, "lm_head_bias": True}))
    res = evaluate.main(["--run", str(run), "--k", "6", "--h", "3", "--no-baselines", "--plots", "0"])
    c = res["config"]
    assert (c["n_series"], c["seed"], c["scaling"], c["decimals"], c["adapter"]) == (24, 3, "per-series", 1, str(run / "best"))
    assert c["label"] == "run" and (run / "eval" / "ours-best" / "results.json").is_file()
    assert res["series"]["index"] == splits.split(24, seed=3).test.tolist()
    args = evaluate.parse_args(["--run", str(run), "--k", "6", "--h", "3"])
    traj, _, split, test = evaluate.load_series(args)
    scaled = llmtime.Scaler.fit(traj[test], 90, 1.0, per_series=True).transform(traj[test])
    expected = evaluate.cross_entropy(model.eval(), tok, scaled, args)["mean"]  # the unmerged in-memory model
    assert res["cross_entropy"]["mean"] == pytest.approx(expected, rel=1e-5)
    base = evaluate.main(["--run", str(run), "--no-adapter", "--k", "6", "--h", "3", "--no-baselines", "--plots", "0",
                          "--out", str(tmp_path / "base")])
    assert base["cross_entropy"]["mean"] != pytest.approx(expected, rel=1e-3)  # the adapter mattered
    ledger = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["kind"]) for e in ledger] == [("run evaluation", "eval"), ("run evaluation", "generate"),
                                                         ("base evaluation", "eval"), ("base evaluation", "generate")]
    assert ledger[0]["flops"] == res["flops"]["cross_entropy"] > 0 and ledger[1]["flops"] == res["flops"]["generate"] > 0
    with pytest.raises(SystemExit):  # the run fixes its split: another seed would test on training series
        evaluate.parse_args(["--run", str(run), "--seed", "4"])
    # each evaluation its own folder: a second one never lands on the first
    again = evaluate.parse_args(["--run", str(run), "--k", "6", "--h", "3"])
    assert Path(again.out).parent == run / "eval" and Path(again.out).name.startswith("ours-best-")
    assert evaluate.parse_args(["--run", str(run), "--no-adapter", "--preset", "report-b"]).out == str(run / "eval" / "report-b-base")
    with pytest.raises(SystemExit):  # an explicit --out that holds results is refused, not overwritten
        evaluate.parse_args(["--run", str(run), "--out", str(tmp_path / "base")])
    assert res["provenance"]["torch"] == torch.__version__ and res["provenance"]["device"].startswith("cpu")


def test_generation_flops_count_only_rows_still_generating(ckpt, tmp_path):
    few = evaluate.main(["--model", str(ckpt), *FAST, "--no-ce", "--no-baselines", "--out", str(tmp_path / "a")])
    more = evaluate.main(["--model", str(ckpt), *FAST[:4], "--h", "8", *FAST[6:], "--no-ce", "--no-baselines",
                          "--out", str(tmp_path / "b")])
    assert 0 < few["flops"]["generate"] < more["flops"]["generate"] and few["flops"]["cross_entropy"] == 0


def test_greedy_forecasts_check_guesses_and_equal_plain_decoding(ckpt, tmp_path):
    """evaluate.py checks LLMTIME guesses in every greedy pass (qwen_min/speculative.py): the same
    forecasts as --no-draft; the FLOPs differ, since the guessed columns were computed too."""
    flags = ["--model", str(ckpt), *FAST, "--no-ce", "--no-baselines"]
    drafted = evaluate.main(flags + ["--out", str(tmp_path / "a")])
    plain = evaluate.main(flags + ["--no-draft", "--out", str(tmp_path / "b")])
    assert drafted["results"] == plain["results"] and drafted["tokens_generated"] == plain["tokens_generated"]
    assert drafted["flops"]["generate"] != plain["flops"]["generate"]
    tok = Tokenizer.from_pretrained(ckpt)
    assert evaluate.draft_of(SimpleNamespace(no_draft=False, device="cpu"), tok) is not None
    assert evaluate.draft_of(SimpleNamespace(no_draft=False, device="cuda"), tok) is None  # slower on an H100


@pytest.mark.parametrize("flags", [["--scale-target", "0"], ["--percentile", "150"], ["--seed", "-1"], ["--context", "1"],
                                   ["--plots", "-1"]])
def test_nonsense_flags_get_one_clear_error(flags, capsys):
    with pytest.raises(SystemExit):
        evaluate.parse_args(flags)
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["{}", "[1, 2]", "not json", '{"config": {"label": "x", "h": 2}, "results": {"model": {}}}',
                                  '{"config": {"label": "x", "h": 3}, "results": {"model": {"overall": {}, "per_step": '
                                  '{"mae": {"prey": {"mean": [1]}, "predator": {"mean": [1]}}}}}}'])
def test_compare_refuses_files_that_are_not_results(tmp_path, text):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(UserError, match="not a results.json"):
        evaluate.compare([tmp_path / "bad.json", tmp_path / "bad.json"])


def test_compare_reports_percent_improvement(tmp_path):
    def result(label, mae, r2):
        overall = {key: 1.0 for _, key in evaluate.OVERALL_ROWS} | {"mae": mae, "r2": r2}
        step = {"mean": [mae], "se": [0.0]}
        return {"config": {"label": label, "k": 5, "h": 1, "n_test": 2, "scaling": "global"}, "cross_entropy": {"mean": 2.0},
                "results": {"model": {"overall": overall, "per_step": {"mae": {"prey": step, "predator": step}}}}}
    for label, mae, r2 in (("base", 2.0, 0.5), ("tuned", 0.5, 0.75)):
        (tmp_path / f"{label}.json").write_text(json.dumps(result(label, mae, r2)))
    table = evaluate.compare([tmp_path / "base.json", tmp_path / "tuned.json"])
    assert "| MAE | 2 | 0.5 | +75.0% |" in table and "| R2 | 0.5 | 0.75 | +50.0% |" in table
    assert "not like for like" not in table


# ---------------------------------------------------------------- the report presets on a model

def with_generation_config(tmp_path, **settings):
    """A tiny checkpoint with room for report A's 1000-token series, and Qwen's generation_config.json."""
    folder = write_checkpoint(random_model(tiny_config(max_seq_len=2048)), tmp_path / "ckpt")
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8,
                                                               "repetition_penalty": 1.1, "eos_token_id": [2, 0]} | settings))
    return folder


def test_report_a_preset_reads_prompt_plus_output_as_its_code_did(ckpt, tok, tmp_path, monkeypatch):
    folder = with_generation_config(tmp_path)
    flags = ["--model", str(folder), "--preset", "report-a", "--n-series", "40", "--limit", "4", "--no-baselines", "--plots", "0"]
    args = evaluate.parse_args(flags)
    traj, _, split, test = evaluate.load_series(args)
    texts = evaluate.Series(args, traj, test).texts
    calls = []

    def fake_generate(model, prompts, max_new, **kw):  # continues each prompt with the rest of its own series
        calls.append((max_new, kw))
        rows = []
        for p in prompts:
            full = tok.encode(next(t for t in texts if tok.encode(t)[: len(p)] == p))
            new = full[len(p):] + tok.encode(";" + "9.99,9.99;" * 60)  # beyond step 99: cut by its decoder's [:99]
            if p == tok.encode(texts[2])[: len(p)]:
                new = full[len(p):] + tok.encode(";1,2,3;")  # a piece its decoder rejects: the series is lost
            rows.append(new[:max_new])
        return fake_generation(prompts, rows, tok.pad_id, kw.get("details", False))

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    res = evaluate.main(flags + ["--no-ce", "--out", str(tmp_path / "a")])
    assert res["series"]["lost"] == [int(test[2])] and res["config"]["n_test"] == 3
    assert res["repairs"] == {"forecasts_repaired": 1, "forecasts": 4, "by_kind": {"lost_series": 1}}
    gc = evaluate.GenerationConfig.from_pretrained(folder)
    model = evaluate.load_model(args)
    from qwen_min.files import Journal

    journal = Journal(tmp_path / "journal.jsonl", {"s": 1})
    _, kept, repairs, _, _ = evaluate.forecast_report_a(model, tok, [texts[0], texts[3]], args, gc, journal)  # neither is lost
    assert kept.tolist() == [True, True] and repairs == {"forecasts_repaired": 0, "forecasts": 2, "by_kind": {}}
    assert list(journal.done) == ["forecast rows 0-1"]  # a killed report-A evaluation resumes from its journal too
    step = res["results"]["model"]["published"]["per_step"]
    assert max(max(step[m][sp]["mean"]) for m in ("mae", "mape") for sp in metrics.SPECIES) == 0  # exact continuation, exact score
    _, kw = calls[0]
    assert kw["generation_config"].repetition_penalty == 1.1 and kw["do_sample"] is False and "allowed_token_ids" not in kw
    n = len(tok.encode(texts[0]))
    assert max(c[0] for c in calls) >= int(np.ceil(1.2 * (n - n // 2)))


def test_report_b_preset_decodes_as_transformers_with_repetition_penalty(tok, tmp_path):
    from conftest import hf_twin

    model = random_model(tiny_config(max_seq_len=1024), seed=2)
    gc = evaluate.GenerationConfig(repetition_penalty=1.1, eos_token_id=(2, 0))
    args = evaluate.parse_args(["--preset", "report-b", "--n-series", "40", "--batch", "2"])
    traj, _, _, test = evaluate.load_series(args)
    contexts = traj[test[:2], :51]
    values, repairs, _, _ = evaluate.forecast_report_b(model, tok, contexts, args, gc)
    hf = hf_twin(model)
    for i, context in enumerate(contexts):
        text, scale = protocols.report_b_prompt(context.astype(np.float32))
        ids = torch.tensor([tok.encode(text)[:512]])
        out = hf.generate(ids, max_new_tokens=300, do_sample=False, repetition_penalty=1.1, eos_token_id=[2, 0], pad_token_id=0)
        expected, _ = protocols.report_b_read(tok.decode(out[0, ids.shape[1]:].tolist()), scale, 20)
        np.testing.assert_array_equal(values[i, 0], expected)
    assert repairs["forecasts"] == 2


def test_our_protocol_passes_no_generation_config(tok, monkeypatch):
    seen = {}

    def fake_generate(model, prompts, max_new, **kw):
        seen.update(kw)
        return fake_generation(prompts, [[0]] * len(prompts), 0, kw.get("details", False))

    monkeypatch.setattr(evaluate, "generate", fake_generate)
    evaluate.generate_forecasts(None, prompts(tok), 2, 5, tok.encode(";")[0])
    assert seen["use_generation_config"] is False and seen["repetition_penalty"] == 1.0


@pytest.mark.parametrize("flags, words", [
    (["--context", "100000"], "--context 100000 is longer"),
    (["--out", "FILE"], "is a file"),
])
def test_user_errors_are_one_sentence(ckpt, tmp_path, flags, words, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # without --out, the results folder would be made under the working directory
    (tmp_path / "FILE").write_text("x")
    flags = [str(tmp_path / "FILE") if f == "FILE" else f for f in flags]
    with pytest.raises(SystemExit) as e:
        evaluate.run_cli(evaluate.main, ["--model", str(ckpt), *FAST, *flags])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse prints its usage above
    assert e.value.code == 2 and words in last and "error:" in last


def test_a_run_whose_args_json_is_not_an_object_is_refused(tmp_path, capsys):
    (tmp_path / "args.json").write_text("[1, 2]")
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--run", str(tmp_path)])
    assert f"{tmp_path / 'args.json'} holds a JSON list, not an object; is {tmp_path} a train.py run folder?" in capsys.readouterr().err


def test_a_runs_split_is_its_test_split_and_test_series_it_trained_on_are_counted(ckpt, tmp_path, capsys):
    """A run trained with --split report-a is scored on report A's test series; scoring a run under
    a protocol whose test series it trained on warns and records how many."""
    run = tmp_path / "run"
    model = random_model(tiny_config())
    lora.inject_lora(model, r=2)
    lora.save_adapter(model, run / "best", module_name=hf_name)
    args_json = {"model": str(ckpt), "data": None, "n_series": 40, "seed": 0, "scaling": "global", "percentile": 95.0,
                 "scale_target": 10.0, "decimals": 2, "context": 48, "lm_head_bias": False, "split": "report-a"}
    (run / "args.json").write_text(json.dumps(args_json))
    fast = ["--k", "8", "--h", "4", "--no-ce", "--no-baselines", "--plots", "0"]
    res = evaluate.main(["--run", str(run), *fast])
    order = np.random.RandomState(42).permutation(40)  # report A: np.random.seed(42) shuffle, test = last 15% by int()
    assert res["series"]["index"] == order[34:].tolist() and res["config"]["seen_in_training"] == 0
    (run / "args.json").write_text(json.dumps(args_json | {"split": "ours"}))
    capsys.readouterr()
    res = evaluate.main(["--run", str(run), "--split", "ours", *fast, "--out", str(tmp_path / "ours")])
    assert res["config"]["seen_in_training"] == 0  # ours on ours: disjoint
    rows = evaluate.parse_args(["--run", str(run), "--preset", "report-b", "--no-baselines"])
    _, _, _, test = evaluate.load_series(rows)
    ours = splits.split(40, seed=0)
    expected = len(set(test.tolist()) & set(ours.train.tolist() + ours.val.tolist()))
    assert expected > 0 and rows.seen_in_training == expected
    assert f"trained or validated on {expected} of these" in capsys.readouterr().err


def test_evaluating_a_run_folder_another_process_holds_is_one_sentence(ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"model": str(ckpt), "n_series": 24, "context": 48}))
    with FolderLock(run):  # as train.py holds it for the whole run
        with pytest.raises(SystemExit):
            run_cli(evaluate.main, ["--run", str(run), "--no-adapter", *FAST, "--no-baselines"])
    assert "in use by another qwen-min process" in capsys.readouterr().err


def test_log_tensorboard_writes_the_overall_metrics_of_results_json(ckpt, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = evaluate.main(["--model", str(ckpt), *FAST, "--no-ce", "--plots", "0", "--log", "tensorboard", "--out", str(tmp_path / "e")])
    events = EventAccumulator(str(tmp_path / "e" / "tensorboard"))
    events.Reload()
    for forecaster in ("model", "persistence"):
        for metric in ("mae", "rmse"):
            (event,) = events.Scalars(f"eval/ours-base/{forecaster}/{metric}")
            assert event.step == 0 and event.value == pytest.approx(res["results"][forecaster]["overall"][metric], rel=1e-6)
