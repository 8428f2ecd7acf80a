"""The peer sync protocol as a sans-I/O state machine: bytes in, events and bytes out.

Both ends run the same machine. Frames are a 4-byte big-endian length and a msgpack map with
"v" (version) and "t" (type); on a data channel each frame is one message.

    hello    {versions, device}           first frame both ways
    inv      {names, sizes?, last}        what this side holds (in batches), sizes if known
    want     {names}                      what it asks for, after comparing inventories
    announce {names}                      newly stored objects: the peer wants them at once
    obj      {name, off, total, data, last}   one part of an object (<= PART bytes)
    ack      {name} / nack {name, reason, code?}   the receiver stored it / refused it
    lane     {fp, port}                   this side's direct-lane certificate and port
    notice   {reason}                     something the peer's user should hear, the session
                                          goes on (e.g. a partner's quota is full)
    error    {reason}                     the session ends

Two lanes: everything starts on the control lane (the data channel). Once the adapter has a
direct lane up (`bulk_lane_up`), object parts go there; if it drops (`bulk_lane_down`), every
object not yet acknowledged is sent again on the control lane and the receiver ignores parts
of objects it already stored. While a lane is being set up (`await_bulk_lane`), nothing is
sent: an object handed to the data channel must finish there at its few MB/s, even once the
lane is up (measured: one 16 MiB pack stranded there made a 5 s transfer take 9 s).

A refusal may carry a code saying why in a way the sender acts on: `MISMATCH`, the content
does not match its name (the sender's copy may have rotted: it checks it). Any other refusal
(a quota, who may write what) has none; a code this version does not know counts as none.

Flow control: at most `window` bytes of parts are unacknowledged; the application is asked for
the next object (`ObjectWanted`) only when there is room, so nothing queues without bound.
A frame that does not parse ends the session with one `Closed` event; input never raises.

Whatever the peer sends, the session holds at most `limits` (framing.Limits): names it keeps
for the peer (what the peer holds and we lack, what we asked for; the peer's wants are only
queued for names we hold), objects arriving in parts (count, bytes, and time: `expire` drops
one whose next part does not come and asks for it again). Crossing a bound ends the session.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .framing import (Buffer, FrameError, FrameReader, LimitExceeded, Limits, Partials, encode,
                      encode_with_bin)

VERSION = 1
PART = 1024 * 1024
INV_BATCH = 2000
MAX_OBJECT = 512 * 1024 * 1024   # as fetch.MAX_OBJECT: a larger "total" is a malformed frame
MISMATCH = "mismatch"    # nack code: the content does not match its name
CODES = frozenset({MISMATCH})


@dataclass(frozen=True, slots=True)
class PeerHello:
    device: str
    version: int


@dataclass(frozen=True, slots=True)
class InventoryDone:
    """The peer's whole inventory arrived and our wants went out."""

    wanted: int


@dataclass(frozen=True, slots=True)
class ObjectWanted:
    """Send `name` now with `send_object` (or `missing`)."""

    name: str


@dataclass(frozen=True, slots=True)
class ObjectReceived:
    """A whole object arrived: check and store it, then `ack` or `reject`."""

    name: str
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class ObjectAcked:
    name: str
    size: int


@dataclass(frozen=True, slots=True)
class ObjectRejected:
    name: str
    reason: str
    code: str | None = None    # one of CODES, or None


@dataclass(frozen=True, slots=True)
class LaneOffered:
    """The peer's direct-lane certificate fingerprint and listening port."""

    fingerprint: str
    port: int


@dataclass(frozen=True, slots=True)
class PeerNotice:
    """The peer says something this side's user should hear; the session goes on."""

    reason: str


@dataclass(frozen=True, slots=True)
class Closed:
    reason: str
    by_peer: bool = False


Event = PeerHello | InventoryDone | ObjectWanted | ObjectReceived | ObjectAcked | \
    ObjectRejected | LaneOffered | PeerNotice | Closed


_Bad = FrameError


def _need(msg: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    value = msg.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise _Bad(f"field {key!r} is missing or of the wrong type in a {msg.get('t')!r} frame")
    return value


# A name of a kind a newer version writes: lowercase words and ids separated by single
# slashes, nothing that could climb out of a store.
_FUTURE_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}(/[A-Za-z0-9_-]{1,128}){1,4}")


def _names(msg: dict, key: str, valid: Callable[[str], bool]) -> list[str]:
    """The object names in `msg[key]` this version knows. Names of a kind it does not know
    are passed over (downgrade-safe: a newer peer may hold kinds we cannot take); anything
    else that is not a name ends the session."""
    names = _need(msg, key, list)
    known = []
    for n in names:
        if isinstance(n, str) and valid(n):
            known.append(n)
        elif not (isinstance(n, str) and _FUTURE_NAME.fullmatch(n)):
            raise _Bad(f"a {msg.get('t')!r} frame names {str(n)[:60]!r}, not an object name")
    return known


class _Names(set):
    """A set of names (the peer chose them) that keeps count of the bytes they hold."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def add(self, name: str) -> None:
        if name not in self:
            super().add(name)
            self.bytes += len(name)

    def update(self, names: Iterable[str]) -> None:   # type: ignore[override]
        for n in names:
            self.add(n)

    def discard(self, name: str) -> None:
        if name in self:
            super().discard(name)
            self.bytes -= len(name)

    def clear(self) -> None:
        super().clear()
        self.bytes = 0


class SyncSession:
    """One peer session; `have` is the local inventory, `wants(name)` says what to fetch."""

    def __init__(self, device: str, have: set[str], *, valid_name: Callable[[str], bool],
                 wants: Callable[[str], bool] | None = None, window: int = 16 * 1024 * 1024,
                 sizes: dict[str, int] | None = None,
                 join: Callable[[str, list, int], bytes | memoryview] | None = None,
                 limits: Limits = Limits(), now: Callable[[], float] = time.monotonic) -> None:
        self.device, self.have = device, have
        self.limits = limits
        # Puts an object's parts together (name, parts, total): the adapter may want its own
        # kind of buffer (an aligned one a store can write without the page cache).
        self._join = join or (lambda name, parts, total: b"".join(parts))
        self.valid_name = valid_name
        self.wants = wants or (lambda name: True)
        self.window = window
        self.peer: str | None = None
        self.closed = False
        self.in_flight = 0          # bytes of our parts not yet acknowledged
        self.bytes_sent = self.bytes_received = 0
        self.bytes_in = 0           # everything fed to receive_data: the adapter's sign of life
        self.objects_sent = self.objects_received = 0
        # What the peer holds of ours (a partner's share of this device's data): what its
        # inventory lists that we hold (by our sizes, if given), then what it acknowledges.
        self.peer_holds = self.peer_holds_bytes = 0
        self._sizes = sizes or {}
        self._out: list[list[Buffer]] = []        # frames, each as buffers to write in turn
        self._out_bulk: list[list[Buffer]] = []
        self._in = FrameReader(max_array=INV_BATCH * 2, bin_views=True)
        self._in_bulk = FrameReader(max_array=INV_BATCH * 2, bin_views=True)
        self.bulk_up = False
        self._awaiting_lane = False
        self._peer_has = _Names()           # in the peer's inventory, not here (until its end)
        self._peer_sizes: dict[str, int] = {}
        self._inv_done = False
        self._asked = _Names()              # we asked for these and have not got them yet
        self._to_send: deque[str] = deque() # the peer asked for these
        self._queued: set[str] = set()
        self._offering: str | None = None   # ObjectWanted emitted, waiting for send_object
        self._unacked: dict[str, int] = {}
        self._incoming = Partials(limits, now)   # objects arriving, by name
        self._rewanted: set[str] = set()    # asked for twice: a second copy may come
        self._sent_again: set[str] = set()  # the peer asked twice: an ack may come for either
        self._frame({"t": "hello", "versions": [VERSION], "device": device})
        names = sorted(have)
        for i in range(0, max(len(names), 1), INV_BATCH):
            batch = names[i:i + INV_BATCH]
            msg: dict[str, Any] = {"t": "inv", "names": batch,
                                   "last": i + INV_BATCH >= len(names)}
            if sizes is not None:
                msg["sizes"] = [sizes.get(n, 0) for n in batch]
            self._frame(msg)

    # ---- output -----------------------------------------------------------------------------

    def data_to_send(self, lane: str = "control") -> bytes:
        """Bytes to write on `lane` ("control" or "bulk")."""
        return b"".join(b for frame in self.frames_to_send(lane) for b in frame)

    def frames_to_send(self, lane: str = "control") -> list[list[Buffer]]:
        """The frames to write on `lane`, each as a list of buffers to write one after the
        other (object parts are views of the object given to `send_object`, not copies)."""
        if lane == "bulk":
            out, self._out_bulk = self._out_bulk, []
        else:
            out, self._out = self._out, []
        return out

    def _frame(self, msg: dict, bulk: bool = False) -> None:
        (self._out_bulk if bulk and self.bulk_up else self._out).append([encode(VERSION, msg)])

    def offer_lane(self, fingerprint: str, port: int) -> None:
        """Tell the peer our direct-lane certificate and port (inside this signed session)."""
        self._frame({"t": "lane", "fp": fingerprint, "port": port})

    def await_bulk_lane(self) -> None:
        """A direct lane is being set up: send no object until `bulk_lane_up`, or until
        `bulk_lane_down` says it failed (the adapter bounds the wait)."""
        if not self.bulk_up:
            self._awaiting_lane = True

    def bulk_lane_up(self) -> None:
        self.bulk_up = True
        self._awaiting_lane = False

    def bulk_lane_down(self) -> None:
        """The direct lane failed (or never came): resend every unacknowledged object on the
        control lane."""
        self.bulk_up = False
        self._awaiting_lane = False
        self._out_bulk = []
        self._in_bulk = FrameReader(max_array=INV_BATCH * 2, bin_views=True)
        for name in self._incoming.on_lane("bulk"):   # never finished there: sent again
            self._incoming.pop(name)
        for name, size in reversed(list(self._unacked.items())):
            self.in_flight -= size
            self.bytes_sent -= size
            if name not in self._queued:
                self._queued.add(name)
                self._to_send.appendleft(name)
        self._unacked.clear()

    # ---- application calls ------------------------------------------------------------------

    def send_object(self, name: str, data: Buffer) -> None:
        """Send the object last asked for by `ObjectWanted` (in parts).

        The parts are views of `data` until they are written: do not change it meanwhile."""
        if self.closed:
            return
        self._offering = None
        view = memoryview(data).cast("B")
        total = len(view)
        out = self._out_bulk if self.bulk_up else self._out
        off = 0
        while True:
            part = view[off:off + PART]
            last = off + len(part) >= total
            out.append(encode_with_bin(VERSION, {"t": "obj", "name": name, "off": off,
                                                 "total": total, "last": last}, "data", part))
            off += len(part)
            if last:
                break
        self._unacked[name] = total
        self.in_flight += total
        self.bytes_sent += total

    def missing(self, name: str) -> None:
        """We were asked for `name` but do not have it (any more)."""
        self._offering = None
        self._frame({"t": "nack", "name": name, "reason": "not here"})

    def ack(self, name: str) -> None:
        """The object arrived whole and is stored."""
        self.have.add(name)
        self._frame({"t": "ack", "name": name})

    def reject(self, name: str, reason: str, *, code: str | None = None) -> None:
        """The object failed our checks; the peer is told why (it is not stored), and with
        `code` (e.g. MISMATCH) why in a way it acts on."""
        msg = {"t": "nack", "name": name, "reason": reason[:200]}
        if code is not None:
            msg["code"] = code
        self._frame(msg)

    def announce(self, names: list[str]) -> None:
        """New objects here: the peer wants those it lacks at once (push, not polling)."""
        for n in names:
            self.have.add(n)
        if names and not self.closed:
            self._frame({"t": "announce", "names": names})

    def notice(self, reason: str) -> None:
        """Tell the peer something its user should hear (one line); the session goes on."""
        if not self.closed:
            self._frame({"t": "notice", "reason": reason[:300]})

    def close(self, reason: str) -> None:
        if not self.closed:
            self._frame({"t": "error", "reason": reason[:200]})
            self.closed = True

    def next_wanted(self) -> list[Event]:
        """Ask the application for the next object to send when the window has room."""
        if self.closed or self._offering is not None or not self._to_send:
            return []
        if self._awaiting_lane or self.in_flight >= self.window:
            return []
        name = self._to_send.popleft()
        self._queued.discard(name)
        self._offering = name
        return [ObjectWanted(name)]

    def rewant(self) -> int:
        """Ask again for everything asked for and not received (the adapter calls this when
        nothing arrived for a long time: an object lost on the way must not stall the session
        forever). Partial objects restart from their first part. Returns how many."""
        if self.closed or not self._asked:
            return 0
        return self._ask_from_start(sorted(self._asked))

    def _ask_from_start(self, names: list[str]) -> int:
        for name in names:
            self._incoming.pop(name)
        self._rewanted.update(names)
        for i in range(0, len(names), INV_BATCH):
            self._frame({"t": "want", "names": names[i:i + INV_BATCH]})
        return len(names)

    def expire(self) -> int:
        """Drop the objects arriving in parts whose next part did not come for
        `limits.partial_timeout` seconds, and ask for them again; returns how many (the
        adapter calls this now and then; input calls it too)."""
        if self.closed:
            return 0
        expired = self._incoming.expired()
        for name in expired:
            self._incoming.pop(name)
        stalled = sorted(n for n in expired if n in self._asked)
        return self._ask_from_start(stalled) if stalled else 0

    def ask_again(self, names: list[str]) -> list[Event]:
        """Ask the peer again for objects we received but could not store (a local failure,
        not the object's: it was refused with `reject` meanwhile)."""
        if self.closed:
            return []
        try:
            self._want([n for n in names if n not in self.have], again=True)
        except LimitExceeded as exc:
            return [self._end(str(exc))]
        return []

    def lost(self, names: list[str]) -> list[Event]:
        """We no longer hold `names` (found damaged here): they leave our inventory and are
        asked for (a peer that does not hold one says so, and it is no longer awaited)."""
        self.have.difference_update(names)
        return self.ask_again(names)

    def offered_size(self, name: str) -> int | None:
        """The size of `name` the peer's inventory gave, if it did (for `wants`, while the
        inventory is taken; afterwards for the names asked for)."""
        return self._peer_sizes.get(name)

    @property
    def pending(self) -> int:
        """Objects we asked the peer for and have not received yet."""
        return len(self._asked)

    @property
    def bytes_behind(self) -> int:
        """Bytes of what we asked for and have not received (as the peer's inventory said)."""
        return max(0, sum(self._peer_sizes.get(n, 0) for n in self._asked) - self.partial_bytes)

    # What the peer makes this session hold (each within `limits`).

    @property
    def names_held(self) -> int:
        return len(self._peer_has) + len(self._asked)

    @property
    def name_bytes_held(self) -> int:
        return self._peer_has.bytes + self._asked.bytes

    @property
    def partial_objects(self) -> int:
        return len(self._incoming)

    @property
    def partial_bytes(self) -> int:
        return self._incoming.bytes

    @property
    def queued(self) -> int:
        """Objects the peer asked for that wait to be sent."""
        return len(self._to_send)

    # ---- input ------------------------------------------------------------------------------

    def receive_data(self, data: Buffer, lane: str = "control") -> list[Event]:
        """Feed bytes from the peer (on `lane`); returns what happened.

        Parts of objects are kept as views of `data` until the object is whole: do not change
        `data` afterwards."""
        if self.closed:
            return []
        self.bytes_in += len(data)
        reader = self._in_bulk if lane == "bulk" else self._in
        reader.feed(data)
        events: list[Event] = []
        try:
            while (msg := reader.next()) is not None:
                events += self._handle(msg, lane)
                if self.closed:
                    return events
        except LimitExceeded as exc:
            return events + [self._end(str(exc))]
        except _Bad as exc:
            return events + [self._end(f"the peer sent a malformed frame: {exc}")]
        self.expire()
        return events + self.next_wanted()

    def _end(self, reason: str) -> Closed:
        """We end the session: the peer is told why, and so is the application (once)."""
        self.close(reason)
        return Closed(reason)

    def _handle(self, msg: dict, lane: str) -> list[Event]:
        t = msg["t"]
        if self.peer is None and t not in ("hello", "error"):
            raise _Bad(f"a {t!r} frame came before hello")
        if t == "hello":
            if self.peer is not None:
                raise _Bad("a second hello")
            versions = _need(msg, "versions", list)
            if VERSION not in versions:
                self.close("no common protocol version")
                return [Closed(f"the peer speaks protocol versions {versions[:5]}, we speak "
                               f"{VERSION}; upgrade p2pbackup")]
            self.peer = _need(msg, "device", str)
            return [PeerHello(self.peer, VERSION)]
        if t == "inv":
            names = _names(msg, "names", self.valid_name)
            if self._inv_done:
                return []   # an inventory goes once
            # Only what we lack is kept: an inventory that matches ours costs nothing.
            new = [n for n in names if n not in self.have and n not in self._peer_has]
            held = [n for n in names if n in self.have]
            self.peer_holds += len(held)
            self.peer_holds_bytes += sum(self._sizes.get(n, 0) for n in held)
            self.limits.check_names(self.names_held + len(new),
                                    self.name_bytes_held + sum(map(len, new)))
            self._peer_has.update(new)
            sizes, listed = msg.get("sizes"), msg["names"]  # sizes pair with every name listed
            if isinstance(sizes, list) and len(sizes) == len(listed):
                self._peer_sizes.update((n, z) for n, z in zip(listed, sizes)
                                        if isinstance(z, int) and z >= 0 and n in self._peer_has)
            if _need(msg, "last", bool):
                self._inv_done = True
                lacking = sorted(self._peer_has - self.have)
                self._peer_has.clear()
                wanted = self._want(lacking)
                self._peer_sizes = {n: z for n, z in self._peer_sizes.items() if n in self._asked}
                return [InventoryDone(wanted)]
            return []
        if t == "announce":
            names = _names(msg, "names", self.valid_name)
            # Announced names are wanted even if held: heads are the one mutable kind.
            self._want([n for n in names if n not in self.have or n.startswith("heads/")],
                       again=True)
            return []
        if t == "want":
            for n in _names(msg, "names", self.valid_name):
                if n not in self.have:   # said at once: the queue holds only what we hold
                    self._frame({"t": "nack", "name": n, "reason": "not here"})
                    continue
                size = self._unacked.pop(n, None)
                if size is not None:    # asked again (see `rewant`): that copy is lost or late
                    self.in_flight -= size
                    self.bytes_sent -= size
                    self._sent_again.add(n)
                if n not in self._queued:
                    self._queued.add(n)
                    self._to_send.append(n)
            return []
        if t == "obj":
            return self._part(msg, lane)
        if t == "ack":
            name = _need(msg, "name", str)
            size = self._unacked.pop(name, None)
            if size is None and name in self._sent_again:
                # The copy the peer asked for again arrived after all: no need to resend.
                if name in self._queued:
                    self._queued.discard(name)
                    self._to_send.remove(name)
                return []
            if size is None:
                raise _Bad(f"an ack for {name[:60]!r}, which was not sent")
            self.in_flight -= size
            self.objects_sent += 1
            self.peer_holds += 1
            self.peer_holds_bytes += size
            return [ObjectAcked(name, size)]
        if t == "nack":
            name = _need(msg, "name", str)
            reason = str(msg.get("reason", ""))[:200]
            code = msg.get("code")
            size = self._unacked.pop(name, None)
            if size is not None:
                self.in_flight -= size
                known = code if isinstance(code, str) and code in CODES else None
                return [ObjectRejected(name, reason, known)]
            self._asked.discard(name)   # we asked, the peer does not have it
            return []
        if t == "lane":
            port = _need(msg, "port", int)
            if not 0 < port < 65536:
                raise _Bad("a lane offer with no valid port")
            return [LaneOffered(_need(msg, "fp", str)[:200], port)]
        if t == "notice":
            return [PeerNotice(str(msg.get("reason", ""))[:300])]
        if t == "error":
            self.closed = True
            return [Closed(f"the peer ended the session: {str(msg.get('reason', ''))[:200]}",
                           by_peer=True)]
        return []  # a message type from a newer version: ignored

    def _want(self, names: list[str], again: bool = False) -> int:
        wanted = [n for n in names if self.wants(n) and (again or n not in self._asked)]
        new = [n for n in wanted if n not in self._asked]
        self.limits.check_names(self.names_held + len(new),
                                self.name_bytes_held + sum(map(len, new)))
        for i in range(0, len(wanted), INV_BATCH):
            self._frame({"t": "want", "names": wanted[i:i + INV_BATCH]})
        self._asked.update(wanted)
        return len(wanted)

    def _part(self, msg: dict, lane: str) -> list[Event]:
        name = _need(msg, "name", str)
        if name in self.have and name not in self._asked and name not in self._incoming:
            return []  # sent again after the direct lane dropped; we stored it already
        again = name in self._rewanted
        if again and name not in self._asked:
            return []  # the other copy of an object asked for twice arrived first
        if not self.valid_name(name) or name not in self._asked:
            raise _Bad(f"an object {name[:60]!r} that was never asked for")
        off, total = _need(msg, "off", int), _need(msg, "total", int)
        data, last = _need(msg, "data", (bytes, memoryview)), _need(msg, "last", bool)
        if not 0 <= total <= MAX_OBJECT:
            raise _Bad(f"an object {name[:60]!r} of {total} bytes (the limit is {MAX_OBJECT})")
        inc = self._incoming.get(name)
        if off == 0:
            inc = self._incoming.start(name, total, lane=lane)
        if inc is None or not inc.fits(off, total, len(data), last):
            if again:   # the rest of a copy we gave up on, or two copies interleaved
                self._incoming.pop(name)
                return []
            raise _Bad(f"the parts of {name[:60]!r} do not fit together")
        self._incoming.add(name, data)
        if not last:
            return []
        self._incoming.finish(name)
        self._asked.discard(name)
        self.bytes_received += total
        self.objects_received += 1
        # One copy, from the frames the parts came in (b"".join of one bytes is no copy).
        return [ObjectReceived(name, self._join(name, inc.parts, total))]
