"""Connections that have not yet proved who they are, bounded per source address and in total.

Anyone on the LAN can open TCP connections to the signaling endpoint or the direct lane, and
each holds a file descriptor and a task until it authenticates or gives up: 1,100 idle ones
once ran the daemon out of descriptors, and a paired device could no longer connect. So the
servers admit every new connection here first. A source address may hold `per_source`
unauthenticated connections at once (more are closed at once); all sources together hold at
most `total`, and when that is full a newcomer takes the place of the oldest connection of the
source holding the most (so a device with one connection is never pushed out by a crowd from
a few addresses); and each has `handshake_timeout` seconds to authenticate.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("p2pbackup.transport")


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    per_source: int = 8             # unauthenticated connections from one address at once
    total: int = 64                 # ... from all addresses
    handshake_timeout: float = 10.0  # seconds a connection has to say who it is


class PendingConnections:
    """The unauthenticated connections of one server (`what` names it in log lines).

    `push_out(writer)` closes a connection pushed out to make room (default: at once, without
    a word; the server's handler then sees its end)."""

    def __init__(self, limits: ConnectionLimits, what: str, *,
                 push_out: Callable[[asyncio.StreamWriter], None] | None = None) -> None:
        self.limits, self.what = limits, what
        self._push_out = push_out or (lambda writer: writer.transport.abort())
        self._by_source: dict[str, deque[asyncio.StreamWriter]] = {}
        self._source_of: dict[asyncio.StreamWriter, str] = {}
        self._count = 0
        self._said: set[str] = set()    # sources (and "" for the total) told of, until calm

    def __len__(self) -> int:
        return self._count

    def admit(self, writer: asyncio.StreamWriter) -> bool:
        """Count a new connection in; False if it must be closed at once (over a bound)."""
        source = _source(writer)
        mine = self._by_source.get(source)
        if mine is not None and len(mine) >= self.limits.per_source:
            self._say(source, f"{self.what}: more than {self.limits.per_source} connections "
                      f"from {source} have not authenticated; refusing more from it")
            return False
        if self._count >= self.limits.total:
            crowd = max(self._by_source.values(), key=len)
            if len(crowd) <= (len(mine) if mine else 0) + 1:
                self._say("", f"{self.what}: {self._count} connections have not "
                          f"authenticated; refusing more")
                return False
            self._say("", f"{self.what}: {self._count} connections have not authenticated; "
                      f"dropping the oldest of the addresses that hold the most")
            self._drop(crowd[0])
        self._by_source.setdefault(source, deque()).append(writer)
        self._source_of[writer] = source
        self._count += 1
        return True

    def done(self, writer: asyncio.StreamWriter) -> None:
        """The connection authenticated or ended: it no longer counts (idempotent)."""
        source = self._source_of.pop(writer, None)
        if source is None:
            return
        mine = self._by_source[source]
        mine.remove(writer)
        self._count -= 1
        if not mine:
            del self._by_source[source]
            self._said.discard(source)
        if not self._count:
            self._said.discard("")

    def _drop(self, writer: asyncio.StreamWriter) -> None:
        self.done(writer)
        self._push_out(writer)   # its handler's read fails and it ends

    def _say(self, key: str, message: str) -> None:
        # Once per flood, not once per connection.
        if key not in self._said:
            self._said.add(key)
            log.warning("%s", message)


def _source(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if peer else "?"
