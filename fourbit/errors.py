"""Errors a user can fix, raised where the problem is known.

    UserError                        str(err) == "<what> — <how to fix>"
      InvalidInput  (ValueError)     a flag, argument or value out of range
      BadFile       (ValueError)     a file that exists but is truncated, corrupt or of another kind
      MissingFile   (FileNotFoundError)
      RunExists     (FileExistsError) an output that is already there
      OutputError   (OSError)        cannot write: disk full, read-only, a file where a directory goes
      Locked        (BlockingIOError) another process is using that output (the message names it)
      Unavailable   (RuntimeError)   the environment lacks something asked for (CUDA, torchrun)
      Diverged      (RuntimeError)   training produced a non-finite loss or exploding gradients

The CLI prints `fourbit <command>: error: <str(err)>` for a UserError and exits non-zero; any other
exception is a bug in fourbit and keeps its traceback. Each class also derives from the builtin a
library caller would expect, so `except ValueError` keeps working.

Every error carries a fix; a raise that gives none gets its class's generic one.
"""

from __future__ import annotations

import errno
import os

__all__ = [
    "UserError", "InvalidInput", "BadFile", "MissingFile", "RunExists", "OutputError", "Locked", "Unavailable", "Diverged",
    "output_error",
]


class UserError(Exception):
    default_fix = "check the arguments (--help lists them)"
    exit_code = 2  # the CLI's exit status

    def __init__(self, what: str, fix: str | None = None):
        self.what, self.fix = what, fix or self.default_fix
        super().__init__(f"{self.what} — {self.fix}")

    def __str__(self) -> str:  # KeyError and OSError would otherwise format their args differently
        return f"{self.what} — {self.fix}"


class InvalidInput(UserError, ValueError):
    pass


class BadFile(UserError, ValueError):
    default_fix = "the file is damaged or of another kind: restore it, or re-create it"


class MissingFile(UserError, FileNotFoundError):
    default_fix = "check the path"


class RunExists(UserError, FileExistsError):
    default_fix = "choose another output directory, or pass --overwrite to replace it"


class OutputError(UserError, OSError):
    default_fix = "choose another output location"


class Locked(UserError, BlockingIOError):
    default_fix = "wait for that process to finish (or stop it), or choose another output"


class Unavailable(UserError, RuntimeError):
    default_fix = "change the setting or the environment"


class Diverged(UserError, RuntimeError):
    default_fix = "lower --lr or --alpha (or --clip-norm) and start again; the last good checkpoint is kept"
    exit_code = 3


_REASONS = {
    errno.ENOSPC: ("disk full", "free space on that disk, or write somewhere else"),
    errno.EDQUOT: ("disk quota exceeded", "free space, or write somewhere else"),
    errno.EROFS: ("read-only file system", "write somewhere else"),
    errno.EACCES: ("permission denied", "write somewhere you may write, or fix the permissions"),
    errno.EPERM: ("permission denied", "write somewhere you may write, or fix the permissions"),
    errno.ENOTDIR: ("a path component is a file, not a directory", "choose another path"),
    errno.EISDIR: ("it is a directory", "choose a file path"),
    errno.EEXIST: ("a file is in the way: a path component is a file, not a directory", "choose another path"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
}


def output_error(path: str | os.PathLike, err: OSError) -> OSError:
    """The OutputError for an OSError raised while writing `path` (what happened, in words). An
    error that already is a UserError (an inner write named its file) comes back unchanged, so
    the message says what and how to fix once."""
    if isinstance(err, UserError):
        return err
    what, fix = _REASONS.get(err.errno, (None, "choose another output location"))
    detail = err.strerror or str(err)
    return OutputError(f"cannot write {os.fspath(path)}: {what} ({detail})" if what else f"cannot write {os.fspath(path)}: {detail}", fix)
