"""The run directory: which files a run owns, how --overwrite replaces an old run without losing it,
and reads and writes whose failures name the file.

    <run>/metrics.jsonl summary.json loss.png adapter/ checkpoint/   the run (RUN_FILES)
    <run>/.replaced/                                                 an old run being replaced

--overwrite never deletes first. The Trainer validates everything (config, environment, model, data)
before `set_aside` moves the old run's files into .replaced/ (renames inside one directory: nothing
is copied, nothing can run out of space). The new run's first checkpoint `discard`s them; a failure
before that `restore`s them (the new run's files are deleted, the old ones moved back). After a
kill -9 in between, `recover` at the next start finds .replaced/ and restores it if the new run never
wrote a checkpoint, or deletes it if it did.

Every write goes through `fourbit.nf4.files.atomic_write`: temporary file, fsync, rename, fsync of
the directory, permissions from the umask, OutputError ("disk full") on failure. Reads of a file the
run wrote raise BadFile naming it when it is truncated or damaged (torch's own messages, such as
"PytorchStreamReader failed reading zip archive", do not say which file).
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import zipfile

import torch

from ..errors import BadFile, MissingFile, output_error
from ..nf4.files import fsync_dir, write_bytes

__all__ = [
    "RUN_FILES", "REPLACED", "present", "prepare", "set_aside", "restore", "discard", "recover",
    "write_json", "write_torch", "read_json", "read_torch", "append_line",
]

RUN_FILES = ("metrics.jsonl", "summary.json", "loss.png", "adapter", "checkpoint", ".checkpoint-new", ".checkpoint-old")
REPLACED = ".replaced"
_CHECKPOINTS = ("checkpoint", ".checkpoint-old")  # either one means the run has a checkpoint


def present(run_dir: str) -> list[str]:
    """The run files that exist in run_dir (none for a fresh directory)."""
    return [f for f in RUN_FILES if os.path.lexists(os.path.join(run_dir, f))]


def prepare(run_dir: str) -> None:
    """Create run_dir and prove it writable, before any work: OutputError names the problem
    (a file in the way, a read-only or full disk)."""
    probe = os.path.join(run_dir, ".write-test")
    created = not os.path.lexists(run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"fourbit")
            os.fsync(f.fileno())
    except OSError as err:
        if os.path.lexists(probe):
            os.unlink(probe)
        if created and os.path.isdir(run_dir):
            os.rmdir(run_dir)  # leave nothing behind
        raise output_error(run_dir, err) from err
    os.unlink(probe)


def _move(src_dir: str, dst_dir: str, names) -> None:
    for name in names:
        src = os.path.join(src_dir, name)
        if os.path.lexists(src):
            os.replace(src, os.path.join(dst_dir, name))


def set_aside(run_dir: str) -> None:
    """Move the old run's files into run_dir/.replaced (see the module docstring)."""
    aside = os.path.join(run_dir, REPLACED)
    try:
        if os.path.isdir(aside):  # an older replacement that was never settled: it is not this run
            shutil.rmtree(aside)
        os.makedirs(aside)
        _move(run_dir, aside, present(run_dir))
        fsync_dir(run_dir)
    except OSError as err:
        raise output_error(run_dir, err) from err


def restore(run_dir: str) -> bool:
    """Delete the new run's files and move the replaced run back; False if nothing was aside."""
    aside = os.path.join(run_dir, REPLACED)
    if not os.path.isdir(aside):
        return False
    for name in present(run_dir):
        path = os.path.join(run_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
    _move(aside, run_dir, os.listdir(aside))
    os.rmdir(aside)
    fsync_dir(run_dir)
    return True


def discard(run_dir: str) -> None:
    """The new run has its own checkpoint: the replaced one can go."""
    shutil.rmtree(os.path.join(run_dir, REPLACED), ignore_errors=True)


def recover(run_dir: str) -> None:
    """Settle a replacement a kill interrupted (see the module docstring)."""
    if not os.path.isdir(os.path.join(run_dir, REPLACED)):
        return
    if any(os.path.isdir(os.path.join(run_dir, c)) for c in _CHECKPOINTS):
        discard(run_dir)
    else:
        restore(run_dir)


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


def read_torch(path: str, *, weights_only: bool = True):
    _need(path)
    try:
        return torch.load(path, weights_only=weights_only)
    except OSError as err:  # a truncated zip archive makes torch seek past the end: EINVAL
        if err.errno not in (errno.EINVAL, None):
            raise BadFile(f"{path} cannot be read ({err.strerror})", "check its permissions and the disk") from None
        raise BadFile(f"{path} is truncated or damaged ({err})", "start again with --overwrite") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BadFile(f"{path} is truncated or damaged ({first})", "start again with --overwrite") from None


def append_line(path: str, line: str) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as err:
        raise output_error(path, err) from err
