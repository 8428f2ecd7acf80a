"""The snapshot engine in-process, on a real local store and a real SQLite index."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from p2pbackup.backup.maintenance import forget_and_prune
from p2pbackup.backup.restore import restore
from p2pbackup.backup.retention import Policy
from p2pbackup.backup.verify import verify
from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.config import Source
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.crypto.keys import AccountKeys
from p2pbackup.repo.repository import Repository


async def test_file_changing_while_read_is_flagged(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    growing = src / "growing.log"
    growing.write_bytes(os.urandom(20 * 1024 * 1024))
    stop = threading.Event()

    def append() -> None:
        with open(growing, "ab") as f:
            while not stop.is_set():
                f.write(b"x" * 4096)
                f.flush()

    t = threading.Thread(target=append)
    t.start()
    try:
        summary = await take_snapshot(repo, (Source("src", str(src)),),
                                      temp_dir=str(tmp_path / "tmp"))
    finally:
        stop.set()
        t.join()
    assert any("kept changing while it was read" in w for w in summary.warnings)
    assert summary.stored.snapshot.warnings == len(summary.warnings)


async def test_hard_link_in_a_subdirectory_of_the_first_link(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "zz-first.txt").write_text("shared content\n")  # sorted after "sub": walked later
    (src / "a-first.txt").write_text("other\n")
    os.link(src / "a-first.txt", src / "sub" / "second.txt")
    os.link(src / "zz-first.txt", src / "sub" / "third.txt")
    summary = await take_snapshot(repo, (Source("src", str(src)),),
                                  temp_dir=str(tmp_path / "tmp"))
    assert summary.warnings == []
    out = tmp_path / "out"
    await restore(repo, summary.stored, str(out))
    r = out / "src"
    assert os.stat(r / "a-first.txt").st_ino == os.stat(r / "sub" / "second.txt").st_ino
    assert os.stat(r / "zz-first.txt").st_ino == os.stat(r / "sub" / "third.txt").st_ino
    assert (r / "sub" / "third.txt").read_text() == "shared content\n"


async def test_index_is_rebuilt_from_packs(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(300_000))
    await take_snapshot(repo, (Source("src", str(src)),), temp_dir=str(tmp_path / "tmp"))
    before = dict(repo.index.blobs)
    added, dropped = await repo.rebuild_index()
    assert added == len(repo.index.packs) == 2 and dropped == 0
    assert repo.index.blobs == before


class _Crash(Exception):
    """Stands for kill -9 just after prune deleted its first pack."""


class _CrashingStore(LocalDirStore):
    async def delete(self, name: str) -> None:
        await super().delete(name)
        if name.startswith("packs/"):
            raise _Crash(name)


async def test_prune_killed_while_deleting_packs_leaves_a_repository_that_verifies(
        tmp_path: Path):
    keys, ident = AccountKeys(os.urandom(32)), DeviceIdentity.generate()
    store_dir, cache = tmp_path / "store", str(tmp_path / "cache")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"f{i}").write_bytes(os.urandom(3_000_000))
    repo = await Repository.create(LocalDirStore(store_dir), keys, ident, cache, "test")
    await take_snapshot(repo, (Source("src", str(src)),), temp_dir=str(tmp_path / "tmp"))
    for i in range(10):
        (src / f"f{i}").unlink()
    await take_snapshot(repo, (Source("src", str(src)),), temp_dir=str(tmp_path / "tmp"))
    await repo.close()

    repo = await Repository.open(_CrashingStore(store_dir), keys, ident, cache)
    with pytest.raises(_Crash):
        await forget_and_prune(repo, ident, Policy(last=1), prune_after=True)
    await repo.close()

    repo = await Repository.open(LocalDirStore(store_dir), keys, ident, cache)
    try:
        assert not repo.missing_packs
        report = await verify(repo, read_data=True)
        assert report.ok, [str(d) for d in report.damage]
        # The packs prune meant to delete are back as unused data; the next prune removes them.
        result = await forget_and_prune(repo, ident, None, prune_after=True)
        assert result["prune"]["packs_deleted"] + result["prune"]["packs_repacked"] >= 1
        assert (await verify(repo, read_data=True)).ok
        (latest,), _ = await repo.list_snapshots()
        await restore(repo, latest, str(tmp_path / "out"))
        for name in ("f10", "f11"):
            assert (tmp_path / "out" / "src" / name).read_bytes() == (src / name).read_bytes()
    finally:
        await repo.close()


async def test_prune_keeps_packs_that_just_arrived_for_a_snapshot_on_its_way(tmp_path: Path):
    """A peer sends a snapshot's packs before the snapshot: a prune in between must not
    delete them (nor list them in its removal record) while they are new here."""
    keys = AccountKeys(os.urandom(32))
    me, peer = DeviceIdentity.generate(), DeviceIdentity.generate()
    store, cache = LocalDirStore(tmp_path / "store"), str(tmp_path / "cache")
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(2_000_000))
    repo = await Repository.create(store, keys, me, cache, "test")
    try:
        await take_snapshot(repo, (Source("mine", str(src)),), temp_dir=str(tmp_path / "tmp"))
        # The peer's snapshot, written into this store as replication would; then its
        # snapshot object is held back (still on its way), leaving its packs unused here.
        peer_repo = await Repository.open(store, keys, peer, cache + "-peer")
        await peer_repo.register_device(peer, "peer")
        theirs = await take_snapshot(peer_repo, (Source("theirs", str(src)),),
                                     temp_dir=str(tmp_path / "tmp"))
        await peer_repo.close()
        sid = theirs.stored.id
        held_back = await store.get(f"snapshots/{sid}")
        await store.delete(f"snapshots/{sid}")
        await repo.sync_index()

        result = await forget_and_prune(repo, me, None, prune_after=True, grace=3600)
        assert result["prune"]["packs_held"] >= 1
        assert result["prune"]["packs_deleted"] == result["prune"]["packs_repacked"] == 0
        assert "removal" not in result
        await store.put(f"snapshots/{sid}", held_back)   # it arrives
        report = await verify(repo, read_data=True)
        assert report.ok and report.snapshots == 2, [str(d) for d in report.damage]

        # Once the packs are older than the grace period, unused ones go as before.
        await store.delete(f"snapshots/{sid}")
        result = await forget_and_prune(repo, me, None, prune_after=True, grace=0.0)
        assert result["prune"]["packs_held"] == 0 and result["prune"]["packs_deleted"] >= 1
    finally:
        await repo.close()
