"""Prune: delete what no snapshot or kept log segment needs, repack packs that are mostly waste.

Crash-safe by order: new packs are written and made durable, and the index points at them,
before any old pack is deleted; a fold marker is written before folded segments are deleted.
A kill -9 at any point leaves a repository that verifies (at worst with some unused data,
which the next prune removes). Prune refuses to run when any snapshot cannot be read, because
it could not know what that snapshot needs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Set
from dataclasses import dataclass, field

from ..crypto.identity import DeviceIdentity
from ..errors import IntegrityError, P2PError
from ..format.header import Kind
from ..format.log import PUT, Head
from ..format.membership import SignerRefused
from ..format.pack import PackBuilder
from ..format.records import DIR, FILE
from ..repo.index import BlobLocation
from ..repo.logstore import LogStore, segment_name
from ..repo.repository import Repository, StoredSnapshot
from .gcwindow import fewer_collections


@dataclass(slots=True)
class PruneReport:
    """What prune did (or, with dry_run, would do)."""

    snapshots: int = 0
    blobs_used: int = 0
    blobs_dropped: int = 0      # unused blobs in the packs deleted or repacked: they go
    blobs_unused_kept: int = 0  # unused blobs left in packs mostly in use (see repack_below)
    bytes_unused_kept: int = 0
    packs_deleted: int = 0
    packs_repacked: int = 0
    packs_written: int = 0
    packs_held: int = 0     # unused, but arrived too recently to be sure (see `hold_new`)
    packs_damaged_kept: int = 0  # damaged: left for `repair` and healing, never pruned
    bytes_freed: int = 0
    segments_folded: int = 0
    removed: list[str] = field(default_factory=list)   # store names deleted


def _used_by_snapshots(repo: Repository, snaps: list[StoredSnapshot]) -> set[bytes]:
    used: set[bytes] = set()
    seen_trees: set[bytes] = set()

    def walk(tree_id: bytes) -> None:
        if tree_id in seen_trees:
            return
        seen_trees.add(tree_id)
        used.add(tree_id)
        for e in repo.load_tree_blocking(tree_id).entries:
            if e.type == DIR and e.subtree:
                walk(e.subtree)
            elif e.type == FILE:
                used.update(e.chunks)

    with fewer_collections():
        for s in snaps:
            for root in s.snapshot.sources:
                walk(root.tree)
    return used


async def prune(repo: Repository, identity: DeviceIdentity | None, *,
                repack_below: float = 0.5, dry_run: bool = False,
                protect: Callable[[], set[str]] | None = None,
                hold_new: float = 0.0, forgotten: Set[str] = frozenset()) -> PruneReport:
    """Remove unused data; the caller holds the writer lock.

    A pack is deleted when no blob in it is used, repacked when fewer than `repack_below` of
    its blobs are; the unused blobs of other packs stay (counted, not dropped) until more of
    their pack is unused. `forgotten` names snapshots to count as gone (a dry run of forget
    and prune, which deleted none).

    `protect` names packs written for data not yet in any snapshot or segment (the daemon's
    open segment); it is read at the same moment as the index, so none can slip between.
    `hold_new` (seconds): packs that arrived from elsewhere more recently (not written here;
    see PackIndex.arrived) are neither deleted nor repacked.
    A peer sends a snapshot's packs before the snapshot, so a pack that just arrived may be
    used by a snapshot or segment still on its way; deleting it would break that snapshot here
    and, through our removal record, on storage partners.
    """
    report = PruneReport()
    snaps, unreadable = await repo.list_snapshots()
    snaps = [s for s in snaps if s.id not in forgotten]
    # A refused snapshot (its signer may not have written it) keeps nothing alive.
    unreadable = [u for u in unreadable if not u.refused]
    if unreadable:
        raise IntegrityError(f"prune stopped: snapshot {unreadable[0].id[:8]} cannot be read "
                             f"({unreadable[0].reason}); run `p2pbackup verify` first")
    report.snapshots = len(snaps)
    try:
        used = await asyncio.to_thread(_used_by_snapshots, repo, snaps)
    except P2PError as exc:
        raise IntegrityError(f"prune stopped: {exc}; run `p2pbackup verify` first") from None

    logstore = LogStore(repo)
    fold_at: dict[str, int] = {}
    for s in snaps:
        fold_at[s.snapshot.device] = max(fold_at.get(s.snapshot.device, 0), s.snapshot.log_seq)
    devices = {n.split("/")[1] async for n in repo.store.list("segments/")}
    for device in sorted(devices):
        anchor = await logstore.read_anchor(device)
        fold = fold_at.get(device, 0) if identity and device == identity.device_id else 0
        for seq in await logstore.segment_seqs(device):
            if anchor and seq <= anchor.seq:
                continue
            if seq <= fold:
                report.segments_folded += 1
                continue
            try:
                _, seg = await logstore.load_segment(device, seq)
            except SignerRefused:
                continue
            for _scope, cl in logstore.open_changes(seg):
                for c in cl.changes:
                    if c.op == PUT and c.entry is not None and c.entry.type == FILE:
                        used.update(c.entry.chunks)

    # One pack at a time from the index: memory for the packs to repack, not for every blob.
    # pack -> (unused blobs, their bytes, the used blobs if it is to be repacked (or else
    # None), whether all of its blobs are unused)
    plans: dict[str, tuple[int, int, list[tuple[bytes, BlobLocation]] | None, bool]] = {}
    async for name, blobs in repo.index.blobs_by_pack():
        if name not in repo.index.packs:
            continue   # another process added it since this one opened the index: not ours
        unused = [loc for bid, loc in blobs if bid not in used]
        kept = len(blobs) - len(unused)
        report.blobs_used += kept
        plans[name] = (len(unused), sum(loc.length for loc in unused),
                       [(bid, loc) for bid, loc in blobs if bid in used]
                       if 0 < kept < len(blobs) * repack_below else None, kept == 0)
    for name in repo.index.packs:
        # A pack the index reads nothing from holds only copies of blobs in other packs.
        plans.setdefault(name, (0, 0, None, True))
    # (read after the index: a pack the sink stores is protected before it is indexed)
    for name in protect() if protect else ():
        plans.pop(name, None)
    # A damaged pack's bad blobs are not in the blob map, so they would look unused: pruning
    # it (and telling the peers to delete their intact copy) would lose them for good.
    for name in repo.index.damaged:
        if plans.pop(name, None) is not None:
            report.packs_damaged_kept += 1
    if hold_new > 0:
        recent = time.time() - hold_new
        for name in [n for n, t in repo.index.arrived.items() if t > recent]:
            if name in plans and plans[name][0]:
                report.packs_held += 1
            plans.pop(name, None)
    delete: list[str] = []
    repack: dict[str, list[tuple[bytes, BlobLocation]]] = {}   # their used blobs
    repack_unused_bytes = 0
    for name, (n_unused, unused_bytes, keep, all_unused) in plans.items():
        if all_unused:
            delete.append(name)
        elif keep is not None:
            repack[name] = keep
            repack_unused_bytes += unused_bytes
        else:
            report.blobs_unused_kept += n_unused
            report.bytes_unused_kept += unused_bytes
            continue
        report.blobs_dropped += n_unused
    report.packs_deleted, report.packs_repacked = len(delete), len(repack)
    report.bytes_freed = sum(repo.index.packs[n][2] for n in delete)
    if dry_run:  # what repacking frees, but for the new packs' headers and trailers
        report.bytes_freed += repack_unused_bytes
        return report

    # 1. fold this device's log up to its newest snapshot: anchor first, then delete.
    if identity and report.segments_folded:
        fold = fold_at[identity.device_id]
        h, _ = await logstore.load_segment(identity.device_id, fold)
        await logstore.write_anchor(identity, Head(identity.device_id, fold, h, None,
                                                   time.time_ns()))
        for seq in await logstore.segment_seqs(identity.device_id):
            if seq <= fold:
                await repo.store.delete(segment_name(identity.device_id, seq))
                report.removed.append(segment_name(identity.device_id, seq))

    # 2. copy the used blobs of mostly-unused packs into new packs, durable and indexed.
    written = await _repack(repo, repack)
    report.packs_written = len(written)
    new_bytes = sum(size for _, size in written)
    report.bytes_freed += sum(repo.index.packs[n][2] for n in repack) - new_bytes

    # 3. only now delete the old packs, index first: a kill between the two leaves a pack the
    # index lacks (re-indexed on open as unused data), never an index naming a missing pack.
    gone = delete + list(repack)
    await repo.index.remove_packs(gone)
    for name in gone:
        await repo.store.delete(f"packs/{name}")
    report.removed += [f"packs/{name}" for name in gone]
    return report


async def _repack(repo: Repository, packs: dict[str, list[tuple[bytes, BlobLocation]]]
                  ) -> list[tuple[str, int]]:
    """Copy the `packs`' blobs given (those still used) into new packs, durable and
    indexed; returns the new packs' names and sizes."""
    builders: dict[tuple[str, int, bool], PackBuilder] = {}
    written: list[tuple[str, int]] = []
    pack_size = repo.config.pack_size

    async def ship(builder: PackBuilder) -> None:
        name, data, trailer = builder.finish(repo.keys.record_key)
        await repo.store.put(f"packs/{name}", data)  # durable before any old pack goes
        await repo.index.add_packs([(name, trailer.scope, trailer.epoch, len(data),
                                     [(b.id, b.kind, b.offset, b.length, b.raw_length)
                                      for b in trailer.blobs])])
        written.append((name, len(data)))

    for name, blobs in packs.items():
        scope, epoch, _ = repo.index.packs[name]
        data = await repo.store.get(f"packs/{name}")
        for bid, loc in blobs:
            slot = (scope, epoch, loc.kind == Kind.TREE)
            builder = builders.get(slot)
            if builder is None:
                builder = builders[slot] = PackBuilder(scope, epoch, pack_size)
            builder.add(loc.kind, bid, data[loc.offset:loc.offset + loc.length], loc.raw_length)
            if builder.size >= pack_size:
                await ship(builders.pop(slot))
    for builder in builders.values():
        await ship(builder)
    return written
