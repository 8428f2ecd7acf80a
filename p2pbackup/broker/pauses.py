"""Full garbage collections of a broker process: measured, and kept short.

A broker holding thousands of sockets keeps ~80 tracked objects per socket (aiohttp's request,
protocol, transport, WebSocket reader and writer, their futures and handles) alive for as long
as the socket is open. CPython's full (generation 2) collection walks every one of them: at
10,000 sockets ~0.8 million objects, a pause of 0.2-1.3 s during which no message is relayed,
which is the broker's whole p99 (issue 18 §4). `GcPauses` measures those pauses (count,
longest, total; a log line for each one longer than the relay's latency target); `GcFreezer`
moves what the open sockets hold out of the collector's way with `gc.freeze()` and gives it
back (`gc.unfreeze()`) once enough of the frozen sockets have closed that their cycles are
worth collecting.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("p2pbackup.broker")

LOG_OVER = 0.05          # seconds: a pause longer than the relay's p99 target is logged


@dataclass(slots=True)
class GcPauses:
    """Full collections of this process since `install`: how many, the longest and the total
    pause (seconds). Pauses of at least `log_over` seconds are logged, from the event loop
    (a gc callback may run inside a logging call, whose stream must not be re-entered)."""

    log_over: float = LOG_OVER
    what: str = "the broker"
    clock: Callable[[], float] = time.perf_counter
    count: int = 0
    longest: float = 0.0
    total: float = 0.0
    _started: float = 0.0
    _loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop | None = None) -> GcPauses:
        self._loop = loop
        gc.callbacks.append(self._callback)
        return self

    def remove(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = self.clock()
            return
        took = self.clock() - self._started
        self.count += 1
        self.total += took
        self.longest = max(self.longest, took)
        if took >= self.log_over and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._log, took)

    def _log(self, took: float) -> None:
        log.warning("a full garbage collection paused %s for %.0f ms (%d full collections, "
                    "%.2f s in all)", self.what, took * 1000, self.count, self.total)

    def figures(self) -> dict[str, float]:
        return {"gc_full": self.count, "gc_longest_ms": self.longest * 1000,
                "gc_total_s": self.total}


def _nothing() -> None:
    pass


def _refreeze() -> None:
    gc.unfreeze()
    gc.collect()
    gc.freeze()


@dataclass(slots=True)
class GcFreezer:
    """Keeps long-lived socket objects out of full collections. `opened()` when a socket is
    ready: every `every` new sockets, `gc.freeze()` (O(1): the collector's lists are spliced)
    moves every object alive to the permanent generation, which collections do not walk, so
    a full collection walks at most what `every` sockets and the traffic since made. A frozen
    object still dies by reference counting, but a frozen reference cycle (a closed socket's
    protocol and transport) is never collected: `closed()` counts the frozen sockets that
    closed, and once they are a quarter of those still open, `refreeze` gives everything back,
    collects once (the one long pause, after that much churn) and freezes what is left."""

    every: int = 100
    freeze: Callable[[], None] = gc.freeze
    refreeze: Callable[[], None] = _refreeze
    batch: int = 0        # freezes so far: a socket opened in batch b < batch is frozen
    fresh: int = 0        # sockets opened since the last freeze
    frozen: int = 0       # frozen sockets still open
    gone: int = 0         # frozen sockets closed since the last refreeze

    def start(self) -> None:
        """Freeze what start-up made (modules, the application): it lives as long as the
        process."""
        self.freeze()

    def opened(self) -> int:
        """The socket's batch, for `closed`."""
        batch = self.batch
        self.fresh += 1
        if self.fresh >= self.every:
            self.freeze()
            self._frozen_all()
        return batch

    def closed(self, batch: int) -> None:
        if batch >= self.batch:           # not frozen: collected as usual
            self.fresh = max(0, self.fresh - 1)
            return
        self.frozen = max(0, self.frozen - 1)
        self.gone += 1
        if self.gone * 4 >= max(self.frozen, self.every):
            self.refreeze()
            self._frozen_all()
            self.gone = 0

    @classmethod
    def off(cls) -> GcFreezer:
        """One that freezes nothing: a broker inside another program (tests) leaves that
        process's collector alone; the broker's own process (broker/main.py) freezes."""
        return cls(freeze=_nothing, refreeze=_nothing)

    def _frozen_all(self) -> None:
        self.batch += 1
        self.frozen += self.fresh
        self.fresh = 0
