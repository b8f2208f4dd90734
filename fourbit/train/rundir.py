"""The run directory: one object that owns its lock, its marker, and replacing an old run without
losing it; plus reads and writes whose failures name the file.

    <run>/fourbit-run.json                                           the marker: fourbit wrote this run
    <run>/metrics.jsonl summary.json loss.png adapter/ checkpoint/   the run (RUN_FILES)
    <run>/.replaced/                                                 an old run being replaced
    <run>/.fourbit.lock                                              while a process uses it (lock.py)

    run = RunDir(path)
    run.lock()                                     # first: before anything in it is read or moved
    replacing = run.check(resume=..., overwrite=...)   # refuses what cannot work; changes nothing
    ...validate config, data, model...
    run.begin(replacing)                           # marker; --overwrite sets the old run aside
    run.checkpointed()                             # the new run can be resumed: the old one goes
    run.failed()                                   # before that: the old run comes back
    run.release()                                  # every exit path (the Trainer's train() and close())

One process per directory: `lock` takes an flock on .fourbit.lock (creating the directory, and
remembering which folders it created), so a second fourbit process -- another run, a --resume, an
--overwrite -- gets one line naming the holder and changes nothing; a lock a killed process left is
taken over with one line saying so. `release` deletes the lock file and the folders `lock` created
if they are still empty, so a refused run leaves nothing behind.

Only runs fourbit wrote are replaced or resumed: `begin` writes the marker, and --overwrite and
--resume refuse a directory without it, as does any run into a symlinked directory whose target is
not empty and not a fourbit run; a directory holding files with a run's names but no marker is
never touched (those names are common: adapter/, checkpoint/, metrics.jsonl).

--overwrite never deletes first. Everything is validated (config, environment, model, data) before
`begin` moves the old run's files into .replaced/ (renames inside one directory: nothing is copied,
nothing can run out of space). The new run's first checkpoint discards them; a failure before that
restores them (the new run's files are deleted, the old ones moved back). After a kill -9 in between,
`check` at the next start finds .replaced/ and restores it if the new run never wrote a checkpoint,
or deletes it if it did.

Every write goes through `fourbit.nf4.files.atomic_write`: temporary file, fsync, rename, fsync of
the directory, permissions from the umask, OutputError ("disk full") on failure. Reads of a file the
run wrote raise BadFile naming it when it is truncated or damaged (torch's own messages, such as
"PytorchStreamReader failed reading zip archive", do not say which file); torch files are read with
weights_only=True, so a hostile checkpoint cannot run code.
"""

from __future__ import annotations

import datetime
import errno
import io
import json
import os
import pickle
import re
import shutil
import sys
import zipfile

import torch

from ..errors import BadFile, InvalidInput, MissingFile, RunExists, output_error
from ..nf4.files import fsync_dir, write_bytes
from .lock import Lock, make_dirs, remove_empty

__all__ = [
    "RunDir", "RunDirExists", "RUN_FILES", "MARKER", "LOCK", "REPLACED",
    "write_json", "write_torch", "read_json", "read_torch", "append_line",
]

RUN_FILES = ("metrics.jsonl", "summary.json", "loss.png", "adapter", "checkpoint", ".checkpoint-new", ".checkpoint-old")
MARKER = "fourbit-run.json"
LOCK = ".fourbit.lock"
REPLACED = ".replaced"
_CHECKPOINTS = ("checkpoint", ".checkpoint-old")  # either one means the run has a checkpoint


class RunDirExists(RunExists):
    pass


class RunDir:
    """One run directory (see the module docstring). Every method but `lock` expects the lock held."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._lock = Lock(os.path.join(self.path, LOCK), what=f"the run directory {self.path!r}")
        self._created: list[str] = []  # folders lock() created, deepest last
        self.replacing = False  # an old run is set aside in .replaced/

    def __repr__(self) -> str:
        return f"RunDir({self.path!r})"

    # ---- what is there ---------------------------------------------------------------------------
    def present(self) -> list[str]:
        """The run files that exist (none for a fresh directory)."""
        return [f for f in RUN_FILES if os.path.lexists(os.path.join(self.path, f))]

    @property
    def marked(self) -> bool:
        return os.path.isfile(os.path.join(self.path, MARKER))

    def has_checkpoint(self) -> bool:
        return any(os.path.isdir(os.path.join(self.path, c)) for c in _CHECKPOINTS)

    # ---- lock ------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Create the directory if needed and take its lock (Locked names the holder)."""
        try:
            self._created = make_dirs(self.path)
        except OSError as err:
            raise output_error(self.path, err) from err
        try:
            notice = self._lock.acquire()
        except BaseException:
            self.release()
            raise
        if notice:
            print(f"fourbit: {notice}", file=sys.stderr)

    def release(self) -> None:
        """Drop the lock and delete the folders `lock` created if they are still empty."""
        self._lock.release()
        remove_empty(self._created)
        self._created = []

    # ---- before the run ----------------------------------------------------------------------------
    def check(self, *, resume: bool, overwrite: bool) -> bool:
        """Refuse a directory this run may not use, in one line; settle a replacement a kill
        interrupted; prove the directory writable. Returns whether --overwrite replaces a run."""
        if os.path.islink(self.path) and not self.marked and set(os.listdir(self.path)) - {LOCK}:
            raise InvalidInput(
                f"{self.path!r} is a symlink to {os.path.realpath(self.path)!r}, a directory fourbit did not write "
                f"(no {MARKER}); fourbit does not write into it",
                "give a new --output-dir, or the fourbit run directory itself",
            )
        present = self.present()
        if present and not self.marked:
            raise RunDirExists(
                f"{self.path!r} holds {', '.join(present)} but no {MARKER}: not a fourbit run directory, so "
                "fourbit neither continues nor replaces it",
                "choose another --output-dir (or move those files away yourself)",
            )
        if self.marked and os.path.isdir(os.path.join(self.path, REPLACED)):
            self._recover()
            present = self.present()
        if resume and not self.has_checkpoint():
            raise MissingFile(
                f"{self.path!r} has no checkpoint to continue from",
                "drop --resume to start a new run, or give the --output-dir of the run to continue",
            )
        if present and not (resume or overwrite):
            raise RunDirExists(
                f"{self.path!r} already holds a run ({', '.join(present)})",
                "pass --resume to continue it, or --overwrite to replace it",
            )
        self._probe()
        return bool(present) and overwrite and not resume

    def _probe(self) -> None:
        """Prove the directory takes a file's bytes (a full or read-only disk fails here, before the
        model loads); the name is this process's own."""
        probe = os.path.join(self.path, f".write-test-{os.getpid()}")
        try:
            with open(probe, "wb") as f:
                f.write(b"fourbit")
                os.fsync(f.fileno())
        except OSError as err:
            raise output_error(self.path, err) from err
        finally:
            if os.path.lexists(probe):
                os.unlink(probe)

    # ---- the run -------------------------------------------------------------------------------------
    def begin(self, replacing: bool) -> None:
        """Mark the directory as a fourbit run and, for --overwrite, set the old run aside."""
        try:
            if not self.marked:
                created = datetime.datetime.now().isoformat(timespec="seconds")
                write_json(os.path.join(self.path, MARKER), {"written_by": "fourbit finetune", "created": created})
            if replacing:
                aside = os.path.join(self.path, REPLACED)
                if os.path.isdir(aside):  # an older replacement that was never settled: it is not this run
                    shutil.rmtree(aside)
                os.makedirs(aside)
                self.replacing = True
                self._move(self.path, aside, self.present())
                fsync_dir(self.path)
        except OSError as err:
            raise output_error(self.path, err) from err

    def checkpointed(self) -> None:
        """The new run has its own checkpoint: the replaced one can go."""
        if self.replacing:
            shutil.rmtree(os.path.join(self.path, REPLACED), ignore_errors=True)
            self.replacing = False

    def failed(self) -> bool:
        """The new run failed before its first checkpoint: delete its files and move the replaced
        run back. False if nothing was aside."""
        if not self.replacing:
            return False
        self._restore()
        self.replacing = False
        return True

    def _restore(self) -> None:
        aside = os.path.join(self.path, REPLACED)
        for name in self.present():
            path = os.path.join(self.path, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
        self._move(aside, self.path, os.listdir(aside))
        os.rmdir(aside)
        fsync_dir(self.path)

    def _recover(self) -> None:
        """Settle a replacement a kill interrupted (see the module docstring)."""
        if self.has_checkpoint():
            shutil.rmtree(os.path.join(self.path, REPLACED), ignore_errors=True)
        else:
            self._restore()

    @staticmethod
    def _move(src_dir: str, dst_dir: str, names) -> None:
        for name in names:
            src = os.path.join(src_dir, name)
            if os.path.lexists(src):
                os.replace(src, os.path.join(dst_dir, name))


# ---- files ---------------------------------------------------------------------------------------
def write_json(path: str, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def write_torch(path: str, obj) -> None:
    """torch.save through a buffer: torch writing to a path reports a full disk as
    "[enforce fail at inline_container.cc] unexpected pos"; Python's write says ENOSPC."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def _need(path: str) -> None:
    if not os.path.isfile(path):
        raise MissingFile(f"{path} is missing", "the checkpoint is incomplete: start again with --overwrite")


def read_json(path: str):
    _need(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadFile(f"{path} is truncated or damaged ({err})", "start again with --overwrite") from None


def read_torch(path: str):
    """torch.load with weights_only=True, always: a checkpoint may come from someone else, and a full
    unpickle runs whatever code the file names. Tensors, numbers, strings and containers load; any
    other object is refused as BadFile naming the file and the object."""
    _need(path)
    try:
        return torch.load(path, weights_only=True)
    except OSError as err:  # a truncated zip archive makes torch seek past the end: EINVAL
        if err.errno not in (errno.EINVAL, None):
            raise BadFile(f"{path} cannot be read ({err.strerror})", "check its permissions and the disk") from None
        raise BadFile(f"{path} is truncated or damaged ({err})", "start again with --overwrite") from None
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found:  # torch's restricted unpickler met an object: the file was not written by fourbit
            raise BadFile(
                f"{path} holds a Python object ({found.group(1)}), not only tensors and plain data: "
                "fourbit never unpickles objects (loading them can run code); nothing was loaded",
                "use a checkpoint fourbit wrote, or start again with --overwrite",
            ) from None
        raise BadFile(f"{path} is truncated or damaged ({_first_line(err)})", "start again with --overwrite") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise BadFile(f"{path} is truncated or damaged ({_first_line(err)})", "start again with --overwrite") from None


def _first_line(err: Exception) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def append_line(path: str, line: str) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as err:
        raise output_error(path, err) from err
