"""Frames shared by the peer protocols: a 4-byte big-endian length and a msgpack map.

Every map carries "v" (the protocol version) and "t" (its type). On a data channel a frame may
span several messages, so readers buffer bytes and hand out whole frames.

Bulk data is copied as little as possible: `encode_with_bin` gives a frame as a list of
buffers whose payload is the caller's buffer itself (a memoryview, not a copy), and a
`FrameReader(bin_views=True)` parses large frames where they lie (in the bytes fed to it when a
frame arrived whole, else in one copy of it) and hands their bin fields out as memoryviews.
Both produce and accept exactly the msgpack maps `encode` and `msgpack.unpackb` do.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

MAX_FRAME = 4 * 1024 * 1024
_LEN = struct.Struct(">I")
_U16, _U32, _U64 = struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")
IN_PLACE = 16 * 1024    # frames this large are parsed in place by a bin_views reader

Buffer = bytes | bytearray | memoryview


class FrameError(Exception):
    """The peer's bytes are not a frame (the session should end)."""


class LimitExceeded(FrameError):
    """The peer made the session hold more than a bound allows (the session should end)."""


MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """What a peer may make one session hold, whatever it sends; a session that would hold
    more ends (LimitExceeded). An honest peer stays far below every bound."""

    # Names the peer holds and we lack (its inventory, its announcements) and names we asked
    # for: a 16 TB store is a million 16 MiB packs. Names we hold too cost nothing.
    names: int = 1_000_000
    name_bytes: int = 128 * MiB
    # Objects arriving in parts at once: an honest peer sends one at a time on each lane.
    partial_objects: int = 4
    # ... and what they hold together (one object alone may be as large as any object).
    partial_bytes: int = 64 * MiB
    # Seconds an object arriving in parts may wait for its next part.
    partial_timeout: float = 120.0

    def check_names(self, count: int, size: int) -> None:
        if count > self.names:
            raise LimitExceeded(f"the peer exceeded a session limit: {count} names to keep "
                                f"(the limit is {self.names})")
        if size > self.name_bytes:
            raise LimitExceeded(f"the peer exceeded a session limit: {size} bytes of names to "
                                f"keep (the limit is {self.name_bytes})")


@dataclass(slots=True)
class Partial:
    """An object arriving in parts: views of the frames they came in, until it is whole."""

    total: int
    since: float                                    # when its last part came
    name: str = ""
    lane: str = ""
    parts: list[Buffer] = field(default_factory=list)
    received: int = 0

    def fits(self, off: int, total: int, size: int, last: bool) -> bool:
        """Whether a part (offset, total, length, last) continues this object."""
        return off == self.received and total == self.total and \
            off + size <= total and last == (off + size == total)


class Partials:
    """The objects a session receives in parts, keyed by name or request id, within `limits`
    (count and bytes; `expired` says which waited too long for their next part)."""

    def __init__(self, limits: Limits, now: Callable[[], float]) -> None:
        self.limits, self.now = limits, now
        self._by_key: dict[Any, Partial] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def get(self, key: Any) -> Partial | None:
        return self._by_key.get(key)

    def values(self) -> list[Partial]:
        return list(self._by_key.values())

    def pop(self, key: Any) -> Partial | None:
        got = self._by_key.pop(key, None)
        if got is not None:
            self.bytes -= got.received
        return got

    def clear(self) -> None:
        self._by_key.clear()
        self.bytes = 0

    def start(self, key: Any, total: int, *, name: str = "", lane: str = "") -> Partial:
        """A new object (its first part came); it replaces an unfinished one of that key."""
        self.pop(key)
        if len(self._by_key) >= self.limits.partial_objects:
            raise LimitExceeded(f"the peer exceeded a session limit: more than "
                                f"{self.limits.partial_objects} objects sent in parts at once")
        got = self._by_key[key] = Partial(total, self.now(), name, lane)
        return got

    def add(self, key: Any, data: Buffer) -> Partial:
        """Keep the next part of `key` (it `fits`)."""
        got = self._by_key[key]
        if self.bytes + len(data) > self.limits.partial_bytes and len(self._by_key) > 1:
            raise LimitExceeded(f"the peer exceeded a session limit: {self.bytes + len(data)} "
                                f"bytes in objects sent in parts at once (the limit is "
                                f"{self.limits.partial_bytes})")
        got.parts.append(data)
        got.received += len(data)
        got.since = self.now()
        self.bytes += len(data)
        return got

    def finish(self, key: Any) -> Partial:
        """The whole object: no longer counted."""
        got = self.pop(key)
        assert got is not None
        return got

    def expired(self) -> list[Any]:
        """Keys of objects whose last part came `partial_timeout` seconds ago or more."""
        if not self._by_key:
            return []
        deadline = self.now() - self.limits.partial_timeout
        return [k for k, p in self._by_key.items() if p.since <= deadline]

    def on_lane(self, lane: str) -> list[Any]:
        return [k for k, p in self._by_key.items() if p.lane == lane]


def encode(version: int, msg: dict[str, Any]) -> bytes:
    """One frame for `msg`, tagged with `version`."""
    body = msgpack.packb({"v": version, **msg}, use_bin_type=True)
    return _LEN.pack(len(body)) + body


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return bytes((0xc4, n))
    if n < 0x10000:
        return b"\xc5" + _U16.pack(n)
    return b"\xc6" + _U32.pack(n)


def encode_with_bin(version: int, msg: dict[str, Any], key: str,
                    payload: Buffer) -> list[Buffer]:
    """The frame of `{**msg, key: payload}` (payload a msgpack bin, last in the map) as buffers
    to write one after the other: the payload is not copied."""
    n = len(msg) + 2
    head = bytes((0x80 | n,)) if n < 16 else b"\xde" + _U16.pack(n)
    head += msgpack.packb("v") + msgpack.packb(version)
    for k, value in msg.items():
        head += msgpack.packb(k, use_bin_type=True) + msgpack.packb(value, use_bin_type=True)
    head += msgpack.packb(key) + _bin_header(len(payload))
    return [_LEN.pack(len(head) + len(payload)) + head, payload]


class _NotSimple(Exception):
    """The map holds something the in-place parser leaves to msgpack."""


def _parse_in_place(b: memoryview, max_str: int, max_map: int) -> dict[str, Any]:
    """A msgpack map of str keys to ints >= 0, strs, bins (as views of `b`), bools and nil.

    Anything else, or bytes after the map, raises _NotSimple: msgpack decides then (and
    rejects it or not exactly as for any other frame)."""
    end = len(b)

    def value(pos: int) -> tuple[Any, int]:
        c = b[pos]
        pos += 1
        if c < 0x80:
            return c, pos
        if 0xa0 <= c <= 0xbf:
            n = c & 0x1f
        elif c in (0xd9, 0xc4):
            n = b[pos]
            pos += 1
        elif c in (0xda, 0xc5):
            (n,) = _U16.unpack_from(b, pos)
            pos += 2
        elif c in (0xdb, 0xc6):
            (n,) = _U32.unpack_from(b, pos)
            pos += 4
        elif c == 0xc2:
            return False, pos
        elif c == 0xc3:
            return True, pos
        elif c == 0xc0:
            return None, pos
        elif c == 0xcc:
            return b[pos], pos + 1
        elif c == 0xcd:
            return _U16.unpack_from(b, pos)[0], pos + 2
        elif c == 0xce:
            return _U32.unpack_from(b, pos)[0], pos + 4
        elif c == 0xcf:
            return _U64.unpack_from(b, pos)[0], pos + 8
        else:
            raise _NotSimple
        if pos + n > end:
            raise _NotSimple
        if c in (0xc4, 0xc5, 0xc6):
            return b[pos:pos + n], pos + n
        if n > max_str:
            raise _NotSimple
        try:
            return str(b[pos:pos + n], "utf-8"), pos + n
        except UnicodeDecodeError:
            raise _NotSimple from None

    try:
        c = b[0]
        if 0x80 <= c <= 0x8f:
            count, pos = c & 0x0f, 1
        elif c == 0xde:
            count, pos = _U16.unpack_from(b, 1)[0], 3
        else:
            raise _NotSimple
        if count > max_map:
            raise _NotSimple
        out: dict[str, Any] = {}
        for _ in range(count):
            k, pos = value(pos)
            if not isinstance(k, str):
                raise _NotSimple
            out[k], pos = value(pos)
    except (IndexError, struct.error):
        raise _NotSimple from None
    if pos != end:
        raise _NotSimple
    return out


class FrameReader:
    """Buffers bytes from a peer and yields whole frames as typed maps.

    With `bin_views`, bin fields of large frames come out as memoryviews of the bytes fed in
    (or of a copy of them): the caller must not change what it fed afterwards.
    """

    def __init__(self, *, max_array: int = 4096, max_frame: int = MAX_FRAME,
                 bin_views: bool = False) -> None:
        self.max_frame = max_frame
        self.bin_views = bin_views
        self._opts = dict(raw=False, strict_map_key=False, max_str_len=1 << 16,
                          max_bin_len=max_frame, max_array_len=max_array, max_map_len=64)
        self._buf = bytearray()
        self._view: memoryview | None = None   # fed bytes not yet consumed nor copied
        self._pos = 0

    def feed(self, data: Buffer) -> None:
        if not len(data):
            return
        if self._view is not None:
            self._stash()
        if self._buf:
            self._buf += data
            return
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        self._view, self._pos = view, 0

    def _stash(self) -> None:
        """Keep the rest of the fed bytes (an incomplete frame) in our own buffer."""
        assert self._view is not None
        self._buf += self._view[self._pos:]
        self._view = None

    def next(self) -> dict[str, Any] | None:
        """The next whole frame, or None until more bytes arrive; FrameError if malformed."""
        if self._view is not None:
            view, pos = self._view, self._pos
            if len(view) - pos >= 4:
                (n,) = _LEN.unpack_from(view, pos)
                if n > self.max_frame:
                    raise FrameError(f"a frame of {n} bytes is larger than {self.max_frame}")
                if len(view) - pos >= 4 + n:
                    self._pos = pos + 4 + n
                    if self._pos == len(view):
                        self._view = None
                    return self._decode(view[pos + 4:pos + 4 + n])
            self._stash()
            return None
        if len(self._buf) < 4:
            return None
        (n,) = _LEN.unpack_from(self._buf, 0)
        if n > self.max_frame:
            raise FrameError(f"a frame of {n} bytes is larger than {self.max_frame}")
        if len(self._buf) < 4 + n:
            return None
        body = self._buf[4:4 + n]   # one copy, which views may keep
        del self._buf[:4 + n]
        return self._decode(memoryview(body))

    def _decode(self, body: memoryview) -> dict[str, Any]:
        msg: Any = None
        if self.bin_views and len(body) >= IN_PLACE:
            try:
                msg = _parse_in_place(body, self._opts["max_str_len"], self._opts["max_map_len"])
            except _NotSimple:
                msg = None
        if msg is None:
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
