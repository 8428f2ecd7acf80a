"""Verifying a repository: structure and signatures, and with read_data every blob's content.

Problems are collected, not raised one at a time, so the report can name every damaged object
together with the snapshots and files it affects.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import re
from dataclasses import dataclass, field

from ..errors import P2PError
from ..format.pack import check_pack_header, pack_name, parse_trailer
from ..format.log import PUT
from ..format.records import DIR, FILE
from ..repo.index import BlobLocation
from ..repo.logstore import LogStore
from ..repo.repository import Repository, StoredSnapshot
from .names import show_path


@dataclass(slots=True)
class Damage:
    """One damaged or missing object and what it affects."""

    what: str  # "pack 1a2b...", "blob 3c4d...", "snapshot 5e6f..."
    reason: str
    affects: list[str] = field(default_factory=list)  # "snapshot ab12cd34: docs/a.txt"

    def line(self, limit: int = 5) -> str:
        text = f"{self.what}: {self.reason}"
        if self.affects:
            shown = "; ".join(self.affects[:limit])
            more = f" (and {len(self.affects) - limit} more)" if len(self.affects) > limit else ""
            text += f" — affects {shown}{more}"
        return text


@dataclass(slots=True)
class VerifyReport:
    """The outcome of a verify run."""

    snapshots: int = 0
    segments: int = 0
    trees: int = 0
    packs: int = 0
    blobs_read: int = 0
    bytes_read: int = 0
    damage: list[Damage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damage


@dataclass(slots=True)
class VerifyProgress:
    """Counters the CLI polls."""

    packs: int = 0
    total_packs: int = 0
    bytes: int = 0
    expected_bytes: int = 0


def blobs_by_pack(repo: Repository) -> dict[str, list[tuple[bytes, BlobLocation]]]:
    """The index's blobs grouped by the pack that holds them."""
    out: dict[str, list[tuple[bytes, BlobLocation]]] = {}
    for bid, loc in repo.index.blobs.items():
        out.setdefault(loc.pack, []).append((bid, loc))
    return out


def check_pack_blocking(repo: Repository, name: str, blobs: list[tuple[bytes, BlobLocation]]
                        ) -> tuple[list[tuple[bytes, str]], str | None, int, int]:
    """Read a whole pack and check it and the index's `blobs` in it.

    Returns (bad blobs with reasons, pack-level problem, blobs read, bytes read).
    """
    try:
        data = repo.read_blocking(f"packs/{name}")
    except P2PError as exc:
        return [], str(exc), 0, 0
    what = f"pack {name[:12]}"
    problem = None
    if pack_name(data) != name:
        problem = "its content does not match its name (altered or damaged)"
    try:
        check_pack_header(data, what)
        trailer = parse_trailer(data, len(data), repo.keys.record_keys_newest_first(), what)
        listed = {b.id: b for b in trailer.blobs}
    except P2PError as exc:
        problem = str(exc)
        listed = {}
    bad: list[tuple[bytes, str]] = []
    view = memoryview(data)
    count = 0
    for bid, loc in blobs:
        ref = listed.get(bid)
        if listed and (ref is None or (ref.offset, ref.length) != (loc.offset, loc.length)):
            bad.append((bid, "the pack trailer does not list it where the index says"))
        elif loc.offset + loc.length > len(data):
            bad.append((bid, "the pack is truncated"))
        else:
            try:
                repo.decode_blob(bid, loc, view[loc.offset:loc.offset + loc.length])
                count += 1
            except P2PError as exc:
                bad.append((bid, re.sub(r"^blob \w+ in pack \w+ ", "", str(exc))))
    return bad, problem, count, len(data)


class _Findings:
    """Damage found so far, grouped by pack so one broken pack is one line, not hundreds."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.packs: dict[str, Damage] = {}
        self.blobs: dict[bytes, Damage] = {}
        self.bad: dict[bytes, str] = {}  # blob id -> why it cannot be read
        self.other: list[Damage] = []

    def pack(self, name: str, reason: str) -> None:
        if name not in self.packs:
            self.packs[name] = Damage(f"pack {name[:12]}", reason)
        for bid, loc in self.repo.index.blobs.items():
            if loc.pack == name:
                self.bad.setdefault(bid, reason)

    def blob(self, bid: bytes, reason: str) -> None:
        self.bad[bid] = reason

    def affects(self, bid: bytes, snap: StoredSnapshot, path: str) -> None:
        self.note(bid, f"snapshot {snap.short_id}: {path}")

    def note(self, bid: bytes, entry: str) -> None:
        """Record that `entry` (a snapshot's or a log segment's file) needs blob `bid`."""
        loc = self.repo.index.blobs.get(bid)
        d = self.packs.get(loc.pack) if loc else None
        if d is None:
            d = self.blobs.get(bid)
            if d is None:
                where = f" in pack {loc.pack[:12]}" if loc else ""
                d = self.blobs[bid] = Damage(f"blob {bid.hex()[:12]}{where}", self.bad[bid])
        if entry not in d.affects:
            d.affects.append(entry)

    def all(self) -> list[Damage]:
        return [*self.other, *self.packs.values(), *self.blobs.values()]


async def verify(repo: Repository, *, read_data: bool = False,
                 progress: VerifyProgress | None = None,
                 workers: int | None = None) -> VerifyReport:
    """Check every snapshot, tree and (with read_data) every blob of the repository."""
    report = VerifyReport()
    progress = progress or VerifyProgress()
    found = _Findings(repo)
    for name in repo.missing_packs:
        found.packs[name] = Damage(f"pack {name[:12]}", "missing from the store")
    for name, why in repo.damaged_packs.items():
        found.packs[name] = Damage(f"pack {name[:12]}", why)

    # Pack sizes against the index: catches truncation and loss without reading the data.
    for name, (_scope, _epoch, size) in list(repo.index.packs.items()):
        try:
            actual = await repo.store.size(f"packs/{name}")
        except P2PError:
            actual = -1
        if actual != size:
            found.pack(name, "missing from the store" if actual < 0
                       else f"is {actual} bytes, expected {size}")
    report.packs = len(repo.index.packs)

    if read_data:
        names = sorted(repo.index.packs)
        progress.total_packs = len(names)
        progress.expected_bytes = sum(size for _s, _e, size in repo.index.packs.values())
        loop = asyncio.get_running_loop()
        grouped = blobs_by_pack(repo)
        with cf.ThreadPoolExecutor(workers or max(2, os.cpu_count() or 2)) as pool:
            futs = {n: loop.run_in_executor(pool, check_pack_blocking, repo, n,
                                            grouped.get(n, [])) for n in names}
            for name, fut in futs.items():
                bad, problem, count, nbytes = await fut
                progress.packs += 1
                progress.bytes += nbytes
                report.blobs_read += count
                report.bytes_read += nbytes
                if bad:
                    kinds = sorted({why for _, why in bad})
                    detail = f"{len(bad)} of {len(bad) + count} blobs unreadable ({'; '.join(kinds)})"
                    problem = f"{problem}; {detail}" if problem else detail
                if problem:
                    found.packs.setdefault(name, Damage(f"pack {name[:12]}", problem))
                for bid, why in bad:
                    found.blob(bid, why)

    snaps, unreadable = await repo.list_snapshots()
    report.snapshots = len(snaps)
    for u in unreadable:
        found.other.append(Damage(f"snapshot {u.id[:8]}", u.reason))
    report.trees = await asyncio.to_thread(_walk_snapshots, repo, snaps, found)
    report.segments = await _check_logs(repo, found)
    report.damage = found.all()
    return report


async def _check_logs(repo: Repository, found: _Findings) -> int:
    """Every device's log: the chain links, the signatures, and the chunks its changes name."""
    logstore = LogStore(repo)
    devices = sorted({n.split("/")[1] async for n in repo.store.list("segments/")})
    count = 0
    for device in devices:
        what = f"log of device {device[:12]}"
        try:
            links, problems = await logstore.load_chain(device)
        except P2PError as exc:
            links, problems = [], [str(exc)]
        found.other.extend(Damage(what, p) for p in problems)
        for _, seg in links:
            count += 1
            try:
                parts = logstore.open_changes(seg)
            except P2PError as exc:
                found.other.append(Damage(f"segment {seg.seq} of device {device[:12]}", str(exc)))
                continue
            for scope, cl in parts:
                for c in cl.changes:
                    if c.op != PUT or c.entry is None or c.entry.type != FILE:
                        continue
                    for cid in c.entry.chunks:
                        if cid not in found.bad and cid not in repo.index.blobs:
                            found.blob(cid, "missing: no pack holds it")
                        if cid in found.bad:
                            found.note(cid, f"log segment {seg.seq}: {scope}/{show_path(c.path)}")
                            break
    return count


def _walk_snapshots(repo: Repository, snaps: list[StoredSnapshot], found: _Findings) -> int:
    """Walk every snapshot's trees, noting missing or damaged blobs and who uses them."""
    clean: set[bytes] = set()  # trees with nothing damaged below: walked once, not per snapshot
    loaded = 0

    def walk(snap: StoredSnapshot, tree_id: bytes, path: str) -> bool:
        nonlocal loaded
        if tree_id in clean:
            return True
        if tree_id not in found.bad and tree_id not in repo.index.blobs:
            found.blob(tree_id, "missing: no pack holds it")
        if tree_id in found.bad:
            found.affects(tree_id, snap, path + "/")
            return False
        try:
            tree = repo.load_tree_blocking(tree_id)
        except P2PError as exc:
            found.blob(tree_id, str(exc))
            found.affects(tree_id, snap, path + "/")
            return False
        loaded += 1
        ok = True
        for e in tree.entries:
            child = f"{path}/{show_path(e.name)}"
            if e.type == DIR:
                ok = walk(snap, e.subtree, child) and ok
            elif e.type == FILE:
                for cid in e.chunks:
                    if cid not in found.bad and cid not in repo.index.blobs:
                        found.blob(cid, "missing: no pack holds it")
                    if cid in found.bad:
                        found.affects(cid, snap, child)
                        ok = False
                        break
        if ok:
            clean.add(tree_id)
        return ok

    for snap in snaps:
        for root in snap.snapshot.sources:
            walk(snap, root.tree, root.name)
    return loaded
