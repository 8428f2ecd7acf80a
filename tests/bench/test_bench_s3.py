"""bench_s3.py: no restore goes where files were just deleted; the server's CPU is counted."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

from _common import cpu_s
from bench_s3 import Step, restore_step, server_pid

from tests.eventually import eventually_sync


def test_each_restore_goes_to_a_new_directory_and_none_is_deleted_before_the_step_ends(
        tmp_path: Path) -> None:
    """On ext4 without a journal, creating files right after deleting many makes each create
    skip the recently freed inodes one by one: restoring where the last repetition's tree was
    just deleted measured that, not the tools (bench/RESULTS.md's restore swung 0.72-1.51)."""
    made: list[Path] = []

    def restore(to: str) -> tuple[float, int, float]:
        assert all(p.exists() for p in made), "a restore was deleted before another one ran"
        target = Path(to)
        assert not target.exists() and target not in made
        (target / "src").mkdir(parents=True)
        (target / "src" / "file").write_bytes(b"x")
        made.append(target)
        return 1.0, 1024, 0.5

    step = Step("restore")
    restore_step(3, step, tmp_path, restore, restore)

    assert len(made) == 6 and len(step.restic) == len(step.ours) == 3
    assert not any(p.exists() for p in made)   # all gone once the step is over
    assert "| restore | 1.00 | 1.00 | **1.00**" in step.row()


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
