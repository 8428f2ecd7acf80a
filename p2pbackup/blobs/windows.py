"""Small ranged reads of a remote object served from a few larger reads of it.

A restore reads a pack blob by blob (~64 KiB each, mostly in the order they were written); over
HTTP each read is one request, so its latency, not the bandwidth, sets the pace. Reading
aligned windows of a few MiB and slicing them makes that one request per window. Windows of
objects that never change are kept (the last few, least recently used first out); readers
waiting for the same window share its one request. The windows a read needs are fetched at
once (one after another, a read of two cold windows waited two round trips), and the window
after them ahead (a reader going through a pack finds it there instead of waiting a round
trip for it).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable

WINDOW = 4 << 20   # bytes per request; a 16 MiB pack is read in 4
# Windows kept: 96 MiB at most. A restore reads about four packs at once (small files'
# bundles, large files' chunks, folder listings; two writers), each read taking up to three
# windows and one ahead: with 12 they pushed out each other's windows before their readers
# came, and a 1 GiB restore from weed fetched 1225-1239 MiB for its 763 (16: 1051-1146, 20:
# 1033-1035, 24: 925-933). Its peak RSS went from 158-163 to 203-206 MiB (bench_s3 --scale 1).
KEEP = 24
AHEAD = 1          # windows fetched ahead of the one read
# Windows one read may take; a larger read goes straight to the server. A restore reads up to
# 4 MiB of neighbouring chunks and the chunk that crosses that limit: three windows, the first
# two usually held already (with 2 such a read fetched all three again: a restore of 300 MiB
# from weed fetched 282-286 MiB instead of 290-298, bench_s3 --scale 0.3).
SPAN = 3


class RangeWindows:
    """Serves `read(name, start, length, total)` from aligned windows fetched with `fetch`."""

    def __init__(self, fetch: Callable[[str, int, int], Awaitable[bytes]], *,
                 window: int = WINDOW, keep: int = KEEP, ahead: int = AHEAD,
                 span: int = SPAN) -> None:
        self._fetch, self.window, self.keep, self.ahead = fetch, window, keep, ahead
        self.span = span
        self._windows: OrderedDict[tuple[str, int], asyncio.Future[bytes]] = OrderedDict()

    async def read(self, name: str, start: int, length: int, total: int) -> bytes:
        """`length` bytes at `start` of the object `name`, `total` bytes long."""
        first, last = start // self.window, (start + length - 1) // self.window
        if last - first >= self.span:   # a large read gains nothing from windows
            return await self._fetch(name, start, length)
        for i in range(first, min(last + self.ahead, (total - 1) // self.window) + 1):
            self._held(name, i, total)   # all on their way before the first is awaited
        parts = [await self._window(name, i, total) for i in range(first, last + 1)]
        skip = start - first * self.window
        if len(parts) == 1:
            return parts[0][skip:skip + length]
        # Only the range is copied (this runs on the event loop, holding the GIL): a restore's
        # reads of a few MiB mostly straddle two or three windows.
        views = [memoryview(p) for p in parts]
        views[0] = views[0][skip:]
        views[-1] = views[-1][:start + length - last * self.window]
        return b"".join(views)

    def _held(self, name: str, index: int, total: int) -> asyncio.Future[bytes]:
        """Window `index` of `name`: kept, being fetched, or fetched from now on."""
        key = (name, index)
        held = self._windows.get(key)
        if held is None:
            start = index * self.window
            held = asyncio.ensure_future(self._fetch(name, start, min(self.window,
                                                                      total - start)))
            held.add_done_callback(self._fetched)
            self._windows[key] = held
            while len(self._windows) > self.keep:
                self._windows.popitem(last=False)   # a reader still waiting keeps its future
        else:
            self._windows.move_to_end(key)
        return held

    def _fetched(self, fut: asyncio.Future[bytes]) -> None:
        """A window fetched ahead that failed is tried again by its first reader (and its
        error is not left unretrieved)."""
        if not fut.cancelled() and fut.exception() is not None:
            for key, held in list(self._windows.items()):
                if held is fut:
                    del self._windows[key]

    async def _window(self, name: str, index: int, total: int) -> bytes:
        key = (name, index)
        held = self._held(name, index, total)
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
