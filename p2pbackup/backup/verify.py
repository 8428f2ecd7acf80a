"""Verifying a repository: structure and signatures, and with read_data every blob's content.

Problems are collected, not raised one at a time, so the report can name every damaged object
together with the snapshots and files it affects.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..errors import P2PError
from ..format.log import PUT
from ..format.records import DIR, FILE, TreeEntry
from ..repo.index import BlobLocation, PackDamage
from ..repo.logstore import LogStore
from ..repo.repository import Repository, StoredSnapshot
from .gcwindow import fewer_collections
from .names import show_path


@dataclass(slots=True)
class Damage:
    """One damaged or missing object and what it affects."""

    what: str  # "pack 1a2b...", "blob 3c4d...", "snapshot 5e6f..."
    reason: str
    affects: list[str] = field(default_factory=list)  # "snapshot ab12cd34: docs/a.txt"
    blob: str | None = None   # the blob's id (hex), for a damaged or missing blob
    pack: str | None = None   # the pack's name, when known

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
    read_data: bool = False   # blobs were decrypted (else a changed byte cannot be seen)
    noted: list[str] = field(default_factory=list)   # packs this run listed as damaged

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


@dataclass(slots=True)
class PackCheck:
    """One pack read for verify: what is wrong with it, blob by blob."""

    name: str
    bad: dict[bytes, str]          # blob id -> why it cannot be read
    problem: str | None            # what is wrong with the pack beyond its blobs
    blobs_read: int = 0
    bytes_read: int = 0
    damage: PackDamage | None = None   # what the index is to record (the pack was read)


def check_pack_blocking(repo: Repository, name: str,
                        blobs: list[tuple[bytes, BlobLocation]]) -> PackCheck:
    """Read a whole pack and decrypt every blob in it (from a thread): the index's `blobs` in
    it and those its trailer lists (a blob the index dropped as damaged is still named)."""
    try:
        exam = repo.examine_pack_blocking(name, read_blobs=True, expected=blobs, scan=False)
    except P2PError as exc:
        return PackCheck(name, {}, str(exc))
    bad = dict(exam.bad)
    listed = {b.id: b for b in exam.blobs}
    trailer_read = exam.scope is not None and not (exam.problem and blobs)
    for bid, loc in blobs:
        ref = listed.get(bid)
        if bid in bad:
            continue
        if ref is None or (ref.offset, ref.length) != (loc.offset, loc.length):
            bad[bid] = "the pack trailer does not list it where the index says" \
                if trailer_read else "its pack cannot be read"
    problem = exam.problem
    if not exam.intact and not bad:
        # Its blobs all authenticate, yet its bytes changed (its header, its trailer's length):
        # the pack itself is what is damaged.
        problem = "its content does not match its name" + (f"; {problem}" if problem else "")
    good = len(blobs) - sum(1 for bid, _ in blobs if bid in bad)
    return PackCheck(name, bad, problem, good, exam.size, exam.damage)


class Findings:
    """Damage found so far: one entry per damaged blob, and one per pack whose blobs are all
    in doubt (missing, or the wrong size: it was not read) so that is one line, not hundreds."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.packs: dict[str, Damage] = {}      # problems of whole packs
        self.in_doubt: set[str] = set()         # packs whose every blob counts as bad
        self.blobs: dict[bytes, Damage] = {}    # damaged or missing blobs
        self.other: list[Damage] = []

    def pack(self, name: str, reason: str, *, every_blob: bool = False) -> None:
        if name not in self.packs:
            self.packs[name] = Damage(f"pack {name[:12]}", reason, pack=name)
        if every_blob:
            self.in_doubt.add(name)

    def blob(self, bid: bytes, reason: str, pack: str | None = None) -> None:
        if bid not in self.blobs:
            where = f" in pack {pack[:12]}" if pack else ""
            self.blobs[bid] = Damage(f"blob {bid.hex()[:12]}{where}", reason, blob=bid.hex(),
                                     pack=pack)

    def bad(self, bid: bytes) -> bool:
        """True when blob `bid` cannot be read (noting it, if it is missing)."""
        if bid in self.blobs:
            return True
        loc = self.repo.index.blobs.get(bid)
        if loc is not None:
            return loc.pack in self.in_doubt
        damaged = self.repo.index.bad_blobs.get(bid)
        if damaged is not None:
            self.blob(bid, "it does not authenticate (its pack is damaged)", damaged.pack)
        else:
            self.blob(bid, "missing: no pack holds it")
        return True

    def affects(self, bid: bytes, snap: StoredSnapshot, path: str) -> None:
        self.note(bid, f"snapshot {snap.short_id}: {path}")

    def note(self, bid: bytes, entry: str) -> None:
        """Record that `entry` (a snapshot's or a log segment's file) needs bad blob `bid`."""
        d = self.blobs.get(bid)
        if d is None:
            d = self.packs[self.repo.index.blobs[bid].pack]
        if entry not in d.affects:
            d.affects.append(entry)

    def all(self) -> list[Damage]:
        return [*self.other, *self.packs.values(), *self.blobs.values()]


async def verify(repo: Repository, *, read_data: bool = False,
                 progress: VerifyProgress | None = None,
                 workers: int | None = None) -> VerifyReport:
    """Check every snapshot, tree and (with read_data) every blob of the repository."""
    report = VerifyReport(read_data=read_data)
    progress = progress or VerifyProgress()
    found = Findings(repo)
    if read_data:   # noted damage may have been a faulty read: the data is read anyway
        await repo.recheck_damaged()
    for name in repo.missing_packs:
        found.pack(name, "missing from the store")
    for name, d in repo.index.damaged.items():
        if not d.bad or name not in repo.index.packs:   # else its damaged blobs say it
            found.pack(name, d.reason)
        for bid in d.bad:
            found.bad(bid)

    # Pack sizes against the index: catches truncation and loss without reading the data.
    for name, (_scope, _epoch, size) in list(repo.index.packs.items()):
        try:
            actual = await repo.store.size(f"packs/{name}")
        except P2PError:
            actual = -1
        if actual != size:
            # Read, its blobs say for themselves; unread, each of them is in doubt.
            why = "missing from the store" if actual < 0 else f"is {actual} bytes, expected {size}"
            found.pack(name, why, every_blob=not read_data or actual < 0)
            if actual >= 0 and not read_data:   # (read, the check below records more)
                await _record(repo, report, name, PackDamage(
                    f"its content does not match its name: it {why}"))
    report.packs = len(repo.index.packs)

    if read_data:
        names = sorted(n for n in repo.index.packs if n not in found.in_doubt)
        progress.total_packs = len(names)
        progress.expected_bytes = sum(repo.index.packs[n][2] for n in names)
        loop = asyncio.get_running_loop()
        workers = workers or max(2, os.cpu_count() or 2)
        with cf.ThreadPoolExecutor(workers) as pool:

            async def checks() -> AsyncIterator[PackCheck]:
                # A few packs ahead of the one awaited, each with its blobs from the index:
                # memory for those packs' blobs, not for every blob of the repository.
                ahead: collections.deque[asyncio.Future[PackCheck]] = collections.deque()
                for name in names:
                    ahead.append(loop.run_in_executor(pool, check_pack_blocking, repo, name,
                                                      await repo.index.pack_blobs(name)))
                    if len(ahead) > 2 * workers:
                        yield await ahead.popleft()
                while ahead:
                    yield await ahead.popleft()

            async for checked in checks():
                progress.packs += 1
                progress.bytes += checked.bytes_read
                report.blobs_read += checked.blobs_read
                report.bytes_read += checked.bytes_read
                if checked.problem:
                    found.pack(checked.name, checked.problem)
                for bid, why in checked.bad.items():
                    found.blob(bid, why, checked.name)
                if checked.damage is not None:
                    await _record(repo, report, checked.name, checked.damage)

    report.snapshots, report.trees, report.segments = await check_references(repo, found)
    report.damage = found.all()
    return report


async def _record(repo: Repository, report: VerifyReport, name: str,
                  damage: PackDamage) -> None:
    """List pack `name` as damaged in the index, as any reader that finds it so does
    (Repository.recheck_pack): repair, the daemon (which heals it from a peer), the uploader
    (which replaces a store's copy: this may be that store's index) and status read it there.
    A read cut short lists it too: the next `verify --read-data` reads it again first."""
    report.noted.append(name)
    if repo.index.damaged.get(name) != damage:
        await repo.index.mark_damaged(name, damage)
    if repo.damage_seen is not None:   # (verify run by p2pbackupd: it heals it at once)
        repo.damage_seen(name)


async def check_references(repo: Repository, found: Findings) -> tuple[int, int, int]:
    """Every snapshot's trees and every device's log: note what they use that cannot be read,
    and who uses it. Returns (snapshots, trees, log segments) checked."""
    snaps, unreadable = await repo.list_snapshots()
    for u in unreadable:
        found.other.append(Damage(f"snapshot {u.id[:8]}", u.reason))
    trees = await asyncio.to_thread(_walk_snapshots, repo, snaps, found)
    return len(snaps), trees, await _check_logs(repo, found)


async def _check_logs(repo: Repository, found: Findings) -> int:
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
                        if found.bad(cid):
                            found.note(cid, f"log segment {seg.seq}: {scope}/{show_path(c.path)}")
                            break
    return count


def _walk_snapshots(repo: Repository, snaps: list[StoredSnapshot], found: Findings) -> int:
    """Walk every snapshot's trees, noting missing or damaged blobs and who uses them."""
    clean: set[bytes] = set()  # trees with nothing damaged below: walked once, not per snapshot
    loaded = 0
    packs = repo.index.packs

    def borrowed(snap: StoredSnapshot, bid: bytes, path: str, scope: str) -> bool:
        """A blob of another source named in `scope`'s trees (see Repository.check_scope)."""
        loc = repo.index.blobs.get(bid)
        if loc is None or packs[loc.pack][0] == scope:
            return False
        found.other.append(Damage(f"snapshot {snap.short_id}", f"{path} names blob "
                                  f"{bid.hex()[:12]} of source {packs[loc.pack][0]!r}, not of "
                                  f"{scope!r}: restore leaves it out"))
        return True

    def past_its_bundle(snap: StoredSnapshot, entry: TreeEntry, path: str) -> bool:
        """A small file whose bytes, by its offset and size, lie beyond its bundle."""
        assert entry.offset is not None
        raw = repo.locate(entry.chunks[0]).raw_length
        if entry.offset + entry.size <= raw:
            return False
        found.other.append(Damage(f"snapshot {snap.short_id}", f"{path} reaches past its "
                                  f"bundle {entry.chunks[0].hex()[:12]} ({raw} bytes): restore "
                                  "leaves it out"))
        return True

    def walk(snap: StoredSnapshot, tree_id: bytes, path: str, scope: str) -> bool:
        nonlocal loaded
        if borrowed(snap, tree_id, path + "/", scope):  # before `clean`: checked per source
            return False
        if tree_id in clean:
            return True
        if found.bad(tree_id):
            found.affects(tree_id, snap, path + "/")
            return False
        try:
            tree = repo.load_tree_blocking(tree_id)
        except P2PError as exc:
            pack = repo.index.blobs[tree_id].pack
            found.blob(tree_id, re.sub(r"^blob \w+ in pack \w+ ", "", str(exc)), pack)
            found.affects(tree_id, snap, path + "/")
            return False
        loaded += 1
        ok = True
        for e in tree.entries:
            child = f"{path}/{show_path(e.name)}"
            if e.type == DIR:
                ok = walk(snap, e.subtree, child, scope) and ok
            elif e.type == FILE:
                for cid in e.chunks:
                    if found.bad(cid):
                        found.affects(cid, snap, child)
                        ok = False
                        break
                    if borrowed(snap, cid, child, scope):
                        ok = False
                        break
                else:
                    if e.offset is not None and past_its_bundle(snap, e, child):
                        ok = False
        if ok:
            clean.add(tree_id)
        return ok

    with fewer_collections():
        for snap in snaps:
            for root in snap.snapshot.sources:
                walk(snap, root.tree, root.name, root.name)
    return loaded
