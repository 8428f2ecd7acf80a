"""One writer at a time: an flock'd file holding the writer's pid.

The kernel drops an flock when its process dies, so a lock left by a killed process is free
again at once: a stale lock is taken over without guessing about pids.
"""

from __future__ import annotations

import errno
import fcntl
import os

from ..errors import DiskFull, RepositoryLocked, StorageError


class WriterLock:
    """An exclusive, non-blocking lock on `path`; use as a context manager."""

    def __init__(self, path: str, what: str) -> None:
        self.path = path
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise _lock_error(exc, self.path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RepositoryLocked(holder, self.what) from None
        # Written over the last holder's pid, which release leaves in place: the file keeps
        # its block, so the lock is taken again even on a full disk.
        pid = f"{os.getpid()}\n".encode()
        try:
            os.pwrite(fd, pid, 0)
            os.ftruncate(fd, len(pid))
        except OSError as exc:
            os.close(fd)  # (and with it the flock)
            raise _lock_error(exc, self.path) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WriterLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _lock_error(exc: OSError, path: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(os.path.dirname(path))
    return StorageError(f"cannot take the lock file {path}: {exc.strerror}")
