"""prune's figures: what it says it drops is what goes, and a second prune has nothing to do."""

from __future__ import annotations

import os
from pathlib import Path

from p2pbackup.backup.maintenance import forget_and_prune
from p2pbackup.backup.retention import Policy
from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.config import Source
from p2pbackup.repo.repository import Repository


async def test_second_prune_drops_nothing_when_unused_blobs_stay_in_used_packs(
        repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(20):  # one data pack: a changed file leaves it mostly in use
        (src / "sub" / f"f{i:02d}.bin").write_bytes(os.urandom(20_000))
    sources = (Source("src", str(src)),)
    await take_snapshot(repo, sources, temp_dir=str(tmp_path / "t"))
    (src / "sub" / "f00.bin").write_bytes(os.urandom(20_000))
    await take_snapshot(repo, sources, temp_dir=str(tmp_path / "t"))
    blobs_before = len(repo.index.blobs)

    dry = (await forget_and_prune(repo, repo.identity, Policy(last=1), prune_after=True,
                                  dry_run=True))["prune"]
    first = (await forget_and_prune(repo, repo.identity, Policy(last=1),
                                    prune_after=True))["prune"]
    # What it says it drops is what left the index; the old f00 chunk stays in its pack.
    assert first["blobs_dropped"] == blobs_before - len(repo.index.blobs)
    assert first["blobs_unused_kept"] == 1
    assert {k: dry[k] for k in ("blobs_dropped", "packs_deleted", "packs_repacked")} == \
        {k: first[k] for k in ("blobs_dropped", "packs_deleted", "packs_repacked")}

    second = (await forget_and_prune(repo, repo.identity, None, prune_after=True))["prune"]
    assert (second["blobs_dropped"], second["packs_deleted"], second["packs_repacked"],
            second["bytes_freed"], second["segments_folded"]) == (0, 0, 0, 0, 0)
    assert second["blobs_unused_kept"] == 1
