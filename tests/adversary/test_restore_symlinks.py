"""Symlinks in the restore target, there before the restore or planted during it, are replaced
or refused: restore never writes through one. (--to itself may be a symlink: the user's choice.)"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from p2pbackup.backup.restore import Restorer, select
from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.config import Source
from p2pbackup.errors import RestoreConflict
from p2pbackup.repo.repository import Repository
from tests.adversary.hostile import outside_state
from tests.conftest import Cli, tree_state


@pytest.fixture
def backed_up(cli: Cli, sample_tree: Path) -> tuple[Cli, Path]:
    cli("init", "--source", str(sample_tree))
    cli("snapshot")
    return cli, sample_tree


def test_a_symlinked_folder_in_the_target_is_replaced_or_refused_never_followed(
        backed_up, tmp_path: Path):
    cli, src = backed_up
    box = tmp_path / "box"
    (box / "elsewhere").mkdir(parents=True)
    out = box / "out"
    (out / "src").mkdir(parents=True)
    os.symlink(box / "elsewhere", out / "src" / "docs")  # the snapshot has a folder docs/
    before = outside_state(box, out)
    for args in ([], ["--path", "src/docs/deep"], ["--path", "src/docs/deep/er/b.json"]):
        proc = cli("restore", "latest", "--to", str(out), *args, check=False)
        assert proc.returncode == 18, (args, proc.stderr)
        assert f"{out / 'src' / 'docs'}" in proc.stderr and "--overwrite" in proc.stderr
        assert outside_state(box, out) == before, args
    cli("restore", "latest", "--to", str(out), "--overwrite")
    assert outside_state(box, out) == before
    assert not (out / "src" / "docs").is_symlink()
    assert tree_state(out / "src") == tree_state(src)


def test_a_symlink_at_a_files_name_is_replaced_or_refused_never_written_through(
        backed_up, tmp_path: Path):
    cli, src = backed_up
    box = tmp_path / "box"
    (box / "elsewhere").mkdir(parents=True)
    (box / "elsewhere" / "precious").write_text("precious\n")
    out = box / "out"
    (out / "src" / "docs").mkdir(parents=True)
    os.symlink(box / "elsewhere" / "precious", out / "src" / "docs" / "a.txt")
    before = outside_state(box, out)
    for args in ([], ["--path", "src/docs/a.txt"]):
        proc = cli("restore", "latest", "--to", str(out), *args, check=False)
        assert proc.returncode == 18, (args, proc.stderr)
        assert outside_state(box, out) == before
    cli("restore", "latest", "--to", str(out), "--path", "src/docs/a.txt", "--overwrite")
    assert outside_state(box, out) == before
    assert not (out / "src" / "docs" / "a.txt").is_symlink()
    assert (out / "src" / "docs" / "a.txt").read_bytes() == (src / "docs" / "a.txt").read_bytes()


def test_the_target_itself_may_be_a_symlink(backed_up, tmp_path: Path):
    cli, src = backed_up
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "via-link")
    cli("restore", "latest", "--to", str(tmp_path / "via-link"))
    assert tree_state(tmp_path / "real" / "src") == tree_state(src)


class _Planting(Restorer):
    """A restore during which someone acts in the target just before files are handed out."""

    plant = staticmethod(lambda: None)

    def _submit(self, *args, **kwargs):
        plant, self.plant = self.plant, (lambda: None)
        plant()
        return super()._submit(*args, **kwargs)


async def _small_snapshot(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "a.txt").write_text("a\n")
    (src / "docs" / "b.txt").write_text("b\n")
    (src / "c.txt").write_text("c\n")
    snap = await take_snapshot(repo, (Source("src", str(src)),), temp_dir=str(tmp_path / "t"))
    return src, snap.stored


@pytest.mark.parametrize("processes", [False, True])
async def test_a_folder_swapped_for_a_symlink_during_the_restore_is_not_followed(
        repo: Repository, tmp_path: Path, processes: bool):
    src, stored = await _small_snapshot(repo, tmp_path)
    box = tmp_path / "box"
    (box / "elsewhere").mkdir(parents=True)
    out = box / "out"
    docs = out / "src" / "docs"

    def swap() -> None:  # the restore made docs/ and is about to write its files
        os.rename(docs, out / "src" / "moved")
        os.symlink(box / "elsewhere", docs)

    before = outside_state(box, out)
    restorer = _Planting(repo, select(stored, None), os.fsencode(out), overwrite=False,
                         processes=processes, workers=2)
    restorer.plant = swap
    with pytest.raises(RestoreConflict, match="symlink"):
        await asyncio.to_thread(restorer.run)
    assert outside_state(box, out) == before


@pytest.mark.parametrize("how", [os.link, os.symlink])
async def test_a_planted_temporary_file_is_not_written_through(repo: Repository,
                                                               tmp_path: Path, how):
    src, stored = await _small_snapshot(repo, tmp_path)
    box = tmp_path / "box"
    (box / "elsewhere").mkdir(parents=True)
    victim = box / "elsewhere" / "victim"
    victim.write_text("precious\n")
    out = box / "out"

    def plant() -> None:  # a hard link or symlink where the restore writes before renaming
        how(victim, out / "src" / "docs" / ".p2pb-restore-a.txt")

    before = outside_state(box, out)
    restorer = _Planting(repo, select(stored, None), os.fsencode(out), overwrite=False,
                         processes=False)
    restorer.plant = plant
    await asyncio.to_thread(restorer.run)
    assert outside_state(box, out) == before
    assert tree_state(out / "src") == tree_state(src)
