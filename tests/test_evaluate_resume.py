"""A killed evaluation resumes: rerunning its command decodes only the batches it had not finished,
and ends with the results of an uninterrupted run (OUT/journal.jsonl holds the finished ones)."""

import json
from pathlib import Path

import numpy as np
import pytest

import evaluate
from conftest import random_model, tiny_config, write_checkpoint
from qwen_min.errors import run_cli

FLAGS = ["--n-series", "40", "--k", "8", "--h", "4", "--context", "48", "--lv-iterations", "5", "--plots", "0",
         "--batch", "4", "--samples", "2", "--temperature", "0.9"]  # sampled: each batch's seed must survive the kill


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(random_model(tiny_config(), seed=1), tmp_path_factory.mktemp("tiny"))


class Killed(Exception):
    pass


def counting(monkeypatch, kill_at=None):
    """Counts evaluate.generate calls (decode batches) and cross-entropy passes; raises Killed at call `kill_at`."""
    calls = {"generate": 0, "cross_entropy": 0}
    real_generate, real_ce = evaluate.generate, evaluate.cross_entropy

    def generate(*a, **kw):
        calls["generate"] += 1
        if calls["generate"] == kill_at:
            raise Killed
        return real_generate(*a, **kw)

    def cross_entropy(*a, **kw):
        calls["cross_entropy"] += 1
        return real_ce(*a, **kw)

    monkeypatch.setattr(evaluate, "generate", generate)
    monkeypatch.setattr(evaluate, "cross_entropy", cross_entropy)
    at_commit(monkeypatch, "a" * 40)  # the checkout's own commit may move while the suite runs
    return calls


def at_commit(monkeypatch, commit):
    real = evaluate.run_folder.provenance
    monkeypatch.setattr(evaluate.run_folder, "provenance", lambda device="cpu": real(device) | {"commit": commit})


def same_results(a, b):
    assert a["series"]["forecasts"]["model"] == b["series"]["forecasts"]["model"]
    assert a["results"]["model"]["overall"] == b["results"]["model"]["overall"]
    assert (a["tokens_generated"], a["flops"], a["repairs"]) == (b["tokens_generated"], b["flops"], b["repairs"])
    assert a["cross_entropy"]["mean"] == b["cross_entropy"]["mean"]


def test_a_killed_evaluation_rerun_finishes_only_what_was_left_and_equals_an_uninterrupted_one(ckpt, tmp_path, monkeypatch):
    whole = evaluate.main(["--model", str(ckpt), *FLAGS, "--out", str(tmp_path / "whole")])
    n_batches = -(-whole["config"]["n_test"] * 2 // 4)
    assert n_batches >= 3  # the kill below leaves finished batches before it and unfinished ones after it

    monkeypatch.chdir(tmp_path)  # the default output folder: evals/base-ours
    calls = counting(monkeypatch, kill_at=3)
    with pytest.raises(Killed):
        evaluate.main(["--model", str(ckpt), *FLAGS])
    out = tmp_path / "evals" / "base-ours"
    assert not (out / "results.json").exists()
    pieces = [json.loads(line).get("piece") for line in (out / "journal.jsonl").read_text().splitlines()]
    assert pieces == [None, "cross-entropy", "forecast rows 0-1", "forecast rows 2-3"]  # settings line, then what finished

    calls = counting(monkeypatch)
    resumed = evaluate.main(["--model", str(ckpt), *FLAGS])  # the same command again
    assert resumed["config"]["out"] == str(Path("evals") / "base-ours")  # the unfinished folder, not a new one
    assert calls == {"generate": n_batches - 2, "cross_entropy": 0}
    same_results(resumed, whole)

    again = evaluate.main(["--model", str(ckpt), *FLAGS])  # a finished evaluation is never resumed: a new folder
    assert again["config"]["out"] != resumed["config"]["out"] and calls["generate"] == 2 * n_batches - 2
    same_results(again, whole)


def test_a_torn_last_journal_line_is_decoded_again(ckpt, tmp_path, monkeypatch):
    flags = ["--model", str(ckpt), *FLAGS, "--no-ce", "--out", str(tmp_path / "e")]
    counting(monkeypatch, kill_at=2)
    with pytest.raises(Killed):
        evaluate.main(flags)
    journal = tmp_path / "e" / "journal.jsonl"
    text = journal.read_text()
    journal.write_text(text + text.splitlines()[-1][:30])  # a kill in the middle of writing the next batch's line
    calls = counting(monkeypatch)
    res = evaluate.main(flags)
    whole = evaluate.main(["--model", str(ckpt), *FLAGS, "--no-ce", "--out", str(tmp_path / "whole")])
    assert calls["generate"] == 2 * -(-whole["config"]["n_test"] * 2 // 4) - 1
    assert res["series"]["forecasts"]["model"] == whole["series"]["forecasts"]["model"]


@pytest.mark.parametrize("change, differs", [(["--h", "3"], "h"), (["--sample-seed", "1"], "sample_seed"), (["--batch", "2"], "batch")])
def test_resuming_with_other_settings_is_refused_in_one_sentence(ckpt, tmp_path, monkeypatch, capsys, change, differs):
    flags = ["--model", str(ckpt), *FLAGS, "--no-ce", "--out", str(tmp_path / "e")]
    counting(monkeypatch, kill_at=2)
    with pytest.raises(Killed):
        evaluate.main(flags)
    before = (tmp_path / "e" / "journal.jsonl").read_text()
    with pytest.raises(SystemExit) as e:
        run_cli(evaluate.main, flags + change)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and f"({differs} differs)" in err and "journal.jsonl" in err
    assert (tmp_path / "e" / "journal.jsonl").read_text() == before  # the unfinished work is kept


def test_flags_that_only_present_results_may_change_on_resume(ckpt, tmp_path, monkeypatch):
    flags = ["--model", str(ckpt), *FLAGS, "--no-ce", "--out", str(tmp_path / "e")]
    counting(monkeypatch, kill_at=2)
    with pytest.raises(Killed):
        evaluate.main(flags)
    calls = counting(monkeypatch)
    res = evaluate.main(flags + ["--label", "renamed", "--no-baselines"])
    assert res["config"]["label"] == "renamed" and set(res["results"]) == {"model"}
    assert calls["generate"] == -(-res["config"]["n_test"] * 2 // 4) - 1


def test_new_code_never_resumes_an_old_journal(ckpt, tmp_path, monkeypatch, capsys):
    flags = ["--model", str(ckpt), *FLAGS, "--no-ce", "--out", str(tmp_path / "e")]
    counting(monkeypatch, kill_at=2)
    with pytest.raises(Killed):
        evaluate.main(flags)
    at_commit(monkeypatch, "b" * 40)  # the code was updated in between
    with pytest.raises(SystemExit):
        run_cli(evaluate.main, flags)
    assert "(commit differs)" in capsys.readouterr().err
