"""The broker's pairing mailbox: magic-wormhole's mailbox server protocol on aiohttp.

Mount it with `add_mailbox_routes(app)`; clients speak JSON over a WebSocket at
`/v1/mailbox` (docs/server-protocol.md of magic-wormhole-mailbox-server, whose behaviour this
follows: a nameplate is a short number pointing to a mailbox; a mailbox holds the messages of
at most two sides, so a third device claiming a code is refused as "crowded"). What it learns:
nameplates, random sides and opaque bodies (SPAKE2 messages and ciphertext), nothing that helps
guess a code's words. State lives in a `MailboxState`: `MemoryMailboxes` keeps it in memory
(the standalone server), `StoredMailboxes` in the broker's database, so that the two sides of a
pairing may reach different processes of a fleet (a message added on one reaches a listener on
another through the relay, broker/relay.py). Both prune what nobody has used for `idle`
seconds (a pairing code's lifetime by default).

A misbehaving client gets one log line: a message too large, not JSON or not valid here (it
is also told, with the protocol's `error`), or a flood of messages (the connection is closed).

`python -m p2pbackup.broker.mailbox --port N` runs it alone (for tests and small setups).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import WSMsgType, web

from ..crypto.pairing import CODE_LIFETIME
from ..errors import StorageError
from .relay import Relay
from .state import BrokerState, Transaction

log = logging.getLogger("p2pbackup.broker.mailbox")

NAMEPLATE = re.compile(r"[0-9]{1,40}")
MAX_SIDES = 2
# One WebSocket message: a pairing piece (32 KiB of body, hex-encoded) in its envelope.
MAX_MESSAGE = 72 * 1024
# A pairing adds five frames (a welcome of a few KiB is one piece); a wormhole file-offer a
# few more. 64 per mailbox bounds a mailbox at 64 x MAX_MESSAGE (4.5 MiB).
MAX_MAILBOX_MESSAGES = 64
# Memory is bounded by the bodies of all mailboxes together, and the count of mailboxes (a
# claim of a new nameplate makes one, empty).
MAX_MAILBOXES = 10_000
MAX_STORED_BYTES = 256 * 1024 * 1024
# Messages queued for a client that does not read them (every message of a full mailbox and
# the acks of a burst fit).
MAX_OUTBOX = 4 * MAX_MAILBOX_MESSAGES + 64
# Commands per connection: a burst that fills a mailbox, then 8 a second. A pairing sends
# about ten (a welcome of 1 MiB, the most a pairing sends, is 32 more).
BURST, RATE = MAX_MAILBOX_MESSAGES + 16, 8.0
SIDE = re.compile(r"[0-9a-zA-Z_-]{1,64}")
MOODS = frozenset({"happy", "lonely", "scary", "errory"})


class Refused(Exception):
    """A command the protocol refuses; the text goes back to the client as `error`."""


@dataclass(slots=True)
class Mailbox:
    id: str
    app: str
    sides: set[str] = field(default_factory=set)     # ever opened it (crowding counts these)
    open_sides: set[str] = field(default_factory=set)
    messages: list[dict[str, Any]] = field(default_factory=list)
    size: int = 0
    listeners: dict[object, Callable[[dict[str, Any]], None]] = field(default_factory=dict)
    touched: float = 0.0


@dataclass(slots=True)
class Nameplate:
    mailbox: str
    claimed: set[str] = field(default_factory=set)
    released: set[str] = field(default_factory=set)


class MailboxState(Protocol):
    """What the WebSocket handler needs of the state (memory, or the broker's database).
    Each method raises Refused with the protocol's error text."""

    async def allocate(self, app: str, side: str) -> str: ...
    async def claim(self, app: str, nameplate: str, side: str) -> str: ...
    async def release(self, app: str, nameplate: str, side: str) -> None: ...
    async def open(self, app: str, mailbox: str, side: str, handle: object,
                   deliver: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]: ...
    async def add(self, app: str, mailbox: str, message: dict[str, Any]) -> None: ...
    async def close(self, app: str, mailbox: str, side: str, handle: object) -> None: ...
    async def unsubscribe(self, app: str, mailbox: str, handle: object) -> None: ...
    async def prune(self) -> int: ...


def free_nameplate(taken: set[str]) -> str:
    """As short as possible, random among the free ones of that length (as the reference
    server does): 1-9, then 10-99, then 100-999. Pairing codes hold up to 999."""
    for digits in (1, 2, 3):
        free = [str(n) for n in range(10 ** (digits - 1), 10 ** digits) if str(n) not in taken]
        if free:
            return secrets.choice(free)
    raise Refused("no free nameplate; try again later")


class MemoryMailboxes:
    """Nameplates and mailboxes in memory, per appid; `idle` seconds unused (nobody
    subscribed, nothing added) and they are gone."""

    def __init__(self, *, idle: float = CODE_LIFETIME,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.idle, self._now = idle, now
        self.nameplates: dict[tuple[str, str], Nameplate] = {}
        self.mailboxes: dict[tuple[str, str], Mailbox] = {}
        self.stored = 0

    async def allocate(self, app: str, side: str) -> str:
        name = free_nameplate({name for (a, name) in self.nameplates if a == app})
        await self.claim(app, name, side)
        return name

    async def claim(self, app: str, nameplate: str, side: str) -> str:
        plate = self.nameplates.get((app, nameplate))
        if plate is None:
            if len(self.mailboxes) >= MAX_MAILBOXES:
                raise Refused("the mailbox server is full; try again later")
            plate = Nameplate(secrets.token_urlsafe(12))
            self.mailboxes[(app, plate.mailbox)] = Mailbox(plate.mailbox, app,
                                                           touched=self._now())
            self.nameplates[(app, nameplate)] = plate
        if side in plate.released:
            raise Refused("reclaimed")
        box = self.mailboxes[(app, plate.mailbox)]
        if side not in box.sides and len(box.sides) >= MAX_SIDES:
            raise Refused("crowded")
        plate.claimed.add(side)
        box.sides.add(side)
        box.open_sides.add(side)
        box.touched = self._now()
        return plate.mailbox

    async def release(self, app: str, nameplate: str, side: str) -> None:
        plate = self.nameplates.get((app, nameplate))
        if plate is None or side not in plate.claimed:
            return
        plate.claimed.discard(side)
        plate.released.add(side)
        if not plate.claimed:
            del self.nameplates[(app, nameplate)]

    async def open(self, app: str, mailbox: str, side: str, handle: object,
                   deliver: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
        box = self.mailboxes.get((app, mailbox))
        if box is None:
            raise Refused("no such mailbox")
        if side not in box.sides and len(box.sides) >= MAX_SIDES:
            raise Refused("crowded")
        box.sides.add(side)
        box.open_sides.add(side)
        box.listeners[handle] = deliver
        box.touched = self._now()
        return list(box.messages)

    async def add(self, app: str, mailbox: str, message: dict[str, Any]) -> None:
        box = self.mailboxes.get((app, mailbox))
        if box is None:
            raise Refused("the mailbox is gone")
        size = len(message["body"])
        if len(box.messages) >= MAX_MAILBOX_MESSAGES:
            raise Refused(f"the mailbox holds {MAX_MAILBOX_MESSAGES} messages already")
        if self.stored + size > MAX_STORED_BYTES:
            raise Refused("the mailbox server is full; try again later")
        box.messages.append(message)
        box.size += size
        self.stored += size
        box.touched = self._now()
        for deliver in list(box.listeners.values()):
            deliver(message)

    async def close(self, app: str, mailbox: str, side: str, handle: object) -> None:
        box = self.mailboxes.get((app, mailbox))
        if box is None:
            return
        box.listeners.pop(handle, None)
        box.open_sides.discard(side)
        if not box.open_sides:
            self._drop(box)

    async def unsubscribe(self, app: str, mailbox: str, handle: object) -> None:
        box = self.mailboxes.get((app, mailbox))
        if box is not None:
            box.listeners.pop(handle, None)
            box.touched = self._now()

    async def prune(self) -> int:
        """Drop mailboxes (and their nameplates) nobody listens to nor used for `idle` s."""
        cutoff = self._now() - self.idle
        stale = [b for b in self.mailboxes.values() if not b.listeners and b.touched < cutoff]
        for box in stale:
            self._drop(box)
        return len(stale)

    def _drop(self, box: Mailbox) -> None:
        self.mailboxes.pop((box.app, box.id), None)
        self.stored -= box.size
        for key in [k for k, p in self.nameplates.items()
                    if k[0] == box.app and p.mailbox == box.id]:
            del self.nameplates[key]


@dataclass(slots=True)
class _Listener:
    deliver: Callable[[dict[str, Any]], None]
    last: int          # the index of the last message it was given


class StoredMailboxes:
    """Nameplates, mailboxes and messages in the broker's database (`state`), shared by the
    processes of a fleet; the same rules and limits as MemoryMailboxes. The listeners are this
    process's clients: a message added on any process is announced through `relay`, and each
    process hands its listeners what they have not had yet, by the message's index."""

    def __init__(self, state: BrokerState, relay: Relay, *, idle: float = CODE_LIFETIME,
                 now: Callable[[], float] = time.time) -> None:
        self.state, self.relay, self.idle, self._now = state, relay, idle, now
        self.listeners: dict[tuple[str, str], dict[object, _Listener]] = {}
        self._delivering: dict[tuple[str, str], asyncio.Lock] = {}
        self._catching_up: set[asyncio.Future[None]] = set()
        relay.hear_mailboxes(self)

    async def allocate(self, app: str, side: str) -> str:
        async with self.state.mailbox_transaction() as tx:
            taken = await tx.rows("SELECT nameplate FROM mailbox_nameplates WHERE app = ?", app)
            name = free_nameplate({row[0] for row in taken})
            await self._claim(tx, app, name, side)
        return name

    async def claim(self, app: str, nameplate: str, side: str) -> str:
        async with self.state.mailbox_transaction() as tx:
            return await self._claim(tx, app, nameplate, side)

    async def _claim(self, tx: Transaction, app: str, nameplate: str, side: str) -> str:
        found = await tx.rows("SELECT mailbox FROM mailbox_nameplates WHERE app = ? AND "
                              "nameplate = ?", app, nameplate)
        if found:
            mailbox = found[0][0]
        else:
            (count,), = await tx.rows("SELECT count(*) FROM mailboxes")
            if count >= MAX_MAILBOXES:
                raise Refused("the mailbox server is full; try again later")
            mailbox = secrets.token_urlsafe(12)
            await tx.run("INSERT INTO mailboxes VALUES (?, ?, ?, 0)", app, mailbox, self._now())
            await tx.run("INSERT INTO mailbox_nameplates VALUES (?, ?, ?)", app, nameplate,
                         mailbox)
        sides = await self._sides(tx, app, mailbox)
        if sides.get(side, (0, 0, 0))[1]:
            raise Refused("reclaimed")
        await self._enter(tx, app, mailbox, side, sides, claimed=True)
        return mailbox

    @staticmethod
    async def _sides(tx: Transaction, app: str, mailbox: str
                     ) -> dict[str, tuple[int, int, int]]:
        """Every side that ever opened `mailbox`: (claimed, released, opened)."""
        rows = await tx.rows("SELECT side, claimed, released, opened FROM mailbox_sides "
                             "WHERE app = ? AND mailbox = ?", app, mailbox)
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    async def _enter(self, tx: Transaction, app: str, mailbox: str, side: str,
                     sides: dict[str, tuple[int, int, int]], *, claimed: bool) -> None:
        """`side` claims or opens `mailbox`, unless two others did ("crowded")."""
        if side not in sides:
            if len(sides) >= MAX_SIDES:
                raise Refused("crowded")
            await tx.run("INSERT INTO mailbox_sides VALUES (?, ?, ?, 0, 0, 1)", app, mailbox,
                         side)
        await tx.run("UPDATE mailbox_sides SET opened = 1" + (", claimed = 1" if claimed else "")
                     + " WHERE app = ? AND mailbox = ? AND side = ?", app, mailbox, side)
        await tx.run("UPDATE mailboxes SET touched = ? WHERE app = ? AND mailbox = ?",
                     self._now(), app, mailbox)

    async def release(self, app: str, nameplate: str, side: str) -> None:
        async with self.state.mailbox_transaction() as tx:
            found = await tx.rows("SELECT mailbox FROM mailbox_nameplates WHERE app = ? AND "
                                  "nameplate = ?", app, nameplate)
            if not found:
                return
            mailbox = found[0][0]
            sides = await self._sides(tx, app, mailbox)
            if not sides.get(side, (0, 0, 0))[0]:
                return
            await tx.run("UPDATE mailbox_sides SET claimed = 0, released = 1 WHERE app = ? "
                         "AND mailbox = ? AND side = ?", app, mailbox, side)
            if not any(c for s, (c, _, _) in sides.items() if s != side):
                await tx.run("DELETE FROM mailbox_nameplates WHERE app = ? AND nameplate = ?",
                             app, nameplate)

    async def open(self, app: str, mailbox: str, side: str, handle: object,
                   deliver: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
        async with self.state.mailbox_transaction() as tx:
            if not await tx.rows("SELECT 1 FROM mailboxes WHERE app = ? AND mailbox = ?",
                                 app, mailbox):
                raise Refused("no such mailbox")
            await self._enter(tx, app, mailbox, side, await self._sides(tx, app, mailbox),
                              claimed=False)
            rows = await self._messages(tx, app, mailbox, 0)
        self.listeners.setdefault((app, mailbox), {})[handle] = _Listener(
            deliver, rows[-1][0] if rows else 0)
        # one added between our read and this listener's was announced before it listened;
        # later than the messages returned (the caller delivers those first)
        task = asyncio.ensure_future(self.mailbox_added(app, mailbox))
        self._catching_up.add(task)
        task.add_done_callback(self._catching_up.discard)
        return [message for _, message in rows]

    @staticmethod
    async def _messages(tx: Transaction, app: str, mailbox: str, after: int
                        ) -> list[tuple[int, dict[str, Any]]]:
        rows = await tx.rows("SELECT idx, message FROM mailbox_messages WHERE app = ? AND "
                             "mailbox = ? AND idx > ? ORDER BY idx", app, mailbox, after)
        return [(int(i), json.loads(m)) for i, m in rows]

    async def add(self, app: str, mailbox: str, message: dict[str, Any]) -> None:
        size = len(message["body"])
        async with self.state.mailbox_transaction() as tx:
            if not await tx.rows("SELECT 1 FROM mailboxes WHERE app = ? AND mailbox = ?",
                                 app, mailbox):
                raise Refused("the mailbox is gone")
            (held,), = await tx.rows("SELECT count(*) FROM mailbox_messages WHERE app = ? "
                                     "AND mailbox = ?", app, mailbox)
            if held >= MAX_MAILBOX_MESSAGES:
                raise Refused(f"the mailbox holds {MAX_MAILBOX_MESSAGES} messages already")
            (stored,), = await tx.rows("SELECT coalesce(sum(size), 0) FROM mailboxes")
            if stored + size > MAX_STORED_BYTES:
                raise Refused("the mailbox server is full; try again later")
            await tx.run("INSERT INTO mailbox_messages (app, mailbox, message, size) "
                         "VALUES (?, ?, ?, ?)", app, mailbox, json.dumps(message), size)
            await tx.run("UPDATE mailboxes SET size = size + ?, touched = ? WHERE app = ? AND "
                         "mailbox = ?", size, self._now(), app, mailbox)
        await self.mailbox_added(app, mailbox)       # the sender's echo, and its peer if here
        await self.relay.mailbox_added(app, mailbox)

    async def mailbox_added(self, app: str, mailbox: str) -> None:
        """Hand this process's listeners of `mailbox` the messages they have not had."""
        key = (app, mailbox)
        if not self.listeners.get(key):
            return
        async with self._delivering.setdefault(key, asyncio.Lock()):
            listening = self.listeners.get(key, {})
            if not listening:
                return
            async with self.state.mailbox_transaction() as tx:
                rows = await self._messages(tx, app, mailbox,
                                            min(lis.last for lis in listening.values()))
            for lis in list(listening.values()):
                for index, message in rows:
                    if index > lis.last:
                        lis.deliver(message)
                        lis.last = index
        if not self.listeners.get(key):
            self._delivering.pop(key, None)

    async def missed(self) -> None:
        for app, mailbox in list(self.listeners):
            await self.mailbox_added(app, mailbox)

    def _unlisten(self, app: str, mailbox: str, handle: object) -> None:
        listening = self.listeners.get((app, mailbox), {})
        listening.pop(handle, None)
        if not listening:
            self.listeners.pop((app, mailbox), None)

    async def close(self, app: str, mailbox: str, side: str, handle: object) -> None:
        self._unlisten(app, mailbox, handle)
        async with self.state.mailbox_transaction() as tx:
            await tx.run("UPDATE mailbox_sides SET opened = 0 WHERE app = ? AND mailbox = ? "
                         "AND side = ?", app, mailbox, side)
            if not await tx.rows("SELECT 1 FROM mailbox_sides WHERE app = ? AND mailbox = ? "
                                 "AND opened = 1", app, mailbox):
                await self._drop(tx, app, mailbox)

    async def unsubscribe(self, app: str, mailbox: str, handle: object) -> None:
        self._unlisten(app, mailbox, handle)
        async with self.state.mailbox_transaction() as tx:
            await tx.run("UPDATE mailboxes SET touched = ? WHERE app = ? AND mailbox = ?",
                         self._now(), app, mailbox)

    async def prune(self) -> int:
        """Drop mailboxes (and their nameplates) nobody used for `idle` s; one a client here
        listens to counts as used (each process says so for its own)."""
        async with self.state.mailbox_transaction() as tx:
            for app, mailbox in list(self.listeners):
                await tx.run("UPDATE mailboxes SET touched = ? WHERE app = ? AND mailbox = ?",
                             self._now(), app, mailbox)
            stale = await tx.rows("SELECT app, mailbox FROM mailboxes WHERE touched < ?",
                                  self._now() - self.idle)
            for app, mailbox in stale:
                await self._drop(tx, app, mailbox)
        return len(stale)

    @staticmethod
    async def _drop(tx: Transaction, app: str, mailbox: str) -> None:
        for table in ("mailbox_messages", "mailbox_sides", "mailbox_nameplates", "mailboxes"):
            await tx.run(f"DELETE FROM {table} WHERE app = ? AND mailbox = ?", app, mailbox)


class _Connection:
    """One client's WebSocket: bound to (appid, side), at most one claim and one mailbox."""

    def __init__(self, ws: web.WebSocketResponse, state: MailboxState, who: str,
                 now: Callable[[], float]) -> None:
        self.ws, self.state, self.who, self._now = ws, state, who, now
        self.app: str | None = None
        self.side = ""
        self.nameplate: str | None = None
        self.mailbox: str | None = None
        self.allocated = self.claimed = self.released = self.closed = False
        self.tokens, self._stamp = float(BURST), now()
        self.said: set[str] = set()  # kinds of trouble logged for this connection
        self.outbox: asyncio.Queue[str] = asyncio.Queue()
        self.writer = asyncio.ensure_future(self.write())

    def note(self, kind: str, text: str) -> None:
        if kind not in self.said:
            self.said.add(kind)
            log.warning("mailbox: %s from %s: %s", kind, self.who, text)

    def spend(self) -> bool:
        now = self._now()
        self.tokens = min(float(BURST), self.tokens + (now - self._stamp) * RATE)
        self._stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def send(self, t: str, **fields: Any) -> None:
        """Queue a message for this client, in order; one that reads nothing is dropped."""
        if self.ws.closed:
            return
        if self.outbox.qsize() >= MAX_OUTBOX:
            self.note("a client that does not read", f"{MAX_OUTBOX} messages wait for it; "
                      "connection closed")
            self.writer.cancel()
            asyncio.ensure_future(self.ws.close(code=1008, message=b"not reading"))
            return
        self.outbox.put_nowait(json.dumps({"type": t, "server_tx": time.time(), **fields}))

    async def write(self) -> None:
        """The one writer of this WebSocket (so messages leave in the order queued)."""
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                await self.ws.send_str(await self.outbox.get())

    def deliver(self, message: dict[str, Any]) -> None:
        self.send("message", **message)

    async def handle(self, msg: dict[str, Any]) -> None:
        t = msg["type"]
        self.send("ack", id=msg.get("id"))
        if t == "ping":
            self.send("pong", pong=_need(msg, "ping", (int, float, str)))
            return
        if t == "bind":
            if self.app is not None:
                raise Refused("already bound")
            app, side = _need(msg, "appid", str), _need(msg, "side", str)
            if not 0 < len(app) <= 200 or not SIDE.fullmatch(side):
                raise Refused("bind requires a short 'appid' and a hex 'side'")
            self.app, self.side = app, side
            return
        if self.app is None:
            raise Refused("must bind first")
        if t == "list":
            self.send("nameplates", nameplates=[])  # nobody learns which codes are in use
        elif t == "allocate":
            if self.allocated or self.claimed:
                raise Refused("you already allocated one, don't be greedy")
            self.nameplate = await self.state.allocate(self.app, self.side)
            self.allocated = True   # (after: an allocation the database refused may be asked again)
            self.send("allocated", nameplate=self.nameplate)
        elif t == "claim":
            nameplate = _need(msg, "nameplate", str)
            if not NAMEPLATE.fullmatch(nameplate):
                raise Refused("claim requires a decimal 'nameplate'")
            if self.claimed:
                raise Refused("only one claim per connection")
            if self.nameplate is not None and nameplate != self.nameplate:
                raise Refused("claim the nameplate you allocated")
            self.claimed = True
            self.nameplate = nameplate
            self.send("claimed", mailbox=await self.state.claim(self.app, nameplate, self.side))
        elif t == "release":
            nameplate = msg.get("nameplate", self.nameplate)
            if self.released or nameplate is None or nameplate != self.nameplate:
                raise Refused("release the one nameplate claimed on this connection, once")
            self.released = True
            await self.state.release(self.app, nameplate, self.side)
            self.send("released")
        elif t == "open":
            mailbox = _need(msg, "mailbox", str)
            if self.mailbox is not None:
                raise Refused("only one open per connection")
            old = await self.state.open(self.app, mailbox, self.side, self, self.deliver)
            self.mailbox = mailbox
            for message in old:
                self.deliver(message)
        elif t == "add":
            if self.mailbox is None or self.closed:
                raise Refused("must open mailbox before adding")
            phase, body = _need(msg, "phase", str), _need(msg, "body", str)
            if len(phase) > 64 or not _is_hex(body):
                raise Refused("add requires a short 'phase' and a hex 'body'")
            message_id = msg.get("id")
            await self.state.add(self.app, self.mailbox, {
                "side": self.side, "phase": phase, "body": body,
                "id": message_id if isinstance(message_id, str) and len(message_id) <= 64
                else None, "server_rx": time.time()})
        elif t == "close":
            mailbox = msg.get("mailbox", self.mailbox)
            if self.closed or mailbox is None or mailbox != self.mailbox:
                raise Refused("close the one mailbox opened on this connection, once")
            mood = msg.get("mood")
            if mood is not None and mood not in MOODS:
                raise Refused("unknown mood")
            self.closed = True
            await self.state.close(self.app, mailbox, self.side, self)
            self.send("closed")
        else:
            raise Refused("unknown type")

    async def gone(self) -> None:
        if self.app is not None and self.mailbox is not None and not self.closed:
            await self.state.unsubscribe(self.app, self.mailbox, self)


def _need(msg: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = msg.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise Refused(f"{msg['type']} requires {key!r}")
    return value


def _is_hex(text: str) -> bool:
    return len(text) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in text)


def add_mailbox_routes(app: web.Application, path: str = "/v1/mailbox", *,
                       state: MailboxState | None = None,
                       now: Callable[[], float] = time.monotonic,
                       prune_every: float = 60.0) -> MailboxState:
    """Serve the mailbox protocol at `path` on `app`; returns its state (memory by default)."""
    mailboxes = state if state is not None else MemoryMailboxes(now=now)

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, heartbeat=60)
        await ws.prepare(request)
        conn = _Connection(ws, mailboxes, request.remote or "?", now)
        conn.send("welcome", welcome={})
        try:
            async for frame in ws:
                if frame.type is WSMsgType.ERROR:
                    conn.note("refused a message", f"{ws.exception()}; connection closed")
                    break
                if frame.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    continue
                if not conn.spend():
                    conn.note("a flood", f"more than {BURST} messages at {RATE:g} a second; "
                              "connection closed")
                    await ws.close(code=1008, message=b"too many messages")
                    break
                try:
                    msg = json.loads(frame.data)
                except (ValueError, UnicodeDecodeError):
                    conn.note("refused a message", "not JSON")
                    conn.send("error", error="not JSON", orig={})
                    continue
                if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                    conn.note("refused a message", "no 'type'")
                    conn.send("error", error="missing 'type'", orig={})
                    continue
                try:
                    await conn.handle(msg)
                except Refused as exc:
                    conn.note("refused a message", f"{msg['type'][:20]!r}: {exc}")
                    conn.send("error", error=str(exc), orig={"type": msg["type"][:20]})
                except StorageError as exc:   # the database: the client may try again
                    log.warning("mailbox: %s", exc)
                    conn.send("error", error=str(exc), orig={"type": msg["type"][:20]})
        finally:
            try:
                await conn.gone()
            except StorageError as exc:   # its mailbox expires unused instead
                log.warning("mailbox: %s", exc)
            conn.writer.cancel()
        return ws

    async def pruning(_app: web.Application) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                await asyncio.sleep(prune_every)
                try:
                    await mailboxes.prune()
                except StorageError as exc:   # the next round prunes what this one left
                    log.warning("mailbox: %s", exc)

        task = asyncio.ensure_future(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.router.add_get(path, websocket)
    app.cleanup_ctx.append(pruning)
    return mailboxes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m p2pbackup.broker.mailbox",
                                     description="Serve the pairing mailbox alone.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4000)
    parser.add_argument("--path", default="/v1/mailbox")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = web.Application()
    add_mailbox_routes(app, args.path)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
