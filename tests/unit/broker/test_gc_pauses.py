"""broker/pauses.py with CPython's real collector: full collections are measured, what open
sockets hold is frozen out of them, and the cycles of sockets closed since are reclaimed."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from collections.abc import Iterator

import pytest

from p2pbackup.broker.pauses import GcFreezer, GcPauses


@pytest.fixture
def thawed() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()      # nothing frozen outlives the test


class Socket:
    """Stands for what one open socket holds: objects in a reference cycle."""

    def __init__(self) -> None:
        self.parts = [{"protocol": self} for _ in range(20)]


def test_full_collections_are_counted_and_long_ones_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    async def run() -> GcPauses:
        pauses = GcPauses(log_over=0.0).install(asyncio.get_running_loop())
        try:
            gc.collect()
            gc.collect(1)          # not a full collection: not counted
            await asyncio.sleep(0)  # the log line is written from the loop
        finally:
            pauses.remove()
        return pauses
    with caplog.at_level(logging.WARNING, "p2pbackup.broker"):
        pauses = asyncio.run(run())
    assert pauses.count == 1 and pauses.total >= pauses.longest > 0
    assert "a full garbage collection paused the broker for" in caplog.text


def test_open_sockets_are_frozen_and_closed_ones_reclaimed(thawed: None) -> None:
    freezer = GcFreezer(every=10)
    freezer.start()
    sockets = [Socket() for _ in range(40)]
    batches = [freezer.opened() for _ in sockets]
    assert gc.get_freeze_count() >= 40 * 21        # a full collection does not walk them
    assert freezer.frozen == 40 and freezer.fresh == 0

    closed = []
    for b in batches[:7]:                           # 7 closed, 33 open
        closed.append(weakref.ref(sockets.pop(0)))
        freezer.closed(b)
    gc.collect()
    assert all(r() is not None for r in closed)     # frozen: kept until enough have closed
    closed.append(weakref.ref(sockets.pop(0)))
    freezer.closed(batches[7])                      # 8 closed, 32 open: a quarter
    assert all(r() is None for r in closed)         # reclaimed by the refreeze
    assert gc.get_freeze_count() >= 32 * 21         # and those still open frozen again
    assert freezer.frozen == 32 and freezer.gone == 0


def test_a_socket_closed_before_it_was_frozen_counts_nothing(thawed: None) -> None:
    refrozen = []
    freezer = GcFreezer(every=10, freeze=lambda: None, refreeze=lambda: refrozen.append(1))
    b = freezer.opened()
    freezer.closed(b)
    assert (freezer.fresh, freezer.frozen, freezer.gone, refrozen) == (0, 0, 0, [])
