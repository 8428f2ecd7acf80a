"""Frames shared by the peer protocols: a 4-byte big-endian length and a msgpack map.

Every map carries "v" (the protocol version) and "t" (its type). On a data channel a frame may
span several messages, so readers buffer bytes and hand out whole frames.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

MAX_FRAME = 4 * 1024 * 1024
_LEN = struct.Struct(">I")


class FrameError(Exception):
    """The peer's bytes are not a frame (the session should end)."""


def encode(version: int, msg: dict[str, Any]) -> bytes:
    """One frame for `msg`, tagged with `version`."""
    body = msgpack.packb({"v": version, **msg}, use_bin_type=True)
    return _LEN.pack(len(body)) + body


class FrameReader:
    """Buffers bytes from a peer and yields whole frames as typed maps."""

    def __init__(self, *, max_array: int = 4096, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._opts = dict(raw=False, strict_map_key=False, max_str_len=1 << 16,
                          max_bin_len=max_frame, max_array_len=max_array, max_map_len=64)
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next(self) -> dict[str, Any] | None:
        """The next whole frame, or None until more bytes arrive; FrameError if malformed."""
        if len(self._buf) < 4:
            return None
        (n,) = _LEN.unpack_from(self._buf, 0)
        if n > self.max_frame:
            raise FrameError(f"a frame of {n} bytes is larger than {self.max_frame}")
        if len(self._buf) < 4 + n:
            return None
        body = bytes(self._buf[4:4 + n])
        del self._buf[:4 + n]
        try:
            msg = msgpack.unpackb(body, **self._opts)
        except Exception:
            raise FrameError("a frame is not valid msgpack") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
            raise FrameError("a frame is not a typed map")
        return msg


def peek_type(data: bytes) -> str | None:
    """The type of the first frame in `data` (a session's first message), if it parses."""
    reader = FrameReader()
    reader.feed(data)
    try:
        msg = reader.next()
    except FrameError:
        return None
    return msg["t"] if msg else None
