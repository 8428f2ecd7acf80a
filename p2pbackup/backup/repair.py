"""Repairing damaged packs: keep every blob that still authenticates, set the pack aside.

Good blobs are copied (still sealed) into a new pack before the damaged pack is moved to
`quarantine/`, so a crash at any point loses nothing. Blobs that did not authenticate are then
missing from the index; the next snapshot stores them again from the source files, and since
blobs are named by their content, older snapshots that use them are whole again too.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..errors import P2PError
from ..format.pack import PackBuilder
from ..repo.repository import Repository
from .verify import check_pack_blocking, blobs_by_pack


@dataclass(slots=True)
class PackRepair:
    """What happened to one damaged pack."""

    pack: str
    reason: str
    salvaged: int = 0
    lost: int = 0


@dataclass(slots=True)
class RepairReport:
    """The outcome of a repair run."""

    checked: int = 0
    repaired: list[PackRepair] = field(default_factory=list)


async def repair_packs(repo: Repository) -> RepairReport:
    """Read every pack; salvage and quarantine the damaged ones. Hold the writer lock."""
    report = RepairReport()
    for name, why in list(repo.damaged_packs.items()):  # trailer unreadable: nothing to salvage
        await _quarantine(repo, name)
        report.repaired.append(PackRepair(name, why))
    grouped = blobs_by_pack(repo)
    for name in sorted(repo.index.packs):
        bad, problem, _count, _n = await asyncio.to_thread(check_pack_blocking, repo, name,
                                                           grouped.get(name, []))
        report.checked += 1
        if not bad and not problem:
            continue
        bad_ids = {bid for bid, _ in bad}
        fix = PackRepair(name, problem or bad[0][1])
        scope, epoch, _size = repo.index.packs[name]
        builder = PackBuilder(scope, epoch)
        try:
            data = await repo.store.get(f"packs/{name}")
        except P2PError:
            data = b""
        for bid, loc in grouped.get(name, []):
            if bid in bad_ids or loc.offset + loc.length > len(data):
                fix.lost += 1
                continue
            builder.add(loc.kind, bid, data[loc.offset:loc.offset + loc.length], loc.raw_length)
            fix.salvaged += 1
        if len(builder):
            new_name, new_data, trailer = builder.finish(repo.keys.trailer_key(builder.epoch))
            await repo.store.put(f"packs/{new_name}", new_data)
            await repo.index.add_pack(new_name, scope, epoch, len(new_data),
                                      [(b.id, b.kind, b.offset, b.length, b.raw_length)
                                       for b in trailer.blobs])
        await _quarantine(repo, name, data)
        report.repaired.append(fix)
    return report


async def _quarantine(repo: Repository, name: str, data: bytes | None = None) -> None:
    if data is None:
        try:
            data = await repo.store.get(f"packs/{name}")
        except P2PError:
            data = b""
    if data:
        await repo.store.put(f"quarantine/{name}", data)
    if name in repo.index.packs:
        await repo.index.remove_pack(name)
    await repo.store.delete(f"packs/{name}")
    repo.damaged_packs.pop(name, None)
