"""Mutation testing, on demand: plant small bugs in one area of the code, run that area's tests, count survivors.

    pip install -r requirements-mutation.txt
    python tests/mutation.py lora              # one area: minutes
    python tests/mutation.py --list            # the areas, their files and tests
    python tests/mutation.py all               # every area: hours on two cores

A mutant is the code with one small change (`+` for `-`, `<` for `<=`, a constant off by one, an
argument dropped); a test suite that still passes on it has a blind spot, unless the change cannot
alter behaviour (an equivalent mutant: docs/testing.md lists those found and why). mutmut 3 makes
and runs the mutants in a clone of the last commit (OUT/<area>.work), so the working tree is never
touched. The clone is kept, so a run that is stopped (Ctrl-C, a kill, the end of a session) goes on
where it stopped when run again. Run at a later commit, it keeps a mutant's verdict "killed" or
"timed out" while the function it mutates is unchanged, and checks every other one (survived, no
tests) again against the new commit's tests. `--fresh` starts the area over: a kept catch can go
stale when a change outside the mutated function (a test, a caller, a constant) stops its test
from reaching it, so the scores docs/testing.md publishes say whether they were measured fresh or
in pieces.
Each area runs only its own test files: the whole suite per mutant would take days on two cores.
Writes OUT/<area>.json (counts, score, every surviving mutant's diff) and prints one line per area.
Not part of CI (too slow); docs/testing.md records the last measured scores.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# area -> (files to mutate, test files that own them)
AREAS = {
    "lora": (["lora/*"], ["tests/test_lora.py", "tests/test_lora_peft_format.py", "tests/test_lora_inject.py",
                          "tests/test_lora_layer.py", "tests/test_try_cli.py"]),
    "loss": (["qwen_min/loss.py", "data/windows.py"], ["tests/test_loss.py", "tests/test_data_windows.py", "tests/test_protocols.py"]),
    "model": (["qwen_min/model.py", "qwen_min/kv_cache.py", "qwen_min/config.py"],
              ["tests/test_model.py", "tests/test_model_config.py", "tests/test_model_parts.py"]),
    "generate": (["qwen_min/generate.py", "qwen_min/generation_config.py"],
                 ["tests/test_generate.py", "tests/test_generate_config.py", "tests/test_generate_rules.py"]),
    "weights": (["qwen_min/weights.py", "qwen_min/tokenizer.py"], ["tests/test_weights.py", "tests/test_tokenizer.py",
                                                                 "tests/test_weights_tokenizer.py", "tests/test_weights_save.py",
                                                                 "tests/test_weights_load.py"]),
    "files": (["qwen_min/files.py", "qwen_min/progress.py", "qwen_min/cli.py"],
              ["tests/test_files.py", "tests/test_progress.py", "tests/test_cli.py", "tests/test_config.py"]),
    "data": (["data/llmtime.py", "data/metrics.py", "data/splits.py", "data/lotka_volterra.py", "data/h5file.py",
              "data/forecast.py", "data/baselines.py"],
             ["tests/test_data_llmtime.py", "tests/test_data_metrics.py", "tests/test_data_splits.py",
              "tests/test_data_lotka_volterra.py", "tests/test_data_forecast.py",
              "tests/test_data_baselines.py"]),
    "protocols": (["data/protocols.py"], ["tests/test_protocols.py"]),
    "speculative": (["qwen_min/speculative.py", "data/draft.py"], ["tests/test_speculative.py"]),
    "flops": (["flops.py"], ["tests/test_flops.py", "tests/test_flops_algebra.py", "tests/test_flops_cli.py"]),
    "train": (["train.py", "qwen_min/run_folder.py", "qwen_min/checkpoint.py"],  # not test_kill_resume.py: 3 min a mutant
              ["tests/test_train.py", "tests/test_train_run_folder.py", "tests/test_train_cli.py"]),
    "evaluate": (["evaluate.py"], ["tests/test_evaluate.py", "tests/test_evaluate_oracle.py", "tests/test_evaluate_resume.py",
                                   "tests/test_evaluate_cli.py"]),
}
SOURCES = ["qwen_min/", "lora/", "data/", "flops.py", "train.py", "evaluate.py"]  # copied into the scratch tree


def mutmut_config(files, tests):
    """The [tool.mutmut] table for one area (TOML)."""
    def toml_list(xs):
        return "[" + ", ".join(json.dumps(x) for x in xs) + "]"
    return (f"\n[tool.mutmut]\nsource_paths = {toml_list(SOURCES)}\nonly_mutate = {toml_list(files)}\n"
            f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
            f"also_copy = {toml_list(['docs/', 'README.md', 'requirements.txt', 'requirements-test.txt'])}\n")


def checked(counts):
    """Mutants checked: all made, less those skipped and, in a stopped run, those not checked yet."""
    return counts["total"] - counts["skipped"] - counts.get("not_checked", 0)


def score(counts):
    """Mutants caught (killed or timed out) over all mutants checked; one that no test runs counts as a
    survivor."""
    return (counts["killed"] + counts["timeout"]) / max(1, checked(counts))


# mutmut's exit codes that mean the tests caught the mutant (failed, or ran past the time limit)
CAUGHT = {1, 3, 24, -24, 36, 152, 255}


def checkout(repo, work):
    """Put REPO's last commit in WORK, cloning it the first time (mutmut's mutants/ folder, untracked
    and ignored there, survives). Returns (this commit, the commit the run before began at, or None)."""
    git, mark = ["git", "-C", str(work)], work / ".git" / "mutation-commit"
    before = mark.read_text().strip() if mark.is_file() else None
    if (work / ".git").is_dir():
        subprocess.run(git + ["fetch", "--quiet", str(repo), "HEAD"], check=True)
        subprocess.run(git + ["reset", "--quiet", "--hard", "FETCH_HEAD"], check=True)
    else:
        work.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "--quiet", str(repo), str(work)], check=True)
        with open(work / ".git" / "info" / "exclude", "a") as f:
            f.write("mutants/\n")
    commit = subprocess.run(git + ["rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    mark.write_text(commit)
    return commit, before


def carry_over(work, commit, before):
    """Ready an earlier run's mutants/ for this one. At the same commit, nothing to do: mutmut goes on
    with the mutants that have no verdict yet. At another commit, every verdict but a catch is
    cleared (a test added since may kill those mutants), and so is mutmut's map of which tests reach
    which function (it maps only tests it has not seen). mutmut itself clears the verdicts of
    functions whose code changed. A record left unreadable by a kill is removed with its mutated
    file, so that file's mutants are made and run again."""
    moved = before not in (None, commit)
    for meta in (work / "mutants").rglob("*.meta"):
        try:
            m = json.loads(meta.read_text())
        except ValueError:
            meta.unlink()
            meta.with_suffix("").unlink(missing_ok=True)  # mutants/x.py.meta -> mutants/x.py
            continue
        if moved:
            m["exit_code_by_key"] = {name: code if code in CAUGHT else None for name, code in m["exit_code_by_key"].items()}
            meta.write_text(json.dumps(m, indent=4))
    if moved:
        (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)


def run_area(area, out, children, fresh=False):
    files, tests = AREAS[area]
    work = (out / f"{area}.work").resolve()
    if fresh and work.exists():
        shutil.rmtree(work)
    commit, before = checkout(REPO, work)
    carry_over(work, commit, before)
    tests = [t for t in tests if (work / t).is_file()]  # an area's test files that exist at this commit
    with open(work / "pyproject.toml", "a") as f:
        f.write(mutmut_config(files, tests))
    env = {k: v for k, v in os.environ.items() if k != "QWEN_MIN_CHECKPOINT"} | {"OMP_NUM_THREADS": "1"}
    mutmut = [sys.executable, "-m", "mutmut"]
    run = subprocess.run(mutmut + ["run", "--max-children", str(children)], cwd=work, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if run.returncode != 0:  # e.g. the area's tests failed before any mutant (its clean run): say why, stop
        tail = "\n".join(run.stdout.splitlines()[-30:])
        raise SystemExit(f"{area}: mutmut run stopped with exit code {run.returncode} before measuring; its last lines:\n{tail}")
    subprocess.run(mutmut + ["export-cicd-stats"], cwd=work, env=env, check=True, capture_output=True)
    counts = json.loads((work / "mutants" / "mutmut-cicd-stats.json").read_text())
    listed = subprocess.run(mutmut + ["results"], cwd=work, env=env, check=True, capture_output=True, text=True).stdout
    survivors, unchecked = [], 0
    for line in listed.splitlines():  # "    name: status" for every mutant not killed
        name, _, status = line.strip().rpartition(": ")
        if name and status == "not checked":  # a stopped run: the next one checks it
            unchecked += 1
        elif name:
            diff = subprocess.run(mutmut + ["show", name], cwd=work, env=env, capture_output=True, text=True).stdout
            survivors.append({"name": name, "status": status, "diff": diff})
    counts["not_checked"] = unchecked
    result = {"area": area, "commit": commit, "resumed_from": before, "complete": unchecked == 0, "files": files,
              "tests": tests, "counts": counts, "score": score(counts), "mutmut_exit": run.returncode,
              "survivors": survivors}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{area}.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("areas", nargs="*", help=f"areas to mutate, or 'all': {', '.join(AREAS)}")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "mutation", help="folder for <area>.json")
    p.add_argument("--children", type=int, default=2, help="mutants run at once (default: 2)")
    p.add_argument("--fresh", action="store_true", help="forget the area's earlier verdicts and start over")
    p.add_argument("--list", action="store_true", help="print the areas, their files and tests, then exit")
    args = p.parse_args(argv)
    if args.list:
        for area, (files, tests) in AREAS.items():
            print(f"{area:10s} {' '.join(files)}  <-  {' '.join(tests)}")
        return
    areas = list(AREAS) if args.areas == ["all"] else args.areas
    unknown = [a for a in areas if a not in AREAS]
    if unknown or not areas:
        p.error(f"name areas from: {', '.join(AREAS)} (or 'all'); got {' '.join(unknown) or 'none'}")
    for area in areas:
        r = run_area(area, args.out, args.children, args.fresh)
        c = r["counts"]
        print(f"{area:10s} {100 * r['score']:5.1f}%  {c['killed'] + c['timeout']} of {checked(c)} caught, "
              f"{len(r['survivors'])} not killed" + ("" if r["complete"] else f", {c['not_checked']} not checked yet (run again to go on)")
              + f" -> {args.out / (area + '.json')}", flush=True)


if __name__ == "__main__":
    main()
