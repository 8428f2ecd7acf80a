"""Replication between two real repositories over the in-memory link: the initial sync, then
a push of what is stored later (hostile objects: tests/unit/repo/test_replica.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.config import Source
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.crypto.keys import AccountKeys
from p2pbackup.daemon.peers import PeerState
from p2pbackup.replication.member import Replicator
from p2pbackup.repo.repository import Repository
from p2pbackup.transport.memory import memory_pair

from tests.index_view import stored_blobs


async def until(cond, timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await cond():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.05)


async def two_repositories(tmp_path: Path, *, a_dials: bool | None = None):
    """A repository with one snapshot of `src`, and an empty replica of it (`a_dials`: the
    identities are drawn so that a's device id sorts first, the side that dials lanes, or
    last)."""
    keys, a_id, b_id = AccountKeys(os.urandom(32)), DeviceIdentity.generate(), \
        DeviceIdentity.generate()
    if a_dials is not None and (a_id.device_id < b_id.device_id) != a_dials:
        a_id, b_id = b_id, a_id
    src = tmp_path / "src"
    src.mkdir()
    (src / "one").write_bytes(os.urandom(300_000))
    ra = await Repository.create(LocalDirStore(tmp_path / "a"), keys, a_id, str(tmp_path / "ca"),
                                 "a")
    await take_snapshot(ra, (Source("src", str(src)),), temp_dir=str(tmp_path / "t"))
    rb = await Repository.create_replica(LocalDirStore(tmp_path / "b"), keys, b_id,
                                         str(tmp_path / "cb"), "b", await ra.config_object())
    return src, a_id, b_id, ra, rb


@contextlib.asynccontextmanager
async def running(ra, rb, a_id, b_id, *, keep_open: bool = False,
                  a_view: PeerState | None = None, b_view: PeerState | None = None,
                  a_options: dict | None = None, **b_options):
    """A Replicator on each repository, in session over the in-memory link; yields a's
    Replicator, b's view of a (PeerState) and b's Replicator (`a_view`: a's view of b).
    Direct-lane servers listen on loopback before the sessions start. Everything is closed
    at the end (the repositories too, unless `keep_open`)."""
    la, lb = memory_pair()
    pa = Replicator(ra, a_id.device_id, **(a_options or {}))
    pb = Replicator(rb, b_id.device_id, **b_options)
    for p in (pa, pb):
        await p.start_lane("127.0.0.1")
    sb = b_view or PeerState(a_id.device_id)
    tasks = [asyncio.create_task(pa.run(b_id.device_id, la,
                                        a_view or PeerState(b_id.device_id))),
             asyncio.create_task(pb.run(a_id.device_id, lb, sb))]
    try:
        yield pa, sb, pb
    finally:
        await la.close()
        await lb.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pa.close()
        await pb.close()
        if not keep_open:
            await ra.close()
            await rb.close()


async def test_initial_sync_then_push(tmp_path: Path):
    src, a_id, b_id, ra, rb = await two_repositories(tmp_path)
    async with running(ra, rb, a_id, b_id) as (pa, sb, _pb):
        async def b_has_snapshot() -> bool:
            return len((await rb.list_snapshots())[0]) == 1
        await until(b_has_snapshot)
        assert {n async for n in ra.store.list("")} <= {n async for n in rb.store.list("")}
        (src / "two").write_bytes(os.urandom(100_000))
        await take_snapshot(ra, (Source("src", str(src)),), temp_dir=str(tmp_path / "t"))
        await pa.announce_new()

        async def b_has_both() -> bool:
            return len((await rb.list_snapshots())[0]) == 2
        await until(b_has_both)
        assert sb.last_sync is not None and sb.objects_behind == 0 and sb.bytes_behind == 0


async def test_what_the_peer_holds_of_ours_is_in_its_status(tmp_path: Path):
    """A device's view of a peer (a storage partner) says how much of its data the peer
    holds: all it offered, once the peer has stored it."""
    from p2pbackup.repo import replica

    src, a_id, b_id, ra, rb = await two_repositories(tmp_path)
    names = await replica.offered_names(ra)
    total = sum([await ra.store.size(n) for n in names])
    sa = PeerState(b_id.device_id)
    async with running(ra, rb, a_id, b_id, a_view=sa):
        async def all_held() -> bool:
            return sa.held_objects == len(names)
        await until(all_held)
        assert sa.held_bytes == total
        assert sa.to_json()["held_bytes"] == total


async def test_a_pack_we_could_not_store_is_asked_for_again(tmp_path: Path, monkeypatch,
                                                             caplog):
    """A local failure (a pack worker died, the disk was full) refuses the pack for now; the
    same session asks for it again after a delay and stores it."""
    from p2pbackup.errors import StorageError
    from p2pbackup.repo import replica

    src, a_id, b_id, ra, rb = await two_repositories(tmp_path)
    real, failed = replica.accept, []

    async def flaky(repo, name, data, **kw):
        if repo is rb and name.startswith("packs/") and not failed:
            failed.append(name)
            raise StorageError("the process checking packs from peers ended (exit status -9)")
        return await real(repo, name, data, **kw)

    monkeypatch.setattr(replica, "accept", flaky)
    async with running(ra, rb, a_id, b_id, retry=0.3):
        async def b_has_all() -> bool:
            return {n async for n in ra.store.list("")} <= {n async for n in rb.store.list("")}
        await until(b_has_all)
        assert failed and await rb.store.has(failed[0])
        assert "asking for it again in 0 s" in caplog.text
        assert len((await rb.list_snapshots())[0]) == 1


async def test_a_hostile_peer_ends_its_session_and_plants_nothing(tmp_path: Path):
    import struct

    import msgpack

    keys, b_id = AccountKeys(os.urandom(32)), DeviceIdentity.generate()
    rb = await Repository.create(LocalDirStore(tmp_path / "b"), keys, b_id, str(tmp_path / "cb"),
                                 "b")
    before = {n async for n in rb.store.list("")}

    def frame(msg: dict) -> bytes:
        body = msgpack.packb({"v": 1, **msg}, use_bin_type=True)
        return struct.pack(">I", len(body)) + body

    attacks = [
        os.urandom(5000),                                         # random bytes
        frame({"t": "hello", "versions": [1], "device": "x"})[:-3],   # truncated, then EOF
        frame({"t": "hello", "versions": [1], "device": "x"}) +
        frame({"t": "inv", "names": ["packs/" + "a" * 64], "last": True}) +
        frame({"t": "obj", "name": "packs/" + "a" * 64, "off": 0, "total": 5,
               "data": b"evil!", "last": True}),                  # valid frames, wrong content
    ]
    try:
        for data in attacks:
            la, lb = memory_pair()
            state = PeerState("x")
            task = asyncio.create_task(Replicator(rb, b_id.device_id).run("x", lb, state))
            await la.send(data)
            await asyncio.sleep(0.2)
            await la.close()
            await asyncio.wait_for(task, 5)   # ends quietly, no exception
        assert {n async for n in rb.store.list("")} == before
    finally:
        await rb.close()


# ---- damaged packs: never offered, healed from the peer's intact copy ----------------------

def _damage_a_chunk(repo) -> tuple[str, bytes]:
    """Flip a byte inside one chunk of a pack (under the index's feet); returns the pack's
    name and its intact bytes."""
    from pathlib import Path as P

    from p2pbackup.format.header import Kind

    bid, loc = next((b, l) for b, l in stored_blobs(repo.index).items() if l.kind == Kind.CHUNK)
    path = P(repo.store.path_of(f"packs/{loc.pack}"))
    intact = path.read_bytes()
    damaged = bytearray(intact)
    damaged[loc.offset + loc.length // 2] ^= 1
    path.write_bytes(damaged)
    return loc.pack, intact


async def _same_stores(ra, rb) -> bool:
    return {n async for n in ra.store.list("")} <= {n async for n in rb.store.list("")}


async def test_a_read_that_fails_heals_the_pack_from_the_peer_in_the_same_session(
        tmp_path: Path):
    """What the daemon does on its own: a blob read fails (a snapshot's, a rescan's), the pack
    is checked, listed as damaged, and the peer's copy asked for and put in its place."""
    from p2pbackup.backup.verify import verify
    from p2pbackup.errors import BlobDamaged

    from tests.eventually import eventually

    src, a_id, b_id, ra, rb = await two_repositories(tmp_path)
    async with running(ra, rb, a_id, b_id) as (pa, sb, pb):
        await eventually(lambda: _same_stores(ra, rb))
        name, intact = _damage_a_chunk(rb)
        loop = asyncio.get_running_loop()
        rb.damage_seen = lambda pack: loop.call_soon_threadsafe(pb.check_pack_soon, pack)
        in_pack = [b for b, _ in await rb.index.pack_blobs(name)]
        bid = in_pack[0]
        with pytest.raises(BlobDamaged):
            for b in in_pack:
                await asyncio.to_thread(rb.read_blob_blocking, b)
        await eventually(lambda: name not in rb.damaged_packs and
                         open(rb.store.path_of(f"packs/{name}"), "rb").read() == intact)
        assert (await verify(rb, read_data=True)).ok
        assert await asyncio.to_thread(rb.read_blob_blocking, bid)


async def test_a_damaged_pack_is_not_offered_and_the_next_session_heals_it(tmp_path: Path):
    """After an index rebuild (or a repair that set the pack aside), the damaged pack is not
    in this store's inventory, so a peer holding it sends its copy at the next session."""
    from p2pbackup.backup.repair import repair_packs
    from p2pbackup.backup.verify import verify
    from p2pbackup.repo.replica import offered_names as local_names

    from tests.eventually import eventually

    src, a_id, b_id, ra, rb = await two_repositories(tmp_path)
    async with running(ra, rb, a_id, b_id, keep_open=True):
        await eventually(lambda: _same_stores(ra, rb))
    name, intact = _damage_a_chunk(rb)
    await rb.rebuild_index()
    assert name in rb.damaged_packs and f"packs/{name}" not in await local_names(rb)
    async with running(ra, rb, a_id, b_id, keep_open=True):
        await eventually(lambda: name not in rb.damaged_packs)
    assert (await verify(rb, read_data=True)).ok
    # Set aside by repair (no other copy given): the same at the next session.
    _damage_a_chunk(rb)
    report = await repair_packs(rb)
    assert report.repaired[0].lost == 1 and not await rb.store.has(f"packs/{name}")
    assert not (await verify(rb)).ok
    async with running(ra, rb, a_id, b_id):
        await eventually(lambda: rb.store.has(f"packs/{name}"))
        await eventually(lambda: not rb.index.damaged and name in rb.index.packs)
        assert (await verify(rb, read_data=True)).ok


async def test_a_pack_that_rotted_is_refused_once_then_never_sent_again(tmp_path: Path):
    """The sender's copy changed since it was written: the peer refuses it (it checks the
    hash); the sender then finds it damaged and stops offering it: no loop."""
    from p2pbackup.repo.replica import offered_names as local_names

    from tests.eventually import eventually

    src, a_id, b_id, ra, rb = await two_repositories(tmp_path)
    name, _ = _damage_a_chunk(ra)
    async with running(ra, rb, a_id, b_id, keep_open=True):
        await eventually(lambda: name in ra.damaged_packs)
        assert not await rb.store.has(f"packs/{name}")
    assert f"packs/{name}" not in await local_names(ra)
    async with running(ra, rb, a_id, b_id) as (pa, _sb, _pb):
        await eventually(lambda: b_id.device_id in pa.sessions)
        assert f"packs/{name}" not in pa.sessions[b_id.device_id].session.have   # not offered


async def test_a_session_takes_a_bulk_lane_from_whoever_opens_one(tmp_path: Path):
    """`Replicator.use_lane` takes any bulk lane (here an in-memory one; the TLS lane in the
    product, a relayed one later): new packs go over it, and over the control link again
    once it drops; status says which path the peer is on."""
    from p2pbackup.transport.memory import memory_pair as lane_pair

    from tests.eventually import eventually

    src, a_id, b_id, ra, rb = await two_repositories(tmp_path)
    async with running(ra, rb, a_id, b_id) as (pa, sb, pb):
        async def b_has_all() -> bool:
            return {n async for n in ra.store.list("")} <= {n async for n in rb.store.list("")}
        await eventually(b_has_all)
        lane_a, lane_b = lane_pair(max_message_size=4 * 1024 * 1024)
        lanes = [asyncio.create_task(pa.use_lane(b_id.device_id, lane_a)),
                 asyncio.create_task(pb.use_lane(a_id.device_id, lane_b))]
        await eventually(lambda: sb.path == "direct lane")
        (src / "two").write_bytes(os.urandom(400_000))
        await take_snapshot(ra, (Source("src", str(src)),), temp_dir=str(tmp_path / "t"))
        await pa.announce_new()
        await eventually(b_has_all)
        assert lane_a.bytes_sent >= 400_000   # the new pack took the lane

        await lane_a.close()
        await asyncio.gather(*lanes)
        assert sb.path == "data channel"
        sent = lane_a.bytes_sent
        (src / "three").write_bytes(os.urandom(400_000))
        await take_snapshot(ra, (Source("src", str(src)),), temp_dir=str(tmp_path / "t"))
        await pa.announce_new()
        await eventually(b_has_all)
        assert lane_a.bytes_sent == sent and len((await rb.list_snapshots())[0]) == 3


async def test_a_session_through_a_relay_does_not_wait_for_a_direct_lane(tmp_path: Path,
                                                                         monkeypatch):
    """The direct lane dials the peer's LAN addresses: across NATs (the data channel relayed
    or hole punched) it cannot come, so neither side offers it and objects do not wait for it
    (they waited LANE_WAIT, 2 s of every WAN session; here that wait is made an hour)."""
    from p2pbackup.replication import member

    from tests.eventually import eventually

    monkeypatch.setattr(member, "LANE_WAIT", 3600.0)
    # The sender is the side that waits for the peer to dial.
    src, a_id, b_id, ra, rb = await two_repositories(tmp_path, a_dials=False)
    sb = PeerState(a_id.device_id, ice_path="relay")
    async with running(ra, rb, a_id, b_id, a_view=PeerState(b_id.device_id, ice_path="relay"),
                       b_view=sb, direct_lane=True, a_options={"direct_lane": True}):
        async def b_has_snapshot() -> bool:
            return len((await rb.list_snapshots())[0]) == 1
        await eventually(b_has_snapshot, timeout=30)
        assert sb.path != "direct lane"
