"""Restore from forked worker processes gives the same tree as from threads, and its errors
reach the caller as the same one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p2pbackup.backup import restore as restore_mod
from p2pbackup.backup.restore import restore
from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.config import Source
from p2pbackup.errors import IntegrityError
from p2pbackup.repo.repository import Repository
from tests.conftest import inode_groups, make_sample_tree, tree_state


def _many_files(root: Path) -> Path:
    make_sample_tree(root, big=5 * 1024 * 1024)
    for d in range(6):
        sub = root / f"dir{d}"
        sub.mkdir()
        for i in range(150):  # several batches per directory, so both workers get some
            (sub / f"f{i}.txt").write_bytes(os.urandom(64) * (1 + i % 40))
    return root


async def test_worker_processes_restore_the_same_tree_as_threads(repo: Repository,
                                                                  tmp_path: Path):
    src = _many_files(tmp_path / "src")
    summary = await take_snapshot(repo, (Source("src", str(src)),),
                                  temp_dir=str(tmp_path / "tmp"))
    results = {}
    for processes in (False, True):
        out = tmp_path / f"out-{processes}"
        results[processes] = await restore(repo, summary.stored, str(out), processes=processes,
                                           workers=2)
        assert tree_state(out / "src") == tree_state(src)
        assert sorted(map(sorted, inode_groups(out / "src"))) == \
            sorted(map(sorted, inode_groups(src)))
        assert not list((out / "src").rglob(".p2pb-restore-*"))
    threads, procs = results[False], results[True]
    assert (procs.files_restored, procs.bytes, procs.dirs, procs.links) == \
        (threads.files_restored, threads.bytes, threads.dirs, threads.links)
    assert procs.files_restored > 900
    assert restore_mod._forked is None  # released for the next restore


async def test_a_damaged_chunk_found_by_a_worker_process_is_reported(repo: Repository,
                                                                     tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    summary = await take_snapshot(repo, (Source("src", str(src)),),
                                  temp_dir=str(tmp_path / "tmp"))
    tree = await repo.load_tree(summary.stored.snapshot.sources[0].tree)
    (entry,) = tree.entries
    loc = repo.locate(entry.chunks[len(entry.chunks) // 2])
    pack = repo.store.path_of(f"packs/{loc.pack}")
    with open(pack, "r+b") as f:
        f.seek(loc.offset + loc.length // 2)
        byte = f.read(1)
        f.seek(loc.offset + loc.length // 2)
        f.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(IntegrityError, match=f"in pack {loc.pack[:12]}"):
        await restore(repo, summary.stored, str(tmp_path / "out"), processes=True, workers=2)
    assert not (tmp_path / "out" / "src" / "big.bin").exists()  # nothing half-written kept
    assert restore_mod._forked is None
