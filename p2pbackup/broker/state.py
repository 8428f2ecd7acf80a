"""What the broker keeps between restarts, behind one small interface (`BrokerState`): SQLite
(`SqliteState`, embedded, the default) or PostgreSQL (`PostgresState`, shared by several broker
processes; they relay between them through it too, broker/relay.py).

Per account: its roster (the owner-signed device list it follows, format/roster.py), each
device's record (opaque bytes the devices encrypt: the broker never reads a name), queued
pushes (one per sender and receiver: a newer push replaces an older one) and commands (FxA's
invoke_command: kept until their TTL runs out). Times are Unix seconds.

Beside them, what a fleet's processes must share for its clients: the pairing mailbox's
nameplates, mailboxes and messages (broker/mailbox.py `StoredMailboxes` keeps them in these
tables, through `mailbox_transaction`: the two sides of a pairing may reach different
processes) and the operator's one-time invitations (spent once, on whichever process).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..errors import StorageError, UnsupportedFormat

T = TypeVar("T")
# 2: the pairing mailbox and invitations moved into the state. A broker of version 1 on the
# same database would pair and spend invitations on its own, so it is refused.
SCHEMA_VERSION = 2

# Tables both databases create alike (the mailbox's SQL is written once, broker/mailbox.py).
SHARED_TABLES = """
    CREATE TABLE IF NOT EXISTS mailboxes (
        app TEXT NOT NULL, mailbox TEXT NOT NULL, touched DOUBLE PRECISION NOT NULL,
        size BIGINT NOT NULL, PRIMARY KEY (app, mailbox));
    CREATE TABLE IF NOT EXISTS mailbox_nameplates (
        app TEXT NOT NULL, nameplate TEXT NOT NULL, mailbox TEXT NOT NULL,
        PRIMARY KEY (app, nameplate));
    CREATE TABLE IF NOT EXISTS mailbox_sides (
        app TEXT NOT NULL, mailbox TEXT NOT NULL, side TEXT NOT NULL,
        claimed INTEGER NOT NULL, released INTEGER NOT NULL, opened INTEGER NOT NULL,
        PRIMARY KEY (app, mailbox, side));
    CREATE INDEX IF NOT EXISTS mailbox_messages_box ON mailbox_messages (app, mailbox, idx);
    CREATE TABLE IF NOT EXISTS invitations (
        digest TEXT PRIMARY KEY, expires DOUBLE PRECISION NOT NULL);
"""


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


class Transaction(Protocol):
    """Statements in one transaction, with `?` placeholders (each state adapts them); the
    transaction serialises with every other mailbox transaction of the fleet."""

    async def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]: ...
    async def run(self, sql: str, *args: Any) -> None: ...


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

    # -- shared with the fleet's other processes --------------------------------------------
    def mailbox_transaction(self) -> contextlib.AbstractAsyncContextManager[Transaction]:
        """One transaction over the mailbox tables (committed when the block ends, rolled
        back when it raises)."""
        ...
    async def add_invitation(self, digest: str, expires: float) -> None: ...
    async def spend_invitation(self, digest: str, now: float) -> bool:
        """True (and it is gone) if the invitation of `digest` is held and unexpired."""
        ...


def unavailable(where: str, exc: BaseException) -> StorageError:
    """The database failing under the broker (stopped, cut off, a locked or read-only file),
    as one line: the broker answers 503 and goes on with what needs no database."""
    why = " ".join(str(exc).split()) or type(exc).__name__
    return StorageError(f"the broker's database {where} failed: {why}")


def check_schema(found: int, what: str) -> None:
    """Refuse a database a newer broker wrote (its tables may mean something else now)."""
    if found > SCHEMA_VERSION:
        raise UnsupportedFormat(what, found)


class _SqliteTransaction:
    def __init__(self, db: sqlite3.Connection, run: Callable[[Callable[[], Any]], Any]) -> None:
        self._db, self._run = db, run

    async def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        return await self._run(lambda: self._db.execute(sql, args).fetchall())

    async def run(self, sql: str, *args: Any) -> None:
        await self._run(lambda: self._db.execute(sql, args))


class SqliteState:
    """BrokerState in one SQLite file (stdlib sqlite3 on one worker thread: calls are short
    and run in order)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = path
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
            CREATE TABLE IF NOT EXISTS mailbox_messages (
                idx INTEGER PRIMARY KEY AUTOINCREMENT, app TEXT NOT NULL,
                mailbox TEXT NOT NULL, message TEXT NOT NULL, size INTEGER NOT NULL);
        """ + SHARED_TABLES)
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        found = self._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        check_schema(found, f"the broker's database {path}")
        self._db.execute("UPDATE meta SET value = ? WHERE key = 'schema' AND value < ?",
                         (SCHEMA_VERSION, SCHEMA_VERSION))
        # the mailbox's transactions span awaits: a connection (and thread) of their own, so
        # that the other calls' statements never land inside one
        self._mailbox_pool = ThreadPoolExecutor(1, thread_name_prefix="broker-mailbox")
        self._mailbox_db = sqlite3.connect(str(path), check_same_thread=False,
                                           isolation_level=None, timeout=30)
        self._mailbox_lock = asyncio.Lock()

    async def _run(self, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        except sqlite3.OperationalError as exc:   # locked, read-only, I/O: not a bug
            raise unavailable(str(self.path), exc) from None

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

    # -- shared with the fleet (one process here, but kept across restarts) ----------------

    @contextlib.asynccontextmanager
    async def mailbox_transaction(self) -> AsyncIterator[Transaction]:
        async def run(fn: Callable[[], T]) -> T:
            try:
                return await asyncio.get_running_loop().run_in_executor(self._mailbox_pool, fn)
            except sqlite3.OperationalError as exc:   # as `_run`: locked, read-only, I/O
                raise unavailable(str(self.path), exc) from None

        async with self._mailbox_lock:
            await run(lambda: self._mailbox_db.execute("BEGIN IMMEDIATE"))
            try:
                yield _SqliteTransaction(self._mailbox_db, run)
            except BaseException:
                await run(lambda: self._mailbox_db.execute("ROLLBACK"))
                raise
            await run(lambda: self._mailbox_db.execute("COMMIT"))

    async def add_invitation(self, digest: str, expires: float) -> None:
        await self._run(lambda: self._db.execute("INSERT INTO invitations VALUES (?, ?)",
                                                 (digest, expires)))

    async def spend_invitation(self, digest: str, now: float) -> bool:
        def q() -> bool:
            row = self._db.execute("DELETE FROM invitations WHERE digest = ? RETURNING expires",
                                   (digest,)).fetchone()
            self._db.execute("DELETE FROM invitations WHERE expires <= ?", (now,))
            return row is not None and row[0] > now
        return await self._run(q)

    async def close(self) -> None:
        await self._run(self._db.close)
        self._pool.shutdown()
        self._mailbox_pool.submit(self._mailbox_db.close).result()
        self._mailbox_pool.shutdown()
