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


def test_received_parts_are_joined_into_a_buffer_written_without_the_page_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes

    from p2pbackup.blobs import local

    parts = [os.urandom(n) for n in (1 << 20, 3, 700_000, 1 << 20)]
    joined = local.join_for_direct_write(parts, sum(map(len, parts)))
    assert isinstance(joined, memoryview) and not joined.readonly
    assert ctypes.addressof(ctypes.c_char.from_buffer(joined)) % 4096 == 0
    assert joined == b"".join(parts)
    small = local.join_for_direct_write([b"ab", b"cd"], 4)
    assert small == b"abcd" and isinstance(small, bytes)
    with pytest.raises(ValueError):
        local.join_for_direct_write(parts, sum(map(len, parts)) + 1)
    opened: list[int] = []
    real_open = os.open
    monkeypatch.setattr(local.os, "open", lambda p, f, *a: (opened.append(f), real_open(p, f, *a))[1])
    store = LocalDirStore(tmp_path / "store")
    store.put_sync("packs/" + "ab" * 32, joined, durable=False)
    assert any(f & local._O_DIRECT for f in opened)  # put_sync asked for O_DIRECT
    assert store.get_sync("packs/" + "ab" * 32) == b"".join(parts)


async def test_a_blob_replaced_in_place_is_read_anew_from_every_thread(tmp_path: Path) -> None:
    """A damaged pack healed by an intact copy under the same name: ranges read afterwards
    come from the new file, also in threads that had the old one open (a restore's reads)."""
    import concurrent.futures as cf

    store = LocalDirStore(tmp_path)
    name = "packs/" + "ab" * 32
    await store.put(name, b"damaged!" * 100)
    with cf.ThreadPoolExecutor(1) as pool:
        assert pool.submit(store.get_range_sync, name, 0, 8).result() == b"damaged!"
        await store.put(name, b"intact!!" * 100)
        assert pool.submit(store.get_range_sync, name, 0, 8).result() == b"intact!!"
        await store.delete(name)
        await store.put(name, b"again!!!" * 100)
        assert pool.submit(store.get_range_sync, name, 0, 8).result() == b"again!!!"
