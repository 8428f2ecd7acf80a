import os
from pathlib import Path

import pytest

from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.errors import StorageError

from .conformance import BlobStoreConformance


class TestLocalDirStore(BlobStoreConformance):
    @pytest.fixture
    def store(self, tmp_path: Path) -> LocalDirStore:
        return LocalDirStore(tmp_path / "store")


async def test_leftover_temp_files_are_invisible_and_removable(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path)
    await store.put("packs/" + "aa" * 32, b"x")
    shard = tmp_path / "packs" / "aa"
    (shard / ("aa" * 32 + ".123.abc.tmp")).write_bytes(b"half")
    assert [n async for n in store.list("packs/")] == ["packs/" + "aa" * 32]
    assert store.remove_temp_files() == 1
    assert sorted(os.listdir(shard)) == ["aa" * 32]


async def test_names_cannot_escape_the_root(tmp_path: Path) -> None:
    store = LocalDirStore(tmp_path / "s")
    for bad in ("../x", "/etc/passwd", "a//b", ""):
        with pytest.raises(StorageError):
            await store.put(bad, b"x")
