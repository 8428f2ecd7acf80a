"""What the broker keeps between restarts, behind one small interface (`BrokerState`): SQLite
(`SqliteState`, embedded, the default) or PostgreSQL (`PostgresState`, shared by several broker
processes; they relay between them through it too, broker/relay.py).

Per account: its roster (the owner-signed device list it follows, format/roster.py), each
device's record (opaque bytes the devices encrypt: the broker never reads a name), queued
pushes (one per sender and receiver: a newer push replaces an older one) and commands (FxA's
invoke_command: kept until their TTL runs out). Times are Unix seconds.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from ..errors import UnsupportedFormat

T = TypeVar("T")
SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device: str
    info: bytes          # the device's own (encrypted) description; b"" if none registered
    updated: float


@dataclass(frozen=True, slots=True)
class Queued:
    """A push or command waiting for its receiver."""

    index: int
    sender: str
    kind: str            # "push", or the command's name
    payload: bytes
    expires: float


class BrokerState(Protocol):
    """The broker's storage. Every method is a coroutine; implementations serialise as they
    need to."""

    async def roster(self, account: str) -> bytes | None: ...
    async def set_roster(self, account: str, seq: int, roster: bytes, *,
                         replaces: int | None) -> bool:
        """Store `roster` (version `seq`) if the held one is still version `replaces` (None:
        the account is new); False if another request got there first."""
        ...
    async def put_device(self, account: str, device: str, info: bytes, now: float) -> None: ...
    async def devices(self, account: str) -> list[DeviceRecord]: ...
    async def forget_devices(self, account: str, devices: list[str]) -> None: ...
    async def enqueue(self, account: str, receiver: str, sender: str, kind: str,
                      payload: bytes, expires: float, *, collapse: bool) -> int: ...
    async def pending(self, account: str, receiver: str, now: float, *, after: int = 0,
                      kind: str | None = None) -> list[Queued]: ...
    async def drop(self, account: str, receiver: str, indexes: list[int]) -> None: ...
    async def close(self) -> None: ...

    # -- persons: accounts registered with a sign-in (broker/registration.py) --------------
    async def person_of(self, account: str) -> str | None:
        """The person (oidc.person_id) who registered `account`; None if none did."""
        ...
    async def bind_person(self, account: str, person: str, max_accounts: int) -> bool:
        """Tie `account` to `person` unless the person holds `max_accounts` accounts already
        (False then); one step, so that two brokers on one database cannot both pass."""
        ...
    async def unbind_person(self, account: str) -> None:
        """Undo bind_person (the roster it was for lost a race)."""
        ...


def check_schema(found: int, what: str) -> None:
    """Refuse a database a newer broker wrote (its tables may mean something else now)."""
    if found > SCHEMA_VERSION:
        raise UnsupportedFormat(what, found)


class SqliteState:
    """BrokerState in one SQLite file (stdlib sqlite3 on one worker thread: calls are short
    and run in order)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="broker-state")
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS accounts (
                account TEXT PRIMARY KEY, seq INTEGER NOT NULL, roster BLOB NOT NULL);
            CREATE TABLE IF NOT EXISTS devices (
                account TEXT NOT NULL, device TEXT NOT NULL, info BLOB NOT NULL,
                updated REAL NOT NULL, PRIMARY KEY (account, device));
            CREATE TABLE IF NOT EXISTS queue (
                idx INTEGER PRIMARY KEY AUTOINCREMENT, account TEXT NOT NULL,
                receiver TEXT NOT NULL, sender TEXT NOT NULL, kind TEXT NOT NULL,
                payload BLOB NOT NULL, expires REAL NOT NULL);
            CREATE INDEX IF NOT EXISTS queue_receiver ON queue (account, receiver, idx);
            CREATE TABLE IF NOT EXISTS persons (
                account TEXT PRIMARY KEY, person TEXT NOT NULL);
            CREATE INDEX IF NOT EXISTS persons_person ON persons (person);
        """)
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        found = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        check_schema(found, f"the broker's database {path}")

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def roster(self, account: str) -> bytes | None:
        def q() -> bytes | None:
            row = self._db.execute("SELECT roster FROM accounts WHERE account = ?",
                                   (account,)).fetchone()
            return bytes(row[0]) if row else None
        return await self._run(q)

    async def set_roster(self, account: str, seq: int, roster: bytes, *,
                         replaces: int | None) -> bool:
        def q() -> bool:
            if replaces is None:
                cur = self._db.execute("INSERT OR IGNORE INTO accounts VALUES (?, ?, ?)",
                                       (account, seq, roster))
            else:
                cur = self._db.execute("UPDATE accounts SET seq = ?, roster = ? "
                                       "WHERE account = ? AND seq = ?",
                                       (seq, roster, account, replaces))
            return cur.rowcount == 1
        return await self._run(q)

    async def put_device(self, account: str, device: str, info: bytes, now: float) -> None:
        await self._run(lambda: self._db.execute(
            "INSERT OR REPLACE INTO devices VALUES (?, ?, ?, ?)", (account, device, info, now)))

    async def devices(self, account: str) -> list[DeviceRecord]:
        def q() -> list[DeviceRecord]:
            rows = self._db.execute("SELECT device, info, updated FROM devices "
                                    "WHERE account = ? ORDER BY device", (account,))
            return [DeviceRecord(d, bytes(i), u) for d, i, u in rows]
        return await self._run(q)

    async def forget_devices(self, account: str, devices: list[str]) -> None:
        def q() -> None:
            for d in devices:
                self._db.execute("DELETE FROM devices WHERE account = ? AND device = ?",
                                 (account, d))
                self._db.execute("DELETE FROM queue WHERE account = ? AND "
                                 "(receiver = ? OR sender = ?)", (account, d, d))
        await self._run(q)

    async def enqueue(self, account: str, receiver: str, sender: str, kind: str,
                      payload: bytes, expires: float, *, collapse: bool) -> int:
        def q() -> int:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if collapse:
                    self._db.execute("DELETE FROM queue WHERE account = ? AND receiver = ? "
                                     "AND sender = ? AND kind = ?",
                                     (account, receiver, sender, kind))
                cur = self._db.execute(
                    "INSERT INTO queue (account, receiver, sender, kind, payload, expires) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (account, receiver, sender, kind, payload, expires))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return int(cur.lastrowid or 0)
        return await self._run(q)

    async def pending(self, account: str, receiver: str, now: float, *, after: int = 0,
                      kind: str | None = None) -> list[Queued]:
        def q() -> list[Queued]:
            self._db.execute("DELETE FROM queue WHERE expires <= ?", (now,))
            rows = self._db.execute(
                "SELECT idx, sender, kind, payload, expires FROM queue WHERE account = ? AND "
                "receiver = ? AND idx > ? AND (? IS NULL OR kind = ?) ORDER BY idx",
                (account, receiver, after, kind, kind))
            return [Queued(i, s, k, bytes(p), e) for i, s, k, p, e in rows]
        return await self._run(q)

    async def drop(self, account: str, receiver: str, indexes: list[int]) -> None:
        def q() -> None:
            self._db.executemany("DELETE FROM queue WHERE account = ? AND receiver = ? AND "
                                 "idx = ?", [(account, receiver, i) for i in indexes])
        await self._run(q)

    # -- persons ---------------------------------------------------------------------------

    async def person_of(self, account: str) -> str | None:
        def q() -> str | None:
            row = self._db.execute("SELECT person FROM persons WHERE account = ?",
                                   (account,)).fetchone()
            return str(row[0]) if row else None
        return await self._run(q)

    async def bind_person(self, account: str, person: str, max_accounts: int) -> bool:
        def q() -> bool:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                (held,) = self._db.execute("SELECT count(*) FROM persons WHERE person = ?",
                                           (person,)).fetchone()
                ok = held < max_accounts and self._db.execute(
                    "INSERT OR IGNORE INTO persons VALUES (?, ?)",
                    (account, person)).rowcount == 1
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return bool(ok)
        return await self._run(q)

    async def unbind_person(self, account: str) -> None:
        await self._run(lambda: self._db.execute("DELETE FROM persons WHERE account = ?",
                                                 (account,)))

    async def close(self) -> None:
        await self._run(self._db.close)
        self._pool.shutdown()
