"""A removed device keeps its signing key and the old epochs' keys. It must not get anything
new accepted (a snapshot or log it signs now, dated before or after its removal), and it must
not read what is written after its removal (pack trailers, membership versions, device
records)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import blake3
import pytest

from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.device import open_device
from p2pbackup.errors import IntegrityError, P2PError
from p2pbackup.format.header import Kind
from p2pbackup.format.log import GENESIS, Head, Segment
from p2pbackup.format.objects import open_object, seal_object
from p2pbackup.format.pack import parse_trailer
from p2pbackup.format.records import Signed, Snapshot
from p2pbackup.repo import replica
from p2pbackup.repo.logstore import LogStore
from tests.conftest import Cli
from tests.index_view import stored_blobs

from .accounts import carry, keys_of, make_owner, pair, remove, snapshot


def signed(kind: str, body: bytes, identity, envelope: str) -> bytes:
    """What the removed device signs: the old envelope, or the current one."""
    if envelope == "v1":
        return Signed(body, identity.device_id, identity.sign(body)).encode()
    return Signed.make(kind, body, identity.device_id, identity.sign).encode()


async def three_owners(tmp_path: Path) -> tuple[Path, Path, Path, Path, str]:
    """Owner A with a snapshot of `src`; B ("laptop", an owner, full keys) and C (an owner)
    paired and in sync with A. Returns (a, b, c, src, the snapshot's id)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "before.txt").write_text("written before the removal\n")
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    await make_owner(a, [src])
    first = await snapshot(a)
    await pair(a, b, "laptop")
    await pair(a, c, "offline-desk")
    await carry(a, b, "")
    await carry(b, a, "")          # B's device record, as replication carries it
    await carry(a, c, "")
    return a, b, c, src, first


@pytest.fixture
async def removal(tmp_path: Path):
    """Owner A; B (an owner, full keys) and C (an owner that will be offline) paired and in
    sync with A; then A removes B and snapshots a file B must never read."""
    a, b, c, src, first = await three_owners(tmp_path)
    packs_before = {n async for n in LocalDirStore(a / "store").list("packs/")}
    removed_at = time.time_ns()
    await remove(a, "laptop")
    (src / "after.txt").write_text("written after the removal: B must not read it\n")
    last = await snapshot(a)
    return a, b, c, first, last, removed_at, packs_before


def forge_snapshot(a: Path, b: Path, first_sources, when_ns: int, envelope: str
                   ) -> tuple[str, bytes]:
    keys, identity = keys_of(b)
    snap = Snapshot(when_ns, identity.device_id, "laptop", first_sources)
    sealed = bytes(seal_object(Kind.SNAPSHOT, signed("snapshot", snap.encode(), identity,
                                                     envelope), keys.record_key))
    return blake3.blake3(sealed).hexdigest(), sealed


@pytest.mark.parametrize("envelope", ["v1", "v2"])
@pytest.mark.parametrize("dated", ["before", "after"])
async def test_a_snapshot_a_removed_device_signs_is_not_replicated_listed_nor_latest(
        removal, tmp_path: Path, dated: str, envelope: str):
    a, b, _, first, last, removed_at, _ = removal
    async with open_device(a) as dev:
        sources = (await dev.repo.load_snapshot(first)).snapshot.sources
    when = removed_at - 10**9 if dated == "before" else time.time_ns() + 3600 * 10**9
    sid, sealed = forge_snapshot(a, b, sources, when, envelope)
    name = f"snapshots/{sid}"
    async with open_device(a) as dev:
        with pytest.raises(IntegrityError, match="removed"):
            await replica.accept(dev.repo, name, sealed)
        assert not await dev.repo.store.has(name)
    await LocalDirStore(a / "store").put(name, sealed)   # planted in the store anyway
    cli = Cli(a)
    listed = cli("snapshots", "--json")
    assert sid not in [s["id"] for s in json.loads(listed.stdout)]
    assert "removed" in listed.stderr
    out = cli("restore", "latest", "--to", str(tmp_path / "out"))
    assert f"restored snapshot {last[:8]}" in out.stdout
    assert (tmp_path / "out" / "src" / "after.txt").exists()


async def test_an_offline_member_refuses_a_removed_devices_snapshot_once_it_learns_of_the_removal(
        removal, tmp_path: Path):
    a, b, c, first, _, removed_at, _ = removal
    async with open_device(c) as dev:
        sources = (await dev.repo.load_snapshot(first)).snapshot.sources
        sid, sealed = forge_snapshot(a, b, sources, removed_at - 10**9, "v2")
        # C has not heard of the removal yet: B is still a member for all it knows.
        assert await replica.accept(dev.repo, f"snapshots/{sid}", sealed)
    await carry(a, c, "membership/")
    async with open_device(c) as dev:
        good, refused = await dev.repo.list_snapshots()
        assert sid not in [s.id for s in good]
        assert [r.id for r in refused] == [sid] and "removed" in refused[0].reason
    # Planted or not, it keeps nothing alive: prune goes on (and verify names it).
    cli = Cli(c)
    assert cli("prune").stdout.startswith("prune: ")
    checked = cli("verify", check=False)
    assert checked.returncode == 13 and f"snapshot {sid[:8]}" in checked.stdout


@pytest.mark.parametrize("envelope", ["v1", "v2"])
async def test_a_log_a_removed_device_signs_after_its_removal_is_refused(removal, envelope: str):
    a, b, _, _, _, _, _ = removal
    keys, identity = keys_of(b)
    me = identity.device_id
    seg = Segment(me, 1, GENESIS, time.time_ns(), ())
    seg_raw = bytes(seal_object(Kind.SEGMENT, signed("segment", seg.encode(), identity, envelope),
                                keys.record_key))
    from p2pbackup.format.log import segment_hash

    head = Head(me, 1, segment_hash(seg_raw), None, time.time_ns())
    head_raw = bytes(seal_object(Kind.HEAD, signed("head", head.encode(), identity, envelope),
                                 keys.record_key))
    async with open_device(a) as dev:
        with pytest.raises(IntegrityError, match="removed"):
            await replica.accept(dev.repo, f"segments/{me}/{1:012d}", seg_raw)
        with pytest.raises(IntegrityError, match="removed"):
            await replica.accept(dev.repo, f"heads/{me}", head_raw)
        await dev.repo.store.put(f"segments/{me}/{1:012d}", seg_raw)   # planted anyway
        links, problems = await LogStore(dev.repo).load_chain(me)
        assert links == [] and any("removed" in p for p in problems)


async def test_a_removed_device_cannot_open_trailers_membership_or_device_records_written_after(
        removal, tmp_path: Path):
    a, b, _, _, _, _, packs_before = removal
    d = tmp_path / "d"
    d_id = await pair(a, d, "new-phone")       # a membership version and a device record
    await carry(d, a, "devices/")
    store = LocalDirStore(a / "store")
    keys, _ = keys_of(b)
    held = [keys.meta_key, *keys.record_keys.values()]
    new_packs = [n async for n in store.list("packs/") if n not in packs_before]
    assert new_packs
    for name in new_packs:
        data = bytes(await store.get(name))
        for key in held:
            with pytest.raises(P2PError):
                parse_trailer(data, len(data), key, name)
    async with open_device(a) as dev:
        from p2pbackup.repo import membership as store_membership

        current, chain = await store_membership.load(dev.repo)
    removal_seq = next(s for s in range(1, current.seq + 1) if _removes(chain[s - 1]))
    later = [f"membership/{s:012d}" for s in range(removal_seq + 1, current.seq + 1)]
    assert later
    for name in later + [f"devices/{d_id}"]:
        raw = bytes(await store.get(name))
        for key in held:
            with pytest.raises(P2PError):
                open_object(raw, key)


def _removes(signed_version: bytes) -> bool:
    from p2pbackup.format.membership import Membership

    return bool(Membership.decode(Signed.decode(signed_version, "m").body).removed)


async def test_restore_at_a_time_does_not_replay_what_a_removed_device_appends_to_its_log(
        tmp_path: Path):
    import datetime as dt

    from p2pbackup.backup.snapshot import take_snapshot
    from p2pbackup.config import Source
    from p2pbackup.format.log import PUT, Change, ChangeList, SegmentPart, segment_hash
    from p2pbackup.format.records import FILE, TreeEntry

    src, notes = tmp_path / "src", tmp_path / "notes"
    for d in (src, notes):
        d.mkdir()
    (notes / "mine.txt").write_text("B's own file\n")
    a, b = tmp_path / "a", tmp_path / "b"
    await make_owner(a, [src])
    await pair(a, b, "laptop")
    await carry(a, b, "")
    async with open_device(b, write=True) as dev:   # B's snapshot and one log segment
        snap = await take_snapshot(dev.repo, (Source("notes", str(notes)),),
                                   temp_dir=dev.temp_dir)
        await LogStore(dev.repo).append(dev.identity, Segment(dev.identity.device_id, 1,
                                                              GENESIS, time.time_ns(), ()))
    await carry(b, a, "")
    await remove(a, "laptop")

    keys, identity = keys_of(b)
    now = time.time_ns()
    evil = ChangeList((Change(PUT, b"evil.txt", now - 10**9,
                              TreeEntry(FILE, b"evil.txt", 0o100644, 0, 0, now)),))
    part = SegmentPart("notes", 0, bytes(seal_object(Kind.SEGMENT_PART, evil.encode(),
                                                     keys.scope("notes", 0).data_key)))
    store = LocalDirStore(a / "store")
    first = bytes(await store.get(f"segments/{identity.device_id}/{1:012d}"))
    forged = Segment(identity.device_id, 2, segment_hash(first), now, (part,))
    await store.put(f"segments/{identity.device_id}/{2:012d}", bytes(seal_object(
        Kind.SEGMENT, signed("segment", forged.encode(), identity, "v2"), keys.record_key)))

    at = dt.datetime.fromtimestamp(time.time() + 1).astimezone().isoformat()
    Cli(a)("restore", snap.stored.id, "--at", at, "--to", str(tmp_path / "out"))
    assert (tmp_path / "out" / "notes" / "mine.txt").exists()
    assert not (tmp_path / "out" / "notes" / "evil.txt").exists()


async def test_a_pack_repair_writes_after_a_removal_does_not_list_its_blobs_to_the_removed_device(
        removal, tmp_path: Path):
    """repair salvages a damaged pack's blobs into a new pack: written in the pack's epoch, its
    trailer is sealed with that epoch's key, as every pack written after the removal is."""
    from p2pbackup.backup.repair import repair_packs

    a, b, _, _, _, _, packs_before = removal
    for i in range(8):
        (tmp_path / "src" / f"late-{i}.bin").write_bytes(  # (not bundled: chunks of their own)
            bytes([i]) * 20_000 + str(i).encode())
    await snapshot(a)
    async with open_device(a, write=True) as dev:
        repo = dev.repo
        after = {n.removeprefix("packs/") for n in
                 {n async for n in repo.store.list("packs/")} - packs_before}
        held: dict[str, list] = {}
        for loc in stored_blobs(repo.index).values():
            if loc.pack in after and loc.kind == Kind.CHUNK:
                held.setdefault(loc.pack, []).append(loc)
        name, locs = max(held.items(), key=lambda kv: len(kv[1]))
        assert len(locs) > 1 and repo.index.packs[name][1] >= 1   # written in epoch 1
        path = Path(repo.store.path_of(f"packs/{name}"))
        data = bytearray(path.read_bytes())
        data[locs[0].offset + locs[0].length // 2] ^= 0x01       # one blob damaged
        path.write_bytes(data)
        report = await repair_packs(repo)
        assert [(r.pack, r.salvaged) for r in report.repaired] == [(name, len(locs) - 1)]
        made = {n async for n in repo.store.list("packs/")} - packs_before - \
            {f"packs/{n}" for n in after}
        assert len(made) == 1
        new = bytes(await repo.store.get(made.pop()))
        assert parse_trailer(new, len(new), repo.keys.record_keys_newest_first(), "new").blobs
    keys, _ = keys_of(b)
    for key in [keys.meta_key, *keys.record_keys.values()]:
        with pytest.raises(P2PError):
            parse_trailer(new, len(new), key, "the repaired pack")


async def test_a_pack_repaired_after_a_removal_from_an_older_epochs_pack_is_hidden_from_it_too(
        tmp_path: Path):
    """The damaged pack was written before the removal (epoch 0, which the removed device
    holds); the pack repair writes now is new metadata all the same: its trailer is sealed with
    the newest epoch's key, or the removed device could list the blobs of packs repaired (or
    repacked by prune) after its removal."""
    from p2pbackup.backup.repair import repair_packs

    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"f{i}.bin").write_bytes(  # (not bundled: chunks of their own)
            bytes([i]) * 20_000 + str(i).encode())
    a, b = tmp_path / "a", tmp_path / "b"
    await make_owner(a, [src])
    await snapshot(a)
    await pair(a, b, "laptop")
    await carry(a, b, "")
    await remove(a, "laptop")
    async with open_device(a, write=True) as dev:
        repo = dev.repo
        held: dict[str, list] = {}
        for loc in stored_blobs(repo.index).values():
            if loc.kind == Kind.CHUNK:
                held.setdefault(loc.pack, []).append(loc)
        name, locs = max(held.items(), key=lambda kv: len(kv[1]))
        assert len(locs) > 1 and repo.index.packs[name][1] == 0   # written in epoch 0
        path = Path(repo.store.path_of(f"packs/{name}"))
        data = bytearray(path.read_bytes())
        data[locs[0].offset + locs[0].length // 2] ^= 0x01
        path.write_bytes(data)
        before = {n async for n in repo.store.list("packs/")}
        await repair_packs(repo)
        (made,) = {n async for n in repo.store.list("packs/")} - before
        new = bytes(await repo.store.get(made))
        assert parse_trailer(new, len(new), repo.keys.record_keys_newest_first(), "new").blobs
    keys, _ = keys_of(b)
    for key in [keys.meta_key, *keys.record_keys.values()]:
        with pytest.raises(P2PError):
            parse_trailer(new, len(new), key, "the repaired pack")


async def test_removing_an_owner_keeps_the_removals_it_made_before_and_refuses_later_ones(
        tmp_path: Path):
    """Owner B forgets a snapshot; device C takes B's removal record, then learns that A
    removed B. The record still counts at C (C noted its signer when it first held it):
    removing a device does not cancel what it removed. One B signs after its removal is
    refused, and one C never held while B was an owner does not count."""
    from p2pbackup import account
    from p2pbackup.replication.member import Replicator
    from p2pbackup.format.removal import Removal, removal_name, removal_object
    from p2pbackup.repo import membership as store_membership
    from p2pbackup.repo import removals

    a, b, c, _, first = await three_owners(tmp_path)
    forgotten = f"snapshots/{first}"
    async with open_device(b, write=True) as dev:
        record = await removals.record(dev.repo.store, dev.identity, [forgotten])
        data = bytes(await dev.repo.store.get(record))
    note = c / removals.FIRST_SEEN
    async with open_device(c, write=True) as dev:
        assert await replica.accept(dev.repo, record, data)
        assert record in await Replicator(dev.repo, dev.identity.device_id,
                                          seen=removals.FirstSeen(note)).refresh_removals()
    await remove(a, "laptop")
    await carry(a, c, "")      # the version that removes B reaches C
    _, b_id = keys_of(b)
    async with open_device(c, write=True) as dev:
        await account.take_grants(dev)
        current, _ = await store_membership.load(dev.repo)
        assert b_id.device_id in current.removed
        replicator = Replicator(dev.repo, dev.identity.device_id, seen=removals.FirstSeen(note))
        records = await replicator.refresh_removals()
        assert record in records and forgotten in replicator.tombstones
        later = removal_object(Removal(b_id.device_id, time.time_ns(), ("snapshots/" + "ab" * 32,
                                                                         )), b_id.sign)
        with pytest.raises(IntegrityError, match="not an owner"):
            await replica.accept(dev.repo, removal_name(later), later)
        await dev.repo.store.put(removal_name(later), later)   # brought in some other way
        records = await replicator.refresh_removals()
        assert removal_name(later) not in records and record in records
        grace = 7 * 86400
        assert await removals.apply_due(dev.repo.store, records, grace, kinds=("snapshots/",),
                                        seen=replicator.seen,
                                        now_ns=time.time_ns() + grace * 10**9 + 1) == [forgotten]
