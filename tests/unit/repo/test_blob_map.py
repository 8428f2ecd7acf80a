"""The index's blob map: no memory per blob, always the database's copy, made again when not."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pbackup.errors import DiskFull
from p2pbackup.repo.blobmap import RECORD, LmdbBlobMap
from p2pbackup.repo.index import BlobLocation, PackDamage, PackIndex

from tests.eventually import eventually
from tests.index_view import blob_locations

GOLDEN = Path(__file__).parent.parent.parent / "data" / "index-v4"


def _pack(ids: list[bytes], name: str | None = None):
    return name or os.urandom(32).hex(), "src", 0, len(ids) * 100, \
        [(bid, 1, i * 100, 90, 200) for i, bid in enumerate(ids)]


async def _open(path: Path) -> PackIndex:
    index = PackIndex(str(path))
    await index.open()
    return index


async def _agrees(index: PackIndex) -> dict[bytes, BlobLocation]:
    """The blob map holds exactly the database's blobs; returns them."""
    held = await blob_locations(index)
    assert len(index.blobs) == len(held)
    assert all(index.blobs.get(bid) == loc for bid, loc in held.items())
    return held


async def test_opening_an_index_of_many_blobs_allocates_no_object_per_blob(tmp_path: Path):
    path = tmp_path / "index.sqlite"
    index = await _open(path)
    ids = [os.urandom(32) for _ in range(60_000)]
    for at in range(0, len(ids), 10_000):
        await index.add_packs([_pack(ids[at:at + 5_000]), _pack(ids[at + 5_000:at + 10_000])])
    await index.close()
    # Objects Python allocated and still holds (no tracemalloc: with the index's threads it
    # was seen to deadlock, a CPython bug of 3.11).
    gc.collect()
    before = sys.getallocatedblocks()
    again = await _open(path)
    found = sum(1 for bid in ids[::60] if bid in again.blobs and again.blobs.get(bid))
    gc.collect()
    held = sys.getallocatedblocks() - before
    await again.close()
    assert found == 1000
    # The previous index held a dict of every blob: 3 objects or more per blob.
    assert held < 10_000, f"{held} objects held after opening an index of 60,000 blobs"


async def test_a_blob_map_behind_its_database_is_made_again_from_it(tmp_path: Path, caplog):
    """An older p2pbackup changed the database (or a process died between the two commits):
    the map does not say the database's generation, and is made again on open."""
    path = tmp_path / "index.sqlite"
    index = await _open(path)
    await index.add_packs([_pack([os.urandom(32) for _ in range(20)])])
    await index.close()
    late = os.urandom(32)
    with closing(sqlite3.connect(path)) as db:
        db.execute("INSERT INTO packs (name, scope, epoch, size) VALUES (?, 'src', 0, 100)",
                   ("ab" * 32,))
        num = db.execute("SELECT num FROM packs WHERE name=?", ("ab" * 32,)).fetchone()[0]
        db.execute("INSERT INTO blobs VALUES (?, 1, ?, 0, 90, 200)", (late, num))
        db.execute("UPDATE meta SET value=value+1 WHERE key='generation'")
        db.commit()
    with caplog.at_level("INFO"):
        again = await _open(path)
    assert "not at its database's generation" in caplog.text
    assert again.blobs.get(late) == BlobLocation("ab" * 32, 0, 90, 200, 1)
    assert len(await _agrees(again)) == 21
    await again.close()


async def test_a_blob_map_ahead_of_its_database_is_made_again(tmp_path: Path):
    """The map moved, then the database's commit never happened (a kill between the two)."""
    path = tmp_path / "index.sqlite"
    index = await _open(path)
    kept = os.urandom(32)
    await index.add_packs([_pack([kept])])
    generation = index.blobs.generation
    phantom = os.urandom(32)
    assert index.blobs.apply([(phantom, 1, 0, 90, 200, 1)], [kept], generation, generation + 1)
    await index.close()
    again = await _open(path)
    assert phantom not in again.blobs and kept in again.blobs
    await _agrees(again)
    await again.close()


async def test_a_damaged_blob_map_file_is_made_again(tmp_path: Path, caplog):
    path = tmp_path / "index.sqlite"
    index = await _open(path)
    ids = [os.urandom(32) for _ in range(50)]
    await index.add_packs([_pack(ids)])
    await index.close()
    Path(str(path) + ".map").write_bytes(b"not an lmdb file" * 1000)
    Path(str(path) + ".map-lock").unlink(missing_ok=True)
    with caplog.at_level("INFO"):
        again = await _open(path)
    assert all(bid in again.blobs for bid in ids)
    await _agrees(again)
    await again.close()


async def test_a_blob_map_left_by_another_database_is_not_used(tmp_path: Path):
    path = tmp_path / "index.sqlite"
    index = await _open(path)
    await index.add_packs([_pack([os.urandom(32) for _ in range(6)])])
    await index.close()
    for suffix in ("", "-wal", "-shm"):  # the database is made again; the map stays
        Path(str(path) + suffix).unlink(missing_ok=True)
    again = await _open(path)
    assert not again.blobs
    await again.close()


async def test_an_index_written_by_the_previous_version_opens_with_its_blobs(tmp_path: Path,
                                                                            caplog):
    """Migration: an index of INDEX_VERSION 4 with its `.blobs` side file (tests/data/index-v4)
    opens as it is; the map is made from it once, with an info line, and the side file goes."""
    shutil.copytree(GOLDEN, tmp_path / "cache")
    path = tmp_path / "cache" / "index.sqlite"

    def bid(i: int) -> bytes:
        return bytes([i]) * 32

    def name(i: int) -> str:
        return (bytes([0xA0 + i]) * 32).hex()

    with caplog.at_level("INFO"):
        index = await _open(path)
    assert "making the blob map of the index" in caplog.text
    assert not Path(str(path) + ".blobs").exists()
    assert index.blobs.get(bid(3)) == BlobLocation(name(1), 310, 90, 203, 1)
    assert index.blobs.get(bid(9)) == BlobLocation(name(2), 900, 80, 309, 2)
    assert index.blobs.get(bid(1)) == BlobLocation(name(1), 110, 90, 201, 1)
    assert bid(20) in index.blobs and bid(21) not in index.blobs
    assert index.bad_blobs[bid(21)] == BlobLocation(name(3), 1050, 40, 100, 1)
    assert index.packs[name(3)] == ("docs", 1, 500) and name(3) in index.arrived
    assert len(await _agrees(index)) == 10
    # Its spare still takes over when the pack read from goes.
    await index.remove_pack(name(1))
    assert index.blobs.get(bid(1)) == BlobLocation(name(2), 100, 80, 301, 1)
    await index.add_packs([_pack([bid(40)])])
    await index.close()
    again = await _open(path)
    assert len(await _agrees(again)) == 6 and bid(40) in again.blobs
    await again.close()


_GROW = """
import asyncio, os, sys
from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.backup.sink import BlobSink
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.crypto.keys import AccountKeys
from p2pbackup.format.header import Kind
from p2pbackup.repo.repository import Repository

async def main():
    keys = AccountKeys(bytes.fromhex(sys.argv[1]))
    store, cache = LocalDirStore(sys.argv[2]), sys.argv[3]
    if sys.argv[4] == "create":
        repo = await Repository.create(store, keys, DeviceIdentity.generate(), cache, "d")
    else:
        repo = await Repository.open(store, keys, None, cache)
    scope = keys.scope("src", 0)
    sink = BlobSink(repo, pack_size=64 * 1024)   # many small packs, indexed in batches
    print("ready", flush=True)
    while True:
        await asyncio.to_thread(sink.add_many, scope, Kind.CHUNK,
                                [os.urandom(1500) for _ in range(64)])

asyncio.run(main())
"""


async def test_an_index_killed_while_it_grows_opens_and_names_only_stored_packs(tmp_path: Path):
    """kill -9 of a process adding packs (stored, made durable, indexed in batches), twice:
    the index opens, names no pack the store lacks, its map is the database's, and every
    blob it names reads back."""
    from p2pbackup.backup.verify import verify
    from p2pbackup.blobs.local import LocalDirStore
    from p2pbackup.crypto.keys import AccountKeys
    from p2pbackup.repo.repository import Repository

    secret = os.urandom(32)
    store_dir, cache = tmp_path / "store", tmp_path / "cache"

    def stored() -> set[str]:
        return {n.split("/", 1)[1] for n in LocalDirStore(store_dir).list_sync("packs/")}
    for round_, (how, packs) in enumerate((("create", 40), ("open", 90))):
        proc = subprocess.Popen([sys.executable, "-c", _GROW, secret.hex(), str(store_dir),
                                 str(cache), how], stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
            await eventually(lambda: len(stored()) >= packs, timeout=120)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        repo = await Repository.open(LocalDirStore(store_dir), AccountKeys(secret), None,
                                     str(cache))
        try:
            assert set(repo.index.packs) == stored() and not repo.missing_packs
            held = await _agrees(repo.index)
            assert len(held) >= 64 * 10 * (round_ + 1)
            report = await verify(repo, read_data=True)
            assert report.ok and report.blobs_read == len(held), report.damage[:3]
        finally:
            await repo.close()


_ID = st.integers(0, 11).map(lambda i: bytes([i]) * 32)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.one_of(
    st.tuples(st.just("add"), st.lists(_ID, min_size=1, max_size=5, unique=True)),
    st.tuples(st.just("remove"), st.integers(0, 9)),
    st.tuples(st.just("damage"), st.integers(0, 9), st.integers(0, 4)),
    st.tuples(st.just("reopen"), st.none())), max_size=14))
def test_the_blob_map_is_the_databases_copy_whatever_is_done(tmp_path_factory, ops):
    """Packs added (blobs shared between packs become spares), removed (spares take over),
    damaged (bad blobs leave), the index reopened: after each step the map holds exactly the
    database's blobs."""
    path = tmp_path_factory.mktemp("ix") / "index.sqlite"

    async def run() -> None:
        index = await _open(path)
        names: list[str] = []
        try:
            for op, *args in ops:
                if op == "add":
                    pack = _pack(args[0])
                    names.append(pack[0])
                    await index.add_packs([pack])
                elif op == "remove" and names:
                    await index.remove_pack(names.pop(args[0] % len(names)))
                elif op == "damage" and names:
                    name = names[args[0] % len(names)]
                    inside = await index.pack_blobs(name)
                    if inside:
                        bid, loc = inside[args[1] % len(inside)]
                        await index.mark_damaged(name, PackDamage("changed", {bid: loc}))
                elif op == "reopen":
                    await index.close()
                    index = await _open(path)
                await _agrees(index)
        finally:
            await index.close()

    asyncio.run(run())


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_blob_map_made_on_a_full_disk_is_disk_full_not_a_crash(tmp_path: Path):
    """LMDB maps its lock file: on a full tmpfs, a page of it without a block would kill the
    process (SIGBUS). It is made with its blocks first, so a full disk is DiskFull."""
    from tests.diskfull import fill, small_tmpfs

    with small_tmpfs(tmp_path / "small", "1m") as fs:
        fill(fs)
        with pytest.raises(DiskFull):
            LmdbBlobMap(str(fs / "index.sqlite.map"), {})
        assert not (fs / "index.sqlite.map-lock").exists()


def test_a_record_holds_what_a_pack_index_row_can():
    """Pack numbers, offsets and lengths of 32 bits (packs are at most 512 MiB), a kind byte."""
    row = (2**32 - 1, 512 << 20, 64 << 20, 2**32 - 1, 255)
    assert RECORD.unpack(RECORD.pack(*row)) == row
    assert RECORD.size == 17
    assert LmdbBlobMap is not None
