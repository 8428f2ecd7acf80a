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


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_database_nobody_writes_restores_byte_identical(cli: Cli, tmp_path: Path, mode: str):
    """Closed (a WAL database's -wal goes with its last connection): its bytes are stored as
    they are, not rewritten by the backup API, and nothing is left next to it."""
    import hashlib

    src = tmp_path / "src"
    src.mkdir()
    db_path = src / "app.db"
    _make_db(db_path, mode)
    before = sorted(p.name for p in src.iterdir())
    cli("init", "--source", str(src))
    cli("snapshot")
    assert sorted(p.name for p in src.iterdir()) == before == ["app.db"]
    cli("restore", "latest", "--to", str(tmp_path / "out"))
    restored = tmp_path / "out" / "src" / "app.db"
    assert hashlib.sha256(restored.read_bytes()).hexdigest() == \
        hashlib.sha256(db_path.read_bytes()).hexdigest()
    # Unchanged since: taken over without being read again.
    assert " 0 new, 0 changed, 1 unchanged" in cli("snapshot").stdout


def test_database_with_committed_wal_frames_is_copied_consistently(cli: Cli, tmp_path: Path):
    """An open WAL database whose last commits are still only in its -wal: the main file's
    bytes alone would lose them, so it goes through the backup API."""
    src = tmp_path / "src"
    src.mkdir()
    db_path = src / "app.db"
    _make_db(db_path, "wal")
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("UPDATE meta SET pairs = 42")
    db.commit()  # in app.db-wal only; the connection stays open
    try:
        assert (src / "app.db-wal").stat().st_size > 0
        cli("init", "--source", str(src))
        cli("snapshot")
    finally:
        db.close()
    cli("restore", "latest", "--to", str(tmp_path / "out"))
    restored = sqlite3.connect(tmp_path / "out" / "src" / "app.db")
    assert restored.execute("SELECT pairs FROM meta").fetchone()[0] == 42
    restored.close()
