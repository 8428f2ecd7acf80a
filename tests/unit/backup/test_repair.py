"""Damaged packs in a real repository: what a lost trailer or a changed byte still leaves
readable, and what repair heals from another store."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from p2pbackup.backup.repair import repair_packs
from p2pbackup.backup.restore import restore
from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.backup.verify import verify
from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.config import Source
from p2pbackup.format.header import Kind
from p2pbackup.format.pack import PackBuilder, trailer_length
from p2pbackup.repo.repository import Repository

from tests.index_view import stored_blobs


async def _backed_up(repo: Repository, tmp_path: Path, files: int = 40) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(files):
        (src / f"f{i:02d}").write_bytes(os.urandom(3000 + 50 * i))
    await take_snapshot(repo, (Source("src", str(src)),), temp_dir=str(tmp_path / "t"))
    return src


def _chunk_pack(repo: Repository) -> str:
    return next(loc.pack for loc in stored_blobs(repo.index).values() if loc.kind == Kind.CHUNK)


async def _restored_equal(repo: Repository, src: Path, out: Path) -> None:
    (latest,), _ = await repo.list_snapshots()
    await restore(repo, latest, str(out))
    for f in src.iterdir():
        assert (out / "src" / f.name).read_bytes() == f.read_bytes()


async def test_a_pack_whose_trailer_is_lost_is_found_again_by_scanning_it(repo, tmp_path: Path):
    src = await _backed_up(repo, tmp_path)
    name = _chunk_pack(repo)
    held = dict(await repo.index.pack_blobs(name))
    path = Path(repo.store.path_of(f"packs/{name}"))
    data = bytearray(path.read_bytes())
    data[-(trailer_length(data, "pack") // 2)] ^= 0x10      # inside the sealed trailer
    path.write_bytes(data)

    await repo.rebuild_index()
    assert name in repo.damaged_packs and "trailer" in repo.damaged_packs[name]
    # Every blob found at the place the trailer said, by its header and its content.
    assert dict(await repo.index.pack_blobs(name)) == held
    await _restored_equal(repo, src, tmp_path / "out")
    report = await repair_packs(repo)
    assert [(r.pack, r.salvaged, r.lost) for r in report.repaired] == [(name, len(held), 0)]
    assert not report.lost and (await verify(repo, read_data=True)).ok


async def test_a_cut_off_pack_keeps_the_blobs_before_the_cut(repo, tmp_path: Path):
    await _backed_up(repo, tmp_path)
    name = _chunk_pack(repo)
    path = Path(repo.store.path_of(f"packs/{name}"))
    data = path.read_bytes()
    cut = len(data) // 2
    path.write_bytes(data[:cut])
    before = {bid for bid, loc in await repo.index.pack_blobs(name)
              if loc.offset + loc.length <= cut}
    after = {bid for bid, _ in await repo.index.pack_blobs(name)} - before

    await repo.rebuild_index()
    assert {bid for bid, _ in await repo.index.pack_blobs(name)} == before
    report = await repair_packs(repo)
    # The blob cut in two is one unreadable record; the ones after the cut left no trace.
    assert [(r.salvaged, r.lost) for r in report.repaired] == [(len(before), 1)]
    assert {bytes.fromhex(d.blob) for d in report.lost} == after
    assert all(d.affects for d in report.lost)


@pytest.mark.parametrize("epoch", [0, 1])
async def test_repair_copies_a_lost_blob_from_another_pack_of_another_store(repo, tmp_path: Path,
                                                                           epoch: int):
    if epoch:   # after a removal: packs are written, and their trailers sealed, in epoch 1
        repo.keys = repo.keys.with_epoch(epoch, os.urandom(32))
    src = await _backed_up(repo, tmp_path)
    name = _chunk_pack(repo)
    assert repo.index.packs[name][1] == epoch
    # The other store holds the same blobs packed differently (a repack there, another
    # device's pack): no pack of the same name to take back, only blobs.
    other = LocalDirStore(tmp_path / "other")
    shutil.copytree(repo.store.root, other.root)
    data = await repo.store.get(f"packs/{name}")
    scope, epoch, _ = repo.index.packs[name]
    builder = PackBuilder(scope, epoch)
    blobs = await repo.index.pack_blobs(name)
    for bid, loc in reversed(blobs):
        builder.add(loc.kind, bid, data[loc.offset:loc.offset + loc.length], loc.raw_length)
    repacked, repacked_data, _ = builder.finish(repo.keys.record_keys[epoch])
    await other.delete(f"packs/{name}")
    await other.put(f"packs/{repacked}", repacked_data)

    victim, loc = blobs[len(blobs) // 2]
    damaged = bytearray(data)
    damaged[loc.offset + loc.length // 2] ^= 1
    Path(repo.store.path_of(f"packs/{name}")).write_bytes(damaged)
    assert not (await verify(repo, read_data=True)).ok

    report = await repair_packs(repo, sources=[other])
    assert [(r.salvaged, r.lost, r.healed_from) for r in report.repaired] == \
        [(len(blobs) - 1, 1, None)]
    assert report.copied == {other.location: 1} and not report.lost
    assert (await verify(repo, read_data=True)).ok
    assert repo.index.blobs[victim].pack not in (name, repacked)
    await _restored_equal(repo, src, tmp_path / "out")
