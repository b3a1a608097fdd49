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


def test_checkout_moves_to_the_new_commit_and_keeps_mutmuts_folder_out_of_git(tmp_path):
    repo, work = tmp_path / "repo", tmp_path / "out" / "area.work"
    repo.mkdir()
    git(repo, "init", "-q")
    first = commit_file(repo, "x = 1\n")
    assert mutation.checkout(repo, work) == (first, None)
    (work / "mutants").mkdir()
    (work / "mutants" / "f.py.meta").write_text("{}")
    (work / "f.py").write_text("x = 3\n")  # e.g. mutmut's config appended to pyproject.toml
    assert git(work, "status", "--porcelain") == "M f.py"  # mutants/ is ignored
    second = commit_file(repo, "x = 2\n")
    assert mutation.checkout(repo, work) == (second, first)
    assert (work / "f.py").read_text() == "x = 2\n"
    assert (work / "mutants" / "f.py.meta").read_text() == "{}"
    assert mutation.checkout(repo, work) == (second, second)  # a stopped run, started again


CODES = {"killed": 1, "pytest_error": 3, "timeout": 36, "sigxcpu": -24, "survived": 0, "no_tests": 33,
         "not_checked": None, "interrupted": 2, "segfault": -11}


def earlier_run(work):
    """mutants/ as mutmut leaves it: a record of verdicts per mutated file, its map of tests."""
    meta = work / "mutants" / "data" / "f.py.meta"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"exit_code_by_key": CODES, "durations_by_key": {"killed": 0.5}}))
    (work / "mutants" / "mutmut-stats.json").write_text("{}")
    return meta


def test_at_a_new_commit_only_catches_are_kept_and_the_test_map_is_rebuilt(tmp_path):
    meta = earlier_run(tmp_path)
    mutation.carry_over(tmp_path, "b" * 40, "a" * 40)
    after = json.loads(meta.read_text())
    assert after["exit_code_by_key"] == {"killed": 1, "pytest_error": 3, "timeout": 36, "sigxcpu": -24,
                                         "survived": None, "no_tests": None, "not_checked": None,
                                         "interrupted": None, "segfault": None}
    assert after["durations_by_key"] == {"killed": 0.5}  # the rest of mutmut's record is left as it was
    assert not (tmp_path / "mutants" / "mutmut-stats.json").exists()


@pytest.mark.parametrize("before", ["c" * 40, None])
def test_at_the_same_commit_or_first_nothing_is_forgotten(tmp_path, before):
    meta = earlier_run(tmp_path)
    mutation.carry_over(tmp_path, "c" * 40, before)
    assert json.loads(meta.read_text())["exit_code_by_key"] == CODES
    assert (tmp_path / "mutants" / "mutmut-stats.json").exists()


def test_a_record_cut_short_by_a_kill_goes_with_its_mutated_file(tmp_path):
    meta = earlier_run(tmp_path)
    meta.write_text('{"exit_code_by_key": {"killed"')
    (tmp_path / "mutants" / "data" / "f.py").write_text("# mutants of f")
    (tmp_path / "mutants" / "data" / "g.py").write_text("# another file's mutants")
    mutation.carry_over(tmp_path, "c" * 40, "c" * 40)
    assert sorted(p.name for p in (tmp_path / "mutants" / "data").iterdir()) == ["g.py"]


def test_the_score_leaves_out_what_is_not_checked_yet():
    counts = {"killed": 8, "timeout": 1, "total": 20, "skipped": 2, "not_checked": 6}
    assert mutation.score(counts) == 9 / 12
    assert mutation.score(counts | {"not_checked": 0}) == 9 / 18


def test_caught_is_mutmuts_killed_and_timeout():
    stats = pytest.importorskip("mutmut.stats")  # requirements-mutation.txt; not in CI
    named = dict(stats.status_by_exit_code)  # the codes mutmut names (others read "suspicious")
    assert mutation.CAUGHT == {code for code, status in named.items() if status in ("killed", "timeout")}
