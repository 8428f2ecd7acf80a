"""The pack index: which pack holds each blob. A cache in SQLite, rebuilt from packs at will."""

from __future__ import annotations

import errno
import os
import sqlite3
import struct
import time
import urllib.parse
from typing import NamedTuple

from dataclasses import dataclass, field

import aiosqlite
import blake3

from ..errors import DiskFull, P2PError, StorageError

# 2: packs.arrived; 3: meta.generation (the blob map side file); 4: the spare table, and
# blobs name their pack by packs.num (a 64-character name in each row made the table twice the
# size, and a peer's pack cost twice the CPU to index).
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
"""
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


class BlobLocation(NamedTuple):
    """Where one blob is stored (a named tuple: an index holds one per blob, tens of
    thousands, built at every open; a frozen dataclass took twice as long to make)."""

    pack: str
    offset: int
    length: int
    raw_length: int
    kind: int


# The blob map is also kept in a side file, one fixed-size record per blob, read with
# struct.iter_unpack: loading 30k blobs from it takes ~35 ms, from SQLite ~100 ms (rows to
# Python objects), and every command opens the index. It is a cache of the SQLite cache: used
# only when it carries the generation the database is at, else rebuilt from the database.
_DUMP_MAGIC = b"P2PBIDX\x01"
_DUMP_HEAD = struct.Struct("<8sQII")    # magic, generation, packs, blobs
_DUMP_BLOB = struct.Struct("<32sIIIIB")  # id, pack number, offset, length, raw length, kind


def encode_blob_map(generation: int, blobs: dict[bytes, BlobLocation]) -> bytes | None:
    """The side file for `blobs` at `generation`; None if a value does not fit its fields."""
    numbers: dict[str, int] = {}
    out = bytearray()
    pack = _DUMP_BLOB.pack
    try:
        for bid, loc in blobs.items():
            n = numbers.setdefault(loc.pack, len(numbers))
            if len(bid) != 32:
                return None
            out += pack(bid, n, loc.offset, loc.length, loc.raw_length, loc.kind)
    except struct.error:
        return None
    names = "\n".join(numbers).encode()
    body = _DUMP_HEAD.pack(_DUMP_MAGIC, generation, len(numbers), len(blobs)) \
        + struct.pack("<I", len(names)) + names + out
    return body + blake3.blake3(body).digest()


def decode_blob_map(data: bytes, generation: int) -> dict[bytes, BlobLocation] | None:
    """The blob map in a side file, if it is whole and at `generation`; else None."""
    if len(data) < _DUMP_HEAD.size + 36 or \
            blake3.blake3(memoryview(data)[:-32]).digest() != data[-32:]:
        return None
    magic, gen, n_packs, n_blobs = _DUMP_HEAD.unpack_from(data)
    if magic != _DUMP_MAGIC or gen != generation:
        return None
    at = _DUMP_HEAD.size
    (names_len,) = struct.unpack_from("<I", data, at)
    at += 4
    names = data[at:at + names_len].decode().split("\n") if n_packs else []
    at += names_len
    records = memoryview(data)[at:-32]
    if len(names) != n_packs or len(records) != n_blobs * _DUMP_BLOB.size:
        return None
    new = tuple.__new__
    try:
        return {bid: new(BlobLocation, (names[p], off, length, raw, kind))
                for bid, p, off, length, raw, kind in _DUMP_BLOB.iter_unpack(records)}
    except IndexError:
        return None


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
    """The SQLite index, opened with aiosqlite, plus an in-memory map for hot lookups.

    `in_memory`: a copy of the file at `path` (if it can be read) held in memory and never
    written back, for a process that only reads when the disk holding the file is full.
    """

    def __init__(self, path: str, *, in_memory: bool = False) -> None:
        self.path = path
        self.in_memory = in_memory
        self._db: aiosqlite.Connection | None = None
        self.blobs: dict[bytes, BlobLocation] = {}
        self._generation = 0        # of the database, as this process last saw or made it
        self._map_stale = False     # the side file does not match what this process holds
        self.packs: dict[str, tuple[str, int, int]] = {}
        # When packs not written here arrived (unix seconds; 0 for packs this device wrote): a
        # pack from a peer may be used by a snapshot still on its way (prune leaves it alone).
        self.arrived: dict[str, int] = {}
        self.damaged: dict[str, PackDamage] = {}
        self.bad_blobs: dict[bytes, BlobLocation] = {}   # those of damaged packs' `bad`

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
                # Blob ids are random keys: a cache that holds the whole B-tree writes each
                # page once per commit instead of spilling and re-reading (30k writes per GB
                # before).
                await self._db.execute("PRAGMA cache_size=-65536")
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
            for name, scope, epoch, size, arrived in await self._db.execute_fetchall(
                    "SELECT name, scope, epoch, size, arrived FROM packs"):
                self.packs[name] = (scope, epoch, size)
                if arrived:
                    self.arrived[name] = arrived
            for name, reason, bad in await self._db.execute_fetchall(
                    "SELECT name, reason, bad FROM damaged"):
                self._note_damage(name, PackDamage.decode(name, reason, bad))
            self._generation = await self._read_generation()
            if self._generation == 0:
                # A new database starts at a random generation, so that a side file left by
                # an older database at this path never matches it.
                self._generation = int.from_bytes(os.urandom(7), "big") | 1
                await self._db.execute("INSERT INTO meta VALUES ('generation', ?)",
                                       (str(self._generation),))
                await self._db.commit()
            fast = self._read_blob_map()
            if fast is not None:
                self.blobs.update(fast)
            else:
                make = BlobLocation._make
                self.blobs.update((row[0], make(row[1:])) for row in
                                  await self._db.execute_fetchall(
                                      "SELECT b.id, p.name, b.offset, b.length, b.raw_length, "
                                      "b.kind FROM blobs b JOIN packs p ON p.num = b.pack"))
                self._map_stale = True
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
                for table in sorted(ours & theirs):
                    await self._db.execute(f"INSERT INTO main.{table} SELECT * FROM file.{table}")
            await self._db.commit()
        except sqlite3.Error:
            await self._db.rollback()
        finally:
            await self._db.execute("DETACH DATABASE file")

    @property
    def _map_path(self) -> str:
        return self.path + ".blobs"

    def _read_blob_map(self) -> dict[bytes, BlobLocation] | None:
        try:
            with open(self._map_path, "rb") as f:
                return decode_blob_map(f.read(), self._generation)
        except OSError:
            return None

    async def _read_generation(self) -> int:
        assert self._db is not None
        row = await (await self._db.execute(
            "SELECT value FROM meta WHERE key='generation'")).fetchone()
        return int(row[0]) if row else 0

    async def _next_generation(self) -> None:
        """Count a change (inside its transaction); a change by another process since this one
        loaded means our map may lack it, so no side file is written from it."""
        assert self._db is not None
        current = await self._read_generation()
        mine = current == self._generation
        await self._db.execute("INSERT INTO meta VALUES ('generation', ?) ON CONFLICT(key) "
                               "DO UPDATE SET value=excluded.value", (str(current + 1),))
        # -1 never matches again: a process that missed a change writes no side file.
        self._generation = current + 1 if mine and self._generation >= 0 else -1
        self._map_stale = True

    async def _write_blob_map(self) -> None:
        if self.in_memory or not self._map_stale or self._generation < 0 or \
                await self._read_generation() != self._generation:
            return
        data = encode_blob_map(self._generation, self.blobs)
        if data is None:
            return
        tmp = f"{self._map_path}.{os.getpid()}.tmp"
        try:  # no fsync: a torn or lost file fails its hash and is made again
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self._map_path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    async def close(self) -> None:
        if self._db is not None:
            try:
                await self._write_blob_map()
            except sqlite3.Error:
                pass
            finally:
                db, self._db = self._db, None
                try:
                    await db.close()  # also on error: it stops the connection's thread
                except sqlite3.Error:
                    pass

    async def add_pack(self, name: str, scope: str, epoch: int, size: int,
                       blobs: list[tuple[bytes, int, int, int, int]], *,
                       arrived: bool = False, damage: PackDamage | None = None) -> None:
        """Record a stored pack and its blobs (id, kind, offset, length, raw_length);
        `arrived`: it was not written here (a peer sent it, or nobody knows who wrote it);
        `damage`: its bytes do not match its name (`blobs` are those that authenticate)."""
        await self.add_packs([(name, scope, epoch, size, blobs)], arrived=arrived,
                             damage={name: damage} if damage else None)

    async def add_packs(self, packs: list[tuple[str, str, int, int,
                                                list[tuple[bytes, int, int, int, int]]]],
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
        # The first location of a blob stays the one reads use (nothing rewrites its row);
        # a copy in another pack is a spare.
        fresh: dict[bytes, BlobLocation] = {}
        spares: list[tuple[bytes, int, str, int, int, int]] = []
        for n, _s, _e, _z, blobs in packs:
            for bid, kind, off, length, raw in blobs:
                held = fresh.get(bid) or self.blobs.get(bid)
                if held is None or held.pack == n:
                    fresh[bid] = BlobLocation(n, off, length, raw, kind)
                else:
                    spares.append((bid, kind, n, off, length, raw))
        try:
            await self._db.executemany(
                "INSERT INTO packs (name, scope, epoch, size, arrived) VALUES (?,?,?,?,?) "
                "ON CONFLICT(name) DO UPDATE SET "
                "scope=excluded.scope, epoch=excluded.epoch, size=excluded.size",
                [(n, scope, epoch, size, now) for n, scope, epoch, size, _ in packs])
            num = await self._pack_numbers([n for n, *_ in packs])
            await self._db.executemany(
                "INSERT OR REPLACE INTO blobs VALUES (?,?,?,?,?,?)",
                [(bid, loc.kind, num[loc.pack], loc.offset, loc.length, loc.raw_length)
                 for bid, loc in fresh.items()])
            if spares:
                await self._db.executemany(
                    "INSERT OR REPLACE INTO spare VALUES (?,?,?,?,?,?)",
                    [(bid, kind, num[n], off, length, raw)
                     for bid, kind, n, off, length, raw in spares])
            await self._write_damage(damage, healed)
            await self._next_generation()
            await self._db.commit()
        except sqlite3.Error as exc:
            raise _sql_error(exc, self.path) from None
        for n, scope, epoch, size, _ in packs:
            if now and n not in self.packs:   # as the SQL: an already known pack keeps its time
                self.arrived[n] = now
            self.packs[n] = (scope, epoch, size)
        self.blobs.update(fresh)
        for n in healed:
            self._note_damage(n, None)
        for n, d in damage.items():
            self._note_damage(n, d)

    async def mark_damaged(self, name: str, damage: PackDamage) -> None:
        """Record that the stored pack `name` is damaged. Its blobs in `damage.bad` leave the
        blob map (to a spare copy in another pack, if there is one); the others stay. A pack
        the index does not hold (its trailer is unreadable) is only listed."""
        assert self._db is not None
        moved: dict[bytes, tuple[int, BlobLocation]] = {}
        lost = [bid for bid in damage.bad if (loc := self.blobs.get(bid)) and loc.pack == name]
        try:
            num = (await self._pack_numbers([name])).get(name)
            if num is not None and damage.bad:
                bad = sorted(damage.bad)
                await self._db.executemany("DELETE FROM blobs WHERE id=? AND pack=?",
                                           [(bid, num) for bid in bad])
                await self._db.executemany("DELETE FROM spare WHERE id=? AND pack=?",
                                           [(bid, num) for bid in bad])
                moved = await self._promote_spares(lost)
            await self._write_damage({name: damage}, [])
            await self._next_generation()
            await self._db.commit()
        except sqlite3.Error as exc:
            raise _sql_error(exc, self.path) from None
        for bid in lost:
            del self.blobs[bid]
        self.blobs.update((bid, loc) for bid, (_, loc) in moved.items())
        self._note_damage(name, damage)

    async def forget_damage(self, names: list[str]) -> None:
        """Stop listing `names` as damaged (they left the store)."""
        assert self._db is not None
        gone = [n for n in names if n in self.damaged]
        if not gone:
            return
        try:
            await self._write_damage({}, gone)
            await self._db.commit()
        except sqlite3.Error as exc:
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
        assert self._db is not None
        gone = set(names)
        moved: dict[bytes, tuple[int, BlobLocation]] = {}
        try:
            gone_nums = list((await self._pack_numbers(names)).values())
            # From the database, not this process's map: another process may have added some.
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
            await self._next_generation()
            await self._db.commit()
        except sqlite3.Error as exc:
            raise _sql_error(exc, self.path) from None
        for n in names:
            self.packs.pop(n, None)
            self.arrived.pop(n, None)
            self._note_damage(n, None)
        for bid in [b for b, loc in self.blobs.items() if loc.pack in gone]:
            del self.blobs[bid]
        self.blobs.update((bid, loc) for bid, (_, loc) in moved.items())

    async def _promote_spares(self, lost: list[bytes]) -> dict[bytes, tuple[int, BlobLocation]]:
        """Inside the caller's transaction: each of `lost` (blobs whose location was just
        deleted) moves to a spare location, if it has one left; returns the moves."""
        assert self._db is not None
        moved: dict[bytes, tuple[int, BlobLocation]] = {}
        if not lost or not await self._db.execute_fetchall("SELECT 1 FROM spare LIMIT 1"):
            return moved
        for part in _parts(lost):
            for bid, num, name, off, length, raw, kind in await self._db.execute_fetchall(
                    "SELECT s.id, s.pack, p.name, s.offset, s.length, s.raw_length, "
                    "s.kind FROM spare s JOIN packs p ON p.num = s.pack "
                    f"WHERE s.id IN ({_marks(part)})", part):
                moved.setdefault(bid, (num, BlobLocation(name, off, length, raw, kind)))
        await self._db.executemany(
            "INSERT INTO blobs VALUES (?,?,?,?,?,?)",
            [(bid, loc.kind, num, loc.offset, loc.length, loc.raw_length)
             for bid, (num, loc) in moved.items()])
        await self._db.executemany("DELETE FROM spare WHERE id=? AND pack=?",
                                   [(bid, num) for bid, (num, _) in moved.items()])
        return moved

    async def _pack_numbers(self, names: list[str]) -> dict[str, int]:
        """packs.num of each of `names` the database holds."""
        assert self._db is not None
        out: dict[str, int] = {}
        for part in _parts(names):
            out.update(await self._db.execute_fetchall(   # type: ignore[arg-type]
                f"SELECT name, num FROM packs WHERE name IN ({_marks(part)})", part))
        return out


def _parts(items: list, size: int = 500) -> list[list]:
    """`items` in slices small enough for one SQL IN (...) list."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def _marks(part: list) -> str:
    return ",".join("?" * len(part))
