"""Files that survive a kill at any instant, and a lock that makes a folder one process's.

A file is written beside its destination under a temporary name and renamed over it: on POSIX a
rename within a folder is atomic, so a reader (or a resumed run) sees the old file or the new one,
never half of either. A folder is swapped the same way in two renames; `recover_folder` finishes
or undoes a swap that a kill interrupted. Temporary names end in `.tmp` and `.old`, so leftovers
are recognisable and `clean_leftovers` can remove them. Logs are appended one whole line per
write (`append_jsonl`); a kill can cut only the last line short, and readers skip such a line.
A `Journal` is such a log of finished pieces of a long job, so that rerunning it after a kill
continues where it stopped.
"""

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from .errors import UserError

TMP, OLD = ".tmp", ".old"


def atomic_write(path, write) -> Path:
    """Calls write(tmp_path) to fill a temporary file, flushes it to disk, then renames it to path."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP)
    try:
        write(tmp)
        sync(tmp)
    except BaseException:  # a write that fails leaves the previous file and nothing beside it
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _sync_folder(path.parent)  # the rename itself reaches the disk
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2))


def read_json_object(path, fix: str, name=None) -> dict:
    """The JSON object in the file `path`. A file that cannot be read, is not JSON, or holds JSON of
    another kind is a UserError naming it (`name`, default the path) and saying what to do (`fix`)."""
    name = name or path
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{name} cannot be read ({e.strerror}); {fix}.") from None
    except ValueError as e:  # not UTF-8, or not JSON; json quotes the place, cut short for a huge file
        raise UserError(f"{name} is not valid JSON ({str(e)[:80]}); {fix}.") from None
    if not isinstance(obj, dict):
        raise UserError(f"{name} holds a JSON {type(obj).__name__}, not an object; {fix}.")
    return obj


def append_jsonl(path, record) -> None:
    """Appends `record` as one JSON line, in a single write."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path) -> list:
    """The records of a JSON-lines file, without a last line that a kill cut short."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


class Journal:
    """Finished pieces of a long job, one JSON line each, so that a rerun after a kill skips them.

    The first line records the job's settings: a journal with other settings belongs to another
    job, and opening it raises UserError naming the first setting that differs. A piece is
    appended whole once it is done, so a kill loses at most the piece in progress.
    """

    def __init__(self, path, settings: dict):
        self.path = Path(path)
        settings = json.loads(json.dumps(settings))  # as it reads back: tuples become lists
        self.settings, self.done = settings, {}  # piece name -> its record
        if not self.path.exists():  # written with the first piece: a job that fails before any leaves no journal
            return
        records = read_jsonl(self.path)
        if not records:  # killed while writing its first line: nothing was finished
            self.path.unlink()
            return
        theirs = records[0].get("settings") if records and isinstance(records[0], dict) else None
        if theirs != settings:
            if not isinstance(theirs, dict):
                why = "its first line holds no settings"
            else:  # a key on one side only differs too, even where the other side's value is None
                why = min(k for k in set(settings) | set(theirs)
                          if k not in theirs or k not in settings or theirs[k] != settings[k]) + " differs"
            raise UserError(f"{self.path} is the journal of an unfinished job with other settings ({why}); "
                            "rerun that job's command to finish it, or choose another output folder.")
        self.done = {r.pop("piece"): r for r in records[1:] if isinstance(r, dict) and "piece" in r}
        lines = [{"settings": settings}] + [{"piece": name} | r for name, r in self.done.items()]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in lines))  # without a cut-short last line

    @staticmethod
    def settings_of(path):
        """The settings a journal file was started with (None when unreadable)."""
        try:
            first = read_jsonl(path)[:1]
        except (OSError, UnicodeDecodeError):
            return None
        return first[0].get("settings") if first and isinstance(first[0], dict) else None

    def add(self, piece: str, record: dict) -> dict:
        """Appends a finished piece; returns its record as a rerun will read it back."""
        if not self.path.exists():
            append_jsonl(self.path, {"settings": self.settings})
        append_jsonl(self.path, {"piece": piece} | record)
        self.done[piece] = json.loads(json.dumps(record))
        return self.done[piece]


def sync(path) -> None:
    """Flushes a file's data to the disk, so that what was written survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder) -> None:
    try:
        sync(folder)
    except OSError:  # some file systems cannot fsync a folder; the rename is still atomic
        pass


def atomic_folder(folder, write) -> Path:
    """Calls write(tmp_folder) to fill a fresh temporary folder, then swaps it in for `folder`.

    Two renames: folder -> folder.old, folder.tmp -> folder. A kill between them leaves no
    `folder` but a complete `folder.tmp`; `recover_folder` finishes the swap.
    """
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + TMP), folder.with_name(folder.name + OLD)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                sync(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / ".complete").touch()  # written last: a .tmp folder without it was interrupted mid-write
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    _sync_folder(folder.parent)
    (folder / ".complete").unlink()
    shutil.rmtree(old, ignore_errors=True)
    return folder


def recover_folder(folder) -> None:
    """Brings `folder` back to one whole version after a kill inside `atomic_folder`."""
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + TMP), folder.with_name(folder.name + OLD)
    if not folder.exists():
        if (tmp / ".complete").is_file():  # killed between the two renames: the new version is whole
            os.replace(tmp, folder)
        elif old.exists():  # killed while the new version was being written: keep the previous one
            os.replace(old, folder)
    (folder / ".complete").unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def clean_leftovers(folder, names=None) -> list:
    """Removes the temporary files a killed atomic_write left in `folder`; returns their names.

    With `names`, only the temporary files of those (a folder shared with other files keeps theirs)."""
    removed = []
    for path in Path(folder).glob("*" + TMP):
        if path.is_file() and (names is None or path.name[:-len(TMP)] in names):
            path.unlink()
            removed.append(path.name)
    return removed


class FolderLock:
    """An exclusive lock on `folder`, held while the object is open (use it in a `with` block).

    It is an flock on `folder/.lock`: the operating system releases it when the process ends,
    however it ends, so a killed run never leaves a stale lock behind.
    """

    def __init__(self, folder):
        self.path = Path(folder) / ".lock"
        self.file = None

    def __enter__(self):
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self.file.close()
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise UserError(f"{self.path.parent} is in use by another qwen-min process; wait for it to end "
                                "or choose another folder.") from None
            raise
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
        self.file.close()
