"""Repairing damaged packs: keep every blob that still authenticates, heal from other copies.

Blobs are sealed one by one, so a changed byte damages one blob, not its pack. For each pack
whose bytes no longer match its name:

1. an intact copy of the pack in another store (`sources`: a directory, a peer) takes its
   place; packs are named by the hash of their bytes, so a copy that hashes to the name is
   exactly the pack that was written, whoever holds it;
2. else the blobs that still authenticate are copied (still sealed) into a new pack, and the
   damaged pack is moved to `quarantine/` (in that order: a crash at any point loses nothing);
3. blobs the snapshots and logs still need that no pack holds (lost in step 2, or in a pack
   that went missing) are looked for in the sources' other packs, blob by blob, and each is
   checked like any blob before it is stored;
4. what is still lost is named with the files that use it (as verify does). The next
   snapshot stores it again from the source files, and since blobs are named by their
   content, older snapshots that use it are whole again too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..blobs.base import BlobStore
from ..crypto.keys import MissingKey
from ..errors import NotFound, P2PError
from ..format.pack import PackBuilder
from ..repo.repository import PackExam, Repository, open_blob, read_trailer
from .verify import Damage, Findings, VerifyProgress, check_references

log = logging.getLogger("p2pbackup.repair")


@dataclass(slots=True)
class PackRepair:
    """What happened to one damaged pack."""

    pack: str
    reason: str
    salvaged: int = 0
    lost: int = 0                   # its blobs that did not authenticate (or scan unreadable)
    healed_from: str | None = None  # the store whose intact copy replaced it


@dataclass(slots=True)
class RepairReport:
    """The outcome of a repair run."""

    checked: int = 0
    repaired: list[PackRepair] = field(default_factory=list)
    copied: dict[str, int] = field(default_factory=dict)   # source -> blobs copied from it
    lost: list[Damage] = field(default_factory=list)       # still missing, and who uses it


async def repair_packs(repo: Repository, *, sources: Sequence[BlobStore] = (),
                       progress: VerifyProgress | None = None) -> RepairReport:
    """Read every pack; heal damaged ones from `sources`, else salvage and quarantine them;
    then fetch what is still missing from `sources`. Hold the writer lock. `progress` counts
    the packs read (as verify's does)."""
    report = RepairReport()
    lost_with: dict[bytes, str] = {}   # blob id -> the damaged pack it was lost with
    names = sorted(set(repo.index.packs) | set(repo.index.damaged))
    progress = progress or VerifyProgress()
    progress.total_packs = len(names)
    progress.expected_bytes = sum(repo.index.packs[n][2] for n in names if n in repo.index.packs)
    for name in names:
        progress.packs += 1
        progress.bytes += repo.index.packs[name][2] if name in repo.index.packs else 0
        try:
            # (no `expected`: a pack whose trailer is lost is scanned, which also counts the
            # blobs that no longer read)
            exam = await asyncio.to_thread(repo.examine_pack_blocking, name, read_blobs=True)
        except NotFound:
            continue   # gone meanwhile: the next sync_index drops it
        report.checked += 1
        known = repo.index.damaged.get(name)
        damage = exam.damage
        if damage is None and known is None:
            continue
        if damage is None:   # an intact copy was put back by hand: the index only lagged
            await _index_intact(repo, exam)
            continue
        fix = PackRepair(name, damage.reason)
        report.repaired.append(fix)
        for source in sources:
            got = await _intact_copy(repo, source, name)
            if got is not None:
                await _replace(repo, *got)
                fix.healed_from, fix.salvaged = source.location, len(got[0].blobs)
                break
        else:
            good = {b.id for b in exam.blobs}
            lost = (set(exam.bad) | set(known.bad if known else ())) - good
            fix.salvaged, fix.lost = len(exam.blobs), len(lost) + exam.unreadable
            await _salvage(repo, exam)
            lost_with.update((bid, name) for bid in lost)

    found = await _still_lost(repo, lost_with)
    while sources and found.blobs:
        # Step 3; a tree found this way may name blobs that are missing too: look again.
        if not await _copy_blobs(repo, sources, set(found.blobs), report):
            break
        found = await _still_lost(repo, lost_with)
    report.lost = list(found.blobs.values())
    return report


async def _still_lost(repo: Repository, lost_with: dict[bytes, str]) -> Findings:
    """The blobs that snapshots and logs use and no pack holds, and who uses them."""
    found = Findings(repo)
    for bid, pack in lost_with.items():
        if bid not in repo.index.blobs:
            found.blob(bid, f"it did not authenticate; pack {pack[:12]} was set aside", pack)
    await check_references(repo, found)
    return found


async def _intact_copy(repo: Repository, source: BlobStore, name: str
                       ) -> tuple[PackExam, bytes] | None:
    """Pack `name` from `source`, if that copy hashes to its name (and its trailer reads)."""
    try:
        if not await source.has(f"packs/{name}"):
            return None
        data = await source.get(f"packs/{name}")
    except P2PError as exc:
        log.warning("could not read pack %s from %s: %s", name[:12], source.location, exc)
        return None
    exam = await asyncio.to_thread(repo.examine_pack_blocking, name, data, scan=False)
    if exam.damage is not None:
        log.warning("the copy of pack %s in %s is damaged too: %s", name[:12], source.location,
                    exam.damage.reason)
        return None
    return exam, data


async def _replace(repo: Repository, intact: PackExam, data: bytes) -> None:
    """Put the intact copy in place of the damaged pack (which goes to quarantine/)."""
    name = intact.name
    try:
        await repo.store.put(f"quarantine/{name}", await repo.store.get(f"packs/{name}"))
    except NotFound:
        pass
    await repo.store.put(f"packs/{name}", data)
    await _index_intact(repo, intact)


async def _index_intact(repo: Repository, exam: PackExam) -> None:
    assert exam.scope is not None
    await repo.index.add_pack(exam.name, exam.scope, exam.epoch, exam.size,
                              [(b.id, b.kind, b.offset, b.length, b.raw_length)
                               for b in exam.blobs], arrived=exam.name not in repo.index.packs)


async def _salvage(repo: Repository, exam: PackExam) -> None:
    """Copy the blobs of `exam` that authenticate into a new pack, then quarantine it."""
    name = exam.name
    data = await repo.store.get(f"packs/{name}")
    if exam.blobs and exam.scope is not None:
        builder = PackBuilder(exam.scope, exam.epoch)
        for b in exam.blobs:
            builder.add(b.kind, b.id, memoryview(data)[b.offset:b.offset + b.length],
                        b.raw_length)
        await _store_pack(repo, builder)
    await repo.store.put(f"quarantine/{name}", data)
    if name in repo.index.packs:
        await repo.index.remove_pack(name)
    await repo.index.forget_damage([name])
    await repo.store.delete(f"packs/{name}")


async def _store_pack(repo: Repository, builder: PackBuilder) -> None:
    name, data, trailer = builder.finish(repo.keys.record_key)
    await repo.store.put(f"packs/{name}", data)
    await repo.index.add_pack(name, trailer.scope, trailer.epoch, len(data),
                              [(b.id, b.kind, b.offset, b.length, b.raw_length)
                               for b in trailer.blobs])


async def _copy_blobs(repo: Repository, sources: Sequence[BlobStore], wanted: set[bytes],
                      report: RepairReport) -> int:
    """Copy the `wanted` blobs from the packs of `sources` this store lacks (each decrypted
    and checked against its id first); returns how many were copied."""
    builders: dict[tuple[str, int], PackBuilder] = {}
    copied = 0
    for source in sources:
        if not wanted:
            break
        try:
            names = sorted({n.split("/", 1)[1] async for n in source.list("packs/")}
                           - set(repo.index.packs))
        except P2PError as exc:
            log.warning("could not list the packs of %s: %s", source.location, exc)
            continue
        for name in names:
            if not wanted:
                break
            try:
                n = await _copy_from_pack(repo, source, name, wanted, builders)
            except P2PError as exc:
                log.warning("pack %s in %s: %s", name[:12], source.location, exc)
                continue
            if n:
                report.copied[source.location] = report.copied.get(source.location, 0) + n
                copied += n
    for builder in builders.values():
        await _store_pack(repo, builder)
    return copied


async def _copy_from_pack(repo: Repository, source: BlobStore, name: str, wanted: set[bytes],
                          builders: dict[tuple[str, int], PackBuilder]) -> int:
    what = f"pack {name[:12]} of {source.location}"
    _, trailer = await read_trailer(source, name, repo.keys.record_keys_newest_first())
    try:
        keys = repo.keys.scope(trailer.scope, trailer.epoch)
    except MissingKey:
        return 0
    copied = 0
    for ref in trailer.blobs:
        if ref.id not in wanted:
            continue
        sealed = await source.get_range(f"packs/{name}", ref.offset, ref.length)
        try:
            open_blob(keys, ref.id, ref.kind, sealed, f"blob {ref.id.hex()[:12]} in {what}",
                      ref.raw_length)
        except P2PError as exc:
            log.warning("%s", exc)
            continue
        key = (trailer.scope, trailer.epoch)
        builder = builders.setdefault(key, PackBuilder(*key))
        builder.add(ref.kind, ref.id, sealed, ref.raw_length)
        if builder.size >= repo.config.pack_size:
            await _store_pack(repo, builders.pop(key))
        wanted.discard(ref.id)
        copied += 1
    return copied

