"""What a restore holds does not grow with the number of files it writes."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

from p2pbackup.backup import restore as restore_mod
from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.config import Source
from p2pbackup.repo.repository import Repository


async def test_a_restore_does_not_keep_every_batch_it_wrote(repo: Repository, tmp_path: Path,
                                                            monkeypatch):
    src = tmp_path / "src"
    for d in range(4):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(1500):
            (src / f"d{d}" / f"f{i}").write_bytes(b"%d" % i)
    summary = await take_snapshot(repo, (Source("src", str(src)),),
                                  temp_dir=str(tmp_path / "tmp"))
    monkeypatch.setattr(restore_mod, "BATCH_FILES", 1)  # a batch per file: 6000 of them
    tracemalloc.start()
    try:
        result = await restore_mod.restore(repo, summary.stored, str(tmp_path / "out"),
                                           processes=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.files_restored == 6000 and result.failed == []
    # Each batch's future held ~1.7 KiB until the end: 10 MiB for these 6000.
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB"
