"""The writer lock on a full disk: one clear error, and taken again where it was taken before."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p2pbackup.errors import DiskFull
from p2pbackup.repo.lock import WriterLock
from tests.diskfull import fill, small_tmpfs


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_the_writer_lock_on_a_full_disk(tmp_path: Path):
    with small_tmpfs(tmp_path / "small", "64k") as fs:
        (fs / "new").mkdir()
        with WriterLock(str(fs / "store" / "lock"), "the store"):
            pass
        fill(fs)
        with WriterLock(str(fs / "store" / "lock"), "the store"):  # (after a pause, say)
            assert (fs / "store" / "lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(DiskFull, match="No space left"):
            WriterLock(str(fs / "new" / "lock"), "another store").acquire()
