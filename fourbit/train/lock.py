"""One fourbit process at a time per output: an exclusive lock on a file that names its holder.

    lock = Lock("runs/a/.fourbit.lock", what="run directory runs/a")
    notice = lock.acquire()   # Locked (one line naming the holder) if another process has it;
                              # a line to print when it took over a lock a killed process left
    ...                       # read, move, write
    lock.release()            # also when the Lock is garbage-collected; the kernel, when the process dies

The lock is flock(2) on the file, which the kernel drops when its holder exits however it exits
(kill -9, the OOM killer), so a lock is never held by a process that is gone: a "stale" lock cannot
block anyone. The file records the holder (pid, host, start time, command) for the message a second
process prints. A holder deletes the file on release, while it still holds the lock; a file still
there when the lock is taken was left by a holder that was killed, and taking it over says so.

Deleting a lock file races with a process that opened it just before: that process would lock a file
that no longer has a name while a third creates and locks a new one. So a process that got the
lock checks that the path still names the file it locked (same device and inode), and starts over
if not. Linux implements flock on NFS with byte-range locks (since 2.6.12), so it also serializes
processes on different hosts that share the directory.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import weakref

from ..errors import Locked, output_error

__all__ = ["Lock", "Locked", "make_dirs", "remove_empty"]


def make_dirs(folder: str) -> list[str]:
    """os.makedirs that returns the folders it created, outermost first, so that a refused command
    can remove them again (`remove_empty`) and leave nothing behind."""
    missing, head = [], os.path.abspath(folder)
    while not os.path.lexists(head):
        missing.append(head)
        head = os.path.dirname(head)
    created = []
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:  # another process created it a moment ago: that is fine
            continue
        except OSError:
            remove_empty(created)
            raise
        created.append(path)
    return created


def remove_empty(folders: list[str]) -> None:
    """Remove `folders` (from make_dirs), innermost first, while they are empty: never a file someone
    else (another run) put there."""
    for folder in reversed(folders):
        try:
            os.rmdir(folder)
        except OSError:
            break

def _describe(holder: dict) -> str:
    """"pid 123 on host h since 2026-01-02 10:11:12 (fourbit finetune ...)" from a lock file's record."""
    if not holder:
        return "another process (it has not recorded who it is yet)"
    text = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('started', '?')}"
    return text + (f" ({holder['command']})" if holder.get("command") else "")


def _alive_here(holder: dict) -> bool:
    """False only when the holder ran on this host and its pid is gone."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 65536, 0)
        holder = json.loads(data.decode("utf-8")) if data.strip() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {"pid": "?", "host": "?", "started": "?", "command": "an unreadable lock record"}
    return holder if isinstance(holder, dict) else {}


def _release(fd: int, path: str) -> None:
    try:
        if os.path.exists(path) and os.path.samestat(os.stat(path), os.fstat(fd)):
            os.unlink(path)  # while still holding the lock (module docstring)
    except OSError:
        pass  # a read-only or vanished directory: the kernel still drops the lock on close
    finally:
        os.close(fd)


class Lock:
    """An exclusive, non-blocking lock on `path` (see the module docstring); `what` names the thing
    it protects in messages ("run directory runs/a")."""

    def __init__(self, path: str | os.PathLike, *, what: str):
        self.path, self.what = os.fspath(path), what
        self._finalizer = None

    @property
    def held(self) -> bool:
        return self._finalizer is not None and self._finalizer.alive

    def acquire(self) -> str | None:
        """Take the lock or raise Locked naming its holder; OutputError when the lock file cannot be
        created. Returns a line to print when a lock left by a killed process was taken over."""
        if self.held:
            raise RuntimeError(f"{self.path} is already locked by this Lock")
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as err:
                raise output_error(self.path, err) from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _read(fd)
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # ENOLCK: no lock service (some NFS)
                    raise output_error(self.path, err) from err
                gone = "" if _alive_here(holder) else f"; pid {holder['pid']} has ended, but a process it started still holds the lock"
                raise Locked(f"{self.what} is in use by {_describe(holder)}{gone}") from None
            try:
                same = os.path.samestat(os.stat(self.path), os.fstat(fd))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder deleted the file we locked: lock the one there now
        left = _read(fd)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": shlex.join([os.path.basename(sys.argv[0]) or "python", *sys.argv[1:]])[:300],
        }
        try:
            data = (json.dumps(record) + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except OSError as err:
            _release(fd, self.path)
            raise output_error(self.path, err) from err
        self._finalizer = weakref.finalize(self, _release, fd, self.path)
        if left:
            return f"took over the lock on {self.what}: its holder, {_describe(left)}, ended without releasing it"
        return None

    def release(self) -> None:
        """Delete the lock file and drop the lock (nothing happens if it is not held)."""
        if self._finalizer is not None:
            self._finalizer()
