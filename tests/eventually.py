"""Wait for a condition in tests without hand-written deadline loops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def eventually(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 30.0,
                     interval: float = 0.05) -> None:
    """Return once `predicate()` (sync or async) is true; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if isinstance(got, Awaitable):
            got = await got
        if got:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {timeout} s: {predicate}")
        await asyncio.sleep(interval)


def eventually_sync(predicate: Callable[[], bool], timeout: float = 30.0,
                    interval: float = 0.05) -> None:
    """The blocking twin of `eventually`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {timeout} s: {predicate}")
        time.sleep(interval)
