"""`verify` records the damage it finds in packs the index already holds, as every other
reader of a pack does (repository.recheck_pack): repair, the daemon's healing from peers,
the uploader's healing of a store and `status` learn about it from the index."""

from __future__ import annotations

import os
from pathlib import Path

from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.backup.verify import verify
from p2pbackup.config import Source
from p2pbackup.format.header import Kind
from p2pbackup.repo.index import noted_damage
from p2pbackup.repo.repository import Repository

from tests.index_view import stored_blobs


async def _chunk_pack(repo: Repository, tmp_path: Path) -> tuple[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i:02d}").write_bytes(os.urandom(3000 + 50 * i))
    await take_snapshot(repo, (Source("src", str(src)),), temp_dir=str(tmp_path / "t"))
    name = next(loc.pack for loc in stored_blobs(repo.index).values()
                if loc.kind == Kind.CHUNK)
    return name, Path(repo.store.path_of(f"packs/{name}"))


async def test_verify_read_data_records_a_changed_byte_in_an_indexed_pack(
        repo: Repository, tmp_path: Path) -> None:
    name, path = await _chunk_pack(repo, tmp_path)
    data = bytearray(path.read_bytes())
    data[40] ^= 1   # inside the first blob
    path.write_bytes(data)
    assert name in repo.index.packs and name not in repo.index.damaged   # indexed whole

    seen: list[str] = []
    repo.damage_seen = seen.append   # (p2pbackupd checks the pack and asks its peers)
    report = await verify(repo, read_data=True)
    assert not report.ok
    assert name in repo.index.damaged, "verify found the damage and did not record it"
    assert seen == [name] and report.noted == [name]
    assert len(repo.index.damaged[name].bad) == 1
    assert name in noted_damage(repo.index.path)   # in the file: other processes see it
    # A second verify names the same blob and the same files (the blob left the index's
    # map, not the report).
    again = await verify(repo, read_data=True)
    assert [(d.what, d.affects) for d in again.damage] == \
        [(d.what, d.affects) for d in report.damage]


async def test_verify_records_a_truncated_pack_without_reading_data(
        repo: Repository, tmp_path: Path) -> None:
    name, path = await _chunk_pack(repo, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])

    report = await verify(repo)
    assert not report.ok
    assert name in noted_damage(repo.index.path), \
        "verify found the pack cut short and did not record it"
    assert "expected" in repo.index.damaged[name].reason


async def test_a_pack_read_whole_again_is_no_longer_recorded(
        repo: Repository, tmp_path: Path) -> None:
    name, path = await _chunk_pack(repo, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])   # a cut the store recovers from (a copy back)
    await verify(repo)
    path.write_bytes(data)
    assert (await verify(repo, read_data=True)).ok
    assert name not in noted_damage(repo.index.path)
