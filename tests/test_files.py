"""qwen_min/files.py: atomic files and folders, recovery from every state a kill can leave, the lock, the journal."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qwen_min.errors import UserError
from qwen_min.files import (FolderLock, Journal, append_jsonl, atomic_folder, atomic_write, atomic_write_json,
                            atomic_write_text, clean_leftovers, read_json_object, read_jsonl, recover_folder)


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
        with pytest.raises(UserError) as e:
            with FolderLock(tmp_path):
                pass
        assert str(e.value) == f"{tmp_path} is in use by another qwen-min process; wait for it to end or choose another folder."
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


def test_read_jsonl_skips_a_line_a_kill_cut_short(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


# ---------------------------------------------------------------- Journal

SETTINGS = {"k": 6, "h": 3, "seed": 7}


def test_a_journal_reads_its_pieces_back_as_they_were_written(tmp_path):
    path = tmp_path / "journal.jsonl"
    journal = Journal(path, {"k": 6, "shape": (2, 3)})  # a tuple is kept as the list it reads back as
    assert journal.done == {} and not path.exists()  # written with the first piece: a job failing before it leaves none
    record = {"rows": (0, 1), "mse": 0.25, "by_step": {1: 0.5}}
    assert journal.add("forecast rows 0-1", record) == {"rows": [0, 1], "mse": 0.25, "by_step": {"1": 0.5}}
    assert record == {"rows": (0, 1), "mse": 0.25, "by_step": {1: 0.5}}  # the caller's record is not changed
    journal.add("cross-entropy", {"mean": 1.5})
    assert path.read_text() == ('{"settings": {"k": 6, "shape": [2, 3]}}\n'
                                '{"piece": "forecast rows 0-1", "rows": [0, 1], "mse": 0.25, "by_step": {"1": 0.5}}\n'
                                '{"piece": "cross-entropy", "mean": 1.5}\n')
    again = Journal(path, {"k": 6, "shape": (2, 3)})  # the same settings, given again as the job gives them
    assert again.done == {"forecast rows 0-1": {"rows": [0, 1], "mse": 0.25, "by_step": {"1": 0.5}},
                          "cross-entropy": {"mean": 1.5}}
    assert list(again.done) == ["forecast rows 0-1", "cross-entropy"]
    assert again.done == journal.done  # what the first run held is what the rerun reads


def test_a_journal_with_other_settings_names_the_first_key_that_differs(tmp_path):
    path = tmp_path / "journal.jsonl"
    Journal(path, SETTINGS).add("forecast rows 0-3", {"mse": 1.0})
    before = path.read_text()
    for settings, key in [({"k": 6, "h": 4, "seed": 8}, "h"),   # two differ: the first by name
                          ({"k": 6, "h": 3}, "seed"),            # one missing here
                          ({"k": 6, "h": 3, "seed": 7, "a": 0}, "a"),  # one the journal lacks
                          ({"k": 6.5, "h": 3, "seed": 7}, "k")]:
        with pytest.raises(UserError) as e:
            Journal(path, settings)
        assert str(e.value) == (f"{path} is the journal of an unfinished job with other settings ({key} differs); "
                                "rerun that job's command to finish it, or choose another output folder.")
    assert path.read_text() == before  # a refused journal is left as it was
    assert Journal(path, dict(reversed(SETTINGS.items()))).done == {"forecast rows 0-3": {"mse": 1.0}}  # order is no setting


def test_a_piece_cut_short_by_a_kill_is_dropped_and_the_next_appends_cleanly(tmp_path):
    path = tmp_path / "journal.jsonl"
    Journal(path, SETTINGS).add("forecast rows 0-3", {"mse": 1.0})
    with open(path, "a") as f:
        f.write('{"piece": "forecast rows 4-7", "ms')  # killed mid-write: no newline
    journal = Journal(path, SETTINGS)
    assert journal.done == {"forecast rows 0-3": {"mse": 1.0}}
    assert path.read_text() == ('{"settings": {"k": 6, "h": 3, "seed": 7}}\n'
                                '{"piece": "forecast rows 0-3", "mse": 1.0}\n')
    journal.add("forecast rows 4-7", {"mse": 2.0})
    assert Journal(path, SETTINGS).done == {"forecast rows 0-3": {"mse": 1.0}, "forecast rows 4-7": {"mse": 2.0}}
    assert listing(tmp_path) == ["journal.jsonl"]  # rewritten in place, nothing left beside it


def test_settings_of_a_journal_and_of_files_that_are_none(tmp_path):
    path = tmp_path / "journal.jsonl"
    Journal(path, SETTINGS).add("forecast rows 0-3", {"mse": 1.0})
    assert Journal.settings_of(path) == SETTINGS
    assert Journal.settings_of(tmp_path / "missing.jsonl") is None
    assert Journal.settings_of(tmp_path) is None  # a folder
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00\n")
    assert Journal.settings_of(tmp_path / "binary.jsonl") is None  # not UTF-8
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    assert Journal.settings_of(tmp_path / "list.jsonl") is None
    (tmp_path / "empty.jsonl").write_text("")
    assert Journal.settings_of(tmp_path / "empty.jsonl") is None
    (tmp_path / "pieces.jsonl").write_text('{"piece": "a"}\n{"settings": {"k": 6}}\n')
    assert Journal.settings_of(tmp_path / "pieces.jsonl") is None  # only the first line holds settings


def test_a_journal_whose_first_line_is_no_settings_is_refused(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('[1, 2]\n{"piece": "forecast rows 0-3", "mse": 1.0}\n')
    with pytest.raises(UserError, match=r"\(its first line holds no settings\)"):  # not a settings line
        Journal(path, SETTINGS)
    path.write_text('{"piece": "forecast rows 0-3", "mse": 1.0}\n')
    with pytest.raises(UserError, match=r"\(its first line holds no settings\)"):
        Journal(path, SETTINGS)


def test_an_empty_journal_left_by_a_kill_at_its_creation_starts_afresh(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text("")  # created by open(path, "a"); the settings line never reached it
    journal = Journal(path, SETTINGS)
    assert journal.done == {} and not path.exists()
    journal.add("forecast rows 0-3", {"mse": 1.0})
    assert path.read_text() == '{"settings": {"k": 6, "h": 3, "seed": 7}}\n{"piece": "forecast rows 0-3", "mse": 1.0}\n'


def test_lines_of_a_journal_that_are_no_pieces_are_ignored(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"settings": {"k": 6, "h": 3, "seed": 7}}\n{"note": "no piece"}\n[1, 2]\n"piece"\n'
                    '{"piece": "forecast rows 0-3", "mse": 1.0}\n')
    assert Journal(path, SETTINGS).done == {"forecast rows 0-3": {"mse": 1.0}}


def test_a_journal_of_no_settings_is_refused_as_unreadable(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('[1, 2]\n')  # a first line that is no settings line, for a job whose settings are empty
    with pytest.raises(UserError, match=r"\(its first line holds no settings\)"):
        Journal(path, {})


def test_a_setting_that_is_none_on_one_side_and_absent_on_the_other_is_named(tmp_path):
    path = tmp_path / "journal.jsonl"
    Journal(path, {"adapter_sha256": None, "k": 6}).add("forecast rows 0-3", {"mse": 1.0})
    with pytest.raises(UserError, match=r"\(adapter_sha256 differs\)"):
        Journal(path, {"k": 6})


def test_atomic_write_json_is_indented_for_people(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": [1, 2], "y": "z"})
    assert (tmp_path / "a.json").read_text() == '{\n  "x": [\n    1,\n    2\n  ],\n  "y": "z"\n}'


def test_a_write_that_fails_before_creating_its_file_raises_its_own_error(tmp_path):
    def fail(tmp):
        raise RuntimeError("no space left")
    with pytest.raises(RuntimeError, match="no space left"):  # not a FileNotFoundError from the clean-up
        atomic_write(tmp_path / "a.txt", fail)
    assert listing(tmp_path) == []


def test_atomic_folder_makes_missing_parents_and_replaces_leftovers_of_a_killed_save(tmp_path):
    folder = tmp_path / "run" / "best"  # run/ does not exist yet
    atomic_folder(folder, lambda tmp: (tmp / "a").write_text("1"))
    assert listing(tmp_path / "run") == ["best", "best/a"]
    make(tmp_path / "run" / "best.tmp", {"stale": "x"})  # a save killed mid-write
    make(tmp_path / "run" / "best.old", {"a": "0"})  # a swap killed before the old version went
    atomic_folder(folder, lambda tmp: (tmp / "a").write_text("2"))
    assert listing(tmp_path / "run") == ["best", "best/a"] and (folder / "a").read_text() == "2"


def test_atomic_folder_flushes_every_file_of_the_new_version_before_the_swap(tmp_path, monkeypatch):
    """Durability cannot be seen without a power cut; what can be seen is which files reach fsync, and when."""
    import qwen_min.files as files

    flushed, real_sync = [], files.sync

    def sync(path):
        if not (tmp_path / "adapter").exists():  # before the swap
            flushed.append(Path(path).relative_to(tmp_path).as_posix())
        real_sync(path)
    monkeypatch.setattr(files, "sync", sync)

    def write(tmp):
        (tmp / "a").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b").write_text("2")
    atomic_folder(tmp_path / "adapter", write)
    assert sorted(flushed) == ["adapter.tmp/a", "adapter.tmp/sub/b"]


def test_read_json_object_names_the_file_and_what_to_do(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": [1, 2]}', encoding="utf-8")
    assert read_json_object(path, "fix it") == {"a": [1, 2]}
    cases = [("[1]", f"{path} holds a JSON list, not an object; fix it."),
             ('"a"', f"{path} holds a JSON str, not an object; fix it."),
             ("{", f"{path} is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)); fix it."),
             (b"\xff{}", f"{path} is not valid JSON ('utf-8' codec can't decode byte 0xff in position 0: invalid start byte); fix it."),
             ("{" + "\n" * 100000 + " 1}",  # json's message is 85 characters here; the first 80 are quoted
              f"{path} is not valid JSON (Expecting property name enclosed in double quotes: line 100001 column 2 (char 10); fix it.")]
    for content, message in cases:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(UserError) as e:
            read_json_object(path, "fix it")
        assert str(e.value) == message
        assert e.value.__context__ is None or e.value.__suppress_context__  # one sentence, no chained traceback
    with pytest.raises(UserError) as e:
        read_json_object(path, "fix it", name="--score x.json")
    assert str(e.value).startswith("--score x.json is not valid JSON (")
    with pytest.raises(UserError) as e:
        read_json_object(tmp_path, "pass a file")  # a folder: the read itself fails
    assert str(e.value) == f"{tmp_path} cannot be read (Is a directory); pass a file."
