"""The BlobStore conformance suite: every backend runs these cases unchanged.

A backend's test module subclasses `BlobStoreConformance` and provides a `store` fixture.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from p2pbackup.blobs.base import BlobStore, ObjectExists
from p2pbackup.errors import NotFound

HEAD = "heads/" + "0f" * 16   # a name a put replaces (base.is_mutable_name), on every backend


async def _names(store: BlobStore, prefix: str = "") -> list[str]:
    return sorted([n async for n in store.list(prefix)])


class BlobStoreConformance:
    """Cases every BlobStore must pass."""

    async def test_put_get_round_trip(self, store: BlobStore) -> None:
        data = os.urandom(100_000)
        await store.put("packs/" + "ab" * 32, data)
        assert await store.get("packs/" + "ab" * 32) == data
        assert await store.has("packs/" + "ab" * 32)
        assert await store.size("packs/" + "ab" * 32) == len(data)

    async def test_missing_blob_is_not_found(self, store: BlobStore) -> None:
        assert not await store.has("snapshots/none")
        with pytest.raises(NotFound):
            await store.get("snapshots/none")
        with pytest.raises(NotFound):
            await store.get_range("snapshots/none", 0, 1)
        with pytest.raises(NotFound):
            await store.size("snapshots/none")

    async def test_ranges_from_start_and_end(self, store: BlobStore) -> None:
        data = bytes(range(256)) * 10
        await store.put("packs/" + "cd" * 32, data)
        assert await store.get_range("packs/" + "cd" * 32, 10, 20) == data[10:30]
        assert await store.get_range("packs/" + "cd" * 32, -16, 16) == data[-16:]
        assert await store.get_range("packs/" + "cd" * 32, len(data) - 4, 100) == data[-4:]

    async def test_list_by_prefix(self, store: BlobStore) -> None:
        await store.put("config", b"c")
        await store.put("snapshots/s1", b"1")
        await store.put("snapshots/s2", b"2")
        await store.put("packs/" + "ef" * 32, b"p")
        assert await _names(store, "snapshots/") == ["snapshots/s1", "snapshots/s2"]
        assert await _names(store, "packs/") == ["packs/" + "ef" * 32]
        assert "config" in await _names(store)

    async def test_put_replaces_a_head_atomically(self, store: BlobStore) -> None:
        await store.put(HEAD, b"old")
        await store.put(HEAD, b"new")
        assert await store.get(HEAD) == b"new"
        assert await _names(store, "heads/") == [HEAD]

    async def test_put_replaces_a_log_anchor(self, store: BlobStore) -> None:
        # prune moves a folded log's anchor forward (repo/logstore.py write_anchor)
        anchor = "segments/" + "0f" * 16 + "/anchor"
        await store.put(anchor, b"folded to 10")
        await store.put(anchor, b"folded to 20")
        assert await store.get(anchor) == b"folded to 20"

    async def test_create_only_store_never_replaces_an_object(self, store: BlobStore) -> None:
        name = "devices/" + "1d" * 16
        await store.put(name, b"first")
        await store.put(name, b"first")   # the same bytes again: an upload retried
        if not store.capabilities.create_only:
            return   # callers check `has` first (LocalDirStore heals packs by replacing them)
        with pytest.raises(ObjectExists):
            await store.put(name, b"other")
        assert await store.get(name) == b"first"

    async def test_blocking_fast_path_agrees_with_put_and_get(self, store: BlobStore) -> None:
        if not store.capabilities.blocking:
            with pytest.raises(NotImplementedError):
                store.get_sync("config")
            return
        data = os.urandom(3000)
        await asyncio.to_thread(store.put_sync, "snapshots/" + "a1" * 32, data, durable=False)
        await asyncio.to_thread(store.sync_sync)
        assert await store.get("snapshots/" + "a1" * 32) == data
        await store.put("snapshots/" + "b2" * 32, data[:1000])
        assert await asyncio.to_thread(store.get_sync, "snapshots/" + "b2" * 32) == data[:1000]
        assert await asyncio.to_thread(store.get_range_sync, "snapshots/" + "a1" * 32,
                                       -10, 10) == data[-10:]
        with pytest.raises(NotFound):
            await asyncio.to_thread(store.get_sync, "snapshots/none")

    async def test_delete_is_idempotent(self, store: BlobStore) -> None:
        await store.put("snapshots/x", b"x")
        await store.delete("snapshots/x")
        await store.delete("snapshots/x")
        assert not await store.has("snapshots/x")
        assert await _names(store, "snapshots/") == []

    async def test_concurrent_puts(self, store: BlobStore) -> None:
        blobs = {f"snapshots/{i:03d}": os.urandom(5000) for i in range(40)}
        await asyncio.gather(*(store.put(n, d) for n, d in blobs.items()))
        assert await _names(store, "snapshots/") == sorted(blobs)
        for n, d in blobs.items():
            assert await store.get(n) == d

    async def test_empty_blob(self, store: BlobStore) -> None:
        await store.put("snapshots/empty", b"")
        assert await store.get("snapshots/empty") == b""
