"""The pack index's blob map side file: used only when it matches the database exactly."""

from __future__ import annotations

import os
from pathlib import Path

from p2pbackup.repo.index import BlobLocation, PackIndex, decode_blob_map, encode_blob_map


def _pack(n: int) -> tuple[str, str, int, int, list[tuple[bytes, int, int, int, int]]]:
    name = os.urandom(32).hex()
    blobs = [(os.urandom(32), 1, i * 100, 90, 200) for i in range(n)]
    return name, "src", 0, n * 100, blobs


def _expected(*packs) -> dict[bytes, BlobLocation]:
    return {bid: BlobLocation(name, off, length, raw, kind)
            for name, _s, _e, _z, blobs in packs for bid, kind, off, length, raw in blobs}


def test_the_side_file_round_trips_and_refuses_damage_and_other_generations():
    blobs = _expected(_pack(50), _pack(3))
    data = encode_blob_map(7, blobs)
    assert data is not None
    assert decode_blob_map(data, 7) == blobs
    assert decode_blob_map(data, 8) is None
    for at in (0, 30, len(data) // 2, len(data) - 1):
        bad = bytearray(data)
        bad[at] ^= 1
        assert decode_blob_map(bytes(bad), 7) is None
    assert decode_blob_map(data[:-40], 7) is None
    assert encode_blob_map(1, {b"short": BlobLocation("p", 0, 1, 1, 1)}) is None
    assert encode_blob_map(1, {os.urandom(32): BlobLocation("p", 1 << 33, 1, 1, 1)}) is None


async def _open(path: Path) -> PackIndex:
    index = PackIndex(str(path))
    await index.open()
    return index


async def test_the_next_open_reads_the_side_file_and_gets_the_same_map(tmp_path: Path):
    path = tmp_path / "index.sqlite"
    a = await _open(path)
    p1, p2 = _pack(40), _pack(5)
    await a.add_packs([p1, p2])
    await a.close()
    assert (tmp_path / "index.sqlite.blobs").exists()
    b = await _open(path)
    assert not b._map_stale  # loaded from the side file
    assert b.blobs == _expected(p1, p2)
    await b.remove_pack(p2[0])
    await b.close()
    c = await _open(path)
    assert not c._map_stale
    assert c.blobs == _expected(p1)
    await c.close()


async def test_a_change_not_written_to_the_side_file_is_not_lost(tmp_path: Path):
    path = tmp_path / "index.sqlite"
    a = await _open(path)
    p1, p2 = _pack(10), _pack(10)
    await a.add_packs([p1])
    await a.close()
    b = await _open(path)
    await b.add_packs([p2])
    await b._db.close()  # the process dies before it can write the side file
    b._db = None
    c = await _open(path)
    assert c._map_stale  # the side file is a generation behind: read from SQLite
    assert c.blobs == _expected(p1, p2)
    await c.close()


async def test_two_processes_changing_the_index_leave_no_wrong_side_file(tmp_path: Path):
    path = tmp_path / "index.sqlite"
    first = await _open(path)
    await first.close()
    a, b = await _open(path), await _open(path)
    pa, pb = _pack(4), _pack(4)
    await b.add_packs([pb])
    await b.close()
    await a.add_packs([pa])  # a never saw b's pack: its map must not become the side file
    await a.close()
    c = await _open(path)
    assert c.blobs == _expected(pa, pb)
    await c.close()


async def test_a_side_file_left_by_an_older_database_is_not_used(tmp_path: Path):
    path = tmp_path / "index.sqlite"
    a = await _open(path)
    await a.add_packs([_pack(6)])
    await a.close()
    for suffix in ("", "-wal", "-shm"):  # the database is made again; the side file stays
        try:
            os.unlink(str(path) + suffix)
        except FileNotFoundError:
            pass
    b = await _open(path)
    assert b.blobs == {}
    await b.close()
