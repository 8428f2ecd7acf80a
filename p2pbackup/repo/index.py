"""The pack index: which pack holds each blob. A cache in SQLite, rebuilt from packs at will."""

from __future__ import annotations

import os
import sqlite3
import time
from typing import NamedTuple

import aiosqlite

from ..errors import DiskFull, StorageError

INDEX_VERSION = 2   # 2: packs.arrived

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS packs (name TEXT PRIMARY KEY, scope TEXT NOT NULL,
    epoch INTEGER NOT NULL, size INTEGER NOT NULL, arrived INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS blobs (id BLOB PRIMARY KEY, kind INTEGER NOT NULL,
    pack TEXT NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL,
    raw_length INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_by_pack ON blobs(pack);
"""


class BlobLocation(NamedTuple):
    """Where one blob is stored (a named tuple: an index holds one per blob, tens of
    thousands, built at every open; a frozen dataclass took twice as long to make)."""

    pack: str
    offset: int
    length: int
    raw_length: int
    kind: int


class IndexCorrupt(Exception):
    """The index file cannot be used; it will be rebuilt."""


def _sql_error(exc: sqlite3.Error, path: str) -> Exception:
    if "disk is full" in str(exc) or "database or disk is full" in str(exc):
        return DiskFull(os.path.dirname(path))
    return StorageError(f"the index {path} cannot be written: {exc}")


class PackIndex:
    """The SQLite index, opened with aiosqlite, plus an in-memory map for hot lookups."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self.blobs: dict[bytes, BlobLocation] = {}
        self.packs: dict[str, tuple[str, int, int]] = {}
        # When packs not written here arrived (unix seconds; 0 for packs this device wrote): a
        # pack from a peer may be used by a snapshot still on its way (prune leaves it alone).
        self.arrived: dict[str, int] = {}

    async def open(self) -> None:
        """Open (creating if needed) and load; raise IndexCorrupt when the file is unusable."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            self._db = await aiosqlite.connect(self.path)
            await self._db.execute("PRAGMA journal_mode=WAL")
            await self._db.execute("PRAGMA synchronous=NORMAL")
            # Blob ids are random keys: a cache that holds the whole B-tree writes each page
            # once per commit instead of spilling and re-reading (30k writes per GB before).
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
                raise IndexCorrupt(f"index version {row[0]}")
            for name, scope, epoch, size, arrived in await self._db.execute_fetchall(
                    "SELECT name, scope, epoch, size, arrived FROM packs"):
                self.packs[name] = (scope, epoch, size)
                if arrived:
                    self.arrived[name] = arrived
            make = BlobLocation._make
            self.blobs.update((row[0], make(row[1:])) for row in await self._db.execute_fetchall(
                "SELECT id, pack, offset, length, raw_length, kind FROM blobs"))
        except sqlite3.DatabaseError as exc:
            await self.close()
            raise IndexCorrupt(str(exc)) from None

    async def close(self) -> None:
        if self._db is not None:
            try:
                await self._db.close()
            except sqlite3.Error:
                pass
            self._db = None

    async def add_pack(self, name: str, scope: str, epoch: int, size: int,
                       blobs: list[tuple[bytes, int, int, int, int]], *,
                       arrived: bool = False) -> None:
        """Record a stored pack and its blobs (id, kind, offset, length, raw_length);
        `arrived`: it was not written here (a peer sent it, or nobody knows who wrote it)."""
        await self.add_packs([(name, scope, epoch, size, blobs)], arrived=arrived)

    async def add_packs(self, packs: list[tuple[str, str, int, int,
                                                list[tuple[bytes, int, int, int, int]]]],
                        *, arrived: bool = False) -> None:
        """Record several packs in one transaction (blob ids are random, so one commit per
        pack would rewrite most of the B-tree each time)."""
        assert self._db is not None
        now = int(time.time()) if arrived else 0
        try:
            await self._db.executemany(
                "INSERT INTO packs VALUES (?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET "
                "scope=excluded.scope, epoch=excluded.epoch, size=excluded.size",
                [(n, scope, epoch, size, now) for n, scope, epoch, size, _ in packs])
            await self._db.executemany(
                "INSERT OR REPLACE INTO blobs VALUES (?,?,?,?,?,?)",
                [(bid, kind, n, off, length, raw) for n, _s, _e, _z, blobs in packs
                 for bid, kind, off, length, raw in blobs])
            await self._db.commit()
        except sqlite3.Error as exc:
            raise _sql_error(exc, self.path) from None
        for n, scope, epoch, size, blobs in packs:
            if now and n not in self.packs:   # as the SQL: an already known pack keeps its time
                self.arrived[n] = now
            self.packs[n] = (scope, epoch, size)
            for bid, kind, off, length, raw in blobs:
                self.blobs[bid] = BlobLocation(n, off, length, raw, kind)

    async def remove_pack(self, name: str) -> None:
        """Forget a pack (it is gone from the store, or about to be)."""
        await self.remove_packs([name])

    async def remove_packs(self, names: list[str]) -> None:
        """Forget several packs in one transaction."""
        assert self._db is not None
        try:
            await self._db.executemany("DELETE FROM blobs WHERE pack=?", [(n,) for n in names])
            await self._db.executemany("DELETE FROM packs WHERE name=?", [(n,) for n in names])
            await self._db.commit()
        except sqlite3.Error as exc:
            raise _sql_error(exc, self.path) from None
        gone = set(names)
        for n in names:
            self.packs.pop(n, None)
            self.arrived.pop(n, None)
        for bid in [b for b, loc in self.blobs.items() if loc.pack in gone]:
            del self.blobs[bid]
