"""The broker's state in PostgreSQL (`PostgresState`), shared by several broker processes, and
their relay to each other (`PostgresRelay`, LISTEN/NOTIFY on the same server).

asyncpg rather than psycopg 3: its LISTEN is a plain callback on a connection of the event
loop's own (psycopg's async notifies are a generator to drive), and its binary protocol is
the faster of the two for the short queries a broker makes.

Which process holds a device: a presence row (account, device, process) written when its
socket opens, and each process's heartbeat row, refreshed every HEARTBEAT seconds by the
database's clock. A process is live while its heartbeat is younger than STALE. Asking the
others and waiting for an answer would make every offer to an absent device (the common
case: a client tries each peer) wait a timeout; a presence row answers at once, and a
killed process's rows stop counting after STALE seconds.

Relayed messages: NOTIFY on the holding process's channel with JSON {"a", "d", "m", "q"}
(account, device, message, queued push index); a message larger than NOTIFY_MAX goes to a
`relayed` row and the NOTIFY carries its id. {"a", "d", "replaced": true} tells the process
that held a device's socket that the device connected to another one. Roster changes: NOTIFY on ROSTER_CHANNEL with the
account id. A message added to a pairing mailbox: NOTIFY on MAILBOX_CHANNEL with JSON [app,
mailbox] (every process listens; the ones with a client on that mailbox read it from the
table). A notification's process handles them one at a time, in the order they came.

The database failing (stopped, restarted, cut off): every query's failure is one StorageError
line (state.unavailable), which the broker turns into a 503 or an undeliverable signal while
it goes on relaying between the sockets it holds. The relay's heartbeat retries with
exponential backoff and jitter; once the database answers again it listens again, writes this
process's presence rows anew (another process may have removed them as stale) and reloads the
rosters it holds (their notifications may be lost). Pushes are queued in the database before
they are sent, so one accepted before the outage reaches its device afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ..errors import ConfigError, StorageError
from .relay import Arrivals, Doc, MailboxArrivals
from .state import (SCHEMA_VERSION, SHARED_TABLES, DeviceRecord, Queued, Transaction,
                    check_schema, unavailable)

log = logging.getLogger("p2pbackup.broker")

HEARTBEAT = 5.0          # seconds between a process's heartbeats
STALE = 15.0             # a process whose heartbeat is older is gone (killed, cut off)
NOTIFY_MAX = 7900        # bytes of a NOTIFY payload (PostgreSQL's limit is 8000)
ROSTER_CHANNEL = "p2pb_roster"
MAILBOX_CHANNEL = "p2pb_mailbox"
MISSED = ""              # not a channel: the inbox's mark that notifications were lost
RETRY_FIRST = 0.5        # seconds before the first retry of a failed heartbeat ...
RETRY_MOST = 30.0        # ... doubling up to this (each with jitter: a fleet does not stampede)
FAILURES = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)

SCHEMA = """
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
    CREATE TABLE IF NOT EXISTS accounts (
        account TEXT PRIMARY KEY, seq BIGINT NOT NULL, roster BYTEA NOT NULL);
    CREATE TABLE IF NOT EXISTS devices (
        account TEXT NOT NULL, device TEXT NOT NULL, info BYTEA NOT NULL,
        updated DOUBLE PRECISION NOT NULL, PRIMARY KEY (account, device));
    CREATE TABLE IF NOT EXISTS queue (
        idx BIGSERIAL PRIMARY KEY, account TEXT NOT NULL, receiver TEXT NOT NULL,
        sender TEXT NOT NULL, kind TEXT NOT NULL, payload BYTEA NOT NULL,
        expires DOUBLE PRECISION NOT NULL);
    CREATE INDEX IF NOT EXISTS queue_receiver ON queue (account, receiver, idx);
    CREATE INDEX IF NOT EXISTS queue_expires ON queue (expires);
    CREATE TABLE IF NOT EXISTS persons (account TEXT PRIMARY KEY, person TEXT NOT NULL);
    CREATE INDEX IF NOT EXISTS persons_person ON persons (person);
    CREATE TABLE IF NOT EXISTS processes (
        process TEXT PRIMARY KEY, seen TIMESTAMPTZ NOT NULL DEFAULT now());
    CREATE TABLE IF NOT EXISTS presence (
        account TEXT NOT NULL, device TEXT NOT NULL, process TEXT NOT NULL,
        PRIMARY KEY (account, device));
    CREATE INDEX IF NOT EXISTS presence_process ON presence (process);
    CREATE TABLE IF NOT EXISTS relayed (
        id BIGSERIAL PRIMARY KEY, body TEXT NOT NULL, made TIMESTAMPTZ NOT NULL DEFAULT now());
    CREATE TABLE IF NOT EXISTS mailbox_messages (
        idx BIGSERIAL PRIMARY KEY, app TEXT NOT NULL, mailbox TEXT NOT NULL,
        message TEXT NOT NULL, size BIGINT NOT NULL);
""" + SHARED_TABLES
_PLACEHOLDER = re.compile(r"\?")


class _PostgresTransaction:
    def __init__(self, db: asyncpg.Connection) -> None:
        self._db = db

    @staticmethod
    def _sql(sql: str) -> str:
        count = iter(range(1, 1000))
        return _PLACEHOLDER.sub(lambda _: f"${next(count)}", sql)

    async def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in await self._db.fetch(self._sql(sql), *args)]

    async def run(self, sql: str, *args: Any) -> None:
        await self._db.execute(self._sql(sql), *args)


def _where(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@",
                                                                 ":…@", 1)))


class _OnDatabase(Protocol):
    @property
    def dsn(self) -> str: ...


S = TypeVar("S", bound=_OnDatabase)
P = ParamSpec("P")
R = TypeVar("R")


def _db(method: Callable[Concatenate[S, P], Awaitable[R]]
        ) -> Callable[Concatenate[S, P], Awaitable[R]]:
    """`method`'s database failures as one StorageError line (state.unavailable)."""
    @functools.wraps(method)
    async def wrapper(self: S, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(self, *args, **kwargs)
        except FAILURES as exc:
            raise unavailable(_where(self.dsn), exc) from None
    return wrapper


class PostgresState:
    """BrokerState in a PostgreSQL database (`await PostgresState.open(dsn)`)."""

    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self.pool, self.dsn = pool, dsn

    @classmethod
    async def open(cls, dsn: str, *, max_size: int = 10) -> PostgresState:
        try:
            # no floor of idle connections: asyncpg would log a traceback for each failed
            # attempt to restore it while the database is down
            pool = await asyncpg.create_pool(dsn, min_size=0, max_size=max_size)
        except (OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise ConfigError(f"cannot reach the broker's database {_where(dsn)}: "
                              f"{exc}") from None
        assert pool is not None
        try:
            async with pool.acquire() as db, db.transaction():
                # two processes starting together: one creates, the other waits
                await db.execute("SELECT pg_advisory_xact_lock(hashtext('p2pbackup-broker'))")
                await db.execute(SCHEMA)
                await db.execute("INSERT INTO meta VALUES ('schema', $1) ON CONFLICT DO NOTHING",
                                 SCHEMA_VERSION)
                found = await db.fetchval("SELECT value FROM meta WHERE key = 'schema'")
                check_schema(found, f"the broker's database {_where(dsn)}")
                await db.execute("UPDATE meta SET value = $1 WHERE key = 'schema' AND "
                                 "value < $1", SCHEMA_VERSION)
        except BaseException as exc:
            await pool.close()
            if isinstance(exc, FAILURES):    # its first connection is made here
                raise ConfigError(f"cannot reach the broker's database {_where(dsn)}: "
                                  f"{exc}") from None
            raise
        return cls(pool, dsn)

    @_db
    async def roster(self, account: str) -> bytes | None:
        return await self.pool.fetchval("SELECT roster FROM accounts WHERE account = $1",
                                        account)

    @_db
    async def set_roster(self, account: str, seq: int, roster: bytes, *,
                         replaces: int | None) -> bool:
        if replaces is None:
            status = await self.pool.execute(
                "INSERT INTO accounts VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                account, seq, roster)
        else:
            status = await self.pool.execute(
                "UPDATE accounts SET seq = $2, roster = $3 WHERE account = $1 AND seq = $4",
                account, seq, roster, replaces)
        return status.endswith(" 1")

    @_db
    async def put_device(self, account: str, device: str, info: bytes, now: float) -> None:
        await self.pool.execute(
            "INSERT INTO devices VALUES ($1, $2, $3, $4) ON CONFLICT (account, device) "
            "DO UPDATE SET info = excluded.info, updated = excluded.updated",
            account, device, info, now)

    @_db
    async def devices(self, account: str) -> list[DeviceRecord]:
        rows = await self.pool.fetch("SELECT device, info, updated FROM devices "
                                     "WHERE account = $1 ORDER BY device", account)
        return [DeviceRecord(r[0], bytes(r[1]), r[2]) for r in rows]

    @_db
    async def forget_devices(self, account: str, devices: list[str]) -> None:
        async with self.pool.acquire() as db, db.transaction():
            await db.execute("DELETE FROM devices WHERE account = $1 AND device = ANY($2)",
                             account, devices)
            await db.execute("DELETE FROM queue WHERE account = $1 AND "
                             "(receiver = ANY($2) OR sender = ANY($2))", account, devices)

    @_db
    async def enqueue(self, account: str, receiver: str, sender: str, kind: str,
                      payload: bytes, expires: float, *, collapse: bool) -> int:
        async with self.pool.acquire() as db, db.transaction():
            if collapse:
                # two processes collapsing the same sender's pushes at once keep one
                await db.execute("SELECT pg_advisory_xact_lock(hashtext($1 || $2 || $3))",
                                 account, receiver, sender)
                await db.execute("DELETE FROM queue WHERE account = $1 AND receiver = $2 "
                                 "AND sender = $3 AND kind = $4", account, receiver, sender,
                                 kind)
            return int(await db.fetchval(
                "INSERT INTO queue (account, receiver, sender, kind, payload, expires) "
                "VALUES ($1, $2, $3, $4, $5, $6) RETURNING idx",
                account, receiver, sender, kind, payload, expires))

    @_db
    async def pending(self, account: str, receiver: str, now: float, *, after: int = 0,
                      kind: str | None = None) -> list[Queued]:
        async with self.pool.acquire() as db:
            await db.execute("DELETE FROM queue WHERE expires <= $1", now)
            rows = await db.fetch(
                "SELECT idx, sender, kind, payload, expires FROM queue WHERE account = $1 "
                "AND receiver = $2 AND idx > $3 AND ($4::text IS NULL OR kind = $4) "
                "ORDER BY idx", account, receiver, after, kind)
        return [Queued(r[0], r[1], r[2], bytes(r[3]), r[4]) for r in rows]

    @_db
    async def drop(self, account: str, receiver: str, indexes: list[int]) -> None:
        await self.pool.execute("DELETE FROM queue WHERE account = $1 AND receiver = $2 AND "
                                "idx = ANY($3)", account, receiver, indexes)

    @_db
    async def person_of(self, account: str) -> str | None:
        return await self.pool.fetchval("SELECT person FROM persons WHERE account = $1",
                                        account)

    @_db
    async def bind_person(self, account: str, person: str, max_accounts: int) -> bool:
        async with self.pool.acquire() as db, db.transaction():
            # two processes binding the same person's accounts at once: one after the other
            await db.execute("SELECT pg_advisory_xact_lock(hashtext($1))", person)
            held = await db.fetchval("SELECT count(*) FROM persons WHERE person = $1", person)
            if held >= max_accounts:
                return False
            status = await db.execute("INSERT INTO persons VALUES ($1, $2) "
                                      "ON CONFLICT DO NOTHING", account, person)
            return bool(status.endswith(" 1"))

    @_db
    async def unbind_person(self, account: str) -> None:
        await self.pool.execute("DELETE FROM persons WHERE account = $1", account)

    @contextlib.asynccontextmanager
    async def mailbox_transaction(self) -> AsyncIterator[Transaction]:
        try:
            async with self.pool.acquire() as db, db.transaction():
                # pairings are few: one mailbox change at a time in the whole fleet
                await db.execute("SELECT pg_advisory_xact_lock(hashtext('p2pbackup-mailbox'))")
                yield _PostgresTransaction(db)
        except FAILURES as exc:    # the block holds only its queries
            raise unavailable(_where(self.dsn), exc) from None

    @_db
    async def add_invitation(self, digest: str, expires: float) -> None:
        await self.pool.execute("INSERT INTO invitations VALUES ($1, $2)", digest, expires)

    @_db
    async def spend_invitation(self, digest: str, now: float) -> bool:
        async with self.pool.acquire() as db, db.transaction():
            expires = await db.fetchval("DELETE FROM invitations WHERE digest = $1 "
                                        "RETURNING expires", digest)
            await db.execute("DELETE FROM invitations WHERE expires <= $1", now)
        return expires is not None and expires > now

    async def close(self) -> None:
        await self.pool.close()


class PostgresRelay:
    """Relay between the broker processes sharing `state`'s database."""

    def __init__(self, state: PostgresState, *, heartbeat: float = HEARTBEAT,
                 stale: float = STALE,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 jitter: Callable[[], float] = random.random) -> None:
        self.state, self.heartbeat, self.stale = state, heartbeat, stale
        self.sleep, self.jitter = sleep, jitter
        self.process = secrets.token_hex(8)
        self.channel = f"p2pb_{self.process}"
        self._listener: asyncpg.Connection | None = None
        self._inbox: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._mailboxes: MailboxArrivals | None = None
        self._here: set[tuple[str, str]] = set()     # (account, device) of the sockets here
        self._lost = False      # listening again: presence and rosters still to be redone

    @property
    def dsn(self) -> str:
        return self.state.dsn

    def hear_mailboxes(self, arrivals: MailboxArrivals) -> None:
        self._mailboxes = arrivals

    @_db
    async def mailbox_added(self, app: str, mailbox: str) -> None:
        await self.state.pool.execute("SELECT pg_notify($1, $2)", MAILBOX_CHANNEL,
                                      json.dumps([app, mailbox]))

    async def start(self, arrivals: Arrivals) -> None:
        await self.state.pool.execute("INSERT INTO processes (process) VALUES ($1)",
                                      self.process)
        await self._listen()
        self._tasks = [asyncio.create_task(self._beat()),
                       asyncio.create_task(self._consume(arrivals))]

    async def _listen(self) -> None:
        self._listener = await asyncpg.connect(self.state.dsn)
        for channel in (self.channel, ROSTER_CHANNEL, MAILBOX_CHANNEL):
            await self._listener.add_listener(channel, self._heard)

    def _heard(self, conn: object, pid: int, channel: str, payload: str) -> None:
        self._inbox.put_nowait((channel, payload))

    def retry_after(self, failures: int) -> float:
        """Seconds before the next attempt after `failures` failed heartbeats in a row:
        doubling from RETRY_FIRST up to RETRY_MOST, each between half and all of that."""
        return min(RETRY_MOST, RETRY_FIRST * 2 ** (failures - 1)) * (0.5 + self.jitter() / 2)

    async def _beat(self) -> None:
        failures = 0
        while True:
            await self.sleep(self.retry_after(failures) if failures else self.heartbeat)
            try:
                await self._heartbeat()
            except StorageError as exc:
                failures += 1
                self._lost = True     # others may have dropped our presence meanwhile
                if failures == 1:
                    log.warning("%s: relaying to the other broker processes stops until it "
                                "answers again (retrying)", exc)
                continue
            if failures:
                log.warning("the broker's database answers again (after %d failed attempts): "
                            "relaying to the other broker processes again", failures)
                failures = 0

    @_db
    async def _heartbeat(self) -> None:
        if self._listener is None or self._listener.is_closed():
            # the database restarted or cut it: listen again before saying we are alive
            # (what was sent meanwhile is lost: signals time out at their sender, pushes
            # stay queued for the device's next connection, rosters are read again)
            if not self._lost:
                log.warning("the broker's database connection for relayed messages was "
                            "lost: listening again")
                self._lost = True
            await self._listen()
        if self._lost:
            await self._announce()
            self._inbox.put_nowait((MISSED, ""))
            self._lost = False
        await self.state.pool.execute(
            "INSERT INTO processes (process) VALUES ($1) ON CONFLICT (process) "
            "DO UPDATE SET seen = now()", self.process)
        # a killed process's presence and its unread large messages
        await self.state.pool.execute(
            "DELETE FROM presence WHERE process IN (SELECT process FROM processes "
            "WHERE seen < now() - $1 * interval '1 second')", self.stale * 4)
        await self.state.pool.execute(
            "DELETE FROM relayed WHERE made < now() - interval '5 minutes'")

    async def _announce(self) -> None:
        """This process's presence rows as they are now (the sockets opened and closed while
        the database was away; rows another process removed as stale)."""
        async with self.state.pool.acquire() as db, db.transaction():
            await db.execute("DELETE FROM presence WHERE process = $1", self.process)
            if self._here:
                await db.executemany(
                    "INSERT INTO presence VALUES ($1, $2, $3) ON CONFLICT (account, device) "
                    "DO UPDATE SET process = excluded.process",
                    [(a, d, self.process) for a, d in self._here])

    async def _consume(self, arrivals: Arrivals) -> None:
        while True:
            channel, payload = await self._inbox.get()
            try:
                if channel == ROSTER_CHANNEL:
                    await arrivals.roster_changed(payload)
                    continue
                if channel == MAILBOX_CHANNEL:
                    if self._mailboxes is not None:
                        await self._mailboxes.mailbox_added(*json.loads(payload))
                    continue
                if channel == MISSED:
                    await arrivals.missed()
                    if self._mailboxes is not None:
                        await self._mailboxes.missed()
                    continue
                doc = json.loads(payload)
                if "id" in doc:
                    body = await self._relayed(doc["id"])
                    if body is None:
                        continue
                    doc = json.loads(body)
                if "m" in doc:
                    await arrivals.arrived(doc["a"], doc["d"], doc["m"], doc.get("q"))
                elif doc.get("replaced"):
                    await arrivals.replaced(doc["a"], doc["d"])
            except StorageError as exc:   # the broker's database failing: one line
                log.warning("a relayed message could not be handled: %s", exc)
            except Exception:   # one bad message must not stop this process's relay
                log.exception("a relayed message could not be handled")

    @_db
    async def _relayed(self, ident: int) -> str | None:
        body = await self.state.pool.fetchval("DELETE FROM relayed WHERE id = $1 "
                                              "RETURNING body", ident)
        return None if body is None else str(body)

    @_db
    async def attached(self, account: str, device: str) -> None:
        async with self.state.pool.acquire() as db, db.transaction():
            before = await db.fetchval("SELECT process FROM presence WHERE account = $1 AND "
                                       "device = $2 FOR UPDATE", account, device)
            await db.execute(
                "INSERT INTO presence VALUES ($1, $2, $3) ON CONFLICT (account, device) "
                "DO UPDATE SET process = excluded.process", account, device, self.process)
            if before is not None and before != self.process:
                # its socket there is dead or a duplicate (as a reconnection on one process)
                await db.execute("SELECT pg_notify($1, $2)", f"p2pb_{before}", json.dumps(
                    {"a": account, "d": device, "replaced": True}))
        self._here.add((account, device))

    @_db
    async def detached(self, account: str, device: str) -> None:
        self._here.discard((account, device))
        await self.state.pool.execute(
            "DELETE FROM presence WHERE account = $1 AND device = $2 AND process = $3",
            account, device, self.process)

    @_db
    async def forward(self, account: str, device: str, doc: Doc, queued: int | None) -> bool:
        body = json.dumps({"a": account, "d": device, "m": doc, "q": queued},
                          separators=(",", ":"))
        if len(body.encode()) <= NOTIFY_MAX:
            # where it is and the NOTIFY in one round trip
            sent = await self.state.pool.fetchval(
                "SELECT count(pg_notify('p2pb_' || p.process, $5)) FROM presence p "
                "JOIN processes r USING (process) WHERE p.account = $1 AND p.device = $2 "
                "AND p.process <> $3 AND r.seen > now() - $4 * interval '1 second'",
                account, device, self.process, self.stale, body)
            return bool(sent)
        async with self.state.pool.acquire() as db, db.transaction():
            holder = await db.fetchval(
                "SELECT p.process FROM presence p JOIN processes r USING (process) "
                "WHERE p.account = $1 AND p.device = $2 AND p.process <> $3 "
                "AND r.seen > now() - $4 * interval '1 second'",
                account, device, self.process, self.stale)
            if holder is None:
                return False
            ident = await db.fetchval("INSERT INTO relayed (body) VALUES ($1) RETURNING id",
                                      body)
            await db.execute("SELECT pg_notify($1, $2)", f"p2pb_{holder}",
                             json.dumps({"id": ident}))
        return True

    @_db
    async def elsewhere(self, account: str) -> set[str]:
        rows = await self.state.pool.fetch(
            "SELECT p.device FROM presence p JOIN processes r USING (process) "
            "WHERE p.account = $1 AND p.process <> $2 "
            "AND r.seen > now() - $3 * interval '1 second'", account, self.process, self.stale)
        return {r[0] for r in rows}

    @_db
    async def roster_stored(self, account: str) -> None:
        await self.state.pool.execute("SELECT pg_notify($1, $2)", ROSTER_CHANNEL, account)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
        with contextlib.suppress(Exception):
            await self.state.pool.execute("DELETE FROM presence WHERE process = $1",
                                          self.process)
            await self.state.pool.execute("DELETE FROM processes WHERE process = $1",
                                          self.process)

