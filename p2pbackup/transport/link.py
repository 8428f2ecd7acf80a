"""What every transport of the sync protocol offers: ordered, reliable, binary messages.

The data channel (`datachannel.PeerLink`), the direct lane (`tls_lane.LaneLink`) and the
in-memory pair (`memory.memory_pair`) all satisfy `MessageLink`, so the protocol layer runs
unchanged over any of them.
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
