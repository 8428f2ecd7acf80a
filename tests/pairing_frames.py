"""Pairing frames by hand (a 4-byte length and a msgpack map), for tests that play a peer."""

from __future__ import annotations

import msgpack


def frame(message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def frames(data: bytes) -> list[dict]:
    out = []
    while data:
        n = int.from_bytes(data[:4], "big")
        out.append(msgpack.unpackb(data[4:4 + n]))
        data = data[4 + n:]
    return out
