"""Decompression bombs: a member gone bad (it holds the keys) seals a few KB of zstd that expand
to hundreds of MiB, as a record or as a blob inside a pack. Every object is refused with
IntegrityError before its expansion is allocated: blobs may not exceed the raw length their
pack trailer (or the index) records, records may not exceed the cap of their kind."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import struct
import tracemalloc
from collections.abc import Iterator

import blake3
import pytest
import zstandard

from p2pbackup.backup.verify import verify
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.errors import IntegrityError
from p2pbackup.format.header import FLAG_ZSTD, Kind
from p2pbackup.format.objects import OVERHEAD, open_object, seal_into, seal_object
from p2pbackup.format.pack import PACK_HEADER, PackBuilder, pack_name
from p2pbackup.repo import replica

from .conftest import KEYS, A

EXPANDS_TO = 512 * 1024 * 1024   # beyond the cap of every kind of record
BOUND = 32 * 1024 * 1024   # what opening a bomb may allocate at most (it is a few KB)


@functools.cache
def bomb(size: int = EXPANDS_TO, *, declared: bool = True) -> bytes:
    """zstd of `size` zero bytes, with the size in the frame header or not."""
    c = zstandard.ZstdCompressor(level=1).compressobj(size=size if declared else -1)
    zero = bytes(16 * 1024 * 1024)
    return b"".join(c.compress(zero) for _ in range(size // len(zero))) + c.flush()


def sealed(kind: int, body: bytes, key: bytes) -> bytes:
    out = bytearray(OVERHEAD + len(body))
    seal_into(memoryview(out), kind, body, FLAG_ZSTD, key)
    return bytes(out)


@contextlib.contextmanager
def allocations() -> Iterator[list[int]]:
    """The peak of Python's allocations (bytes objects included) inside the block."""
    peak = [0]
    tracemalloc.start()
    try:
        yield peak
    finally:
        peak[0] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def test_bombs_are_small():
    assert len(bomb()) < 64 * 1024 and len(bomb(declared=False)) < 64 * 1024


@pytest.mark.parametrize("declared", [True, False], ids=["size-in-frame", "size-unknown"])
@pytest.mark.parametrize("kind", ["snapshot", "head", "segment", "membership", "device",
                                  "pack trailer"])
async def test_a_record_bomb_from_a_peer_is_refused_unexpanded(repos, kind, declared):
    a, b = repos
    body = bomb(declared=declared)
    meta, record = b.keys.meta_key, b.keys.record_key
    if kind == "snapshot":
        data = sealed(Kind.SNAPSHOT, body, record)
        name = f"snapshots/{blake3.blake3(data).hexdigest()}"
    elif kind == "head":
        data, name = sealed(Kind.HEAD, body, record), f"heads/{A.device_id}"
    elif kind == "segment":
        data, name = sealed(Kind.SEGMENT, body, record), f"segments/{A.device_id}/{1:012d}"
    elif kind == "membership":
        data, name = sealed(Kind.MEMBERSHIP, body, meta), f"membership/{1:012d}"
    elif kind == "device":
        data = sealed(Kind.DEVICE, body, meta)
        name = f"devices/{DeviceIdentity.generate().device_id}"
    else:
        trailer = sealed(Kind.PACK_TRAILER, body, meta)
        data = PACK_HEADER + trailer + struct.pack(">I", len(trailer))
        name = f"packs/{pack_name(data)}"
    with allocations() as peak, pytest.raises(IntegrityError):
        await replica.accept(b, name, data)
    assert peak[0] < BOUND, f"opening a {len(data)}-byte {kind} allocated {peak[0]} bytes"
    assert not await b.store.has(name) or kind == "membership"


def bomb_pack(raw_length: int, body: bytes) -> tuple[str, bytes, bytes]:
    """A pack whose one chunk's trailer entry says `raw_length`; its sealed body is `body`."""
    keys = KEYS.scope("src", 0)
    blob_id = keys.blob_id(b"\0" * raw_length)
    builder = PackBuilder("src", 0)
    builder.add(Kind.CHUNK, blob_id, sealed(Kind.CHUNK, body, keys.data_key), raw_length)
    name, data, _ = builder.finish(KEYS.meta_key)
    return name, bytes(data), blob_id


@pytest.mark.parametrize("declared", [True, False], ids=["size-in-frame", "size-unknown"])
async def test_a_blob_that_expands_beyond_its_raw_length_is_refused_unexpanded(repos, declared):
    a, b = repos
    name, data, _ = bomb_pack(1000, bomb(declared=declared))
    with allocations() as peak, pytest.raises(IntegrityError,
                                              match="raw length|does not record its size"):
        await replica.accept(b, f"packs/{name}", data)
    assert peak[0] < BOUND
    assert not await b.store.has(f"packs/{name}")


async def test_a_blob_whose_recorded_raw_length_exceeds_its_kinds_cap_is_refused(repos):
    a, b = repos
    size = 64 * 1024 * 1024   # no chunk is that large: the trailer's length is not believed
    name, data, _ = bomb_pack(size, bomb(size))
    with allocations() as peak, pytest.raises(IntegrityError, match="more than"):
        await replica.accept(b, f"packs/{name}", data)
    assert peak[0] < BOUND


async def test_a_blob_shorter_or_longer_than_its_raw_length_is_refused(repos):
    a, b = repos
    keys = KEYS.scope("src", 0)
    plain = b"hello " * 500
    body = zstandard.ZstdCompressor().compress(plain)
    for claimed in (len(plain) - 1, len(plain) + 1):
        builder = PackBuilder("src", 0)
        builder.add(Kind.CHUNK, keys.blob_id(plain), sealed(Kind.CHUNK, body, keys.data_key),
                    claimed)
        name, data, _ = builder.finish(KEYS.meta_key)
        with pytest.raises(IntegrityError, match="raw length"):
            await replica.accept(b, f"packs/{name}", bytes(data))
    # Stored without compression, the length is checked all the same.
    sealed_plain = bytes(seal_object(Kind.CHUNK, b"x" * 100, keys.data_key, compress=False))
    with pytest.raises(IntegrityError, match="raw length"):
        open_object(sealed_plain, keys.data_key, raw_length=99)
    assert open_object(sealed_plain, keys.data_key, raw_length=100)[1] == b"x" * 100


async def test_a_bomb_in_a_stored_pack_is_reported_by_verify_unexpanded(repos):
    """Restore and verify open blobs with the raw length the index recorded."""
    a, _ = repos
    name, data, blob_id = bomb_pack(1000, bomb())
    await a.store.put(f"packs/{name}", data)
    trailer_at = len(data) - 4 - struct.unpack(">I", data[-4:])[0]
    await a.index.add_pack(name, "src", 0, len(data),
                           [(blob_id, Kind.CHUNK, len(PACK_HEADER), trailer_at - len(PACK_HEADER),
                             1000)])
    with allocations() as peak:
        report = await verify(a, read_data=True)
    assert not report.ok
    assert peak[0] < BOUND
    with allocations() as peak, pytest.raises(IntegrityError, match="raw length|more than"):
        await asyncio.to_thread(a.read_blob_blocking, blob_id)   # what restore calls
    assert peak[0] < BOUND
