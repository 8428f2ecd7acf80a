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

from tests.index_view import blob_locations


async def test_file_changing_while_read_is_noted_not_a_read_failure(repo: Repository,
                                                                    tmp_path: Path):
    """It was read (as last read): a note, not a warning; exit 3 means "could not read"."""
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
    assert any("kept changing while it was read" in n for n in summary.notes)
    assert summary.warnings == [] and summary.stored.snapshot.warnings == 0


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
    before = await blob_locations(repo.index)
    added, dropped = await repo.rebuild_index()
    assert added == len(repo.index.packs) == 2 and dropped == 0
    assert await blob_locations(repo.index) == before
    assert all(repo.index.blobs.get(bid) == loc for bid, loc in before.items())


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


def _xattr_tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    for i in range(3):
        (root / "sub" / f"f{i}").write_text(f"file {i}\n")
    (root / "big").write_bytes(os.urandom(400_000))
    try:
        os.setxattr(root / "sub" / "f1", "user.tag", b"one")
        os.setxattr(root / "sub", "user.tag", b"dir")
        os.setxattr(root / "big", "user.tag", b"big")
    except OSError as exc:
        pytest.skip(f"no user.* attributes here: {exc.strerror}")
    return root


async def test_unchanged_dirs_with_xattrs_keep_tree_ids_and_an_xattr_change_is_seen(
        repo: Repository, tmp_path: Path):
    src = _xattr_tree(tmp_path / "src")
    source = (Source("src", str(src)),)
    first = await take_snapshot(repo, source, temp_dir=str(tmp_path / "tmp"))
    second = await take_snapshot(repo, source, temp_dir=str(tmp_path / "tmp"))
    assert second.files_unchanged == 4 and second.blobs_added == 0
    assert second.stored.snapshot.sources[0].tree == first.stored.snapshot.sources[0].tree
    os.setxattr(src / "sub" / "f2", "user.tag", b"two")  # changes ctime only
    third = await take_snapshot(repo, source, temp_dir=str(tmp_path / "tmp"))
    assert (third.files_changed, third.files_unchanged) == (1, 3)
    await restore(repo, third.stored, str(tmp_path / "out"))
    assert os.getxattr(tmp_path / "out" / "src" / "sub" / "f2", "user.tag") == b"two"
    assert os.getxattr(tmp_path / "out" / "src" / "sub", "user.tag") == b"dir"


async def test_files_unchanged_since_a_snapshot_without_xattrs_get_them_without_a_read(
        repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A parent written before xattrs were recorded (capture level 0): its unchanged files are
    taken over unread, but with their xattrs and holes read now, or they would lack them for
    as long as they stay unchanged."""
    from p2pbackup.backup import files, fsmeta, snapshot

    src = _xattr_tree(tmp_path / "src")
    with open(src / "holes", "wb") as f:
        f.write(os.urandom(300_000))
        f.truncate(8 * 1024 * 1024)
    source = (Source("src", str(src)),)
    with monkeypatch.context() as m:  # what a version 0.1 writer stored
        m.setattr(snapshot, "CAPTURE_LEVEL", 0)
        m.setattr(files.fsmeta, "read_xattrs", lambda target: ())
        m.setattr(files.fsmeta, "is_sparse", lambda fd, st: False)
        old = await take_snapshot(repo, source, temp_dir=str(tmp_path / "tmp"))
    assert old.stored.snapshot.capture == 0
    new = await take_snapshot(repo, source, temp_dir=str(tmp_path / "tmp"))
    assert new.files_unchanged == 5 and new.bytes_read == 0
    assert new.stored.snapshot.capture == snapshot.CAPTURE_LEVEL == 1
    tree = await repo.load_tree(new.stored.snapshot.sources[0].tree)
    entries = {e.name: e for e in tree.entries}
    assert entries[b"big"].xattrs == ((b"user.tag", b"big"),) and entries[b"holes"].sparse
    sub = {e.name: e for e in (await repo.load_tree(entries[b"sub"].subtree)).entries}
    assert sub[b"f1"].xattrs == ((b"user.tag", b"one"),)
    assert fsmeta.read_xattrs(os.fsencode(src / "sub")) == entries[b"sub"].xattrs


async def test_a_tree_deeper_than_the_fd_limit_is_walked_whole(repo: Repository,
                                                              tmp_path: Path):
    """The walker holds one directory's fd at a time (it stats entries relative to it), so a
    tree deeper than the process's fd limit is still read whole, and again unchanged."""
    import resource

    src = tmp_path / "src"
    deep = src
    for i in range(120):
        deep = deep / f"level{i:03d}"
        deep.mkdir(parents=True)
        (deep / f"file{i:03d}").write_text(f"{i}\n")
    open_now = len(os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 60, hard))
    try:
        first = await take_snapshot(repo, (Source("src", str(src)),),
                                    temp_dir=str(tmp_path / "tmp"))
        again = await take_snapshot(repo, (Source("src", str(src)),),
                                    temp_dir=str(tmp_path / "tmp"))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert first.warnings == [] and first.files_new == 120 and first.dirs == 120
    assert again.warnings == [] and again.files_unchanged == 120
    assert again.stored.snapshot.sources[0].tree == first.stored.snapshot.sources[0].tree
    out = tmp_path / "out"
    await restore(repo, again.stored, str(out))
    assert (out / "src" / Path(*(f"level{i:03d}" for i in range(120))) / "file119"
            ).read_text() == "119\n"
