"""Frames built from buffers and parsed in place: same maps as msgpack, same limits."""

from __future__ import annotations

import asyncio
import os
import struct

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from p2pbackup.protocol.framing import (IN_PLACE, FrameError, FrameReader, encode,
                                        encode_with_bin)
from p2pbackup.protocol.sync import MAX_OBJECT, PART, Closed, SyncSession
from p2pbackup.transport.tls_lane import LaneIdentity, LaneServer, connect_lane

from .test_sync import Side, frame, pump, valid


def test_encode_with_bin_is_the_msgpack_frame_and_does_not_copy_the_payload():
    payload = memoryview(os.urandom(70_000))
    for size in (0, 1, 255, 256, 65535, 65536, 70_000):
        msg = {"t": "obj", "name": "packs/x", "off": 7, "total": 2 ** 40, "last": True}
        bufs = encode_with_bin(1, msg, "data", payload[:size])
        assert bufs[-1].obj is payload.obj   # a view, not a copy
        wire = b"".join(bufs)
        (n,) = struct.unpack_from(">I", wire)
        assert n == len(wire) - 4
        assert msgpack.unpackb(wire[4:]) == {"v": 1, **msg, "data": bytes(payload[:size])}


def test_large_frames_are_parsed_in_place_small_ones_by_msgpack():
    big = os.urandom(IN_PLACE + 10)
    wire = b"".join(encode_with_bin(1, {"t": "obj", "name": "n", "last": False}, "data", big))
    wire += encode(1, {"t": "obj", "data": b"small"})
    r = FrameReader(bin_views=True)
    r.feed(wire)
    first = r.next()
    assert isinstance(first["data"], memoryview) and first["data"] == big
    assert first == {"v": 1, "t": "obj", "name": "n", "last": False, "data": first["data"]}
    assert r.next()["data"] == b"small" and r.next() is None
    plain = FrameReader()
    plain.feed(wire)
    assert plain.next()["data"] == big and isinstance(plain.next()["data"], bytes)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.one_of(
    st.integers(min_value=-2 ** 63, max_value=2 ** 64 - 1), st.booleans(), st.none(),
    st.text(max_size=20), st.binary(max_size=20), st.lists(st.integers(0, 99), max_size=3),
    st.floats(allow_nan=False)), max_size=20), st.integers(min_value=1, max_value=50))
def test_in_place_parsing_agrees_with_msgpack(msg, chunk):
    msg = {**msg, "t": "x", "pad": b"\0" * IN_PLACE}
    wire = encode(1, msg)
    want = FrameReader()
    want.feed(wire)
    expect = want.next()
    for pieces in ([wire], [wire[i:i + chunk * 997] for i in range(0, len(wire), chunk * 997)]):
        r = FrameReader(bin_views=True)
        got = None
        for p in pieces:
            r.feed(p)
            got = got or r.next()
        assert {k: bytes(v) if isinstance(v, memoryview) else v for k, v in got.items()} \
            == expect


def test_in_place_parsing_keeps_the_limits():
    wire = encode(1, {"t": "x", "s": "a" * 70_000})   # a str over max_str_len
    r = FrameReader(bin_views=True)
    r.feed(wire)
    with pytest.raises(FrameError):
        r.next()
    wire = encode(1, {"t": "x", "pad": b"\0" * IN_PLACE})
    body = bytearray(wire)
    struct.pack_into(">I", body, 0, len(wire) - 4 + 1)   # one byte after the map
    r = FrameReader(bin_views=True)
    r.feed(bytes(body) + b"\x00")
    with pytest.raises(FrameError):
        r.next()


def test_an_object_larger_than_the_maximum_closes_the_session():
    s = SyncSession("B", set(), valid_name=valid)
    s.receive_data(frame({"t": "hello", "versions": [1], "device": "X"}) +
                   frame({"t": "inv", "names": ["packs/x"], "last": True}))
    ev = s.receive_data(frame({"t": "obj", "name": "packs/x", "off": 0, "total": MAX_OBJECT + 1,
                               "data": b"12345", "last": False}))
    assert isinstance(ev[-1], Closed) and "malformed" in ev[-1].reason and s.closed


def test_multi_part_objects_arrive_whole_in_any_chunking():
    big = {"packs/big": os.urandom(3 * PART + 12345), "packs/one": os.urandom(PART)}
    for chunk in (None, 65536, 1_000_003):
        a, b = Side("A", big), Side("B", {})
        pump(a, b, chunk=chunk)
        assert b.objects == big
        assert all(type(v) is bytes for v in b.objects.values())


def test_bulk_frames_are_buffers_of_the_sent_object():
    data = os.urandom(2 * PART + 1)
    a, b = Side("A", {"packs/x": data}), Side("B", {})
    a.s.bulk_lane_up()
    b.s.bulk_lane_up()
    for _ in range(5):
        for src, dst in ((a, b), (b, a)):
            if d := src.s.data_to_send():
                dst.handle(dst.s.receive_data(d))
            src.handle(src.s.next_wanted())
    frames = a.s.frames_to_send("bulk")
    assert len(frames) == 3 and all(f[-1].obj is data for f in frames)
    for f in frames:   # one lane message per frame: parsed where it lies
        b.handle(b.s.receive_data(bytearray(b"".join(f)), "bulk"))
    assert b.objects["packs/x"] == data


@pytest.mark.timeout(30)
def test_lane_messages_from_buffers():
    srv, cli = LaneIdentity.generate(), LaneIdentity.generate()
    payload = os.urandom(3 * 1024 * 1024)

    async def main():
        got: asyncio.Queue = asyncio.Queue()

        async def handle(link):
            while (m := await link.recv()) is not None:
                await got.put(m)

        async with LaneServer(srv, handle, expected=[cli.fingerprint]) as server:
            addr = await server.start("127.0.0.1")
            link = await connect_lane(*addr, srv.fingerprint, cli)
            view = memoryview(payload)
            await link.send_buffers([b"ab", view[:1000], b"c", view[1000:]])
            await link.send(b"")
            await link.send(b"x")
            assert await got.get() == b"ab" + payload[:1000] + b"c" + payload[1000:]
            assert await got.get() == b""
            assert await got.get() == b"x"
            await link.close()

    asyncio.run(main())
