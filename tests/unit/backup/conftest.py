"""A real repository (local store, SQLite index) for the backup engine's in-process tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.crypto.keys import AccountKeys
from p2pbackup.repo.repository import Repository


@pytest.fixture
async def repo(tmp_path: Path):
    r = await Repository.create(LocalDirStore(tmp_path / "store"), AccountKeys(os.urandom(32)),
                                DeviceIdentity.generate(), str(tmp_path / "cache"), "test")
    yield r
    await r.close()
