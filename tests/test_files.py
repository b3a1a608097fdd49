"""qwen_min/files.py: atomic files and folders, recovery from every state a kill can leave, the lock."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from qwen_min.errors import UserError
from qwen_min.files import (FolderLock, append_jsonl, atomic_folder, atomic_write, atomic_write_json, atomic_write_text,
                            clean_leftovers, recover_folder)


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_atomic_write_replaces_the_file_whole_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"x": [1, 2]})
    atomic_write_text(tmp_path / "b.txt", "hello")
    assert json.loads(path.read_text()) == {"x": [1, 2]} and (tmp_path / "b.txt").read_text() == "hello"
    atomic_write(path, lambda tmp: open(tmp, "wb").write(b"\x00\x01"))
    assert path.read_bytes() == b"\x00\x01" and listing(tmp_path) == ["a.json", "b.txt"]


def test_a_write_that_fails_keeps_the_previous_file(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    def half_then_fail(tmp):
        open(tmp, "w").write("ne")
        raise RuntimeError("disk on fire")
    with pytest.raises(RuntimeError):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old"
    assert listing(tmp_path) == ["a.txt"]  # and no a.txt.tmp beside it


def test_clean_leftovers_removes_only_temporary_files(tmp_path):
    for name in ("state.pt.tmp", "args.json.tmp", "keep.json", "notes.tmpl"):
        (tmp_path / name).write_text("x")
    (tmp_path / "folder.tmp").mkdir()  # folders are recover_folder's business
    assert sorted(clean_leftovers(tmp_path)) == ["args.json.tmp", "state.pt.tmp"]
    assert listing(tmp_path) == ["folder.tmp", "keep.json", "notes.tmpl"]
    for name in ("state.pt.tmp", "theirs.tmp"):
        (tmp_path / name).write_text("x")
    assert clean_leftovers(tmp_path, names={"state.pt", "args.json"}) == ["state.pt.tmp"]  # only its own names'
    assert (tmp_path / "theirs.tmp").exists()


def test_atomic_folder_swaps_the_whole_folder(tmp_path):
    folder = tmp_path / "adapter"
    atomic_folder(folder, lambda tmp: [(tmp / "a").write_text("1"), (tmp / "b").write_text("1")])
    atomic_folder(folder, lambda tmp: (tmp / "a").write_text("2"))
    assert listing(tmp_path) == ["adapter", "adapter/a"] and (folder / "a").read_text() == "2"  # b went with the old version

    def fail(tmp):
        (tmp / "a").write_text("3")
        raise RuntimeError("disk on fire")
    with pytest.raises(RuntimeError):
        atomic_folder(folder, fail)
    assert listing(tmp_path) == ["adapter", "adapter/a"] and (folder / "a").read_text() == "2"


def make(folder, files):
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)


# Every state a kill inside atomic_folder can leave (old version "1", new version "2"), and what
# recover_folder must make of it: the version the folder holds afterwards, None for no folder.
KILL_STATES = {
    "while the new version was written": ({"adapter": {"a": "1"}, "adapter.tmp": {"a": "2"}}, "1"),
    "after it was complete, before any rename": ({"adapter": {"a": "1"}, "adapter.tmp": {"a": "2", ".complete": ""}}, "1"),
    "between the two renames": ({"adapter.old": {"a": "1"}, "adapter.tmp": {"a": "2", ".complete": ""}}, "2"),
    "between the renames of a first save": ({"adapter.tmp": {"a": "2", ".complete": ""}}, "2"),
    "a first save, mid-write": ({"adapter.tmp": {"a": "2"}}, None),
    "after the swap, before the marker went": ({"adapter.old": {"a": "1"}, "adapter": {"a": "2", ".complete": ""}}, "2"),
    "while the old version was removed": ({"adapter.old": {}, "adapter": {"a": "2"}}, "2"),
    "a stale old folder, new one mid-write": ({"adapter.old": {"a": "1"}, "adapter.tmp": {}}, "1"),
}


@pytest.mark.parametrize("state", KILL_STATES)
def test_recover_folder_leaves_one_whole_version(tmp_path, state):
    folders, expected = KILL_STATES[state]
    for name, files in folders.items():
        make(tmp_path / name, files)
    recover_folder(tmp_path / "adapter")
    assert listing(tmp_path) == ([] if expected is None else ["adapter", "adapter/a"])
    if expected:
        assert (tmp_path / "adapter" / "a").read_text() == expected
    atomic_folder(tmp_path / "adapter", lambda tmp: (tmp / "a").write_text("3"))  # and the next save works
    assert listing(tmp_path) == ["adapter", "adapter/a"] and (tmp_path / "adapter" / "a").read_text() == "3"


def test_append_jsonl_adds_one_line_per_record(tmp_path):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"step": 1})
    append_jsonl(path, {"step": 2, "loss": 0.5})
    assert path.read_text() == '{"step": 1}\n{"step": 2, "loss": 0.5}\n'


def test_folder_lock_is_exclusive_and_released_on_exit(tmp_path):
    with FolderLock(tmp_path):
        with pytest.raises(UserError, match="in use by another qwen-min process"):
            with FolderLock(tmp_path):
                pass
    with FolderLock(tmp_path):  # released: it can be taken again
        pass


def test_folder_lock_of_a_killed_process_is_released(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from qwen_min.files import FolderLock
        with FolderLock({str(tmp_path)!r}):
            print("locked", flush=True)
            time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=str(tmp_path)):
            FolderLock(tmp_path).__enter__()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with FolderLock(tmp_path):  # the kernel dropped the dead process's lock
        pass
