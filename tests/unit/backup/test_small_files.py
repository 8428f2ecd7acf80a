"""Small files are stored together, a batch of them in one chunk (a bundle), and come back
exactly; an unchanged file keeps its place in its bundle when a neighbour changes."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

from p2pbackup.backup.restore import restore
from p2pbackup.backup.snapshot import SnapshotBuilder, take_snapshot
from p2pbackup.backup.verify import verify
from p2pbackup.config import Source
from p2pbackup.repo.repository import Repository
from tests.conftest import tree_state
from tests.unit.backup.test_restore_workers import _flip_a_byte


def _small_files(root: Path, dirs: int = 3, files: int = 100) -> Path:
    """Files of 50-3000 bytes, a third random bytes, two thirds text (as the scale benchmark),
    an empty one and one too big to share a chunk in each folder."""
    rng = random.Random(7)
    for d in range(dirs):
        sub = root / f"d{d}"
        sub.mkdir(parents=True)
        for i in range(files):
            size = rng.randint(50, 3000)
            data = rng.randbytes(size) if i % 3 == 0 else \
                (b"lorem ipsum %d " % i * 300)[:size]
            (sub / f"f{i:03d}.txt").write_bytes(data)
        (sub / "empty").write_bytes(b"")
        (sub / "bigger.bin").write_bytes(rng.randbytes(40_000))
    return root


async def _snapshot(repo: Repository, src: Path, tmp_path: Path):
    return await take_snapshot(repo, (Source("src", str(src)),), temp_dir=str(tmp_path / "tmp"))


async def _files(repo: Repository, stored) -> dict[bytes, object]:
    """Every file entry of a snapshot, by its path below the source."""
    out = {}
    root = await repo.load_tree(stored.snapshot.sources[0].tree)
    for d in root.entries:
        for e in (await repo.load_tree(d.subtree)).entries:
            out[d.name + b"/" + e.name] = e
    return out


async def test_small_files_share_a_chunk_per_batch_and_restore_exactly(repo: Repository,
                                                                       tmp_path: Path):
    src = _small_files(tmp_path / "src")
    summary = await _snapshot(repo, src, tmp_path)
    # 300 small files in batches of at most 64 per folder: 2 bundles a folder, the bigger
    # file's chunks, 4 trees. One blob per small file would be over 300.
    assert summary.blobs_added <= 3 * (2 + 3) + 4, summary.blobs_added
    files = await _files(repo, summary.stored)
    bundled = [e for e in files.values() if e.offset is not None]
    assert len(bundled) == 300 and all(len(e.chunks) == 1 for e in bundled)
    assert files[b"d0/bigger.bin"].offset is None and files[b"d0/empty"].chunks == ()
    out = tmp_path / "out"
    result = await restore(repo, summary.stored, str(out))
    assert tree_state(out / "src") == tree_state(src)
    assert result.files_restored == 306 and result.failed == []
    report = await verify(repo, read_data=True)
    assert report.ok and report.blobs_read == summary.blobs_added


async def test_a_changed_neighbour_leaves_the_others_in_their_bundle(repo: Repository,
                                                                     tmp_path: Path):
    src = _small_files(tmp_path / "src", dirs=1, files=40)
    first = await _snapshot(repo, src, tmp_path)
    before = await _files(repo, first.stored)
    old = (src / "d0" / "f007.txt").read_bytes()
    (src / "d0" / "f007.txt").write_bytes(b"changed\n")
    (src / "d0" / "f100.txt").write_bytes(b"new\n")
    second = await _snapshot(repo, src, tmp_path)
    after = await _files(repo, second.stored)
    assert second.files_changed == 1 and second.files_new == 1
    unchanged = set(before) - {b"d0/f007.txt"}
    assert {p: after[p] for p in unchanged} == {p: before[p] for p in unchanged}
    # The two read files share one new bundle; with the two trees, that is all it stored.
    assert after[b"d0/f007.txt"].chunks == after[b"d0/f100.txt"].chunks
    assert second.blobs_added == 3
    out = tmp_path / "out"
    await restore(repo, second.stored, str(out))
    assert tree_state(out / "src") == tree_state(src)
    await restore(repo, first.stored, str(tmp_path / "old"))
    assert (tmp_path / "old" / "src" / "d0" / "f007.txt").read_bytes() == old
    assert not (tmp_path / "old" / "src" / "d0" / "f100.txt").exists()


async def test_a_damaged_bundle_fails_its_files_only(repo: Repository, tmp_path: Path):
    src = _small_files(tmp_path / "src", dirs=1, files=100)
    summary = await _snapshot(repo, src, tmp_path)
    files = await _files(repo, summary.stored)
    bundle = files[b"d0/f000.txt"].chunks[0]
    in_it = sorted(p for p, e in files.items() if e.chunks == (bundle,))
    assert 1 < len(in_it) < 100
    _flip_a_byte(repo, bundle)
    out = tmp_path / "out"
    result = await restore(repo, summary.stored, str(out))
    assert sorted(line.split(": not restored: ")[0] for line in result.failed) == \
        [str(out / "src" / os.fsdecode(p)) for p in in_it]
    assert result.files_restored == 102 - len(in_it)
    assert (out / "src" / "d0" / "f099.txt").read_bytes() == \
        (src / "d0" / "f099.txt").read_bytes()
    kept = tmp_path / "kept"
    result = await restore(repo, summary.stored, str(kept), keep_damaged=True)
    first = kept / "src" / os.fsdecode(in_it[0])
    size = files[in_it[0]].size
    assert first.read_bytes() == bytes(size)
    assert f"{first}: restored with bytes 0-{size - 1} zeroed: blob {bundle.hex()[:12]}" in \
        "\n".join(result.damaged)
    assert len(result.damaged) == len(in_it) and result.failed == []


async def test_an_unchanged_folder_asks_the_index_once_per_bundle(repo: Repository,
                                                                  tmp_path: Path, monkeypatch):
    """The index may answer `in known` from disk: a folder's unchanged small files share a
    few bundles, and each bundle is looked up once, not once per file."""
    from p2pbackup.backup import sink as sink_mod

    src = _small_files(tmp_path / "src", dirs=2, files=200)
    await _snapshot(repo, src, tmp_path)
    asked: list[bytes] = []

    class Counted:
        """The sink's known blobs, counting the lookups (the builder uses only in/add/update)."""

        def __init__(self, known) -> None:
            self.known = known

        def __contains__(self, blob_id: object) -> bool:
            asked.append(blob_id)  # type: ignore[arg-type]
            return blob_id in self.known

        def __getattr__(self, name: str):
            return getattr(self.known, name)

    made = sink_mod.BlobSink.__init__

    def counting(self, *args, **kwargs) -> None:
        made(self, *args, **kwargs)
        self.known = Counted(self.known)

    monkeypatch.setattr(sink_mod.BlobSink, "__init__", counting)
    again = await _snapshot(repo, src, tmp_path)
    assert again.files_unchanged == 404 and again.blobs_added == 0
    # Per folder: 4 bundles, the bigger file's chunks, the tree; 404 lookups before.
    assert len(asked) <= 2 * (4 + 3 + 1) + 1, len(asked)


async def test_unchanged_folders_keep_the_trees_a_walk_that_reads_every_file_makes(
        repo: Repository, tmp_path: Path):
    """The no-change path (entries decoded by the fast path, taken over unread, the tree id
    kept) gives the very trees a walk without a parent, which reads and encodes everything,
    gives; a file whose only change is its ctime (chmod) in such a folder is still seen."""
    src = _small_files(tmp_path / "src", dirs=2, files=150)
    first = await _snapshot(repo, src, tmp_path)
    again = await _snapshot(repo, src, tmp_path)
    assert again.files_unchanged == 2 * 152 and again.blobs_added == 0
    full = SnapshotBuilder(repo, (Source("src", str(src)),), parents={},
                           temp_dir=str(tmp_path / "tmp"))
    roots, counts = await asyncio.to_thread(full.run)
    assert counts.new == 2 * 152 and counts.unchanged == 0
    tree = first.stored.snapshot.sources[0].tree
    assert again.stored.snapshot.sources[0].tree == tree == roots[0].tree
    for d in (await repo.load_tree(tree)).entries:
        data = repo.read_blob_blocking(d.subtree)
        assert (await repo.load_tree(d.subtree)).encode() == data

    (src / "d1" / "f100.txt").chmod(0o600)  # size and mtime as they were
    third = await _snapshot(repo, src, tmp_path)
    assert third.files_changed == 1 and third.files_unchanged == 2 * 152 - 1
    after = await _files(repo, third.stored)
    assert after[b"d1/f100.txt"].mode & 0o777 == 0o600
    before = await _files(repo, first.stored)
    assert {p: e for p, e in after.items() if p.startswith(b"d0/")} == \
        {p: e for p, e in before.items() if p.startswith(b"d0/")}
