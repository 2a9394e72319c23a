"""One writer per directory: an exclusive lock on a run directory or a data output folder.

    with DirLock(workdir, what="--workdir"):
        ...  # nothing else can write here until the block ends

The lock is `DIR/.hibari.lock`, held with `fcntl.flock` for as long as the process lives: the
kernel drops it when the holder exits or is killed, so the lock of a dead process is taken over
without anyone having to clean up. The file records the holder (host, pid, start time, command)
for the error message a second writer gets. Where the filesystem has no flock (some network
filesystems), the file is created exclusively instead and a lock left by a dead process on this
host is detected (its pid no longer runs) and taken over; one held from another host must be
removed by hand, and the error says so.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from hibari.base.errors import UserError

LOCK_NAME = ".hibari.lock"


class DirLocked(UserError, RuntimeError):
    """Another live process holds the directory's lock."""


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300]}


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
            f"(`{holder.get('command', '?')}`)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirLock:
    """Exclusive lock on `directory` (created if missing); `what` names it in errors (e.g.
    "--workdir"). Use as a context manager or call acquire() / release()."""

    def __init__(self, directory: str | os.PathLike, what: str = "directory"):
        self.directory = Path(directory)
        self.what = what
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None
        self._created_dir = False
        self._flock = True

    def _refuse(self, holder: dict) -> DirLocked:
        return DirLocked(f"{self.what} {self.directory} is in use by {_describe(holder)}: wait for "
                         "it to finish or stop it, or choose another directory")

    def _read_holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> DirLock:
        if self._fd is not None:
            return self
        self._created_dir = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refuse(self._read_holder()) from None
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                return self._acquire_exclusive_file()
            try:  # the file we locked must still be the one at the path (not unlinked meanwhile)
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder()).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def _acquire_exclusive_file(self) -> DirLock:
        """No flock here: the lock is the file's existence (O_EXCL)."""
        self._flock = False
        me = _holder()
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                        and holder["pid"] != me["pid"] and not _alive(holder["pid"]):
                    self.path.unlink(missing_ok=True)  # a dead process's lock: take it over
                    continue
                error = self._refuse(holder)
                if holder.get("host") != me["host"]:
                    error = DirLocked(f"{error}; if that process is gone, delete {self.path}")
                raise error from None
            os.write(fd, json.dumps(me).encode())
            os.fsync(fd)
            self._fd = fd
            return self
        raise self._refuse(self._read_holder())

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if not self._flock:
                self.path.unlink(missing_ok=True)
            else:
                os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)
            self._fd = None
        if self._created_dir:  # leave no empty directory behind a run that wrote nothing
            try:
                if self._flock:
                    self.path.unlink(missing_ok=True)
                self.directory.rmdir()
            except OSError:
                pass  # not empty: something was written, keep it (and the lock file)

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
