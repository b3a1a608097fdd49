"""study.py on tiny models: a two-axis study end to end, two workers sharing one SQLite study under a
budget, equal-compute pruning, a killed study continued, the final run, and refused specs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("optuna")

import study  # noqa: E402
from conftest import random_model, tiny_config, write_checkpoint  # noqa: E402
from qwen_min.errors import UserError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(random_model(tiny_config()), tmp_path_factory.mktemp("tiny") / "ckpt")


def spec_file(path, ckpt, budget=1e12, design="grid", axes='lr = [1e-4, 1e-2]\nrank = [2, 4]', steps=10, extra=""):
    path.write_text(f'name = "t"\nbudget = {budget}\ndesign = "{design}"\n{extra}\n'
                    f'[train]\nmodel = "{ckpt}"\nn_series = 12\ncontext = 48\nbatch = 4\nsteps = {steps}\n'
                    f'eval_every = 2\neval_batches = 2\n[axes]\n{axes}\n')
    return path


def ledger_spent(run):
    return sum(json.loads(line)["flops"] for line in (Path(run) / "ledger.jsonl").read_text().splitlines()
               if json.loads(line)["source"] == "spent")


def book(out):
    return study.Book(f"sqlite:///{out / 'study.db'}", "t", 0).state()


def test_a_two_axis_grid_runs_every_combination_once_and_reports_it(ckpt, tmp_path):
    out = tmp_path / "s"
    report = study.main([str(spec_file(tmp_path / "s.toml", ckpt, extra="[prune]\nenabled = false")), "--out", str(out)])
    rows = report["trials"]
    assert sorted((r["setting"]["lr"], r["setting"]["rank"]) for r in rows) == [(1e-4, 2), (1e-4, 4), (1e-2, 2), (1e-2, 4)]
    assert all(r["state"] == "complete" and r["stop_reason"] == "steps" for r in rows)
    for r in rows:  # each trial is a train.py run folder; the study's numbers are its run's
        summary = json.loads((Path(r["run"]) / "summary.json").read_text())
        assert r["best_val_loss"] == summary["best_val_loss"] and r["spent"] == summary["flops_spent"] == pytest.approx(ledger_spent(r["run"]))
        metrics = [json.loads(line) for line in (Path(r["run"]) / "metrics.jsonl").read_text().splitlines()]
        assert r["curve"] == [[m["flops"], m["val_loss"]] for m in metrics if m["kind"] == "val"]
        assert r["spent"] <= r["planned"]  # the reservation is an upper bound of the run
    spent = sum(r["spent"] for r in rows)
    assert book(out) == (1e12, pytest.approx(spent))  # unspent reservations came back
    trials_row = next(b for b in report["budget_table"] if b["phase"].startswith("trials"))
    assert trials_row["spent"] == pytest.approx(spent) and trials_row["share"] == pytest.approx(spent / 1e12)
    for axis in ("lr", "rank"):  # the best value of an axis, and its margin, from the rows by hand
        by_value = {}
        for r in rows:
            by_value.setdefault(r["setting"][axis], []).append(r["best_val_loss"])
        best = sorted((min(v), k) for k, v in by_value.items())
        assert report["axes"][axis]["winner"] == best[0][1]
        assert report["axes"][axis]["margin"] == pytest.approx(best[1][0] - best[0][0])
    assert (out / "report.md").read_text().count("| complete |") == 4
    assert (out / "val_loss_vs_flops.png").stat().st_size > 0 and (out / "axis_lr.png").is_file()
    again = study.main([str(tmp_path / "s.toml"), "--out", str(out)])  # a finished study runs nothing more
    assert [r["trial"] for r in again["trials"]] == [0, 1, 2, 3]


def test_one_at_a_time_varies_each_axis_alone_from_the_base():
    spec = {"design": "one-at-a-time", "train": {"rank": 4}, "axes": {"lr": [1e-3, 1e-4], "rank": [2, 4, 8]}}
    assert study.settings(spec) == [{"lr": 1e-3, "rank": 4}, {"lr": 1e-4, "rank": 4}, {"lr": 1e-3, "rank": 2},
                                    {"lr": 1e-3, "rank": 8}]


def test_behind_compares_best_losses_at_equal_compute():
    class Finished:
        def __init__(self, curve):
            self.intermediate_values = curve
    finished = [Finished({0: 5.0, 10: 4.0, 20: 3.0}), Finished({0: 5.0, 10: 4.4, 20: 2.0}), Finished({0: 5.0, 30: 1.0})]
    # at 10 FLOPs the finished trials' best are 4.0, 4.4 and (nothing at or before 10 but the baseline) 5.0: median 4.4
    assert study.behind({0: 5.0, 10: 4.5}, finished, after=1)
    assert not study.behind({0: 5.0, 10: 4.3}, finished, after=1)
    assert not study.behind({0: 5.0, 10: 4.5}, finished, after=2)  # too early to judge
    assert study.behind({0: 5.0, 10: 4.5}, finished[:2], after=1)  # median of 4.0 and 4.4 is 4.2
    assert not study.behind({0: 5.0, 10: 4.5}, finished[:1], after=1)  # one finished trial is too few to compare with
    assert study.behind({0: 5.0, 10: 4.1, 20: 3.5}, finished, after=1)  # at 20: 3.0, 2.0, 5.0 -> 3.0; its best 3.5


def test_a_trial_behind_at_equal_compute_is_pruned_and_returns_its_unspent_flops(ckpt, tmp_path):
    out = tmp_path / "s"
    spec = spec_file(tmp_path / "s.toml", ckpt, design="one-at-a-time", axes="lr = [1e-2, 2e-2, 1e-7]", steps=12,
                     extra="[prune]\nafter = 2")
    rows = study.main([str(spec), "--out", str(out)])["trials"]
    assert [r["state"] for r in rows] == ["complete", "complete", "pruned"]
    pruned = rows[2]
    assert pruned["stop_reason"] == "pruned" and len(pruned["curve"]) == 3  # baseline + the `after` validations
    assert pruned["spent"] < 0.5 * pruned["planned"]
    assert book(out)[1] == pytest.approx(sum(r["spent"] for r in rows))


def test_two_workers_share_one_study_never_overrun_its_budget_nor_run_a_trial_twice(ckpt, tmp_path):
    out = tmp_path / "s"
    probe = study.read_spec(spec_file(tmp_path / "p.toml", ckpt))
    plan = study.planned_flops(study.train_args(probe, {"lr": 1e-4, "rank": 4}, tmp_path / "x"))
    spec = spec_file(tmp_path / "s.toml", ckpt, budget=2.5 * plan, extra="[prune]\nenabled = false")  # room for two trials
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen([sys.executable, "study.py", str(spec), "--out", str(out)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    assert all("reserved" in log for log in logs), logs  # both workers ran trials
    rows = study.main([str(spec), "--out", str(out), "--report"])["trials"]
    ran = [r for r in rows if r["spent"] is not None]
    assert len(ran) == 2 and sum(r["spent"] for r in ran) <= 2.5 * plan
    assert len({(r["setting"]["lr"], r["setting"]["rank"]) for r in rows}) == len(rows) == 4  # every slot once
    assert sorted(r["state"] for r in rows) == ["complete", "complete", "fail", "fail"]
    assert all("the budget has left" in r["stop_reason"] for r in rows if r["state"] == "fail")


def test_a_killed_study_continues_where_it_stopped(ckpt, tmp_path):
    out = tmp_path / "s"
    spec = spec_file(tmp_path / "s.toml", ckpt, steps=40, extra="[prune]\nenabled = false")
    cmd = [sys.executable, "study.py", str(spec), "--out", str(out)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "trials" / "0001" / "state.pt").exists() and time.time() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "its worker was killed; continuing" in second.stdout
    rows = study.main([str(spec), "--out", str(out), "--report"])["trials"]
    assert [r["state"] for r in rows] == ["complete"] * 4  # no trial twice, none lost
    for r in rows:  # each run's steps once each: a continued run, not one started again beside the old
        steps = [json.loads(line)["step"] for line in (Path(r["run"]) / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "train"]
        assert steps == list(range(1, 41))
    assert book(out)[1] == pytest.approx(sum(r["spent"] for r in rows))


def test_the_final_run_trains_the_best_setting_with_final_over_it_and_evaluates_it(ckpt, tmp_path):
    out = tmp_path / "s"
    final = ('[final]\nsteps = 6\npatience = 1\nevaluate = ["ours", {label = "sampled", samples = 3, temperature = 0.8}]\n'
             'evaluate_flags = ["--limit", "2", "--h", "3", "--k", "12", "--no-baselines"]')
    spec = spec_file(tmp_path / "s.toml", ckpt, axes="lr = [1e-4, 1e-2]", extra="[prune]\nenabled = false\n" + final)
    report = study.main([str(spec), "--out", str(out), "--final"])
    best = min((r for r in report["trials"]), key=lambda r: r["best_val_loss"])
    fin = report["final"]
    assert fin["trial"] == best["trial"] and fin["setting"]["lr"] == best["setting"]["lr"] and fin["setting"]["steps"] == 6
    args = json.loads((out / "final" / "args.json").read_text())
    assert args["lr"] == best["setting"]["lr"] and args["patience"] == 1 and args["steps"] == 6
    assert fin["spent"] == json.loads((out / "final" / "summary.json").read_text())["flops_spent"]
    assert fin["evaluations"]["ours"]["flops"] > 0 and fin["evaluations"]["sampled"]["flags"][:4] == ["--samples", "3", "--temperature", "0.8"]
    sampled = json.loads((out / "final" / "eval" / "study-sampled" / "results.json").read_text())
    assert sampled["config"]["samples"] == 3 and fin["evaluations"]["sampled"]["results"] == sampled["results"]["model"]
    names = [b["phase"] for b in report["budget_table"]]
    assert names[-3:] == ["final training", "final evaluation", "total"]
    assert report["budget_table"][-1]["spent"] == pytest.approx(sum(r["spent"] for r in report["trials"]) + fin["spent"]
                                                               + sum(e["flops"] for e in fin["evaluations"].values()))


def test_specs_that_make_no_study_are_refused_in_one_sentence(ckpt, tmp_path):
    cases = {
        'name = "t"\nbudget = -1\n[axes]\nlr = [1e-3]\n': "'budget' must be a positive number of FLOPs",
        'name = "t"\nbudget = 1e12\ndesign = "random"\n[axes]\nlr = [1e-3]\n': "'design' must be one of",
        'name = "t"\nbudget = 1e12\n[axes]\nlr = []\n': "[axes] must give each axis a non-empty list",
        'name = "t"\nbudget = 1e12\ndesign = "search"\n[axes]\nlr = [1e-3]\n': "a search needs 'trials'",
        'name = "t"\nbudget = 1e12\nbudgte = 3\n[axes]\nlr = [1e-3]\n': "'budgte' is not a key of a study spec",
        f'name = "t"\nbudget = 1e12\n[train]\nmodel = "{ckpt}"\nout = "x"\n[axes]\nlr = [1e-3]\n': "may not set out",
        f'name = "t"\nbudget = 1e12\n[train]\nmodel = "{ckpt}"\n[axes]\nrank = [4, 0]\n': "the trial {'rank': 0} is not a valid train.py run (--rank must be at least 1, or 0 with --lm-head-bias",
        'name = "t"\nbudget = \n': "is not valid TOML",
        'name = "t"\nbudget = 1e12\ntrain = 3\n[axes]\nlr = [1e-3]\n': "'train' must be a table",
        'name = "t"\nbudget = 1e12\n[axes]\nlr = [1e-3]\n[final]\nevaluate = ["report-c"]\n':
            "the final evaluation 'report-c' is not a valid evaluate.py command (argument --preset: invalid choice",
        'name = "t"\nbudget = 1e12\n[axes]\nlr = [1e-3]\n[final]\nevaluate = [{label = "s", samples = "x"}]\n':
            "the final evaluation 's' is not a valid evaluate.py command (argument --samples: invalid int value",
    }
    for body, why in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text(body)
        with pytest.raises(UserError) as e:
            study.read_spec(path)
        assert why in str(e.value) and str(e.value).startswith(str(path)), (body, str(e.value))


def test_a_study_made_from_another_spec_is_refused(ckpt, tmp_path):
    out = tmp_path / "s"
    study.main([str(spec_file(tmp_path / "s.toml", ckpt, axes="lr = [1e-2]", steps=2)), "--out", str(out)])
    with pytest.raises(UserError, match="was made from another spec"):
        study.main([str(spec_file(tmp_path / "s.toml", ckpt, axes="lr = [1e-3]", steps=2)), "--out", str(out)])


def test_trials_killed_before_their_reservation_are_laid_out_again_or_dropped(ckpt, tmp_path):
    import socket

    path = spec_file(tmp_path / "s.toml", ckpt, axes="lr = [1e-4, 1e-2]", steps=2, extra="[prune]\nenabled = false")
    out = tmp_path / "s"
    out.mkdir()
    spec = study.read_spec(path)
    st, bk = study.open_study(spec, out, None)
    gone = f"{socket.gethostname()}:999999999"  # a process id no process has
    first = st.ask()
    assert bk.take_slot(2, first.number) == 0
    first.set_user_attr("worker", gone)  # killed after taking slot 0, before reserving its FLOPs
    second = st.ask()
    second.set_user_attr("worker", gone)  # killed before taking a slot
    rows = study.main([str(path), "--out", str(out)])["trials"]
    assert [(r["trial"], r["state"]) for r in rows] == [(0, "complete"), (1, "fail"), (2, "complete")]
    assert rows[0]["setting"] == {"lr": 1e-4} and rows[2]["setting"] == {"lr": 1e-2}  # each slot once
    assert rows[1]["stop_reason"] == "its worker was killed before it took a slot"
    assert book(out)[1] == pytest.approx(rows[0]["spent"] + rows[2]["spent"])


def test_a_damaged_study_database_is_named_in_one_sentence(ckpt, tmp_path):
    out = tmp_path / "s"
    path = spec_file(tmp_path / "s.toml", ckpt, axes="lr = [1e-2]", steps=2)
    study.main([str(path), "--out", str(out)])
    db = out / "study.db"
    db.write_bytes(db.read_bytes()[:5000])  # cut short, as a full disk or a bad copy leaves it
    with pytest.raises(UserError, match=r"the study's database .*study\.db cannot be used \(.*\); restore it"):
        study.main([str(path), "--out", str(out), "--report"])


def test_final_before_any_trial_has_finished_is_refused(ckpt, tmp_path):
    path = spec_file(tmp_path / "s.toml", ckpt, axes="lr = [1e-2]", steps=2)
    with pytest.raises(UserError, match="no trial of the study in .* has finished, so there is no best setting"):
        study.main([str(path), "--out", str(tmp_path / "s"), "--report", "--final"])
