"""`p2pbackup store check`: is a store usable? (kopia's validate-provider, for any location)

Writes a scratch object, reads it back whole and by ranges, lists it, tries to replace it,
measures throughput and latency, deletes it; one step at a time, each with one line.
"""

from __future__ import annotations

import os
import secrets
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ..errors import DiskFull, IntegrityError, P2PError, StorageError
from .base import BlobStore

SCRATCH = "check/"   # names under it are the check's own and removed at its end
_LATENCY_PROBES = 5


@dataclass(frozen=True, slots=True)
class CheckStep:
    """One step's outcome: `error` is None when it passed."""

    step: str
    detail: str
    error: P2PError | None = None

    @property
    def line(self) -> str:
        return f"{self.step:<10}{'ok' if self.error is None else 'FAILED':<8}{self.detail}"


def _rate(nbytes: int, seconds: float) -> str:
    mib = nbytes / (1 << 20)
    return f"{mib:.1f} MiB in {seconds:.2f} s: {mib / max(seconds, 1e-6):.1f} MiB/s"


async def check_store(store: BlobStore, *, size: int = 4 << 20,
                      clock: Callable[[], float] = time.perf_counter
                      ) -> AsyncIterator[CheckStep]:
    """Run the steps against `store`; stop after the first that fails (its error set)."""
    name = f"{SCRATCH}{secrets.token_hex(8)}"   # one name, no folder of its own left behind
    data = os.urandom(size)
    step = "put"

    def failed(error: P2PError) -> CheckStep:
        return CheckStep(step, str(error), error)

    try:
        start = clock()
        await store.put(name, data)
        yield CheckStep(step, _rate(size, clock() - start))

        step = "get"
        start = clock()
        back = await store.get(name)
        took = clock() - start
        if back != data:
            raise IntegrityError(f"read back {len(back)} bytes that differ from the "
                                 f"{len(data)} written")
        yield CheckStep(step, _rate(size, took))

        step = "range"
        ranges = [(size // 3, 4096), (-100, 100)]
        for offset, length in ranges:
            got = await store.get_range(name, offset, length)
            want = data[offset:offset + length] if offset >= 0 else data[offset:]
            if got != want:
                raise IntegrityError(f"bytes {offset}+{length} read back wrong")
        yield CheckStep(step, f"{len(ranges)} ranges read back right")

        step = "list"
        listed = [n async for n in store.list(name)]
        if listed != [name]:
            raise IntegrityError(f"listing {name} gave {listed[:3]}, not [{name!r}]")
        yield CheckStep(step, "the object is listed")

        step = "overwrite"
        try:
            await store.put(name, b"replaced")
        except DiskFull:
            raise
        except StorageError:
            if await store.get(name) != data:
                raise IntegrityError("the store refused to replace the object, yet it changed")
            yield CheckStep(step, "create-only: enforced")
        else:
            if store.capabilities.create_only:
                raise StorageError("the store replaced an object that it should have refused "
                                   "to (this server does not honour create-only writes)")
            yield CheckStep(step, "create-only: not enforced: p2pbackup checks before each write")

        step = "latency"
        probes = []
        for _ in range(_LATENCY_PROBES):
            start = clock()
            await store.has(name)
            probes.append(clock() - start)
        yield CheckStep(step, f"{statistics.median(probes) * 1000:.2f} ms per request "
                              f"(median of {_LATENCY_PROBES})")

        step = "delete"
        await store.delete(name)
        if await store.has(name):
            raise StorageError("the object is still there after it was deleted")
        yield CheckStep(step, "the object is gone")
    except P2PError as exc:
        yield failed(exc)
        try:
            await store.delete(name)
        except P2PError:
            pass   # the step's own error is the one to tell
