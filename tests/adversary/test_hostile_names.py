"""A snapshot, tree or log segment signed by a device of the account (a member gone bad, or
damage that still authenticates) names entries `../../x`, `/abs`, `a/b`, `..`, NUL...: restore
refuses them and writes nothing outside --to; verify reports them as damage."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from p2pbackup.backup.pointintime import Overlay, plan_at
from p2pbackup.backup.restore import restore
from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.backup.verify import verify
from p2pbackup.config import Source
from p2pbackup.device import open_device
from p2pbackup.errors import IntegrityError
from p2pbackup.format.header import Kind
from p2pbackup.format.log import GENESIS, PUT, Change, ChangeList, Segment, SegmentPart
from p2pbackup.format.records import DIR, SYMLINK, SourceRoot, TreeEntry
from p2pbackup.repo.logstore import LogStore
from p2pbackup.repo.repository import Repository
from tests.adversary.hostile import (hostile_snapshot, outside_state, payload_file, raw_tree,
                                     store_blob)
from tests.conftest import Cli


def _dir(name: bytes, subtree: bytes) -> TreeEntry:
    return TreeEntry(DIR, name, 0o40755, os.geteuid(), os.getegid(), 1, subtree=subtree)


async def _hostile_entries(repo: Repository, scope: str, case: str, box: Path) -> list[TreeEntry]:
    """The root entries of a tree that tries `case`."""
    if case == "dir-and-symlink-of-one-name":
        inner = await store_blob(repo, scope, Kind.TREE,
                                 raw_tree([await payload_file(repo, scope, b"escape")]))
        return [TreeEntry(SYMLINK, b"x", 0o120777, 0, 0, 1, target=os.fsencode(box)),
                _dir(b"x", inner)]
    if case == "dotdot-dirs":  # ../.. below the source folder is the parent of --to
        leaf = await store_blob(repo, scope, Kind.TREE,
                                raw_tree([await payload_file(repo, scope, b"escape")]))
        mid = await store_blob(repo, scope, Kind.TREE, raw_tree([_dir(b"..", leaf)]))
        return [_dir(b"..", mid)]
    name = {"dotdot-path": b"../../escape", "absolute": os.fsencode(box / "abs-escape"),
            "slash": b"sub/escape", "empty": b"", "dot": b".", "dotdot": b"..",
            "nul": b"x\0y"}[case]
    return [await payload_file(repo, scope, name)]


CASES = ["dotdot-path", "absolute", "slash", "empty", "dot", "dotdot", "nul", "dotdot-dirs",
         "dir-and-symlink-of-one-name"]


async def _snapshot_with(repo: Repository, cases: list[str], box: Path) -> object:
    """One good source (`good/ok.txt`) and one source per hostile case, named after it (each
    source's blobs are its own: restore refuses a blob of another source)."""
    roots = []
    for case in cases:
        tree = await store_blob(repo, case, Kind.TREE,
                                raw_tree(await _hostile_entries(repo, case, case, box)))
        roots.append(SourceRoot(case, f"/{case}", tree))
    good = await store_blob(repo, "good", Kind.TREE,
                            raw_tree([await payload_file(repo, "good", b"ok.txt")]))
    roots.append(SourceRoot("good", "/good", good))
    return await hostile_snapshot(repo, roots)


@pytest.mark.parametrize("case", CASES)
async def test_tree_entry_names_that_leave_their_folder_are_refused(repo: Repository,
                                                                   tmp_path: Path, case: str):
    box = tmp_path / "box"
    out = box / "out"
    out.mkdir(parents=True)
    (box / "elsewhere").mkdir()
    stored = await _snapshot_with(repo, [case], box)
    before = outside_state(box, out)
    summary = await restore(repo, stored, str(out))
    assert outside_state(box, out) == before
    assert sorted(os.listdir(out)) == ["good"]  # the hostile source's folder is not even made
    assert (out / "good" / "ok.txt").exists()
    assert len(summary.failed) == 1 and f"{out / case}" in summary.failed[0]
    assert "not a plain name" in summary.failed[0] or "twice" in summary.failed[0]


async def test_names_in_a_replayed_log_are_checked_at_restore_too(repo: Repository,
                                                                 tmp_path: Path):
    """A tree built from the log (not decoded from a stored tree) still never leaves --to."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "kept.txt").write_bytes(b"kept\n")
    snap = await take_snapshot(repo, (Source("src", str(src)),), temp_dir=str(tmp_path / "t"))
    box = tmp_path / "box"
    out = box / "out"
    out.mkdir(parents=True)
    overlay = Overlay()
    overlay.children[b""] = {b"../../escape": await payload_file(repo, "src", b"../../escape")}
    before = outside_state(box, out)
    summary = await restore(repo, snap.stored, str(out), overlays={"src": overlay})
    assert outside_state(box, out) == before
    assert len(summary.failed) == 1 and "not a plain name" in summary.failed[0]


@pytest.mark.parametrize("path", [b"x\0y", b".", b"a/./b", b"a//b", b"a/"])
async def test_a_log_segment_with_paths_that_are_not_plain_is_refused(repo: Repository,
                                                                      tmp_path: Path,
                                                                      path: bytes):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    snap = await take_snapshot(repo, (Source("src", str(src)),), temp_dir=str(tmp_path / "t"))
    log = LogStore(repo)
    ident = repo.identity
    entry = await payload_file(repo, "src", os.path.basename(path) or b"x")
    changes = ChangeList((Change(PUT, path, time.time_ns(), entry),))
    part = SegmentPart("src", 0, log.seal_changes("src", 0, changes))
    await log.append(ident, Segment(ident.device_id, 1, GENESIS, time.time_ns(), (part,)))
    box = tmp_path / "box"
    out = box / "out"
    out.mkdir(parents=True)
    before = outside_state(box, out)
    with pytest.raises(IntegrityError, match="bad path"):
        _, overlays, _ = await plan_at(repo, "latest", time.time_ns() + 10**9)
        await restore(repo, snap.stored, str(out), overlays=overlays)
    assert outside_state(box, out) == before and os.listdir(out) == []
    report = await verify(repo)
    assert [d.what for d in report.damage] == [f"segment 1 of device {ident.device_id[:12]}"]
    assert "bad path" in report.damage[0].reason


def test_restore_and_verify_of_hostile_snapshots_through_the_cli(cli: Cli, tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_text("x")
    cli("init", "--source", str(src))
    box = tmp_path / "box"
    out = box / "out"
    out.mkdir(parents=True)

    async def build() -> tuple[str, str]:
        async with open_device(cli.home, write=True) as dev:
            trees = await _snapshot_with(dev.repo, ["dotdot-path", "nul", "dotdot-dirs"], box)
            good = trees.snapshot.sources[-1]
            up = await hostile_snapshot(dev.repo, [good, SourceRoot("../up", "/up", good.tree)])
            return trees.id, up.id

    trees_id, up_id = asyncio.run(build())
    before = outside_state(box, out)

    proc = cli("restore", trees_id, "--to", str(out), check=False)
    assert proc.returncode == 13, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    for case in ("dotdot-path", "nul", "dotdot-dirs"):
        assert f"{out / case}" in proc.stderr and "not a plain name" in proc.stderr
    assert "3 not restored" in proc.stdout
    assert (out / "good" / "ok.txt").exists()

    proc = cli("restore", up_id, "--to", str(out / "up"), check=False)
    assert proc.returncode == 13 and "source name '../up' is not a plain name" in proc.stderr
    assert outside_state(box, out) == before

    proc = cli("verify", "--json", check=False)
    assert proc.returncode == 13
    damage = json.loads(proc.stdout)["damage"]
    assert any(d["object"] == f"snapshot {up_id[:8]}" for d in damage)
    trees = [d for d in damage if d["object"].startswith("blob ")]
    assert len(trees) == 3 and all("not a plain name" in d["reason"] for d in trees)
