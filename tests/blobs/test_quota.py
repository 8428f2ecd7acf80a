from pathlib import Path

import pytest

from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.blobs.quota import QuotaExceeded, QuotaStore

from .conformance import BlobStoreConformance


class TestQuotaStore(BlobStoreConformance):
    @pytest.fixture
    def store(self, tmp_path: Path) -> QuotaStore:
        return QuotaStore(LocalDirStore(tmp_path / "store"), 1 << 30)


async def test_a_put_over_the_quota_is_refused_and_nothing_is_lost(tmp_path: Path):
    store = QuotaStore(LocalDirStore(tmp_path / "s"), 1000, owner="account 4a1a")
    await store.put("packs/" + "a" * 64, b"x" * 600)
    with pytest.raises(QuotaExceeded, match="quota exceeded: storing packs for account 4a1a "
                                            "would use 1.1 KiB of the 1000 B granted"):
        await store.put("packs/" + "b" * 64, b"y" * 500)
    assert not await store.has("packs/" + "b" * 64)
    assert await store.get("packs/" + "a" * 64) == b"x" * 600
    await store.delete("packs/" + "a" * 64)           # deleting frees the space
    await store.put("packs/" + "b" * 64, b"y" * 500)
    assert await store.used() == 500
    # A fresh wrapper over the same directory counts what is there.
    assert await QuotaStore(LocalDirStore(tmp_path / "s"), 1000).used() == 500
