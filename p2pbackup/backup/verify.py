"""Verifying a repository: structure and signatures, and with read_data every blob's content.

Problems are collected, not raised one at a time, so the report can name every damaged object
together with the snapshots and files it affects.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import P2PError
from ..format.pack import check_pack_header, pack_name, parse_trailer
from ..format.records import DIR, FILE
from ..repo.repository import Repository, StoredSnapshot


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


def _check_pack_blocking(repo: Repository, name: str) -> tuple[list[tuple[bytes, str]], str | None, int, int]:
    """Read a whole pack; return (bad blobs with reasons, pack-level problem, blobs, bytes)."""
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
        trailer = parse_trailer(data, len(data), repo.keys.meta_key, what)
        listed = {b.id: b for b in trailer.blobs}
    except P2PError as exc:
        problem = str(exc)
        listed = {}
    bad: list[tuple[bytes, str]] = []
    view = memoryview(data)
    count = 0
    expected = [(bid, loc) for bid, loc in repo.index.blobs.items() if loc.pack == name]
    for bid, loc in expected:
        ref = listed.get(bid)
        if listed and (ref is None or (ref.offset, ref.length) != (loc.offset, loc.length)):
            bad.append((bid, "the pack trailer does not list it where the index says"))
            continue
        if loc.offset + loc.length > len(data):
            bad.append((bid, "the pack is truncated"))
            continue
        try:
            repo.decode_blob(bid, loc, view[loc.offset:loc.offset + loc.length])
            count += 1
        except P2PError as exc:
            bad.append((bid, str(exc).split(": ", 1)[-1]))
    return bad, problem, count, len(data)


async def verify(repo: Repository, *, read_data: bool = False,
                 progress: VerifyProgress | None = None,
                 workers: int | None = None) -> VerifyReport:
    """Check every snapshot, tree and (with read_data) every blob of the repository."""
    report = VerifyReport()
    progress = progress or VerifyProgress()
    bad_blobs: dict[bytes, str] = {}

    for name in repo.missing_packs:
        report.damage.append(Damage(f"pack {name[:12]}", "missing from the store"))
    for name, why in repo.damaged_packs.items():
        report.damage.append(Damage(f"pack {name[:12]}", why))

    # Pack sizes against the index: catches truncation without reading the data.
    for name, (_scope, _epoch, size) in list(repo.index.packs.items()):
        try:
            actual = await repo.store.size(f"packs/{name}")
        except P2PError:
            actual = -1
        if actual != size:
            why = "missing from the store" if actual < 0 else f"is {actual} bytes, expected {size}"
            report.damage.append(Damage(f"pack {name[:12]}", why))
            for bid, loc in repo.index.blobs.items():
                if loc.pack == name:
                    bad_blobs[bid] = f"its pack {name[:12]} is damaged"
    report.packs = len(repo.index.packs)

    if read_data:
        names = sorted(repo.index.packs)
        progress.total_packs = len(names)
        loop = asyncio.get_running_loop()
        with cf.ThreadPoolExecutor(workers or max(2, os.cpu_count() or 2)) as pool:
            futs = {name: loop.run_in_executor(pool, _check_pack_blocking, repo, name)
                    for name in names}
            for name, fut in futs.items():
                bad, problem, count, nbytes = await fut
                progress.packs += 1
                progress.bytes += nbytes
                report.blobs_read += count
                report.bytes_read += nbytes
                if problem and not any(d.what == f"pack {name[:12]}" for d in report.damage):
                    report.damage.append(Damage(f"pack {name[:12]}", problem))
                for bid, why in bad:
                    bad_blobs[bid] = why

    snaps, unreadable = await repo.list_snapshots()
    report.snapshots = len(snaps)
    for u in unreadable:
        report.damage.append(Damage(f"snapshot {u.id[:8]}", u.reason))

    blob_damage: dict[bytes, Damage] = {}
    for bid, why in bad_blobs.items():
        blob_damage[bid] = Damage(f"blob {bid.hex()[:12]}", why)
    checked_trees: set[bytes] = set()
    await asyncio.to_thread(_walk_snapshots, repo, snaps, bad_blobs, blob_damage, checked_trees)
    report.trees = len(checked_trees)
    report.damage.extend(blob_damage.values())
    return report


def _walk_snapshots(repo: Repository, snaps: list[StoredSnapshot], bad_blobs: dict[bytes, str],
                    blob_damage: dict[bytes, Damage], checked: set[bytes]) -> None:
    """Walk every snapshot's trees, noting missing or damaged blobs and who uses them."""
    clean: set[bytes] = set()  # trees with nothing damaged below: walked once, not per snapshot

    def note(bid: bytes, why: str, snap: StoredSnapshot, path: str) -> None:
        d = blob_damage.get(bid)
        if d is None:
            d = blob_damage[bid] = Damage(f"blob {bid.hex()[:12]}", why)
        d.affects.append(f"snapshot {snap.short_id}: {path}")

    def walk(snap: StoredSnapshot, tree_id: bytes, path: str) -> bool:
        if tree_id in clean:
            return True
        if tree_id in bad_blobs:
            note(tree_id, bad_blobs[tree_id], snap, path + "/")
            return False
        try:
            tree = repo.load_tree_blocking(tree_id)
        except P2PError as exc:
            bad_blobs[tree_id] = str(exc)
            note(tree_id, str(exc), snap, path + "/")
            return False
        checked.add(tree_id)
        ok = True
        for e in tree.entries:
            child = f"{path}/{os.fsdecode(e.name)}"
            if e.type == DIR:
                ok = walk(snap, e.subtree, child) and ok
            elif e.type == FILE:
                for cid in e.chunks:
                    if cid not in bad_blobs and cid not in repo.index.blobs:
                        bad_blobs[cid] = "missing: no pack holds it"
                    if cid in bad_blobs:
                        note(cid, bad_blobs[cid], snap, child)
                        ok = False
                        break
        if ok:
            clean.add(tree_id)
        return ok

    for snap in snaps:
        for root in snap.snapshot.sources:
            walk(snap, root.tree, root.name)
