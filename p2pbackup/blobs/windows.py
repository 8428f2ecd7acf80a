"""Small ranged reads of a remote object served from a few larger reads of it.

A restore reads a pack blob by blob (~64 KiB each, mostly in the order they were written); over
HTTP each read is one request, so its latency, not the bandwidth, sets the pace. Reading
aligned windows of a few MiB and slicing them makes that one request per window. Windows of
objects that never change are kept (the last few, least recently used first out); readers
waiting for the same window share its one request. The windows a read needs are fetched at
once (one after another, a read of two cold windows waited two round trips), and the window
after them ahead (a reader going through a pack finds it there instead of waiting a round
trip for it).

A reader that knows what it will read (a restore, through `expect`) has the windows counted
that it will still read: one that must leave is then one it will not read again (least
recently used first), and only if every window kept is still to be read, the least recently
used. A restore walks files in tree order and reads a pack in visits far apart (its chunks
belong to files in many folders): least recently used alone dropped windows it came back to,
and a 1 GiB restore from weed fetched 55 of its 293 windows twice (the median gap between two
visits of a window was 36 windows, more than KEEP); with its reads counted it fetched 13-18
twice, 847-889 MiB for its 763 instead of 937-1017 (bench mkdata --scale 1). A window ahead
that nobody will read is then not fetched either.

A read whose windows are fetched already (and whose window ahead is on its way) is served on
the reader's thread (`held_spans`), without a hand-over to the event loop and back: a restore's
writers found 162 of 165 reads so (tests/integration/test_s3_restore_plan.py), and a 1 GiB
restore from weed took a median 3.02 s instead of 3.29 (6 restores each, alternating; CPU
3.60 s instead of 3.88).
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

from ..buffers import views_of

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
# Windows whose coming reads are counted at most (a restore of 256 GiB; 6-7 MiB of counts);
# reads announced beyond them are not kept for.
PLANNED = 1 << 16



class RangeWindows:
    """Serves `read(name, start, length, total)` from aligned windows fetched with `fetch`."""

    def __init__(self, fetch: Callable[[str, int, int], Awaitable[bytes]], *,
                 window: int = WINDOW, keep: int = KEEP, ahead: int = AHEAD,
                 span: int = SPAN) -> None:
        self._fetch, self.window, self.keep, self.ahead = fetch, window, keep, ahead
        self.span = span
        self._windows: OrderedDict[tuple[str, int], asyncio.Future[bytes]] = OrderedDict()
        self._planned: dict[tuple[str, int], int] = {}   # reads to come of each window
        # Held while the two above change, or are read from another thread (held_spans).
        self._lock = threading.Lock()

    async def read(self, name: str, start: int, length: int, total: int) -> bytes:
        """`length` bytes at `start` of the object `name`, `total` bytes long."""
        return bytes((await self.spans(name, [(start, length)], total))[0])

    async def spans(self, name: str, spans: Sequence[tuple[int, int]], total: int
                    ) -> list[bytes | memoryview]:
        """The (offset, length) `spans` of the object `name`, `total` bytes long, in order:
        each a read-only view of the window holding it, copied only when it crosses into the
        next window. The views keep their windows alive: let go of them soon."""
        spans, start, end = self._extent(spans, total)
        if end <= start:
            return [b""] * len(spans)
        first, last = start // self.window, (end - 1) // self.window
        if last - first >= self.span:   # a large read gains nothing from windows
            self._count(name, spans, -1)
            return views_of(await self._fetch(name, start, end - start), start, spans)
        reading = range(first, last + 1)
        for i in reading:
            self._held(name, i, total, reading)   # all on their way before one is awaited
        for i in self._ahead(name, last, total):
            self._held(name, i, total, reading)
        held = [memoryview(await self._window(name, i, total)) for i in reading]
        self._count(name, spans, -1)   # not before: the windows being read are not to leave
        return self._slices(held, first, spans)

    def held_spans(self, name: str, spans: Sequence[tuple[int, int]], total: int
                   ) -> list[bytes | memoryview] | None:
        """`spans`, from any thread and without waiting, if the windows they need are
        fetched and the window after them is on its way (or not wanted): else None, and
        `spans` (on the loop) fetches. A restore's reads mostly find their windows held:
        through the loop, each was a hand-over to it and back (two thread wake-ups)."""
        spans, start, end = self._extent(spans, total)
        if end <= start:
            return None
        first, last = start // self.window, (end - 1) // self.window
        if last - first >= self.span:
            return None
        with self._lock:
            held = []
            for i in range(first, last + 1):
                fut = self._windows.get((name, i))
                if fut is None or not fut.done() or fut.cancelled() or fut.exception():
                    return None
                held.append(fut)
            if any((name, i) not in self._windows for i in self._ahead(name, last, total)):
                return None   # (to be fetched ahead: on the loop)
            for i in range(first, last + 1):
                self._windows.move_to_end((name, i))
            self._count_locked(name, spans, -1)
        return self._slices([memoryview(f.result()) for f in held], first, spans)

    @staticmethod
    def _extent(spans: Sequence[tuple[int, int]], total: int
                ) -> tuple[list[tuple[int, int]], int, int]:
        """`spans` cut short at the end of the object, and where they start and end."""
        spans = [(o, max(0, min(n, total - o))) for o, n in spans]
        return spans, spans[0][0], max(o + n for o, n in spans)

    def _ahead(self, name: str, last: int, total: int) -> list[int]:
        """The windows after `last` to fetch ahead: those a read to come needs (with no
        reads announced, all of them)."""
        return [i for i in range(last + 1, min(last + self.ahead, (total - 1) // self.window) + 1)
                if not self._planned or (name, i) in self._planned]

    def _slices(self, held: list[memoryview], first: int, spans: Sequence[tuple[int, int]]
                ) -> list[bytes | memoryview]:
        out: list[bytes | memoryview] = []
        # Slices of the windows, not copies: copying a restore's reads on the event loop (a new
        # 4 MiB bytes each, holding the GIL) took most of the loop's time.
        for offset, length in spans:
            if length == 0:
                out.append(b"")
                continue
            i, j = offset // self.window - first, (offset + length - 1) // self.window - first
            at = offset - (first + i) * self.window
            if i == j:
                out.append(held[i][at:at + length])
                continue
            pieces = [held[i][at:], *held[i + 1:j],
                      held[j][:offset + length - (first + j) * self.window]]
            out.append(b"".join(pieces))
        return out

    def _held(self, name: str, index: int, total: int, reading: range = range(0)
              ) -> asyncio.Future[bytes]:
        """Window `index` of `name`: kept, being fetched, or fetched from now on (not in
        place of `index` or the windows `reading` of `name`)."""
        key = (name, index)
        with self._lock:
            held = self._windows.get(key)
            if held is not None:
                self._windows.move_to_end(key)
                return held
        start = index * self.window
        held = asyncio.ensure_future(self._fetch(name, start, min(self.window, total - start)))
        held.add_done_callback(self._fetched)
        with self._lock:
            self._windows[key] = held
            while len(self._windows) > self.keep:
                # a reader still waiting keeps its future
                del self._windows[self._leaving(name, range(min(reading.start, index),
                                                            max(reading.stop, index + 1)))]
        return held

    def expect(self, name: str, spans: Sequence[tuple[int, int]]) -> None:
        """The (offset, length) `spans` of `name` will be read, each once per time given."""
        self._count(name, spans, 1)

    def forget_expected(self) -> None:
        """The reads given to `expect` and not done will not be (a failed or partial
        restore): their windows are kept no longer than any other."""
        with self._lock:
            self._planned.clear()

    def _count(self, name: str, spans: Sequence[tuple[int, int]], step: int) -> None:
        """Add `step` to the reads to come of each window `spans` cover."""
        with self._lock:
            self._count_locked(name, spans, step)

    def _count_locked(self, name: str, spans: Sequence[tuple[int, int]], step: int) -> None:
        planned, window = self._planned, self.window
        if step > 0 and len(planned) >= PLANNED or step < 0 and not planned:
            return
        for offset, length in spans:
            for index in range(offset // window, (offset + max(length, 1) - 1) // window + 1):
                key = (name, index)
                left = planned.get(key, 0) + step
                if left > 0:
                    planned[key] = left
                else:
                    planned.pop(key, None)

    def _leaving(self, name: str, reading: range) -> tuple[str, int]:
        """The window to drop, but for the windows `reading` of `name`: the least recently
        used of those no read to come needs, else the least recently used (the lock held)."""
        planned = self._planned
        others = [key for key in self._windows if key[0] != name or key[1] not in reading]
        if not others:   # fewer kept than one read takes
            return next(iter(self._windows))
        return next((key for key in others if key not in planned), others[0])

    def _fetched(self, fut: asyncio.Future[bytes]) -> None:
        """A window fetched ahead that failed is tried again by its first reader (and its
        error is not left unretrieved)."""
        if not fut.cancelled() and fut.exception() is not None:
            with self._lock:
                for key, held in list(self._windows.items()):
                    if held is fut:
                        del self._windows[key]

    async def _window(self, name: str, index: int, total: int) -> bytes:
        key = (name, index)
        held = self._held(name, index, total)
        try:
            return await asyncio.shield(held)
        except BaseException:
            with self._lock:
                if self._windows.get(key) is held and held.done():
                    del self._windows[key]   # a failed read is tried again by the next reader
            raise

    def forget(self, name: str) -> None:
        """Drop the windows of `name` (deleted)."""
        with self._lock:
            for key in [k for k in self._planned if k[0] == name]:
                del self._planned[key]
            for key in [k for k in self._windows if k[0] == name]:
                del self._windows[key]
