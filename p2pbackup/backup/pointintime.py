"""Point-in-time restore: the newest snapshot at or before T, plus the log after it up to T.

The log is replayed in seq order (time is metadata: after a clock jump backwards, seq still
says what came first) and replay stops at the first change made after T, so the result is a
state the device really was in. The replayed changes form an overlay on the snapshot's trees.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Container, Sequence
from dataclasses import dataclass, field

from ..format.log import DEL, PUT, Change, Segment
from ..format.membership import SignerRefused
from ..format.records import DIR, Tree, TreeEntry
from ..repo.logstore import LogStore
from ..repo.repository import Repository
from ..repo.snapshots import SourceLike, StoredSnapshot


@dataclass(slots=True)
class Overlay:
    """One source's replayed changes, indexed by parent directory."""

    children: dict[bytes, dict[bytes, TreeEntry | None]] = field(default_factory=dict)
    wiped: set[bytes] = field(default_factory=set)  # deleted dirs: their old contents are gone
    changes: int = 0

    def apply(self, change: Change) -> None:
        parent, name = os.path.split(change.path)
        self.changes += 1
        if change.op == DEL:
            self._drop_below(change.path)
            self.wiped.add(change.path)
            self.children.setdefault(parent, {})[name] = None
        elif change.op == PUT and change.entry is not None:
            entry = change.entry
            if entry.name != name:
                entry = entry._replace(name=name)
            self.children.setdefault(parent, {})[name] = entry

    def _drop_below(self, path: bytes) -> None:
        prefix = path + b"/"
        for key in [k for k in self.children if k == path or k.startswith(prefix)]:
            del self.children[key]
        self.wiped = {w for w in self.wiped if not (w == path or w.startswith(prefix))}

    def is_wiped(self, rel: bytes) -> bool:
        parts = rel.split(b"/") if rel else []
        return any(b"/".join(parts[:i]) in self.wiped for i in range(1, len(parts) + 1))

    def tree(self, rel: bytes, base: Tree | None) -> Tree:
        """The directory at `rel` as of the overlay, given its snapshot tree (or None)."""
        entries = {} if base is None or self.is_wiped(rel) else {e.name: e for e in base.entries}
        for name, entry in self.children.get(rel, {}).items():
            if entry is None:
                entries.pop(name, None)
                continue
            old = entries.get(name)
            if entry.type == DIR and old is not None and old.type == DIR and \
                    not self.is_wiped(os.path.join(rel, name) if rel else name):
                entry = entry._replace(subtree=old.subtree)  # a metadata change only
            entries[name] = entry
        return Tree(tuple(entries[n] for n in sorted(entries)))


async def segments_after(logstore: LogStore, device: str, after_seq: int = 0, *,
                         skip: Container[int] = ()) -> AsyncIterator[tuple[int, Segment]]:
    """The segments of `device`'s log after `after_seq` (but those in `skip`), in seq
    order, read and checked."""
    for seq in await logstore.segment_seqs(device):
        if seq <= after_seq or seq in skip:
            continue
        try:
            _, seg = await logstore.load_segment(device, seq)
        except SignerRefused:
            return   # a removed device's log ends where its removal pinned it
        yield seq, seg


@dataclass(frozen=True, slots=True)
class SegmentSummary:
    """One sealed log segment as a timeline shows it: when, and how many changes per source."""

    device: str
    seq: int
    time_ns: int                  # when it was sealed
    first_ns: int | None          # its first and last change (None: no change)
    last_ns: int | None
    changes: tuple[tuple[str, int], ...]   # (source, changes), sources in order


def summarize(logstore: LogStore, seq: int, seg: Segment) -> SegmentSummary:
    times: list[int] = []
    counts = []
    for scope, cl in logstore.open_changes(seg):
        counts.append((scope, len(cl.changes)))
        times.extend(c.time_ns for c in cl.changes)
    return SegmentSummary(seg.device, seq, seg.time_ns, min(times, default=None),
                          max(times, default=None), tuple(counts))


async def log_summaries(logstore: LogStore, device: str, newest: int,
                        known: dict[tuple[str, int], SegmentSummary]) -> list[SegmentSummary]:
    """The newest `newest` segments of `device`'s log, summarized; `known` keeps summaries
    between calls (segments never change), so only new segments are read, and only those
    among the newest are kept."""
    seqs = (await logstore.segment_seqs(device))[-newest:]
    for key in [k for k in known if k[0] == device and (not seqs or k[1] < seqs[0])]:
        del known[key]
    if not seqs:
        return []
    have = {seq for seq in seqs if (device, seq) in known}
    async for seq, seg in segments_after(logstore, device, seqs[0] - 1, skip=have):
        known[(device, seq)] = summarize(logstore, seq, seg)
    return [known[(device, seq)] for seq in seqs if (device, seq) in known]


@dataclass(frozen=True, slots=True)
class LoggedChange:
    """A change to one path found in the log: its new entry, or None where it was deleted."""

    seq: int
    time_ns: int
    entry: TreeEntry | None


async def changes_of(logstore: LogStore, device: str, source: str, rel: bytes,
                     after_seq: int = 0) -> list[LoggedChange]:
    """Every change the log of `device` after `after_seq` holds for `rel` in `source` (a
    deletion of a folder above it counts as its deletion), oldest first."""
    out: list[LoggedChange] = []
    async for seq, seg in segments_after(logstore, device, after_seq):
        for scope, cl in logstore.open_changes(seg):
            if scope != source:
                continue
            for c in cl.changes:
                if c.path == rel and c.op == PUT:
                    out.append(LoggedChange(seq, c.time_ns, c.entry))
                elif c.op == DEL and (c.path == rel or rel.startswith(c.path + b"/")):
                    out.append(LoggedChange(seq, c.time_ns, None))
    return out


async def plan_at(repo: Repository, ref: str, at_ns: int, *,
                  sources: Sequence[SourceLike] = (), path: str | None = None,
                  note: Callable[[str], None] | None = None
                  ) -> tuple[StoredSnapshot, dict[str, Overlay], int]:
    """Pick the base snapshot for time `at_ns` and replay its device's log up to that time.

    `latest` names what it names for restore without a time (Repository.find_snapshot: the
    newest snapshot of this device's `sources`, or of the source `path` starts with), as if
    only the snapshots taken by `at_ns` existed.
    Returns the snapshot, an overlay per source name, and the last log seq replayed.
    """
    base = await repo.find_snapshot(ref, sources=sources, path=path,
                                    before_ns=at_ns if ref == "latest" else None, note=note)
    logstore = LogStore(repo)
    overlays: dict[str, Overlay] = {r.name: Overlay() for r in base.snapshot.sources}
    last_seq = base.snapshot.log_seq
    async for seq, seg in segments_after(logstore, base.snapshot.device, last_seq):
        cut = False
        for scope, cl in logstore.open_changes(seg):
            for c in cl.changes:
                if c.time_ns > at_ns:  # each source's changes are in order: stop its prefix
                    cut = True
                    break
                if scope in overlays:
                    overlays[scope].apply(c)
        if cut:
            break
        last_seq = seq
    return base, overlays, last_seq


async def plan(repo: Repository, ref: str, at_ns: int | None, *,
               sources: Sequence[SourceLike] = (), path: str | None = None,
               note: Callable[[str], None] | None = None
               ) -> tuple[StoredSnapshot, dict[str, Overlay] | None, int | None]:
    """What a restore of `ref` (optionally as of `at_ns`) reads: the snapshot, and with a
    time its overlays and the last log seq replayed (None, None without one)."""
    if at_ns is None:
        return await repo.find_snapshot(ref, sources=sources, path=path, note=note), None, None
    return await plan_at(repo, ref, at_ns, sources=sources, path=path, note=note)
