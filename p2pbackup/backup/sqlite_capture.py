"""Live SQLite databases are copied through SQLite's online backup API.

Copying the file bytes while an application writes could capture half a transaction; the
backup API copies a consistent state (holding a read lock for the one step it takes). It also
rewrites header counters, so a database nobody writes is stored as its bytes instead (the
reader checks, with side_files before and after, that nobody did).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from urllib.parse import quote

SQLITE_MAGIC = b"SQLite format 3\x00"
SIDE_FILES = ("-wal", "-shm", "-journal")


SIDE_SUFFIXES = tuple(s.encode() for s in SIDE_FILES)


def looks_like_sqlite(head: bytes) -> bool:
    """True when a file starts with the SQLite 3 header."""
    return head.startswith(SQLITE_MAGIC)


def is_database(path: bytes) -> bool:
    """True when the file at `path` is an SQLite database (by its header)."""
    try:
        with open(path, "rb") as f:
            return looks_like_sqlite(f.read(16))
    except OSError:
        return False


def database_of(path: bytes, exists: Callable[[bytes], bool] = os.path.exists) -> bytes | None:
    """The database whose -wal/-shm/-journal file `path` is, or None. Such side files are
    never stored: the database is captured consistently through SQLite (a commit in WAL mode
    changes only the -wal, so it is the database that changed), and a stale -wal restored
    next to a database would be replayed into it."""
    if not path.endswith(SIDE_SUFFIXES):  # most names: one test
        return None
    for s in SIDE_SUFFIXES:
        if path.endswith(s):
            main = path[:-len(s)]
            if exists(main) and is_database(main):
                return main
    return None


def capture(path: bytes, dest: str, busy_timeout: float = 30.0) -> None:
    """Write a consistent copy of the database at `path` to `dest`; raise sqlite3.Error."""
    uri = "file:" + quote(os.fsdecode(path)) + "?mode=ro"
    src = sqlite3.connect(uri, uri=True, timeout=busy_timeout, check_same_thread=False)
    try:
        dst = sqlite3.connect(dest, check_same_thread=False)
        try:
            # The copy is a scratch file read once and deleted: no journal and no fsync
            # (measured: a 57 MB database copies in 0.11 s instead of 0.18 s).
            dst.execute("PRAGMA journal_mode=OFF")
            dst.execute("PRAGMA synchronous=OFF")
            src.backup(dst)  # pages=-1: one step, so a consistent state
        finally:
            dst.close()
    finally:
        src.close()


SideFiles = tuple[tuple[int, int, int, int] | None, tuple[int, int, int, int] | None]


def side_files(path: bytes) -> SideFiles:
    """(size, mtime_ns, ctime_ns, inode) of the database's -wal and -journal (None: absent)."""
    out = []
    for suffix in (b"-wal", b"-journal"):
        try:
            st = os.stat(path + suffix)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return out[0], out[1]


def quiet(sides: SideFiles) -> bool:
    """True if the main file alone holds the database: no WAL frames (committed pages may
    live only there) and no hot journal (a transaction in progress, or one to roll back)."""
    return all(s is None or s[0] == 0 for s in sides)


def wal_mtime_of(sides: SideFiles) -> int:
    """What wal_mtime_ns returned when `sides` was taken."""
    return sides[0][1] if sides[0] is not None else 0


def wal_mtime_ns(path: bytes) -> int:
    """mtime of the database's -wal file (writes in WAL mode do not touch the main file)."""
    try:
        return os.stat(path + b"-wal").st_mtime_ns
    except OSError:
        return 0
