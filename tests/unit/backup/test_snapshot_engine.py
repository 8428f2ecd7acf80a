"""The snapshot engine in-process, on a real local store and a real SQLite index."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from p2pbackup.backup.restore import restore
from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.config import Source
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.crypto.keys import AccountKeys
from p2pbackup.repo.repository import Repository


@pytest.fixture
async def repo(tmp_path: Path):
    r = await Repository.create(LocalDirStore(tmp_path / "store"), AccountKeys(os.urandom(32)),
                                DeviceIdentity.generate(), str(tmp_path / "cache"), "test")
    yield r
    await r.close()


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
