"""bench_s3.py: no restore goes where files were just deleted (without a journal), none is
kept past its timing on a disk of their own; the server's CPU is counted."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

from _common import cpu_s
from bench_s3 import Step, restore_step, server_pid

from tests.eventually import eventually_sync


def _restores(tmp_path: Path, delete_each: bool) -> list[tuple[Path, list[Path]]]:
    """Each restore's target, and the restores still there when it ran (3 repetitions)."""
    runs: list[tuple[Path, list[Path]]] = []

    def restore(to: str) -> tuple[float, int, float]:
        target = Path(to)
        assert not target.exists()
        runs.append((target, [p for p, _ in runs if p.exists()]))
        (target / "src").mkdir(parents=True)
        (target / "src" / "file").write_bytes(b"x")
        return 1.0, 1024, 0.5

    step = Step("restore")
    restore_step(3, step, tmp_path, restore, restore, delete_each=delete_each)
    assert len(step.restic) == len(step.ours) == 3
    assert "| restore | 1.00 | 1.00 | **1.00**" in step.row()
    assert len({p for p, _ in runs}) == 6   # each into a new directory
    assert not any(p.exists() for p, _ in runs)   # all gone once the step is over
    return runs


def test_without_a_journaled_disk_no_restore_is_deleted_before_the_step_ends(
        tmp_path: Path) -> None:
    """On ext4 without a journal, creating files right after deleting many makes each create
    skip the recently freed inodes one by one: restoring where the last repetition's tree was
    just deleted measured that, not the tools (bench/RESULTS.md's restore swung 0.72-1.51)."""
    runs = _restores(tmp_path, delete_each=False)
    assert [len(before) for _, before in runs] == [0, 1, 2, 3, 4, 5]


def test_on_a_disk_of_their_own_each_restore_is_deleted_once_timed(tmp_path: Path) -> None:
    """Ten restores of 1 GiB kept on a loop device filled this machine's memory, and the later
    ones measured page reclaim."""
    runs = _restores(tmp_path, delete_each=True)
    assert [len(before) for _, before in runs] == [0] * 6


def test_the_server_is_found_by_its_directory_and_its_cpu_seconds_counted() -> None:
    """The S3 server's CPU seconds during each command: what a client costs the server."""
    marker = f"/tmp/bench-server-{uuid.uuid4().hex}"
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n" \
        "time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", busy, marker], )
    try:
        eventually_sync(lambda: server_pid(marker) == proc.pid, timeout=30)
        eventually_sync(lambda: cpu_s(proc.pid) >= 0.3, timeout=60)
    finally:
        proc.kill()
        proc.wait()
