"""Reading (and, where the peer allows it, writing) a peer's store, as a sans-I/O pair.

The client is a device restoring or recovering from a peer; the server is the peer's daemon.
Same frames as the sync protocol (framing.py); the client speaks first, so the daemon tells a
fetch session from a sync session by the first frame's type ("fetch").

    client -> server
    fetch    {versions, device}                         first frame
    req      {id, op, name?, off?, len?, prefix?, fp?}  op: get range size has list delete lane
    put      {id, name, off, total, data, last}          one part of an object to store
    server -> client
    fetch    {versions, device}                         the answer to the first frame
    res      {id, value}                                an int, bool or nil result; for
                                                        lane {fp, port}: the server's lane
    data     {id, off, total, data, last}               one part of a get/range result
    names    {id, names, last}                          a batch of a list result
    fail     {id, code, reason}                         code: notfound, refused, error
    error    {reason}                                   the session ends (either way)

"lane" (the client sends its lane certificate's fingerprint, inside this signed session) asks
for a direct TLS lane: the server answers with its own fingerprint and port and then accepts
that certificate; the client opens a new fetch session over the lane for bulk reads. Servers
without lanes refuse it like any unknown operation.

Requests are answered in order. A frame that does not parse ends the session with one
`Closed` event; input never raises. Ops and frame types from newer versions are refused or
skipped, never fatal. Whatever the other end sends, a session holds at most `limits`
(framing.Limits): objects arriving in parts (puts on the server, answers on the client: count
and bytes, and an object whose next part does not come in time ends the session, see
`expire`) and the names of a list answer; crossing a bound ends the session.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .framing import FrameError, FrameReader, LimitExceeded, Limits, Partials, encode

VERSION = 1
HELLO = "fetch"
PART = 1024 * 1024
LIST_BATCH = 2000
MAX_OBJECT = 512 * 1024 * 1024   # nothing we store comes near; bounds a hostile peer's reply
OPS = ("get", "range", "size", "has", "list", "put", "delete", "lane")
NOT_FOUND, REFUSED, ERROR = "notfound", "refused", "error"


@dataclass(frozen=True, slots=True)
class Hello:
    device: str
    version: int


@dataclass(frozen=True, slots=True)
class Request:
    """What the client asks; answer with `FetchServer.reply` or `fail`."""

    id: int
    op: str
    name: str = ""
    offset: int = 0
    length: int = 0
    prefix: str = ""
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole answer: `value` (bytes, names, int, bool or None) or `code` and `reason`."""

    id: int
    value: Any = None
    code: str | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Closed:
    reason: str
    by_peer: bool = False


Event = Hello | Request | Reply | Closed


def _need(msg: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    value = msg.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise FrameError(f"field {key!r} is missing or of the wrong type in a "
                         f"{msg.get('t')!r} frame")
    return value


def _name(msg: dict, key: str, valid: Callable[[str], bool]) -> str:
    name = _need(msg, key, str)
    if not valid(name):
        raise FrameError(f"a {msg.get('t')!r} frame names {name[:60]!r}, not a store name")
    return name


def store_name(name: str) -> bool:
    """A name a store may hold: relative, no empty or dot parts, no backslashes."""
    parts = name.split("/")
    return 0 < len(name) <= 1024 and "\\" not in name and "\x00" not in name and \
        all(p not in ("", ".", "..") for p in parts)


class _End:
    """What both ends share: framing, the hello, objects in parts, the end of the session."""

    def __init__(self, device: str, valid_name: Callable[[str], bool], limits: Limits,
                 now: Callable[[], float]) -> None:
        self.device, self.valid_name = device, valid_name
        self.limits = limits
        self.peer: str | None = None
        self.closed = False
        self._out = bytearray()
        self._in = FrameReader(max_array=LIST_BATCH + 16)
        self._partial = Partials(limits, now)   # objects arriving, by request id

    @property
    def partial_objects(self) -> int:
        return len(self._partial)

    @property
    def partial_bytes(self) -> int:
        return self._partial.bytes

    def _part(self, rid: int, what: str, msg: dict, max_total: int, name: str = ""
              ) -> bytes | None:
        """Keep one part of the object of request `rid`; the object once whole."""
        off, total = _need(msg, "off", int), _need(msg, "total", int)
        data, last = _need(msg, "data", bytes), _need(msg, "last", bool)
        if off == 0:
            if not 0 <= total <= max_total:
                raise FrameError(f"{what} is {total} bytes, larger than {max_total}")
            self._partial.start(rid, total, name=name)
        parts = self._partial.get(rid)
        if parts is None:
            raise FrameError(f"a part of {what} whose first part never came")
        if not parts.fits(off, total, len(data), last):
            raise FrameError(f"the parts of {what} do not fit together")
        self._partial.add(rid, data)
        return b"".join(self._partial.finish(rid).parts) if last else None

    def expire(self) -> "Closed | None":
        """End the session if an object arriving in parts waited `limits.partial_timeout`
        seconds for its next part (the adapter calls this when nothing arrives; input calls
        it too); the Closed event, once."""
        if self.closed or not self._partial.expired():
            return None
        self._partial.clear()
        reason = (f"an object sent in parts stalled: its next part did not come within "
                  f"{self.limits.partial_timeout:g} s")
        self.close(reason)
        return Closed(reason)

    def _frame(self, msg: dict) -> None:
        self._out += encode(VERSION, msg)

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def close(self, reason: str) -> None:
        if not self.closed:
            self._frame({"t": "error", "reason": reason[:200]})
            self.closed = True

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; returns what happened."""
        if self.closed:
            return []
        self._in.feed(data)
        events: list[Event] = []
        try:
            while (msg := self._in.next()) is not None:
                t = msg["t"]
                if t == "error":
                    self.closed = True
                    events.append(Closed(f"the peer ended the session: "
                                         f"{str(msg.get('reason', ''))[:200]}", by_peer=True))
                    return events
                if t == HELLO:
                    if self.peer is not None:
                        raise FrameError("a second hello")
                    versions = _need(msg, "versions", list)
                    self.peer = _need(msg, "device", str)[:200]
                    if VERSION not in versions:
                        reason = (f"the peer speaks fetch protocol versions {versions[:5]}, we "
                                  f"speak {VERSION}; upgrade p2pbackup")
                        self.close("no common protocol version")
                        return events + [Closed(reason)]
                    events += self._hello()
                    continue
                if self.peer is None:
                    raise FrameError(f"a {t!r} frame came before hello")
                events += self._handle(t, msg)
        except FrameError as exc:
            reason = str(exc) if isinstance(exc, LimitExceeded) else \
                f"the peer sent a malformed frame: {exc}"
            self.close(reason)
            events.append(Closed(reason))
            return events
        stalled = self.expire()
        return events + ([stalled] if stalled else [])

    def _hello(self) -> list[Event]:
        return [Hello(self.peer or "", VERSION)]

    def _handle(self, t: str, msg: dict) -> list[Event]:
        raise NotImplementedError


class FetchServer(_End):
    """The store's side: turns frames into `Request`s and answers into frames."""

    def __init__(self, device: str, *, valid_name: Callable[[str], bool] = store_name,
                 max_put: int = 64 * 1024 * 1024, limits: Limits = Limits(),
                 now: Callable[[], float] = time.monotonic) -> None:
        super().__init__(device, valid_name, limits, now)
        self.max_put = max_put

    def _hello(self) -> list[Event]:
        self._frame({"t": HELLO, "versions": [VERSION], "device": self.device})
        return super()._hello()

    def _handle(self, t: str, msg: dict) -> list[Event]:
        if t == "req":
            rid, op = _need(msg, "id", int), _need(msg, "op", str)
            if op not in OPS or op == "put":
                self.fail(rid, REFUSED, f"this peer does not know the operation {op[:20]!r}")
                return []
            if op == "lane":
                return [Request(rid, op, _need(msg, "fp", str)[:200])]
            if op == "list":
                prefix = _need(msg, "prefix", str)
                if len(prefix) > 1024:
                    raise FrameError("a list prefix longer than 1024 characters")
                return [Request(rid, op, prefix=prefix)]
            name = _name(msg, "name", self.valid_name)
            off = length = 0
            if op == "range":
                off, length = _need(msg, "off", int), _need(msg, "len", int)
                if length < 0 or length > MAX_OBJECT:
                    raise FrameError("a range of a negative or huge length")
            return [Request(rid, op, name, off, length)]
        if t == "put":
            rid = _need(msg, "id", int)
            first = _need(msg, "off", int) == 0
            name = _name(msg, "name", self.valid_name) if first else \
                (self._partial.get(rid).name if rid in self._partial else "")
            whole = self._part(rid, f"the object {name[:60]!r}", msg, self.max_put, name)
            if whole is None:
                return []
            return [Request(rid, "put", name, data=whole)]
        return []  # a frame type of a newer version

    def reply(self, rid: int, value: Any) -> None:
        """Answer request `rid`: bytes go in parts, a list of names in batches."""
        if self.closed:
            return
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            off = 0
            while True:
                part = data[off:off + PART]
                last = off + len(part) >= len(data)
                self._frame({"t": "data", "id": rid, "off": off, "total": len(data),
                             "data": part, "last": last})
                off += len(part)
                if last:
                    return
        if isinstance(value, list):
            for i in range(0, max(len(value), 1), LIST_BATCH):
                self._frame({"t": "names", "id": rid, "names": value[i:i + LIST_BATCH],
                             "last": i + LIST_BATCH >= len(value)})
            return
        self._frame({"t": "res", "id": rid, "value": value})

    def fail(self, rid: int, code: str, reason: str) -> None:
        """Request `rid` failed: NOT_FOUND, REFUSED (the peer's policy) or ERROR."""
        if not self.closed:
            self._frame({"t": "fail", "id": rid, "code": code, "reason": reason[:300]})


class FetchClient(_End):
    """The reader's side: requests out, `Reply` events in (one per request)."""

    def __init__(self, device: str, *, valid_name: Callable[[str], bool] = store_name,
                 limits: Limits = Limits(), now: Callable[[], float] = time.monotonic) -> None:
        super().__init__(device, valid_name, limits, now)
        self._next = 1
        self._ops: dict[int, str] = {}
        self._names: dict[int, list[str]] = {}
        self._name_bytes = 0                     # of the names in `_names`
        self._frame({"t": HELLO, "versions": [VERSION], "device": device})

    def request(self, op: str, name: str = "", *, offset: int = 0, length: int = 0,
                prefix: str = "") -> int:
        """Ask for `op` on `name` (or `prefix` for list); returns the request id."""
        if op not in OPS or op in ("put", "lane"):
            raise ValueError(f"unknown fetch operation {op!r}")
        rid = self._id(op)
        msg: dict[str, Any] = {"t": "req", "id": rid, "op": op}
        if op == "list":
            msg["prefix"] = prefix
        else:
            msg["name"] = name
        if op == "range":
            msg.update(off=offset, len=length)
        self._frame(msg)
        return rid

    def request_lane(self, fingerprint: str) -> int:
        """Ask for a direct lane, offering our lane certificate's fingerprint; the reply's value
        is (server fingerprint, port)."""
        rid = self._id("lane")
        self._frame({"t": "req", "id": rid, "op": "lane", "fp": fingerprint})
        return rid

    def put(self, name: str, data: bytes) -> int:
        """Send `data` to be stored under `name`, in parts; returns the request id."""
        rid = self._id("put")
        off = 0
        while True:
            part = data[off:off + PART]
            last = off + len(part) >= len(data)
            self._frame({"t": "put", "id": rid, "name": name, "off": off, "total": len(data),
                         "data": part, "last": last})
            off += len(part)
            if last:
                return rid

    @property
    def waiting(self) -> int:
        return len(self._ops)

    @property
    def names_held(self) -> int:
        """Names of list answers not yet complete."""
        return sum(map(len, self._names.values()))

    def _id(self, op: str) -> int:
        rid, self._next = self._next, self._next + 1
        self._ops[rid] = op
        return rid

    def _pending(self, msg: dict, *ops: str) -> int:
        rid = _need(msg, "id", int)
        if rid not in self._ops or ops and self._ops[rid] not in ops:
            raise FrameError(f"a {msg['t']!r} answer to request {rid}, which did not ask for it")
        return rid

    def _handle(self, t: str, msg: dict) -> list[Event]:
        if t == "res":
            rid = self._pending(msg, "size", "has", "delete", "put", "lane")
            value = msg.get("value")
            op = self._ops.pop(rid)
            if op == "lane":
                fp = value.get("fp") if isinstance(value, dict) else None
                port = value.get("port") if isinstance(value, dict) else None
                if not isinstance(fp, str) or not isinstance(port, int) \
                        or isinstance(port, bool) or not 0 < port < 65536:
                    raise FrameError("a lane answer without a fingerprint and port")
                return [Reply(rid, (fp[:200], port))]
            if op == "size" and (not isinstance(value, int) or isinstance(value, bool)
                                 or value < 0):
                raise FrameError("a size that is not a count of bytes")
            if op == "has" and not isinstance(value, bool):
                raise FrameError("a 'has' answer that is not true or false")
            return [Reply(rid, value if op in ("size", "has") else None)]
        if t == "data":
            rid = self._pending(msg, "get", "range")
            whole = self._part(rid, f"the answer to request {rid}", msg, MAX_OBJECT)
            if whole is None:
                return []
            del self._ops[rid]
            return [Reply(rid, whole)]
        if t == "names":
            rid = self._pending(msg, "list")
            names = _need(msg, "names", list)
            if not all(isinstance(n, str) and self.valid_name(n) for n in names):
                raise FrameError("a list answer with something that is not a store name")
            size = sum(map(len, names))
            self.limits.check_names(self.names_held + len(names), self._name_bytes + size)
            got = self._names.setdefault(rid, [])
            got += names
            self._name_bytes += size
            if not _need(msg, "last", bool):
                return []
            self._drop_names(rid)
            del self._ops[rid]
            return [Reply(rid, got)]
        if t == "fail":
            rid = self._pending(msg)  # any request may fail
            self._ops.pop(rid)
            self._partial.pop(rid)
            self._drop_names(rid)
            code = str(msg.get("code", ERROR))[:20]
            return [Reply(rid, None, code if code in (NOT_FOUND, REFUSED) else ERROR,
                          str(msg.get("reason", ""))[:300])]
        return []  # a frame type of a newer version

    def _drop_names(self, rid: int) -> list[str]:
        got = self._names.pop(rid, [])
        self._name_bytes -= sum(map(len, got))
        return got
