"""tests/mutation.py keeps its clone between runs: a stopped run resumes, and only catches are kept."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mutation  # noqa: E402  (tests/mutation.py, a script beside this file)


def git(cwd, *args):
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout.strip()


def commit_file(repo, text):
    (repo / "f.py").write_text(text)
    git(repo, "add", "f.py")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", text)
    return git(repo, "rev-parse", "HEAD")


def test_checkout_moves_to_the_new_commit_and_keeps_mutmuts_folder(tmp_path):
    repo, work = tmp_path / "repo", tmp_path / "out" / "area.work"
    repo.mkdir()
    git(repo, "init", "-q")
    first = commit_file(repo, "x = 1\n")
    assert mutation.checkout(repo, work) == first
    (work / "mutants").mkdir()
    (work / "mutants" / "f.py.meta").write_text("{}")
    (work / "f.py").write_text("x = 3\n")  # e.g. mutmut's config appended to pyproject.toml
    second = commit_file(repo, "x = 2\n")
    assert mutation.checkout(repo, work) == second
    assert (work / "f.py").read_text() == "x = 2\n"
    assert (work / "mutants" / "f.py.meta").read_text() == "{}"


def test_only_catches_outlive_a_run(tmp_path):
    codes = {"killed": 1, "pytest_error": 3, "timeout": 36, "sigxcpu": -24, "survived": 0, "no_tests": 33,
             "not_checked": None, "interrupted": 2, "segfault": -11}
    meta = tmp_path / "mutants" / "data" / "f.py.meta"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"exit_code_by_key": codes, "durations_by_key": {"killed": 0.5}}))
    assert mutation.forget_uncaught(tmp_path) == 4
    after = json.loads(meta.read_text())
    assert after["exit_code_by_key"] == {"killed": 1, "pytest_error": 3, "timeout": 36, "sigxcpu": -24,
                                         "survived": None, "no_tests": None, "not_checked": None,
                                         "interrupted": None, "segfault": None}
    assert after["durations_by_key"] == {"killed": 0.5}  # the rest of mutmut's record is left as it was


def test_no_earlier_run_keeps_nothing(tmp_path):
    assert mutation.forget_uncaught(tmp_path) == 0


def test_caught_is_mutmuts_killed_and_timeout():
    stats = pytest.importorskip("mutmut.stats")  # requirements-mutation.txt; not in CI
    named = dict(stats.status_by_exit_code)  # the codes mutmut names (others read "suspicious")
    assert mutation.CAUGHT == {code for code, status in named.items() if status in ("killed", "timeout")}
