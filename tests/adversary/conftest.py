"""Fixtures for the attack tests: the backup engine's real repository (local store, SQLite
index), and a repository of device A with a replica of it on device B."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.crypto.keys import AccountKeys
from p2pbackup.repo import replica
from p2pbackup.repo.repository import Repository
from tests.unit.backup.conftest import repo  # noqa: F401

KEYS = AccountKeys(os.urandom(32))
A, B = DeviceIdentity.generate(), DeviceIdentity.generate()


@pytest.fixture
async def repos(tmp_path: Path):
    """(a, b): A's repository and B's replica of it, which knows A's device record."""
    a = await Repository.create(LocalDirStore(tmp_path / "a"), KEYS, A, str(tmp_path / "ca"), "a")
    b = await Repository.create_replica(LocalDirStore(tmp_path / "b"), KEYS, B,
                                        str(tmp_path / "cb"), "b", await a.config_object())
    async for name in a.store.list("devices/"):
        await replica.accept(b, name, bytes(await a.store.get(name)))
    yield a, b
    await a.close()
    await b.close()
