"""The repository tests' shared fixture: a repository with a snapshot, and an empty replica."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.config import Source
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.crypto.keys import AccountKeys
from p2pbackup.format.log import GENESIS, Segment
from p2pbackup.repo.logstore import LogStore
from p2pbackup.repo.repository import Repository

KEYS = AccountKeys(os.urandom(32))
A, B = DeviceIdentity.generate(), DeviceIdentity.generate()


@pytest.fixture
async def pair(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_bytes(os.urandom(200_000))
    a = await Repository.create(LocalDirStore(tmp_path / "a"), KEYS, A, str(tmp_path / "ca"), "a")
    await take_snapshot(a, (Source("src", str(src)),), temp_dir=str(tmp_path / "t"))
    logs = LogStore(a)
    h1 = await logs.append(A, Segment(A.device_id, 1, GENESIS, time.time_ns(), ()))
    await logs.append(A, Segment(A.device_id, 2, h1.segment, time.time_ns(), ()))
    b = await Repository.create_replica(LocalDirStore(tmp_path / "b"), KEYS, B,
                                        str(tmp_path / "cb"), "b", await a.config_object())
    yield a, b, src
    await a.close()
    await b.close()


