"""Small ranged reads of a remote object served from a few larger reads of it.

A restore reads a pack blob by blob (~64 KiB each, mostly in the order they were written); over
HTTP each read is one request, so its latency, not the bandwidth, sets the pace. Reading
aligned windows of a few MiB and slicing them makes that one request per window. Windows of
objects that never change are kept (the last few, least recently used first out); readers
waiting for the same window share its one request.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable

WINDOW = 4 << 20   # bytes per request; a 16 MiB pack is read in 4
KEEP = 12          # windows kept: ~48 MiB at most, a few per pack a restore reads at once


class RangeWindows:
    """Serves `read(name, start, length, total)` from aligned windows fetched with `fetch`."""

    def __init__(self, fetch: Callable[[str, int, int], Awaitable[bytes]], *,
                 window: int = WINDOW, keep: int = KEEP) -> None:
        self._fetch, self.window, self.keep = fetch, window, keep
        self._windows: OrderedDict[tuple[str, int], asyncio.Future[bytes]] = OrderedDict()

    async def read(self, name: str, start: int, length: int, total: int) -> bytes:
        """`length` bytes at `start` of the object `name`, `total` bytes long."""
        first, last = start // self.window, (start + length - 1) // self.window
        if last - first > 1:   # a large read gains nothing from windows
            return await self._fetch(name, start, length)
        parts = [await self._window(name, i, total) for i in range(first, last + 1)]
        joined = parts[0] if len(parts) == 1 else b"".join(parts)
        skip = start - first * self.window
        return joined[skip:skip + length]

    async def _window(self, name: str, index: int, total: int) -> bytes:
        key = (name, index)
        held = self._windows.get(key)
        if held is None:
            start = index * self.window
            held = asyncio.ensure_future(self._fetch(name, start, min(self.window,
                                                                      total - start)))
            self._windows[key] = held
            while len(self._windows) > self.keep:
                self._windows.popitem(last=False)   # a reader still waiting keeps its future
        else:
            self._windows.move_to_end(key)
        try:
            return await asyncio.shield(held)
        except BaseException:
            if self._windows.get(key) is held and held.done():
                del self._windows[key]   # a failed read is tried again by the next reader
            raise

    def forget(self, name: str) -> None:
        """Drop the windows of `name` (deleted)."""
        for key in [k for k in self._windows if k[0] == name]:
            del self._windows[key]
