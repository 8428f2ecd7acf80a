"""Two connected in-memory links with the data channel's interface, for tests of higher layers.

`memory_pair()` returns (a, b): what `a.send()` queues, `b.recv()` returns, in order. Each
direction holds at most `high_water` bytes; `send()` waits above it, like `PeerLink.send()`
does on `bufferedAmount`. `close()` on either side is seen by the other (recv() -> None after
the messages already sent), `break_link()` simulates a lost connection (both sides "failed").
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from ..errors import LocalProtocolError, PeerUnreachable
from .link import CLOSED, CONNECTED, FAILED, Buffer, StateCallback

log = logging.getLogger("p2pbackup.transport")


class _Direction:
    def __init__(self, high_water: int) -> None:
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.high_water = high_water
        self.readable = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()
        self.eof = False

    def wake(self) -> None:
        self.readable.set()
        self.writable.set()


class MemoryLink:
    """One end of a `memory_pair()`."""

    def __init__(self, outbox: _Direction, inbox: _Direction, *,
                 max_message_size: int, on_state: StateCallback | None) -> None:
        self._out = outbox
        self._in = inbox
        self.max_message_size = max_message_size
        self.on_state = on_state
        self.peer: MemoryLink | None = None
        self._state = CONNECTED
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def state(self) -> str:
        return self._state

    @property
    def buffered_amount(self) -> int:
        return self._out.queued

    async def send(self, message: bytes) -> None:
        if len(message) > self.max_message_size:
            raise LocalProtocolError(f"message of {len(message)} bytes exceeds the link's "
                                     f"limit of {self.max_message_size}")
        while True:
            if self._state != CONNECTED or self._out.eof:
                raise PeerUnreachable("the link is closed")
            if self._out.queued <= self._out.high_water:
                break
            self._out.writable.clear()
            await self._out.writable.wait()
        self._out.queue.append(bytes(message))
        self._out.queued += len(message)
        self._out.readable.set()
        self.bytes_sent += len(message)

    async def send_buffers(self, buffers: list[Buffer]) -> None:
        """One message made of `buffers` (a `BulkLane`, like the direct lane)."""
        await self.send(b"".join(buffers))

    async def recv(self) -> bytes | None:
        while not self._in.queue:
            if self._in.eof:
                return None
            self._in.readable.clear()
            await self._in.readable.wait()
        message = self._in.queue.popleft()
        self._in.queued -= len(message)
        self._in.writable.set()
        self.bytes_received += len(message)
        return message

    async def close(self) -> None:
        """Close both directions; the peer still receives what was sent before."""
        self._out.eof = True
        self._in.eof = True
        self._in.queue.clear()
        self._in.queued = 0
        self._out.wake()
        self._in.wake()
        self._set_state(CLOSED)
        if self.peer is not None:
            self.peer._set_state(CLOSED)
        await asyncio.sleep(0)

    def break_link(self) -> None:
        """Drop the connection: nothing in flight arrives, both ends become 'failed'."""
        for d in (self._out, self._in):
            d.eof = True
            d.queue.clear()
            d.queued = 0
            d.wake()
        self._set_state(FAILED)
        if self.peer is not None:
            self.peer._set_state(FAILED)

    def _set_state(self, state: str) -> None:
        if self._state in (CLOSED, FAILED) or state == self._state:
            return
        self._state = state
        if self.on_state is not None:
            try:
                self.on_state(state)
            except Exception:
                log.exception("on_state callback failed")


def memory_pair(*, high_water: int = 1024 * 1024, max_message_size: int = 262144,
                on_state_a: StateCallback | None = None,
                on_state_b: StateCallback | None = None) -> tuple[MemoryLink, MemoryLink]:
    """Two connected links (already in state 'connected')."""
    ab, ba = _Direction(high_water), _Direction(high_water)
    a = MemoryLink(ab, ba, max_message_size=max_message_size, on_state=on_state_a)
    b = MemoryLink(ba, ab, max_message_size=max_message_size, on_state=on_state_b)
    a.peer, b.peer = b, a
    return a, b
