"""The BlobStore conformance suite: every backend runs these cases unchanged.

A backend's test module subclasses `BlobStoreConformance` and provides a `store` fixture
(and `device_id`, the device whose head it may replace, when the backend checks who writes).
Names are real object names (p2pbackup/ids.py) and content-addressed ones match their
content, so that a backend that checks them as a storage partner does (the storage server)
runs the same cases.
"""

from __future__ import annotations

import asyncio
import os

import blake3
import pytest

from p2pbackup.blobs.base import BlobStore, ObjectExists
from p2pbackup.errors import NotFound, StorageError

MISSING = "snapshots/" + "00" * 32


def addressed(kind: str, data: bytes) -> str:
    """The name of `data` as a content-addressed object of `kind` (packs, snapshots)."""
    return f"{kind}/{blake3.blake3(data).hexdigest()}"


async def _names(store: BlobStore, prefix: str = "") -> list[str]:
    return sorted([n async for n in store.list(prefix)])


class BlobStoreConformance:
    """Cases every BlobStore must pass."""

    @pytest.fixture
    def device_id(self) -> str:
        """The device whose head (`heads/<id>`, the one kind of name a put replaces) the
        store is written as."""
        return "0f" * 16

    async def test_put_get_round_trip(self, store: BlobStore) -> None:
        data = os.urandom(100_000)
        name = addressed("packs", data)
        await store.put(name, data)
        assert await store.get(name) == data
        assert await store.has(name)
        assert await store.size(name) == len(data)

    async def test_missing_blob_is_not_found(self, store: BlobStore) -> None:
        assert not await store.has(MISSING)
        with pytest.raises(NotFound):
            await store.get(MISSING)
        with pytest.raises(NotFound):
            await store.get_range(MISSING, 0, 1)
        with pytest.raises(NotFound):
            await store.size(MISSING)

    async def test_ranges_from_start_and_end(self, store: BlobStore) -> None:
        data = bytes(range(256)) * 10
        name = addressed("packs", data)
        await store.put(name, data)
        assert await store.get_range(name, 10, 20) == data[10:30]
        assert await store.get_range(name, -16, 16) == data[-16:]
        assert await store.get_range(name, len(data) - 4, 100) == data[-4:]

    async def test_spans_of_a_blob(self, store: BlobStore) -> None:
        data = os.urandom(3000)
        name = addressed("packs", data)
        await store.put(name, data)
        spans = [(100, 50), (150, 1000), (1150, 1), (2990, 20)]   # the last past the end
        got = await store.get_spans(name, spans)
        assert [bytes(g) for g in got] == [data[100:150], data[150:1150], data[1150:1151],
                                           data[2990:]]
        with pytest.raises(NotFound):
            await store.get_spans(MISSING, [(0, 1)])

    async def test_list_by_prefix(self, store: BlobStore) -> None:
        await store.put("config", b"c")
        await store.put(addressed("snapshots", b"1"), b"1")
        await store.put(addressed("snapshots", b"2"), b"2")
        await store.put(addressed("packs", b"p"), b"p")
        assert await _names(store, "snapshots/") == sorted(
            [addressed("snapshots", b"1"), addressed("snapshots", b"2")])
        assert await _names(store, "packs/") == [addressed("packs", b"p")]
        assert "config" in await _names(store)

    async def test_put_replaces_a_head_atomically(self, store: BlobStore, device_id: str
                                                  ) -> None:
        head = "heads/" + device_id
        await store.put(head, b"old")
        await store.put(head, b"new")
        assert await store.get(head) == b"new"
        assert await _names(store, "heads/") == [head]

    async def test_put_replaces_a_log_anchor(self, store: BlobStore, device_id: str) -> None:
        # prune moves a folded log's anchor forward (repo/logstore.py write_anchor)
        anchor = "segments/" + device_id + "/anchor"
        await store.put(anchor, b"folded to 10")
        await store.put(anchor, b"folded to 20")
        assert await store.get(anchor) == b"folded to 20"

    async def test_a_conditional_replace_takes_only_the_version_read(
            self, store: BlobStore, device_id: str) -> None:
        if not store.capabilities.conditional_replace:
            return   # callers read and then put (the uploader's race is documented there)
        head = "heads/" + device_id
        assert await store.replace_if(head, b"first", None)
        assert not await store.replace_if(head, b"late", None)   # it exists now
        got, tag = await store.get_tagged(head)
        assert got == b"first"
        assert await store.replace_if(head, b"second", tag)
        assert not await store.replace_if(head, b"stale", tag)   # read before "second"
        assert (await store.get_tagged(head))[0] == b"second"
        assert await _names(store, "heads/") == [head]
        with pytest.raises(NotFound):
            await store.get_tagged("heads/" + "2e" * 16)

    async def test_create_only_store_never_replaces_an_object(self, store: BlobStore) -> None:
        name = "devices/" + "1d" * 16
        await store.put(name, b"first")
        await store.put(name, b"first")   # the same bytes again: an upload retried
        if not store.capabilities.create_only:
            return   # callers check `has` first (LocalDirStore heals packs by replacing them)
        with pytest.raises(ObjectExists):
            await store.put(name, b"other")
        assert await store.get(name) == b"first"

    async def test_overwrite_replaces_any_object_where_declared(self, store: BlobStore
                                                                ) -> None:
        intact = os.urandom(3000)
        name = addressed("packs", intact)
        damaged = bytes([intact[0] ^ 1]) + intact[1:]
        if not store.capabilities.overwrite:
            await store.put(name, intact)   # (a store that checks names refuses rot)
            with pytest.raises(NotImplementedError):
                await store.overwrite(name, intact)
            return
        await store.put(name, damaged)
        assert await store.get_range(name, 0, 10) == damaged[:10]   # (cached by some)
        await store.overwrite(name, intact)
        assert await store.get(name) == intact
        assert await store.get_range(name, 0, 10) == intact[:10]
        assert await store.size(name) == len(intact)
        assert await _names(store, "packs/") == [name]

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
            await asyncio.to_thread(store.get_sync, MISSING)

    async def test_delete_is_idempotent(self, store: BlobStore) -> None:
        name = addressed("snapshots", b"x")
        await store.put(name, b"x")
        if store.capabilities.append_only:
            with pytest.raises(StorageError):   # no removal record released it
                await store.delete(name)
            assert await store.has(name)
            await store.delete(MISSING)         # nothing to delete: not an error
            return
        await store.delete(name)
        await store.delete(name)
        assert not await store.has(name)
        assert await _names(store, "snapshots/") == []

    async def test_concurrent_puts(self, store: BlobStore) -> None:
        blobs = {addressed("snapshots", d): d for d in (os.urandom(5000) for _ in range(40))}
        await asyncio.gather(*(store.put(n, d) for n, d in blobs.items()))
        assert await _names(store, "snapshots/") == sorted(blobs)
        for n, d in blobs.items():
            assert await store.get(n) == d

    async def test_empty_blob(self, store: BlobStore) -> None:
        await store.put(addressed("snapshots", b""), b"")
        assert await store.get(addressed("snapshots", b"")) == b""
