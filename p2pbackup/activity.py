"""What this process is doing now, with progress: the daemon's `status` shows it (and the
web console draws it as bars, pushed over its event stream).

Work registers once and is read only when someone looks: a snapshot or a seal while it runs
(`running`, or `tracked` on a method), replication sessions and store uploads for as long as
their owner lives (`follow`: a probe of the owner's own counters, the owner weakly held). So
the work pays nothing per byte for being watched.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from .protocol.sync import SyncSession

if TYPE_CHECKING:
    from .repo.upload import StoreStatus

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

# What a probe says of one activity: "kind", "name", "phase", "done", "total" (None: not
# known), "unit" ("bytes", "files", "objects"), and counters of its own.
View = dict[str, Any]


@dataclass(slots=True)
class Activity:
    """One piece of work that runs for a while; its runner sets phase/done/total as it goes,
    or `probe` reads them from the runner's own counters when the activity is looked at."""

    kind: str
    name: str = ""
    phase: str = ""
    done: int = 0
    total: int | None = None
    unit: str = "bytes"
    probe: Callable[[], Mapping[str, Any]] | None = None
    started: float = field(default_factory=time.time)

    def view(self) -> View:
        out: View = {"kind": self.kind, "name": self.name, "phase": self.phase,
                     "done": self.done, "total": self.total, "unit": self.unit,
                     "started": self.started}
        if self.probe is not None:
            out.update(self.probe())
        return out


class Activities:
    """The registry; `ACTIVITIES` is the process's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()   # snapshots run in worker threads
        self._running: dict[int, Activity] = {}
        self._followed: dict[int, tuple[weakref.ref[Any], Callable[[Any], Iterable[View]]]] = {}
        self._ids = itertools.count()

    @contextmanager
    def running(self, kind: str, name: str = "", *, total: int | None = None,
                unit: str = "bytes", phase: str = "",
                probe: Callable[[], Mapping[str, Any]] | None = None) -> Iterator[Activity]:
        """Listed while the block runs."""
        act = Activity(kind, name, phase, 0, total, unit, probe)
        key = next(self._ids)
        with self._lock:
            self._running[key] = act
        try:
            yield act
        finally:
            with self._lock:
                del self._running[key]

    def follow(self, owner: T, probe: Callable[[T], Iterable[View]]) -> None:
        """List what `probe(owner)` says each time activities are looked at, until `owner` is
        gone (it is held weakly: following it keeps nothing alive)."""
        key = next(self._ids)

        def gone(_ref: weakref.ref[Any]) -> None:
            with self._lock:
                self._followed.pop(key, None)
        with self._lock:
            self._followed[key] = (weakref.ref(owner, gone), probe)

    def view(self) -> list[View]:
        """Every activity now, the ones that run for a while first."""
        with self._lock:
            running = list(self._running.values())
            followed = list(self._followed.values())
        out = [a.view() for a in running]
        for ref, probe in followed:
            owner = ref()
            if owner is not None:
                out.extend(probe(owner))
        return out


ACTIVITIES = Activities()


def tracked(kind: str, name: str = "") -> Callable[[Callable[P, Awaitable[R]]],
                                                   Callable[P, Awaitable[R]]]:
    """Decorate a coroutine function: each call is listed as a `kind` activity while it
    runs (a seal, say, whose steps are quick and need no counters)."""
    def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(fn)
        async def run(*args: P.args, **kwargs: P.kwargs) -> R:
            with ACTIVITIES.running(kind, name, phase="running"):
                return await fn(*args, **kwargs)
        return run
    return decorate


def sessions(live: Mapping[str, SyncSession]) -> Iterator[View]:
    """Replication with each peer: what was sent and received in this session, and what is
    still to come (the bar: received of received plus behind)."""
    for device, s in list(live.items()):
        if s.closed:
            continue
        behind = s.bytes_behind
        phase = "receiving" if s.pending else "sending" if s.queued or s.in_flight else "idle"
        yield {"kind": "replication", "name": device, "phase": phase,
               "done": s.bytes_received, "total": s.bytes_received + behind, "unit": "bytes",
               "sent_bytes": s.bytes_sent, "sent_objects": s.objects_sent,
               "received_bytes": s.bytes_received, "received_objects": s.objects_received,
               "objects_behind": s.pending, "bytes_behind": behind, "queued": s.queued}


def upload(status: "StoreStatus") -> Iterator[View]:
    """A store being brought up to date: the bar is what was put of what it lacked."""
    failing = status.reachable is False
    if status.objects_behind or failing:
        yield {"kind": "upload", "name": status.location,
               "phase": "retrying" if failing else "uploading",
               "done": status.uploaded_bytes,
               "total": status.uploaded_bytes + status.bytes_behind, "unit": "bytes",
               "uploaded_objects": status.uploaded, "objects_behind": status.objects_behind,
               "bytes_behind": status.bytes_behind}
