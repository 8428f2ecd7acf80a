"""The index's blob map: where each blob is, looked up without one Python object per blob.

The SQLite index (index.py) is the truth; this is a copy of its `blobs` table in LMDB (a
memory-mapped B+tree: readers never block, a writer commits atomically, a process killed at
any point leaves it whole), stamped with the SQLite generation it mirrors. Lookups cost about
1 µs from Python at 1M blobs (a prepared SQLite point query: 6-7 µs; a Python set: 0.05 µs
but ~100 bytes of RAM per blob, and the old in-RAM map ~250 bytes more, 250 MiB at 1M;
measured on this machine, 2 cores under load 1-3). Its pages are the file's, in the page cache:
the process's anonymous memory does not grow with the number of blobs.

Writers change SQLite and this map in one SQLite write transaction (the map first, then the
SQLite commit; see PackIndex), so writers are serialized by SQLite's lock and the map is at
most one commit ahead of SQLite, and only after a crash or a failed commit; any map whose
generation is not the database's is rebuilt from SQLite (`rebuild_from`).
"""

from __future__ import annotations

import abc
import errno
import os
import sqlite3
import struct
import threading
import urllib.parse
from collections.abc import Iterable
from typing import NamedTuple

import lmdb

from ..errors import DiskFull, StorageError


class BlobLocation(NamedTuple):
    """Where one blob is stored (a named tuple: cheap to make, one per lookup)."""

    pack: str
    offset: int
    length: int
    raw_length: int
    kind: int


# pack number (the SQLite index's packs.num), offset, length, raw length, kind
RECORD = struct.Struct("<IIIIB")
# A row to write: id, pack number, offset, length, raw length, kind.
Row = tuple[bytes, int, int, int, int, int]

_GENERATION = b"generation"
# 0 is no SQLite generation (those start at a random odd number and only grow): a map
# stamped 0 is made again before use.
INVALID = 0
# Address space only: the file grows as blobs are added (~60 bytes per blob).
_MAP_SIZE = 1 << 36
_REBUILD_ROWS = 20_000   # rows per batch read from SQLite while rebuilding


class BlobMapError(Exception):
    """The map file cannot be used (damaged, or not an LMDB file); it is made again."""


class BlobMap(abc.ABC):
    """Where each blob of the index is (`get`, `in`, `len`), and moving it with the index."""

    generation: int

    @abc.abstractmethod
    def get(self, blob_id: bytes) -> BlobLocation | None: ...

    @abc.abstractmethod
    def __contains__(self, blob_id: object) -> bool: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def pack_numbers(self, blob_ids: list[bytes]) -> dict[bytes, int]:
        """The pack number of each of `blob_ids` (in id order) the map holds."""

    @abc.abstractmethod
    def apply(self, puts: Iterable[Row], deletes: Iterable[bytes], before: int,
              after: int) -> bool:
        """Delete then put rows (best in id order), moving the map from generation `before`
        to `after`; False (and nothing changed) if it is not at `before`: then it must be
        rebuilt."""

    @abc.abstractmethod
    def invalidate(self) -> None:
        """Mark the map as mirroring nothing (a commit it was ahead of failed)."""

    @abc.abstractmethod
    def refresh(self) -> None:
        """Let the next lookups see what was committed until now."""

    @abc.abstractmethod
    def close(self) -> None: ...

    def __getitem__(self, blob_id: bytes) -> BlobLocation:
        loc = self.get(blob_id)
        if loc is None:
            raise KeyError(blob_id)
        return loc


class LmdbBlobMap(BlobMap):
    """The blob map in an LMDB file next to the SQLite index.

    `names` maps pack numbers to pack names; the index owns it and keeps it current. A blob
    whose pack number is not in it (a pack another process added since this one loaded its
    packs) reads as unknown: a snapshot then stores it again, nothing is lost.
    Reads are served by one read transaction, renewed after every change this process makes
    (`refresh`): lookups see what was committed before the last renewal.
    """

    def __init__(self, path: str, names: dict[int, str]) -> None:
        self.path = path
        self._names = names
        self._env, self._meta, self._blobs = _Shared.take(path)
        # One read transaction for every thread, under a lock (LMDB: not two threads at once
        # in one transaction), replaced at each `refresh`. One per thread instead left idle
        # threads holding old snapshots, whose pages LMDB then cannot reuse: the file grew
        # to 239 MB for 1M blobs, 4 times what they need.
        self._lock = threading.Lock()
        self._txn: lmdb.Transaction | None = None
        self._closed = False

    # ---- reading ---------------------------------------------------------------------------

    def refresh(self) -> None:
        with self._lock:
            if self._txn is not None:
                self._txn.abort()
                self._txn = None

    def _lookup(self, blob_id: bytes) -> bytes | None:
        with self._lock:
            txn = self._txn
            if txn is None:
                txn = self._txn = self._env.begin(db=self._blobs, buffers=False)
            return txn.get(blob_id)

    def __contains__(self, blob_id: object) -> bool:
        # (the pack number is not checked: a blob of a pack another process added is stored)
        return self._lookup(blob_id) is not None   # type: ignore[arg-type]

    def get(self, blob_id: bytes) -> BlobLocation | None:
        raw = self._lookup(blob_id)
        if raw is None:
            return None
        num, offset, length, raw_length, kind = RECORD.unpack(raw)
        name = self._names.get(num)
        if name is None:
            return None
        return BlobLocation(name, offset, length, raw_length, kind)

    def pack_numbers(self, blob_ids: list[bytes]) -> dict[bytes, int]:
        # One call into LMDB for all of them (a lookup each from Python: 1-4 µs).
        num = RECORD.unpack_from
        with self._lock:
            txn = self._txn
            if txn is None:
                txn = self._txn = self._env.begin(db=self._blobs, buffers=False)
            with txn.cursor(self._blobs) as cur:
                return {bid: num(raw)[0] for bid, raw in cur.getmulti(blob_ids)}

    def __len__(self) -> int:
        with self._env.begin(db=self._blobs) as txn:
            return int(txn.stat(self._blobs)["entries"])

    @property
    def generation(self) -> int:
        """The SQLite generation this map mirrors (INVALID: none)."""
        with self._env.begin(db=self._meta) as txn:
            raw = txn.get(_GENERATION)
        return int.from_bytes(raw, "little") if raw and len(raw) == 8 else INVALID

    # ---- writing (each call is one LMDB write transaction, in the calling thread) ------------

    def apply(self, puts: Iterable[Row], deletes: Iterable[bytes], before: int,
              after: int) -> bool:
        pack = RECORD.pack
        try:
            with self._env.begin(write=True) as txn:
                if _read_generation(txn, self._meta) != before:
                    return False
                for bid in deletes:
                    txn.delete(bid, db=self._blobs)
                with txn.cursor(self._blobs) as cur:
                    # (in key order, as writers give them: each leaf is copied once per commit)
                    cur.putmulti((bid, pack(num, off, length, raw, kind))
                                 for bid, num, off, length, raw, kind in puts)
                txn.put(_GENERATION, after.to_bytes(8, "little"), db=self._meta)
        except lmdb.Error as exc:
            raise _map_error(exc, self.path) from None
        self.refresh()
        return True

    def invalidate(self) -> None:
        try:
            with self._env.begin(write=True) as txn:
                txn.put(_GENERATION, INVALID.to_bytes(8, "little"), db=self._meta)
        except lmdb.Error:
            pass   # then its generation is one SQLite does not have: rebuilt all the same
        self.refresh()

    def rebuild_from(self, sqlite_path: str, generation: int) -> None:
        """Make the map again from the SQLite index at `sqlite_path`, which is at `generation`
        (the caller holds its write lock, so nothing changes meanwhile)."""
        uri = f"file:{urllib.parse.quote(sqlite_path)}?mode=ro"
        pack = RECORD.pack
        db = sqlite3.connect(uri, uri=True)
        try:
            with self._env.begin(write=True) as txn:
                txn.drop(self._blobs, delete=False)
                rows = db.execute("SELECT id, pack, offset, length, raw_length, kind "
                                  "FROM blobs ORDER BY id")
                with txn.cursor(self._blobs) as cur:
                    while batch := rows.fetchmany(_REBUILD_ROWS):
                        # (in key order: appended, no B-tree search per row)
                        cur.putmulti([(r[0], pack(*r[1:])) for r in batch], append=True)
                txn.put(_GENERATION, generation.to_bytes(8, "little"), db=self._meta)
        except lmdb.Error as exc:
            raise _map_error(exc, self.path) from None
        finally:
            db.close()
        self.refresh()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.refresh()
            _Shared.give_back(self.path)


class _Shared:
    """One LMDB environment per file and process (LMDB's rule: a second open of the same file
    in one process would break the first one's locks), shared by the maps opened on it."""

    _lock = threading.Lock()
    _open: dict[str, list] = {}   # real path -> [env, meta db, blobs db, users]

    @classmethod
    def take(cls, path: str) -> tuple[lmdb.Environment, object, object]:
        key = os.path.realpath(path)
        with cls._lock:
            held = cls._open.get(key)
            if held is None:
                _allocate_lock_file(path + "-lock")
                env = None
                try:
                    env = lmdb.open(path, subdir=False, map_size=_MAP_SIZE, max_dbs=2,
                                    readahead=False, max_readers=1024, mode=0o644,
                                    # One fsync per commit, none for the meta page: a power
                                    # loss may undo the last commit but never damages the
                                    # file (and a map behind SQLite is rebuilt).
                                    sync=True, metasync=False)
                    held = [env, env.open_db(b"meta"), env.open_db(b"blobs"), 0]
                except lmdb.Error as exc:
                    if env is not None:
                        env.close()
                    raise _map_error(exc, path) from None
                cls._open[key] = held
            held[3] += 1
            return held[0], held[1], held[2]

    @classmethod
    def give_back(cls, path: str) -> None:
        key = os.path.realpath(path)
        with cls._lock:
            held = cls._open.get(key)
            if held is None:
                return
            held[3] -= 1
            if held[3] == 0:
                del cls._open[key]
                held[0].close()   # (ends every thread's read transaction too)


class DictBlobMap(BlobMap):
    """The blob map in a dict: for an index held in memory (its disk is full), whose map
    cannot be written either. One Python object per blob, as the warning says."""

    def __init__(self, names: dict[int, str]) -> None:
        self._names = names
        self._map: dict[bytes, tuple[int, int, int, int, int]] = {}
        self.generation = INVALID

    def refresh(self) -> None:
        pass

    def __contains__(self, blob_id: object) -> bool:
        return blob_id in self._map

    def get(self, blob_id: bytes) -> BlobLocation | None:
        rec = self._map.get(blob_id)
        if rec is None or rec[0] not in self._names:
            return None
        return BlobLocation(self._names[rec[0]], *rec[1:])

    def pack_numbers(self, blob_ids: list[bytes]) -> dict[bytes, int]:
        return {bid: rec[0] for bid in blob_ids if (rec := self._map.get(bid)) is not None}

    def __len__(self) -> int:
        return len(self._map)

    def apply(self, puts: Iterable[Row], deletes: Iterable[bytes], before: int,
              after: int) -> bool:
        for bid in deletes:
            self._map.pop(bid, None)
        self._map.update((bid, rest) for bid, *rest in puts)   # type: ignore[misc]
        self.generation = after
        return True

    def invalidate(self) -> None:
        self.generation = INVALID

    def close(self) -> None:
        self._map.clear()


# LMDB maps its lock file and writes into it: on a full tmpfs a page of it that has no block
# yet is a SIGBUS, not an error. Made here with its blocks, it is an error (DiskFull) instead.
# LMDB keeps a lock file larger than it needs (room for more readers).
_LOCK_FILE_SIZE = 160 * 1024   # LMDB needs ~64 KiB for 1024 readers (64 bytes each)


def _allocate_lock_file(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    try:
        os.posix_fallocate(fd, 0, _LOCK_FILE_SIZE)
    except OSError as exc:
        os.close(fd)
        os.unlink(path)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(os.path.dirname(path)) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        return   # a file system without fallocate: LMDB sizes the file itself
    os.close(fd)


def _read_generation(txn: lmdb.Transaction, meta: object) -> int:
    raw = txn.get(_GENERATION, db=meta)
    return int.from_bytes(raw, "little") if raw and len(raw) == 8 else INVALID


def _map_error(exc: lmdb.Error, path: str) -> Exception:
    """An LMDB failure as what it means here: a full disk, damage (made again), or else."""
    directory = os.path.dirname(path)
    try:
        st = os.statvfs(directory)
        full = st.f_bavail * st.f_frsize < (1 << 20)
    except OSError:
        full = False
    if full or "No space left" in str(exc) or isinstance(exc, lmdb.MapFullError):
        return DiskFull(directory)
    if isinstance(exc, (lmdb.CorruptedError, lmdb.InvalidError, lmdb.VersionMismatchError,
                        lmdb.PageNotFoundError, lmdb.PanicError, lmdb.IncompatibleError,
                        lmdb.BadDbiError)):
        return BlobMapError(f"the blob map {path} is damaged: {exc}")
    return StorageError(f"the blob map {path} cannot be used: {exc}")
