"""The one loop that runs a sans-I/O protocol end over a link, and the one send of its output.

A protocol end (protocol/sync.py's `SyncSession`, protocol/fetch.py's `FetchClient` and
`FetchServer`) takes bytes and gives events and bytes; `pump` reads the link into it and
hands the events on until the end closes or the link does; `send_queued` sends what the end
queued, cut into messages the link carries. Replication (replication/driver.py) and the peer
store and its server (blobs/peer.py) run their sessions on these two, whatever answers the
events: the sync protocol's sessions and the fetch protocol's request/response differ in what
an event asks for, not in how bytes move.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from .link import Buffer


class ProtocolEnd(Protocol):
    """One end of a sans-I/O protocol (the h11 shape)."""

    closed: bool

    def receive_data(self, data: bytes) -> Sequence[Any]:
        """Feed bytes from the peer; the events they made."""

    def data_to_send(self) -> bytes:
        """What is queued for the peer, taken."""


class Sender(Protocol):
    async def send(self, message: Buffer) -> None: ...


class Receiver(Protocol):
    async def recv(self) -> Buffer | None: ...


async def send_queued(end: ProtocolEnd, link: Sender, message_size: int) -> None:
    """Send what `end` has queued, in messages of at most `message_size` bytes."""
    data = end.data_to_send()
    for i in range(0, len(data), message_size):
        await link.send(data[i:i + message_size])


async def pump(end: ProtocolEnd, link: Receiver, handle: Callable[[Sequence[Any]], Awaitable[None]],
               *, first: Buffer | None = None,
               feed: Callable[[Buffer], Sequence[Any]] | None = None,
               recv: Callable[[], Awaitable[Buffer | None]] | None = None) -> None:
    """Until `end` closes or `link` ends: read a message (`first`: one already read), feed it
    to `end` (`feed`, default `end.receive_data`) and `handle` the events it made.

    `recv` replaces `link.recv` (e.g. to wake a stalled end up with b"" after a timeout).
    What `handle` sends, and errors the link raises, are the caller's."""
    feed = feed or end.receive_data
    recv = recv or link.recv
    if first is not None:
        await handle(feed(first))
    while not end.closed:
        msg = await recv()
        if msg is None:
            return
        await handle(feed(msg))
