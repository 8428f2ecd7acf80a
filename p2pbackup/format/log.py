"""The device log: segments of changes in a per-device hash chain, and the signed head.

A segment carries `seq` and the hash of the previous segment object, so a device's segments
form a chain that a reader checks link by link; the head names the newest segment (and
snapshot) and is the only object that is ever replaced. The changes themselves are grouped per
source and sealed with that source's key (a device granted only some sources reads only
those), inside the segment, which is sealed with the metadata key and signed by its device.

Changes are `put` (the entry at a path is now this: a file with its chunk ids, a symlink, a
directory's metadata) and `del` (the path and everything under it is gone). A rename is a
`del` and a `put` whose chunks are already stored. Readers skip operations they do not know.
"""

from __future__ import annotations

from dataclasses import dataclass

import blake3

from ..errors import IntegrityError
from .records import (ENTRY_TYPES, RECORD_VERSION, TreeEntry, _need, _pack, _unpack,
                      check_names, is_plain_name)

PUT, DEL = "put", "del"
GENESIS = bytes(32)  # the `prev` of a device's first segment


@dataclass(frozen=True, slots=True)
class Change:
    """One change at `path` (relative to its source's root, `/`-separated raw bytes)."""

    op: str
    path: bytes
    time_ns: int
    entry: TreeEntry | None = None

    def to_map(self) -> dict:
        m = {"op": self.op, "p": self.path, "t": self.time_ns}
        if self.entry is not None:
            m["e"] = self.entry.to_map()
        return m


@dataclass(frozen=True, slots=True)
class ChangeList:
    """The changes of one source inside one segment."""

    changes: tuple[Change, ...]
    skipped: int = 0

    def encode(self) -> bytes:
        return _pack({"v": RECORD_VERSION, "c": [c.to_map() for c in self.changes]})

    @classmethod
    def decode(cls, data: bytes | bytearray, what: str = "segment changes") -> "ChangeList":
        obj = _unpack(bytes(data), what)
        out, skipped = [], 0
        for m in _need(obj, "c", list, what):
            if not isinstance(m, dict) or m.get("op") not in (PUT, DEL):
                skipped += 1  # an operation from a newer version: skip it
                continue
            path = _need(m, "p", bytes, what)
            # Replay joins the path below the restore target: every component must be plain.
            if not all(map(is_plain_name, path.split(b"/"))):
                raise IntegrityError(f"{what} is malformed: bad path {path!r}")
            entry = None
            if m["op"] == PUT:
                e = _need(m, "e", dict, what)
                if e.get("t") not in ENTRY_TYPES:
                    skipped += 1
                    continue
                entry = TreeEntry.from_map(e, what)
                check_names([entry.name], what)
            out.append(Change(m["op"], path, m.get("t", 0), entry))
        return cls(tuple(out), skipped)


@dataclass(frozen=True, slots=True)
class SegmentPart:
    """One source's sealed change list inside a segment."""

    scope: str
    epoch: int
    sealed: bytes


@dataclass(frozen=True, slots=True)
class Segment:
    """A sealed period of the device log."""

    device: str
    seq: int
    prev: bytes
    time_ns: int
    parts: tuple[SegmentPart, ...]

    def encode(self) -> bytes:
        return _pack({"v": RECORD_VERSION, "device": self.device, "seq": self.seq,
                      "prev": self.prev, "time": self.time_ns,
                      "parts": [{"scope": p.scope, "epoch": p.epoch, "data": p.sealed}
                                for p in self.parts]})

    @classmethod
    def decode(cls, data: bytes | bytearray, what: str = "segment") -> "Segment":
        obj = _unpack(bytes(data), what)
        seq = _need(obj, "seq", int, what)
        prev = _need(obj, "prev", bytes, what)
        if seq < 1 or len(prev) != 32:
            raise IntegrityError(f"{what} is malformed: bad seq or prev")
        parts = []
        for m in _need(obj, "parts", list, what):
            if isinstance(m, dict):
                parts.append(SegmentPart(_need(m, "scope", str, what), m.get("epoch", 0),
                                         _need(m, "data", bytes, what)))
        return cls(_need(obj, "device", str, what), seq, prev, _need(obj, "time", int, what),
                   tuple(parts))


@dataclass(frozen=True, slots=True)
class Head:
    """A device's newest segment and snapshot; signed, and strictly ordered (see
    `check_head_update`): a head that is not newer than the one held is refused."""

    device: str
    seq: int
    segment: bytes  # hash of the newest segment object, GENESIS when seq is 0
    snapshot: str | None
    time_ns: int

    def encode(self) -> bytes:
        return _pack({"v": RECORD_VERSION, "device": self.device, "seq": self.seq,
                      "segment": self.segment, "snapshot": self.snapshot, "time": self.time_ns})

    @classmethod
    def decode(cls, data: bytes | bytearray, what: str = "head") -> "Head":
        obj = _unpack(bytes(data), what)
        seq = _need(obj, "seq", int, what)
        seg = _need(obj, "segment", bytes, what)
        if seq < 0 or len(seg) != 32:
            raise IntegrityError(f"{what} is malformed: bad seq or segment hash")
        snap = obj.get("snapshot")
        return cls(_need(obj, "device", str, what), seq, seg,
                   snap if isinstance(snap, str) else None, obj.get("time", 0))


def segment_hash(sealed: bytes | bytearray | memoryview) -> bytes:
    """The hash that the next segment's `prev` and the head name."""
    return blake3.blake3(sealed).digest()


def check_chain(links: list[tuple[bytes, Segment]], device: str,
                start: tuple[int, bytes] | None = None) -> list[str]:
    """Problems in a device's chain, given (hash, segment) ordered by seq; [] if it is whole.

    `start` is (seq, hash) of the last segment folded away by prune, if any.
    """
    problems: list[str] = []
    expected_prev, expected_seq = GENESIS, 1
    if start is not None:
        expected_seq, expected_prev = start[0] + 1, start[1]
    for h, seg in links:
        if seg.device != device:
            problems.append(f"segment {seg.seq} names device {seg.device[:12]}, not {device[:12]}")
        if seg.seq != expected_seq:
            problems.append(f"segment {expected_seq} is missing (next is {seg.seq})")
        elif seg.prev != expected_prev:
            problems.append(f"segment {seg.seq} does not follow segment {seg.seq - 1} "
                            "(its prev hash differs)")
        expected_prev, expected_seq = h, seg.seq + 1
    return problems


def check_head_update(current: Head | None, new: Head) -> str | None:
    """Why `new` may not replace `current` (a rollback, a fork or a replay), or None if it may.

    A device's heads are strictly ordered: `new` is newer when its seq is higher, or when it
    names the same segment and was written later (a snapshot moves the head without a new
    segment). Anything else, the same head included, is not newer: a replay of an older head
    (with an older snapshot, say) is refused."""
    if current is None:
        return None
    if new.device != current.device:
        return f"head is for device {new.device[:12]}, not {current.device[:12]}"
    if new.seq < current.seq:
        return f"head goes backwards (seq {new.seq} < {current.seq}): refused"
    if new.seq == current.seq and new.segment != current.segment:
        return f"head forks at seq {new.seq}: two different segments claim it"
    if new.seq == current.seq and new.time_ns <= current.time_ns:
        return (f"head is not newer than the one held (seq {new.seq}, written at "
                f"{new.time_ns} <= {current.time_ns}): a replay, refused")
    return None


def head_time_after(current: Head | None, now_ns: int) -> int:
    """The time for a head that moves `current` without a new segment: now, or just after
    `current` if the clock went back (so the device's own next head is always newer)."""
    return now_ns if current is None else max(now_ns, current.time_ns + 1)
