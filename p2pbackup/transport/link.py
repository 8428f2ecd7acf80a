"""What every transport of the sync protocol offers: ordered, reliable, binary messages.

The data channel (`datachannel.PeerLink`), the direct lane (`tls_lane.LaneLink`) and the
in-memory pair (`memory.memory_pair`) all satisfy `MessageLink`, so the protocol layer runs
unchanged over any of them. The direct lane and the in-memory pair are also a `BulkLane`: they
take one message made of several buffers without copying them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

# Link states reported to `on_state` callbacks.
CONNECTING = "connecting"
CONNECTED = "connected"
FAILED = "failed"
CLOSED = "closed"

StateCallback = Callable[[str], None]
Buffer = bytes | bytearray | memoryview


class MessageLink(Protocol):
    """An ordered, reliable channel of binary messages to one peer."""

    max_message_size: int

    @property
    def state(self) -> str:
        """One of connecting / connected / failed / closed."""

    async def send(self, message: bytes) -> None:
        """Queue one message; waits while the link's send buffer is above its high-water mark.

        Raises `PeerUnreachable` once the link is closed or failed, `LocalProtocolError` for a
        message larger than `max_message_size`.
        """

    async def recv(self) -> bytes | None:
        """The next message, or None once the link is closed (by either side) or failed."""

    async def close(self) -> None:
        """Flush what was sent (best effort, bounded in time) and close; idempotent."""


class BulkLane(MessageLink, Protocol):
    """A link that bulk object data moves over (a sync session's parts)."""

    async def send_buffers(self, buffers: list[Buffer]) -> None:
        """Queue one message made of `buffers` in order (none is copied where the link can
        avoid it); the same errors as `send`."""
