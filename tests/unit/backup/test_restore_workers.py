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


def _flip_a_byte(repo: Repository, blob_id: bytes) -> None:
    """Damage one stored blob so that it fails authentication."""
    loc = repo.locate(blob_id)
    pack = repo.store.path_of(f"packs/{loc.pack}")
    with open(pack, "r+b") as f:
        f.seek(loc.offset + loc.length // 2)
        byte = f.read(1)
        f.seek(loc.offset + loc.length // 2)
        f.write(bytes([byte[0] ^ 0x40]))


async def _two_files(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    (src / "small.txt").write_bytes(b"small\n")
    summary = await take_snapshot(repo, (Source("src", str(src)),),
                                  temp_dir=str(tmp_path / "tmp"))
    tree = await repo.load_tree(summary.stored.snapshot.sources[0].tree)
    big = next(e for e in tree.entries if e.name == b"big.bin")
    return src, summary.stored, big


@pytest.mark.parametrize("processes", [False, True])
async def test_a_damaged_chunk_fails_its_file_only_and_names_it(repo: Repository,
                                                                tmp_path: Path, processes: bool):
    src, stored, big = await _two_files(repo, tmp_path)
    damaged = big.chunks[len(big.chunks) // 2]
    _flip_a_byte(repo, damaged)
    warnings: list[str] = []
    out = tmp_path / "out"
    summary = await restore(repo, stored, str(out), processes=processes, workers=2,
                            warn=warnings.append)
    assert (out / "src" / "small.txt").read_bytes() == b"small\n"
    assert not (out / "src" / "big.bin").exists()  # nothing half-written kept
    assert not list((out / "src").glob(".p2pb-restore-*"))
    assert summary.files_restored == 1 and len(summary.failed) == 1
    line = summary.failed[0]
    assert line.startswith(f"{out / 'src' / 'big.bin'}: not restored: ")
    assert f"blob {damaged.hex()[:12]}" in line and "failed authentication" in line
    assert warnings == [line]
    assert restore_mod._forked is None


@pytest.mark.parametrize("processes", [False, True])
async def test_keep_damaged_zeroes_the_damaged_range_and_names_it(repo: Repository,
                                                                  tmp_path: Path,
                                                                  processes: bool):
    src, stored, big = await _two_files(repo, tmp_path)
    i = len(big.chunks) // 2
    _flip_a_byte(repo, big.chunks[i])
    start = sum(repo.locate(c).raw_length for c in big.chunks[:i])
    end = start + repo.locate(big.chunks[i]).raw_length
    out = tmp_path / "out"
    summary = await restore(repo, stored, str(out), processes=processes, workers=2,
                            keep_damaged=True)
    got = (out / "src" / "big.bin").read_bytes()
    want = (src / "big.bin").read_bytes()
    assert len(got) == len(want) and got[start:end] == bytes(end - start)
    assert got[:start] == want[:start] and got[end:] == want[end:]
    assert os.stat(out / "src" / "big.bin").st_mtime_ns == big.mtime_ns
    assert summary.failed == [] and len(summary.damaged) == 1
    assert summary.damaged[0].startswith(f"{out / 'src' / 'big.bin'}: restored with bytes "
                                         f"{start}-{end - 1} zeroed: blob ")


async def test_keep_damaged_places_the_chunks_of_a_missing_pack(repo: Repository,
                                                                tmp_path: Path):
    """Chunks whose pack is gone have no known length; one run of them still has a place."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(20 * 1024 * 1024))  # more than one pack
    summary = await take_snapshot(repo, (Source("src", str(src)),),
                                  temp_dir=str(tmp_path / "tmp"))
    (big,) = (await repo.load_tree(summary.stored.snapshot.sources[0].tree)).entries
    last = repo.locate(big.chunks[-1]).pack
    assert repo.locate(big.chunks[0]).pack != last
    kept = [c for c in big.chunks if repo.locate(c).pack != last]
    assert big.chunks[:len(kept)] == tuple(kept)  # the lost ones are one run, at the end
    start = sum(repo.locate(c).raw_length for c in kept)
    os.unlink(repo.store.path_of(f"packs/{last}"))
    await repo.sync_index()  # as the next command would find it: the pack's blobs are gone
    out = tmp_path / "out"
    result = await restore(repo, summary.stored, str(out), keep_damaged=True)
    got = (out / "src" / "big.bin").read_bytes()
    want = (src / "big.bin").read_bytes()
    assert len(got) == len(want) and got[:start] == want[:start]
    assert got[start:] == bytes(len(want) - start)
    lost = big.chunks[len(kept)]
    assert result.damaged == [f"{out / 'src' / 'big.bin'}: restored with bytes {start}-"
                              f"{len(want) - 1} zeroed: blob {lost.hex()[:12]} is missing: "
                              "no pack holds it"]


async def test_a_damaged_folder_listing_fails_that_folder_only(repo: Repository,
                                                              tmp_path: Path):
    src = make_sample_tree(tmp_path / "src", big=64 * 1024)
    summary = await take_snapshot(repo, (Source("src", str(src)),),
                                  temp_dir=str(tmp_path / "tmp"))
    root = await repo.load_tree(summary.stored.snapshot.sources[0].tree)
    docs = next(e for e in root.entries if e.name == b"docs")
    _flip_a_byte(repo, docs.subtree)
    out = tmp_path / "out"
    result = await restore(repo, summary.stored, str(out))
    assert not (out / "src" / "docs").exists()
    assert result.failed[0].startswith(f"{out / 'src' / 'docs'}/: not restored: blob ")
    assert len(result.failed) == 1
    # everything else, the hard link to docs/a.txt outside docs/ included, is restored
    want = {k: v for k, v in tree_state(src).items() if not k.startswith(b"docs")}
    assert tree_state(out / "src") == want


async def test_a_hard_link_of_a_damaged_file_is_named_too(repo: Repository, tmp_path: Path):
    src = make_sample_tree(tmp_path / "src", big=64 * 1024)
    summary = await take_snapshot(repo, (Source("src", str(src)),),
                                  temp_dir=str(tmp_path / "tmp"))
    root = await repo.load_tree(summary.stored.snapshot.sources[0].tree)
    docs = await repo.load_tree(next(e for e in root.entries if e.name == b"docs").subtree)
    (a_txt,) = [e for e in docs.entries if e.name == b"a.txt"]
    _flip_a_byte(repo, a_txt.chunks[0])
    out = tmp_path / "out"
    result = await restore(repo, summary.stored, str(out))
    assert sorted(result.failed) == [
        f"{out / 'src' / 'docs' / 'a.txt'}: not restored: blob {a_txt.chunks[0].hex()[:12]} "
        f"in pack {repo.locate(a_txt.chunks[0]).pack[:12]} failed authentication: it was "
        "altered or damaged",
        f"{out / 'src' / 'hardlink-a.txt'}: not restored: it is a hard link of "
        f"{out / 'src' / 'docs' / 'a.txt'}, which could not be restored"]
    want = {k: v for k, v in tree_state(src).items()
            if k not in (b"docs/a.txt", b"hardlink-a.txt")}
    assert tree_state(out / "src") == want
