"""The daemon's rescan walks the sources against the latest snapshot: it hands changed paths
over as it finds them (a tree where everything changed is never one list in memory) and,
between full rescans, leaves out the files of the folders inotify watches."""

from __future__ import annotations

import os
from pathlib import Path

from p2pbackup.backup.pointintime import Overlay
from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.config import Source
from p2pbackup.daemon.rescan import find_changes
from p2pbackup.daemon.watches import folder_key
from p2pbackup.repo.repository import Repository
from tests.unit.backup.conftest import repo  # noqa: F401  (the fixture)


async def _snapshot_of(repo: Repository, src: Path, tmp_path: Path) -> bytes:
    summary = await take_snapshot(repo, (Source("src", str(src)),),
                                  temp_dir=str(tmp_path / "tmp"))
    return summary.stored.snapshot.sources[0].tree


async def test_the_rescan_hands_over_changed_paths_as_it_finds_them(repo: Repository,
                                                                    tmp_path: Path):
    src = tmp_path / "src"
    for d in ("a", "b"):
        (src / d).mkdir(parents=True)
    tree = await _snapshot_of(repo, src, tmp_path)
    for d in ("a", "b"):
        for i in range(3):
            (src / d / f"new{i}").write_text("x")
    changes = find_changes(repo, os.fsencode(src), tree, Overlay())
    first = next(changes)
    assert first == os.fsencode(src / "a" / "new0")
    for f in (src / "b").iterdir():  # gone before the walk got there: never reported
        f.unlink()
    assert list(changes) == [os.fsencode(src / "a" / f"new{i}") for i in (1, 2)]


async def test_a_rescan_of_unwatched_folders_leaves_the_watched_ones_files_out(
        repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    (src / "watched" / "unwatched-below").mkdir(parents=True)
    (src / "unwatched").mkdir()
    (src / "watched" / "old.txt").write_text("old")
    tree = await _snapshot_of(repo, src, tmp_path)
    for d in ("watched", "watched/unwatched-below", "unwatched"):
        (src / d / "new.txt").write_text("new")
    (src / "watched" / "old.txt").unlink()
    watched = {folder_key(os.stat(src)), folder_key(os.stat(src / "watched"))}
    found = sorted(find_changes(repo, os.fsencode(src), tree, Overlay(), watched))
    assert found == [os.fsencode(src / d / "new.txt")
                     for d in ("unwatched", "watched/unwatched-below")]
    everything = sorted(find_changes(repo, os.fsencode(src), tree, Overlay()))
    assert len(everything) == 4  # a full rescan: the three new files and the one gone
