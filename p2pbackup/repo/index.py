"""The pack index: which pack holds each blob. A cache in SQLite, rebuilt from packs at will.

Nothing here holds one Python object per blob: lookups go to the blob map (blobmap.py, an
LMDB copy of the `blobs` table), and loops over every blob stream them from SQLite, pack by
pack. What is held in memory is per pack (names, sizes, damage), a few thousand at most.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sqlite3
import struct
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import aiosqlite

from ..errors import DiskFull, P2PError, StorageError
from .blobmap import (INVALID, BlobLocation, BlobMap, BlobMapError, DictBlobMap, LmdbBlobMap,
                      Row)

log = logging.getLogger("p2pbackup.repo")
BlobTuple = tuple[bytes, int, int, int, int]   # id, kind, offset, length, raw length

# 2: packs.arrived; 3: meta.generation (the blob map side file); 4: the spare table, and
# blobs name their pack by packs.num (a 64-character name in each row made the table twice the
# size, and a peer's pack cost twice the CPU to index).
# Still 4 with the LMDB blob map (`<index>.map`): the SQLite schema is the same, the map is
# made from it, and an older p2pbackup ignores the map (any change it makes moves the
# generation, so the map is made again afterwards). meta.pack_seq only keeps pack numbers from
# being reused, which an older p2pbackup may do harmlessly (it moves the generation too).
INDEX_VERSION = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS packs (num INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE,
    scope TEXT NOT NULL, epoch INTEGER NOT NULL, size INTEGER NOT NULL,
    arrived INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS blobs (id BLOB PRIMARY KEY, kind INTEGER NOT NULL,
    pack INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
    raw_length INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs(pack);
CREATE TABLE IF NOT EXISTS spare (id BLOB NOT NULL, kind INTEGER NOT NULL,
    pack INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
    raw_length INTEGER NOT NULL, PRIMARY KEY (id, pack)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS spare_by_pack ON spare(pack);
CREATE TABLE IF NOT EXISTS damaged (name TEXT PRIMARY KEY, reason TEXT NOT NULL,
    bad BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS sizes (minute INTEGER PRIMARY KEY, stored INTEGER NOT NULL,
    packs INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pack_totals (one INTEGER PRIMARY KEY CHECK (one = 1),
    stored INTEGER NOT NULL, packs INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS pack_added AFTER INSERT ON packs BEGIN
    UPDATE pack_totals SET stored = stored + NEW.size, packs = packs + 1; END;
CREATE TRIGGER IF NOT EXISTS pack_removed AFTER DELETE ON packs BEGIN
    UPDATE pack_totals SET stored = stored - OLD.size, packs = packs - 1; END;
CREATE TRIGGER IF NOT EXISTS pack_resized AFTER UPDATE OF size ON packs BEGIN
    UPDATE pack_totals SET stored = stored - OLD.size + NEW.size; END;
INSERT OR IGNORE INTO pack_totals SELECT 1, coalesce(sum(size), 0), count(*) FROM packs;
"""
# `sizes` is the store's size over time (for the web console's chart): after each change to
# `packs`, the totals as of that minute. Packs carry no time of their own, so this is the only
# record of how the store grew and shrank; it lives in the index (a cache: a rebuilt index
# starts a new history) and needs no version step (an older p2pbackup leaves the table alone).
# Bounded: rows older than SIZES_FINE keep only the last of each hour. The totals come from
# `pack_totals`, kept by triggers (so every process and version that writes `packs` keeps them
# right), because summing `packs` at every commit cost 10 ms at 60,000 packs (1 TB). The row is
# made after the triggers: a pack added in between is counted by the sum, not twice.
SIZES_FINE = 2 * 86400
# `blobs` holds one location per blob, the one reads use. A blob stored in two packs (a
# repacked pack and its original, both received from a peer during a prune's grace period)
# keeps its other locations in `spare`, so that dropping the pack `blobs` points to moves the
# blob to a surviving copy instead of losing it from the index.
# `damaged` lists stored packs whose bytes no longer match their name, and the ids of their
# blobs that do not authenticate (32 bytes each, in `bad`): those blobs are not in `blobs`, so
# nothing reads them and the next snapshot stores them again. An index without this table
# (an older p2pbackup) gets it on open; an older p2pbackup ignores it, so no version change.


@dataclass(frozen=True, slots=True)
class PackDamage:
    """What is known to be wrong with a stored pack whose bytes do not match its name."""

    reason: str
    # Its blobs that do not authenticate, and where they lie (a restore that keeps damaged
    # files zeroes exactly their bytes); they are not in the blob map.
    bad: dict[bytes, "BlobLocation"] = field(default_factory=dict)

    def encode_bad(self) -> bytes:
        return b"".join(_BAD.pack(bid, loc.kind, loc.offset, loc.length, loc.raw_length)
                        for bid, loc in sorted(self.bad.items()))

    @classmethod
    def decode(cls, name: str, reason: str, bad: bytes) -> "PackDamage":
        usable = len(bad) - len(bad) % _BAD.size
        return cls(reason, {bid: BlobLocation(name, off, length, raw, kind) for
                            bid, kind, off, length, raw in _BAD.iter_unpack(bad[:usable])})


_BAD = struct.Struct("<32sBIII")   # id, kind, offset, length, raw length


class IndexCorrupt(Exception):
    """The index file cannot be used; it will be rebuilt."""


class IndexOutdated(IndexCorrupt):
    """The index was made by another version of p2pbackup; it will be rebuilt."""


# What SQLite says of a file that is not (or no longer) a usable index: rebuilt from the packs.
# Anything else (a full disk, an I/O error, a lock) says nothing about the file's contents.
_DAMAGE = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_FORMAT,
                     sqlite3.SQLITE_ERROR, sqlite3.SQLITE_SCHEMA, sqlite3.SQLITE_MISMATCH,
                     sqlite3.SQLITE_CONSTRAINT, sqlite3.SQLITE_RANGE})
# Less free space than this makes an I/O error a full disk: SQLite's extended codes do not
# carry errno (a full tmpfs fails sizing the shared-memory file with SQLITE_IOERR_SHMSIZE).
_NEARLY_FULL = 1 << 20
# Rows per read when streaming blobs from SQLite (bounded memory whatever the index's size).
_STREAM_ROWS = 10_000
# SQLite's page cache (anonymous memory): opening checks every page of the file (33 MiB more
# RSS at 1M blobs with the writer's cache); lookups never use it, only writes do.
_READ_CACHE_KIB = 2048
_WRITE_CACHE_KIB = 32768
# Files next to the index that belong to it (SQLite's, the blob map's, the old side file).
INDEX_FILE_SUFFIXES = ("", "-wal", "-shm", "-journal", ".map", ".map-lock", ".blobs")


def _no_space(directory: str) -> bool:
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _NEARLY_FULL


def _primary_code(exc: sqlite3.Error) -> int:
    # Set on errors SQLite reported; errors of the sqlite3 module itself have none.
    return (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF


def _sql_error(exc: sqlite3.Error, path: str) -> P2PError:
    """A failed read or write of the index that does not mean its file is damaged."""
    code = _primary_code(exc)
    directory = os.path.dirname(path)
    if code == sqlite3.SQLITE_FULL or (code == sqlite3.SQLITE_IOERR and _no_space(directory)):
        return DiskFull(directory)
    return StorageError(f"the index {path} cannot be used: {exc}")


def _is_damage(exc: sqlite3.Error) -> bool:
    return _primary_code(exc) in _DAMAGE


class PackIndex:
    """The SQLite index, opened with aiosqlite, and its blob map for lookups (`blobs`).

    `in_memory`: a copy of the file at `path` (if it can be read) held in memory and never
    written back, for a process that only reads when the disk holding the file is full.
    """

    def __init__(self, path: str, *, in_memory: bool = False) -> None:
        self.path = path
        self.in_memory = in_memory
        self._db: aiosqlite.Connection | None = None
        self._names: dict[int, str] = {}    # packs.num -> name
        # Where each blob is: get(id), `id in blobs`, len(blobs); `blobs_by_pack` streams all.
        self.blobs: BlobMap = DictBlobMap(self._names)
        self.packs: dict[str, tuple[str, int, int]] = {}
        # When packs not written here arrived (unix seconds; 0 for packs this device wrote): a
        # pack from a peer may be used by a snapshot still on its way (prune leaves it alone).
        self.arrived: dict[str, int] = {}
        self.damaged: dict[str, PackDamage] = {}
        self.bad_blobs: dict[bytes, BlobLocation] = {}   # those of damaged packs' `bad`
        # One write transaction at a time on the connection (the sink's uploaders commit
        # from two threads; the others' statements would join the same transaction).
        self._writing = asyncio.Lock()
        self._write_cache = False
        self.clock = time.time   # when a change to the packs happened (`sizes`)

    @property
    def map_path(self) -> str:
        return self.path + ".map"

    async def open(self) -> None:
        """Open (creating if needed) and load; raise IndexCorrupt when the file is unusable,
        DiskFull or StorageError when it cannot be read or written (it is not damaged then)."""
        try:
            if self.in_memory:
                self._db = await aiosqlite.connect(":memory:", uri=True)
                await self._db.executescript(_SCHEMA)
                await self._copy_from_file()
            else:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                self._db = await aiosqlite.connect(self.path)
                await self._db.execute("PRAGMA journal_mode=WAL")
                await self._db.execute("PRAGMA synchronous=NORMAL")
                # A small cache until this process writes (see _begin): the check below reads
                # every page, and a reader (restore, verify) needs none of them again.
                await self._db.execute(f"PRAGMA cache_size=-{_READ_CACHE_KIB}")
                row = await (await self._db.execute("PRAGMA quick_check")).fetchone()
                if not row or row[0] != "ok":
                    raise IndexCorrupt(str(row))
                await self._db.executescript(_SCHEMA)
            cur = await self._db.execute("SELECT value FROM meta WHERE key='version'")
            row = await cur.fetchone()
            if row is None:
                await self._db.execute("INSERT INTO meta VALUES ('version', ?)", (str(INDEX_VERSION),))
                await self._db.commit()
            elif row[0] != str(INDEX_VERSION):
                raise IndexOutdated(f"index version {row[0]}, this version uses {INDEX_VERSION}")
            for num, name, scope, epoch, size, arrived in await self._db.execute_fetchall(
                    "SELECT num, name, scope, epoch, size, arrived FROM packs"):
                self.packs[name] = (scope, epoch, size)
                self._names[num] = name
                if arrived:
                    self.arrived[name] = arrived
            for name, reason, bad in await self._db.execute_fetchall(
                    "SELECT name, reason, bad FROM damaged"):
                self._note_damage(name, PackDamage.decode(name, reason, bad))
            if await self._read_generation() == 0:
                # A new database starts at a random odd generation, so that a blob map left
                # by an older database at this path never matches it.
                await self._db.execute("INSERT INTO meta VALUES ('generation', ?)",
                                       (str(int.from_bytes(os.urandom(7), "big") | 1),))
                await self._db.commit()
            if self.in_memory:
                await self._load_dict_map()
            else:
                await self._open_blob_map()
        except IndexCorrupt:
            await self.close()
            raise
        except sqlite3.Error as exc:
            await self.close()
            if _is_damage(exc):
                raise IndexCorrupt(str(exc)) from None
            raise _sql_error(exc, self.path) from None
        except OSError as exc:
            await self.close()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(os.path.dirname(self.path)) from None
            raise StorageError(f"the index {self.path} cannot be used: {exc}") from None
        except BaseException:
            await self.close()  # its worker thread would keep the process alive
            raise

    async def _open_blob_map(self) -> None:
        """Open the blob map and make sure it mirrors this database, making it again if not
        (the first open after an upgrade, a crash between the two commits, a damaged map)."""
        try:  # the in-memory map of the blobs of an older p2pbackup: replaced by the map
            os.unlink(self.path + ".blobs")
        except FileNotFoundError:
            pass
        for attempt in (1, 2):
            try:
                self.blobs = LmdbBlobMap(self.map_path, self._names)
                await self._sync_blob_map()
                return
            except BlobMapError as exc:
                if attempt == 2:
                    raise StorageError(str(exc)) from None
                log.warning("%s; making it again from the index", exc)
                self.blobs.close()
                self.blobs = DictBlobMap(self._names)
                for suffix in (".map", ".map-lock"):
                    try:
                        os.unlink(self.path + suffix)
                    except FileNotFoundError:
                        pass

    async def _sync_blob_map(self) -> None:
        """Rebuild the blob map unless it is at the database's generation. A writer moves the
        map first and then commits, holding SQLite's write lock: taking that lock waits for
        one in progress, so a map still off afterwards is really stale."""
        assert self._db is not None
        if self.blobs.generation == await self._read_generation():
            return
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            generation = await self._read_generation()
            if self.blobs.generation != generation:
                if self.blobs.generation == INVALID and not len(self.blobs):
                    log.info("making the blob map of the index %s from its database "
                             "(once; lookups no longer load every blob into memory)", self.path)
                else:
                    log.info("the blob map of the index %s is not at its database's "
                             "generation (a process was stopped while writing it); making "
                             "it again from the database", self.path)
                assert isinstance(self.blobs, LmdbBlobMap)
                await asyncio.to_thread(self.blobs.rebuild_from, self.path, generation)
        finally:
            await self._db.rollback()

    async def _load_dict_map(self) -> None:
        assert self._db is not None
        rows = await self._db.execute_fetchall(
            "SELECT id, pack, offset, length, raw_length, kind FROM blobs")
        self.blobs.apply(rows, (), INVALID, await self._read_generation())  # type: ignore[arg-type]

    async def _copy_from_file(self) -> None:
        """Load the index file into this in-memory database without writing anything next to
        it (immutable: no shared-memory file, no journal). What it lacks or no longer matches
        the store, sync_index puts right; an unreadable or outdated file leaves it empty."""
        assert self._db is not None
        uri = f"file:{urllib.parse.quote(self.path)}?mode=ro&immutable=1"
        try:
            await self._db.execute("ATTACH DATABASE ? AS file", (uri,))
        except sqlite3.Error:
            return  # no file (yet), or not readable
        try:
            rows = await self._db.execute_fetchall(
                "SELECT value FROM file.meta WHERE key='version'")
            if list(rows) == [(str(INDEX_VERSION),)]:
                ours, theirs = [{row[0] for row in await self._db.execute_fetchall(
                    f"SELECT name FROM {db}.sqlite_master WHERE type='table'")}
                    for db in ("main", "file")]
                # (pack_totals: the triggers counted the packs as they were copied)
                for table in sorted(ours & theirs - {"pack_totals"}):
                    await self._db.execute(f"INSERT INTO main.{table} SELECT * FROM file.{table}")
            await self._db.commit()
        except sqlite3.Error:
            await self._db.rollback()
        finally:
            await self._db.execute("DETACH DATABASE file")

    async def _read_generation(self) -> int:
        assert self._db is not None
        row = await (await self._db.execute(
            "SELECT value FROM meta WHERE key='generation'")).fetchone()
        return int(row[0]) if row else 0

    async def _begin(self) -> None:
        """Start a write transaction holding SQLite's write lock from its first statement
        (the blob map is moved inside it, so writers must not interleave)."""
        assert self._db is not None
        if not self._write_cache:
            # Blob ids are random keys: a cache that holds most of the B-tree writes each page
            # once per commit instead of spilling and re-reading (30k writes per GB before).
            await self._db.execute(f"PRAGMA cache_size=-{_WRITE_CACHE_KIB}")
            self._write_cache = True
        await self._db.execute("BEGIN IMMEDIATE")

    async def _commit(self, puts: list[Row], deletes: list[bytes]) -> None:
        """Inside the caller's transaction: count a change, move the blob map with it, then
        commit. The map is moved first: if the commit then fails (or the process is killed
        between the two), the map is at a generation the database never reaches and is made
        again by the next open."""
        assert self._db is not None
        before = await self._read_generation()
        after = before + 1
        await self._db.execute("INSERT INTO meta VALUES ('generation', ?) ON CONFLICT(key) "
                               "DO UPDATE SET value=excluded.value", (str(after),))
        moved = await asyncio.to_thread(self.blobs.apply, puts, deletes, before, after)
        try:
            await self._db.commit()
        except BaseException:
            await asyncio.to_thread(self.blobs.invalidate)
            raise
        if not moved:   # it was not at the database's generation: make it again now
            await self._sync_blob_map()

    async def _note_size(self) -> None:
        """Inside the caller's transaction, after it changed `packs`: the store's totals as
        of this minute; older minutes thinned to one per hour."""
        assert self._db is not None
        minute = int(self.clock()) // 60
        await self._db.execute(
            "INSERT INTO sizes (minute, stored, packs) SELECT ?, stored, packs "
            "FROM pack_totals WHERE true ON CONFLICT(minute) DO UPDATE SET "
            "stored=excluded.stored, packs=excluded.packs", (minute,))
        old = minute - SIZES_FINE // 60
        await self._db.execute(
            "DELETE FROM sizes WHERE minute < ? AND minute NOT IN "
            "(SELECT max(minute) FROM sizes WHERE minute < ? GROUP BY minute / 60)", (old, old))

    async def size_history(self) -> list[tuple[int, int, int]]:
        """(unix seconds, bytes stored, packs) after each change to the packs, oldest first
        (one a minute; one an hour beyond two days)."""
        assert self._db is not None
        return [(minute * 60, stored, packs) for minute, stored, packs in
                await self._db.execute_fetchall(
                    "SELECT minute, stored, packs FROM sizes ORDER BY minute")]

    async def _rollback(self) -> None:
        if self._db is not None and self._db.in_transaction:
            try:
                await self._db.rollback()
            except sqlite3.Error:
                pass

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            try:
                await db.close()  # also on error: it stops the connection's thread
            except sqlite3.Error:
                pass
        self.blobs.close()

    # ---- streaming ------------------------------------------------------------------------

    async def pack_blobs(self, name: str) -> list[tuple[bytes, BlobLocation]]:
        """The blobs the index reads from pack `name` (from the database: another process
        may have changed it)."""
        assert self._db is not None
        rows = await self._db.execute_fetchall(
            "SELECT b.id, b.offset, b.length, b.raw_length, b.kind FROM blobs b "
            "JOIN packs p ON p.num = b.pack WHERE p.name = ?", (name,))
        return [(r[0], BlobLocation(name, *r[1:])) for r in rows]

    async def blobs_by_pack(self) -> AsyncIterator[tuple[str, list[tuple[bytes, BlobLocation]]]]:
        """Every pack the index reads blobs from, with those blobs, one pack at a time (in
        pack number order; memory for one pack's blobs, whatever the index's size)."""
        assert self._db is not None
        cur = await self._db.execute(
            "SELECT b.pack, p.name, b.id, b.offset, b.length, b.raw_length, b.kind "
            "FROM blobs b JOIN packs p ON p.num = b.pack ORDER BY b.pack")
        current: str | None = None
        group: list[tuple[bytes, BlobLocation]] = []
        try:
            while rows := await cur.fetchmany(_STREAM_ROWS):
                for _num, name, bid, off, length, raw, kind in rows:
                    if name != current:
                        if group:
                            yield current, group   # type: ignore[misc]
                        current, group = name, []
                    group.append((bid, BlobLocation(name, off, length, raw, kind)))
            if group:
                yield current, group   # type: ignore[misc]
        finally:
            await cur.close()

    # ---- changes --------------------------------------------------------------------------

    async def add_pack(self, name: str, scope: str, epoch: int, size: int,
                       blobs: Iterable[BlobTuple], *,
                       arrived: bool = False, damage: PackDamage | None = None) -> None:
        """Record a stored pack and its blobs (id, kind, offset, length, raw_length);
        `arrived`: it was not written here (a peer sent it, or nobody knows who wrote it);
        `damage`: its bytes do not match its name (`blobs` are those that authenticate)."""
        await self.add_packs([(name, scope, epoch, size, blobs)], arrived=arrived,
                             damage={name: damage} if damage else None)

    def _split_copies(self, packs: list[tuple[str, str, int, int, Iterable[BlobTuple]]],
                      num: dict[str, int]) -> tuple[list[Row], list[Row]]:
        """The rows of `packs`' blobs reads use (in id order), and the copies of blobs stored
        elsewhere already (spares): the first location of a blob stays the one reads use
        (nothing rewrites its row). Blocking."""
        fresh: dict[bytes, Row] = {}
        spares: list[Row] = []
        for n, _s, _e, _z, blobs in packs:
            here = num[n]
            for bid, kind, off, length, raw in blobs:
                first = fresh.get(bid)
                if first is None or first[1] == here:
                    fresh[bid] = (bid, here, off, length, raw, kind)
                else:
                    spares.append((bid, here, off, length, raw, kind))
        rows = sorted(fresh.values())
        del fresh
        held = self.blobs.pack_numbers([r[0] for r in rows])
        elsewhere = {r[0] for r in rows if held.get(r[0], r[1]) != r[1]}
        if elsewhere:
            spares += [r for r in rows if r[0] in elsewhere]
            rows = [r for r in rows if r[0] not in elsewhere]
        return rows, spares

    async def add_packs(self, packs: list[tuple[str, str, int, int,
                                                Iterable[BlobTuple]]],
                        *, arrived: bool = False,
                        damage: dict[str, PackDamage] | None = None) -> None:
        """Record several packs in one transaction (blob ids are random, so one commit per
        pack would rewrite most of the B-tree each time). A pack not named in `damage` is
        intact: one known as damaged before was replaced by an intact copy."""
        assert self._db is not None
        damage = damage or {}
        # (all of them, not only those this process knows as damaged: another may have listed
        # one meanwhile)
        healed = [n for n, *_ in packs if n not in damage]
        now = int(time.time()) if arrived else 0
        async with self._writing:
            await self._add_packs(packs, damage, healed, now)

    async def _add_packs(self, packs: list[tuple[str, str, int, int,
                                                 Iterable[BlobTuple]]],
                         damage: dict[str, PackDamage], healed: list[str], now: int) -> None:
        assert self._db is not None
        try:
            await self._begin()
            num = await self._pack_numbers([n for n, *_ in packs])
            new = [n for n, *_ in packs if n not in num]
            if new:
                # Numbers are never reused, so a blob map entry never names another pack.
                first = await self._next_pack_number()
                num.update((n, first + i) for i, n in enumerate(dict.fromkeys(new)))
                await self._db.execute(
                    "INSERT INTO meta VALUES ('pack_seq', ?) ON CONFLICT(key) "
                    "DO UPDATE SET value=excluded.value", (str(max(num.values())),))
            await self._db.executemany(
                "INSERT INTO packs (num, name, scope, epoch, size, arrived) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET "
                "scope=excluded.scope, epoch=excluded.epoch, size=excluded.size",
                [(num[n], n, scope, epoch, size, now) for n, scope, epoch, size, _ in packs])
            # (inside the transaction: what another writer committed just before is known)
            # In id order: SQLite's B-tree and the map's are both filled leaf by leaf.
            rows, spares = await asyncio.to_thread(self._split_copies, packs, num)
            await self._db.executemany(
                "INSERT OR REPLACE INTO blobs (id, pack, offset, length, raw_length, kind) "
                "VALUES (?,?,?,?,?,?)", rows)
            if spares:
                await self._db.executemany(
                    "INSERT OR REPLACE INTO spare (id, pack, offset, length, raw_length, kind) "
                    "VALUES (?,?,?,?,?,?)", spares)
            await self._write_damage(damage, healed)
            await self._note_size()
            await self._commit(rows, [])
            del rows
        except sqlite3.Error as exc:
            await self._rollback()
            raise _sql_error(exc, self.path) from None
        except BaseException:
            await self._rollback()
            raise
        for n, scope, epoch, size, _ in packs:
            if now and n not in self.packs:   # as the SQL: an already known pack keeps its time
                self.arrived[n] = now
            self.packs[n] = (scope, epoch, size)
            self._names[num[n]] = n
        for n in healed:
            self._note_damage(n, None)
        for n, d in damage.items():
            self._note_damage(n, d)

    async def _next_pack_number(self) -> int:
        assert self._db is not None
        (top,), = await self._db.execute_fetchall(
            "SELECT max(coalesce((SELECT max(num) FROM packs), 0), "
            "coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key='pack_seq'), 0))")
        return int(top) + 1

    async def mark_damaged(self, name: str, damage: PackDamage) -> None:
        """Record that the stored pack `name` is damaged. Its blobs in `damage.bad` leave the
        blob map (to a spare copy in another pack, if there is one); the others stay. A pack
        the index does not hold (its trailer is unreadable) is only listed."""
        async with self._writing:
            await self._mark_damaged(name, damage)

    async def _mark_damaged(self, name: str, damage: PackDamage) -> None:
        assert self._db is not None
        lost = [bid for bid in damage.bad if (loc := self.blobs.get(bid)) and loc.pack == name]
        try:
            await self._begin()
            moved: list[Row] = []
            num = (await self._pack_numbers([name])).get(name)
            if num is not None and damage.bad:
                bad = sorted(damage.bad)
                await self._db.executemany("DELETE FROM blobs WHERE id=? AND pack=?",
                                           [(bid, num) for bid in bad])
                await self._db.executemany("DELETE FROM spare WHERE id=? AND pack=?",
                                           [(bid, num) for bid in bad])
                moved = await self._promote_spares(lost)
            await self._write_damage({name: damage}, [])
            await self._commit(moved, lost)
        except sqlite3.Error as exc:
            await self._rollback()
            raise _sql_error(exc, self.path) from None
        except BaseException:
            await self._rollback()
            raise
        self._note_damage(name, damage)

    async def forget_damage(self, names: list[str]) -> None:
        """Stop listing `names` as damaged (they left the store)."""
        assert self._db is not None
        gone = [n for n in names if n in self.damaged]
        if not gone:
            return
        try:
            async with self._writing:
                await self._write_damage({}, gone)
                await self._db.commit()
        except sqlite3.Error as exc:
            await self._rollback()
            raise _sql_error(exc, self.path) from None
        for n in gone:
            self._note_damage(n, None)

    async def _write_damage(self, damage: dict[str, PackDamage], cleared: list[str]) -> None:
        """Inside the caller's transaction: list `damage`, unlist `cleared`."""
        assert self._db is not None
        if cleared:
            await self._db.executemany("DELETE FROM damaged WHERE name=?",
                                       [(n,) for n in cleared])
        if damage:
            await self._db.executemany(
                "INSERT OR REPLACE INTO damaged VALUES (?,?,?)",
                [(n, d.reason, d.encode_bad()) for n, d in damage.items()])

    def _note_damage(self, name: str, damage: PackDamage | None) -> None:
        old = self.damaged.pop(name, None)
        for bid in old.bad if old else ():
            loc = self.bad_blobs.get(bid)
            if loc is not None and loc.pack == name:
                del self.bad_blobs[bid]
        if damage is not None:
            self.damaged[name] = damage
            self.bad_blobs.update(damage.bad)

    async def remove_pack(self, name: str) -> None:
        """Forget a pack (it is gone from the store, or about to be)."""
        await self.remove_packs([name])

    async def remove_packs(self, names: list[str]) -> None:
        """Forget several packs in one transaction; a blob they held that another pack also
        holds stays in the index at its other location."""
        async with self._writing:
            await self._remove_packs(names)

    async def _remove_packs(self, names: list[str]) -> None:
        assert self._db is not None
        try:
            await self._begin()
            numbers = await self._pack_numbers(names)
            gone_nums = list(numbers.values())
            # From the database, not this process's view: another process may have added some.
            lost = [row[0] for part in _parts(gone_nums) for row in
                    await self._db.execute_fetchall(
                        f"SELECT id FROM blobs WHERE pack IN ({_marks(part)})", part)]
            await self._db.executemany("DELETE FROM blobs WHERE pack=?",
                                       [(n,) for n in gone_nums])
            await self._db.executemany("DELETE FROM spare WHERE pack=?",
                                       [(n,) for n in gone_nums])
            moved = await self._promote_spares(lost)
            await self._write_damage({}, names)
            await self._db.executemany("DELETE FROM packs WHERE num=?", [(n,) for n in gone_nums])
            await self._note_size()
            await self._commit(moved, lost)
        except sqlite3.Error as exc:
            await self._rollback()
            raise _sql_error(exc, self.path) from None
        except BaseException:
            await self._rollback()
            raise
        for n in names:
            self.packs.pop(n, None)
            self.arrived.pop(n, None)
            self._note_damage(n, None)
        for num in numbers.values():
            self._names.pop(num, None)

    async def _promote_spares(self, lost: list[bytes]) -> list[Row]:
        """Inside the caller's transaction: each of `lost` (blobs whose location was just
        deleted) moves to a spare location, if it has one left; returns the new rows."""
        assert self._db is not None
        moved: dict[bytes, Row] = {}
        if not lost or not await self._db.execute_fetchall("SELECT 1 FROM spare LIMIT 1"):
            return []
        for part in _parts(lost):
            for bid, num, off, length, raw, kind in await self._db.execute_fetchall(
                    "SELECT id, pack, offset, length, raw_length, kind FROM spare "
                    f"WHERE id IN ({_marks(part)})", part):
                moved.setdefault(bid, (bid, num, off, length, raw, kind))
        rows = list(moved.values())
        await self._db.executemany(
            "INSERT INTO blobs (id, pack, offset, length, raw_length, kind) VALUES (?,?,?,?,?,?)",
            rows)
        await self._db.executemany("DELETE FROM spare WHERE id=? AND pack=?",
                                   [(r[0], r[1]) for r in rows])
        await self._learn_packs(sorted({r[1] for r in rows} - set(self._names)))
        return rows

    async def _pack_numbers(self, names: list[str]) -> dict[str, int]:
        """packs.num of each of `names` the database holds."""
        assert self._db is not None
        out: dict[str, int] = {}
        for part in _parts(names):
            out.update(await self._db.execute_fetchall(   # type: ignore[arg-type]
                f"SELECT name, num FROM packs WHERE name IN ({_marks(part)})", part))
        return out

    async def _learn_packs(self, numbers: list[int]) -> None:
        """Load packs another process added (a spare moved into one of them)."""
        assert self._db is not None
        for part in _parts(numbers):
            for num, name, scope, epoch, size in await self._db.execute_fetchall(
                    f"SELECT num, name, scope, epoch, size FROM packs WHERE num IN "
                    f"({_marks(part)})", part):
                self._names[num] = name
                self.packs[name] = (scope, epoch, size)


def noted_damage(path: str) -> dict[str, str]:
    """The packs the index at `path` lists as damaged, with what is wrong, whichever process
    noted it (`verify`, a read that failed; of this store or another's, kept in this device's
    cache); none if there is no such index or it cannot be read (it is a cache)."""
    if not os.path.exists(path):
        return {}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return dict(db.execute("SELECT name, reason FROM damaged"))
        finally:
            db.close()
    except sqlite3.Error:
        return {}


def _parts(items: list, size: int = 500) -> list[list]:
    """`items` in slices small enough for one SQL IN (...) list."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def _marks(part: list) -> str:
    return ",".join("?" * len(part))
