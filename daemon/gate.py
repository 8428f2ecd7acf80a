"""The gate the daemon's writers to the store pass through, which a pause closes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class WriteGate:
    """Change capture and replicated objects pass through together; closing the gate waits
    for those inside and keeps new ones waiting (not refused) until it opens again.

    Sealing, snapshots and removals take `DeviceDaemon.writing` instead; a pause holds both.
    Only top-level work enters it: passing it again from inside while a pause waits would wait
    for itself.
    """

    def __init__(self) -> None:
        self._inside = 0
        self._closers = 0  # pauses holding it shut (a second waits its turn behind the first)
        self._changed = asyncio.Condition()

    @property
    def closed(self) -> bool:
        return self._closers > 0

    @contextlib.asynccontextmanager
    async def passing(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._closers)
            self._inside += 1
        try:
            yield
        finally:
            async with self._changed:
                self._inside -= 1
                self._changed.notify_all()

    async def close(self) -> None:
        """Shut the gate and wait until nothing is inside."""
        async with self._changed:
            self._closers += 1
            try:
                await self._changed.wait_for(lambda: self._inside == 0)
            except BaseException:
                self._closers -= 1
                self._changed.notify_all()
                raise

    async def open(self) -> None:
        async with self._changed:
            self._closers -= 1
            self._changed.notify_all()
