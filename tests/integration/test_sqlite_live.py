"""A database being written during the snapshot restores to a consistent state."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Cli

WRITER = r"""
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
db.execute(f"PRAGMA journal_mode={sys.argv[2]}")
n = 0
while True:
    # Each transaction inserts a pair that must never be seen half-done.
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO t(k, v) VALUES (?, ?)", (n, "x" * 300))
    db.execute("INSERT INTO t(k, v) VALUES (?, ?)", (-n - 1, "y" * 300))
    db.execute("UPDATE meta SET pairs = pairs + 1")
    db.execute("COMMIT")
    n += 1
    if n == 1:
        open(sys.argv[3], "w").close()
"""


def _make_db(path: Path, mode: str) -> None:
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA journal_mode={mode}")
    db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
    db.execute("CREATE TABLE meta (pairs INTEGER)")
    db.execute("INSERT INTO meta VALUES (0)")
    db.executemany("INSERT INTO t VALUES (?, ?)", [(10**9 + i, "z" * 500) for i in range(20000)])
    db.commit()
    db.close()


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_live_database_restores_consistent(cli: Cli, tmp_path: Path, mode: str):
    src = tmp_path / "src"
    src.mkdir()
    db_path = src / "app.db"
    _make_db(db_path, mode)
    (src / "other.txt").write_text("x" * 10_000)
    started = tmp_path / "writer-started"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db_path), mode, str(started)])
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert writer.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        cli("init", "--source", str(src))
        for _ in range(3):  # several snapshots while the writer keeps committing
            cli("snapshot")
        assert writer.poll() is None, "the writer died during the snapshots"
    finally:
        writer.kill()
        writer.wait()
    cli("restore", "latest", "--to", str(tmp_path / "out"))
    restored = tmp_path / "out" / "src" / "app.db"
    assert not (tmp_path / "out" / "src" / "app.db-wal").exists()
    assert not (tmp_path / "out" / "src" / "app.db-journal").exists()
    db = sqlite3.connect(restored)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    pairs = db.execute("SELECT pairs FROM meta").fetchone()[0]
    positives = db.execute("SELECT count(*) FROM t WHERE k >= 0 AND k < 1000000000").fetchone()[0]
    negatives = db.execute("SELECT count(*) FROM t WHERE k < 0").fetchone()[0]
    assert pairs > 0 and positives == negatives == pairs  # no half transaction
    assert db.execute("SELECT count(*) FROM t WHERE k >= 1000000000").fetchone()[0] == 20000
    db.close()
