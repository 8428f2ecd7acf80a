"""Restore's own rules, in process: the top folder's metadata, names at the file system's limit."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

from p2pbackup.backup.restore import restore
from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.config import Source
from p2pbackup.repo.repository import Repository, StoredSnapshot
from tests.conftest import tree_state


async def test_a_snapshot_without_the_top_folders_metadata_restores_it_as_before(
        repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("f")
    os.chmod(src, 0o755)
    stored = (await take_snapshot(repo, (Source("src", str(src)),),
                                  temp_dir=str(tmp_path / "t"))).stored
    assert stored.snapshot.sources[0].mode == stat.S_IFDIR | 0o755
    old = dataclasses.replace(stored.snapshot.sources[0], mode=None, uid=None, gid=None,
                              mtime_ns=None)  # as written before these fields existed
    old_snap = StoredSnapshot(stored.id, dataclasses.replace(stored.snapshot, sources=(old,)))
    await restore(repo, old_snap, str(tmp_path / "out"))
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "src").st_mode) == 0o700


async def test_names_as_long_as_the_file_system_allows_are_restored(repo: Repository,
                                                                   tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    longest = "n" * 255  # NAME_MAX: the temporary name cannot be this plus a prefix
    (src / longest).write_text("long\n")
    os.symlink("target", src / ("l" * 255))
    (src / ("d" * 255)).mkdir()
    (src / ("d" * 255) / longest).write_text("deeper\n")
    stored = (await take_snapshot(repo, (Source("src", str(src)),),
                                  temp_dir=str(tmp_path / "t"))).stored
    await restore(repo, stored, str(tmp_path / "out"))
    assert tree_state(tmp_path / "out" / "src") == tree_state(src)


async def test_a_restore_never_changes_the_process_umask(repo: Repository, tmp_path: Path,
                                                         monkeypatch):
    """Inside the daemon (a console restore) other threads create files at the same time:
    a restore that set the umask to read it, even for an instant, would give their files
    the wrong modes. So it reads the umask and never sets it."""
    from p2pbackup.backup.restore import Restorer

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("f")
    stored = (await take_snapshot(repo, (Source("src", str(src)),),
                                  temp_dir=str(tmp_path / "t"))).stored
    real_umask = os.umask
    calls: list[int] = []

    def recorded(mask: int) -> int:
        calls.append(mask)
        return real_umask(mask)
    monkeypatch.setattr(os, "umask", recorded)
    await restore(repo, stored, str(tmp_path / "out"), processes=False)
    Restorer.reader(repo)  # the console's browsing reader too
    assert calls == []
    assert (tmp_path / "out" / "src" / "f").read_text() == "f"


def test_the_umask_read_without_setting_it_is_the_process_umask():
    from p2pbackup.backup.fsmeta import current_umask

    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
    finally:
        os.umask(old)
