"""Segments and heads in a store: writing them, and reading a device's chain back, checked.

Segments are stored as `segments/<device>/<seq, 12 digits>` and sealed with the record key of
the epoch they are written in (their change lists inside are sealed per source); heads as
`heads/<device>`. Each is signed by its device, which must be a member allowed to write it in
that epoch (repository.check_signer).
"""

from __future__ import annotations

import logging
import time

from ..crypto.identity import DeviceIdentity
from ..crypto.keys import AccountKeys
from ..errors import IntegrityError, NotFound, P2PError
from ..format.header import Kind
from ..format.log import (GENESIS, ChangeList, Head, Segment, check_chain, check_head_update,
                          segment_hash)
from ..format.objects import open_object, seal_object
from ..format.records import ANCHOR_SIG, HEAD_SIG, SEGMENT_SIG, Signed
from .repository import Repository

log = logging.getLogger("p2pbackup.log")


def segment_name(device: str, seq: int) -> str:
    return f"segments/{device}/{seq:012d}"


class LogStore:
    """A device's log in a repository."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo

    @property
    def keys(self) -> AccountKeys:
        return self.repo.keys  # read each time: a re-key (device removal) replaces them

    # ---- writing ---------------------------------------------------------------------------

    def seal_changes(self, scope: str, epoch: int, changes: ChangeList) -> bytes:
        """Seal one source's change list with that source's key."""
        keys = self.keys.scope(scope, epoch)
        return bytes(seal_object(Kind.SEGMENT_PART, changes.encode(), keys.data_key))

    def _seal_signed(self, identity: DeviceIdentity, kind: int, sig_type: str,
                     body: bytes) -> bytearray:
        """Sign a record's encoding with the device key and seal it in the newest epoch."""
        signed = Signed.make(sig_type, body, identity.device_id, identity.sign).encode()
        return self.repo.seal_record(kind, signed)

    async def append(self, identity: DeviceIdentity, segment: Segment,
                     snapshot: str | None = None) -> Head:
        """Store a segment (durably) and then move the head to it."""
        digest = await self.store_segment(identity, segment)
        return await self.move_head(identity, segment.seq, digest, snapshot)

    async def store_segment(self, identity: DeviceIdentity, segment: Segment) -> bytes:
        """Store a segment (durably); return its hash."""
        sealed = self._seal_signed(identity, Kind.SEGMENT, SEGMENT_SIG, segment.encode())
        await self.repo.store.put(segment_name(identity.device_id, segment.seq), sealed)
        return segment_hash(sealed)

    async def move_head(self, identity: DeviceIdentity, seq: int, digest: bytes,
                        snapshot: str | None = None) -> Head:
        """Move the head to the stored segment `seq` whose hash is `digest`."""
        current = await self.read_head(identity.device_id)
        head = Head(identity.device_id, seq, digest,
                    snapshot if snapshot is not None else (current.snapshot if current else None),
                    time.time_ns())
        await self._put_head(identity, head, current)
        return head

    async def write_head(self, identity: DeviceIdentity, head: Head) -> None:
        """Replace the device's head, refusing one that goes backwards or forks."""
        await self._put_head(identity, head, await self.read_head(head.device))

    async def _put_head(self, identity: DeviceIdentity, head: Head, current: Head | None) -> None:
        why = check_head_update(current, head)
        if why:
            raise IntegrityError(why)
        await self.repo.store.put(f"heads/{head.device}",
                                  self._seal_signed(identity, Kind.HEAD, HEAD_SIG, head.encode()))

    async def write_anchor(self, identity: DeviceIdentity, anchor: Head) -> None:
        """Record where a folded (pruned) chain now starts: segment `seq` had hash `segment`."""
        await self.repo.store.put(f"segments/{anchor.device}/anchor",
                                  self._seal_signed(identity, Kind.HEAD, ANCHOR_SIG,
                                                    anchor.encode()))

    async def read_anchor(self, device: str) -> Head | None:
        """The fold point of a device's chain, if prune folded part of it."""
        what = f"log anchor of device {device[:12]}"
        try:
            raw = await self.repo.store.get(f"segments/{device}/anchor")
        except NotFound:
            return None
        return await self.check_anchor(raw, device, what)

    # ---- reading ---------------------------------------------------------------------------

    async def check_anchor(self, raw: bytes | memoryview, device: str, what: str) -> Head:
        """A device's log anchor, authenticated and its signer checked."""
        signed, epoch = self.repo.open_signed(raw, Kind.HEAD, ANCHOR_SIG, what, device)
        anchor = Head.decode(signed.body, what)
        # An anchor signed before signatures named their type looks exactly like a head: it
        # counts only where the log really was folded (the segment it names is gone), which a
        # head replayed as an anchor never is.
        legacy = not await self.repo.store.has(segment_name(device, anchor.seq))
        await self.repo.check_signer(signed, epoch, ANCHOR_SIG, what, legacy=legacy,
                                     kept=lambda k: k.keeps_segment(anchor.seq))
        return anchor

    async def check_head(self, raw: bytes | memoryview, device: str, what: str) -> Head:
        """A device's head, authenticated and its signer checked."""
        signed, epoch = self.repo.open_signed(raw, Kind.HEAD, HEAD_SIG, what, device)
        head = Head.decode(signed.body, what)
        await self.repo.check_signer(signed, epoch, HEAD_SIG, what,
                                     kept=lambda k: k.keeps_head(head.seq, head.segment))
        return head

    async def check_segment(self, raw: bytes | memoryview, device: str, seq: int,
                            what: str) -> Segment:
        """Segment `seq` of a device, authenticated, its signer checked, under its name."""
        signed, epoch = self.repo.open_signed(raw, Kind.SEGMENT, SEGMENT_SIG, what, device)
        seg = Segment.decode(signed.body, what)
        if seg.seq != seq or seg.device != device:
            raise IntegrityError(f"{what} is stored under the wrong name")
        await self.repo.check_signer(signed, epoch, SEGMENT_SIG, what,
                                     sources=[p.scope for p in seg.parts],
                                     kept=lambda k: k.keeps_segment(seq))
        return seg

    async def read_head(self, device: str) -> Head | None:
        """The device's signed head, or None if it has none yet."""
        what = f"head of device {device[:12]}"
        try:
            raw = await self.repo.store.get(f"heads/{device}")
        except NotFound:
            return None
        return await self.check_head(raw, device, what)

    async def segment_seqs(self, device: str) -> list[int]:
        out = []
        async for name in self.repo.store.list(f"segments/{device}/"):
            tail = name.rsplit("/", 1)[1]
            if tail.isdigit():
                out.append(int(tail))
        return sorted(out)

    async def load_segment(self, device: str, seq: int) -> tuple[bytes, Segment]:
        """Read, authenticate and check the signature of one segment; return (hash, segment)."""
        what = f"segment {seq} of device {device[:12]}"
        raw = await self.repo.store.get(segment_name(device, seq))
        return segment_hash(raw), await self.check_segment(raw, device, seq, what)

    async def load_chain(self, device: str) -> tuple[list[tuple[bytes, Segment]], list[str]]:
        """Every segment of a device in seq order, and the problems with the chain and head."""
        links: list[tuple[bytes, Segment]] = []
        problems: list[str] = []
        try:
            anchor = await self.read_anchor(device)
        except P2PError as exc:   # not where the log was folded: read it all
            anchor = None
            problems.append(f"{exc}; ignored")
        for seq in await self.segment_seqs(device):
            if anchor is not None and seq <= anchor.seq:
                continue  # folded by prune; being deleted
            try:
                links.append(await self.load_segment(device, seq))
            except P2PError as exc:
                problems.append(str(exc))
        problems += check_chain(links, device,
                                start=(anchor.seq, anchor.segment) if anchor else None)
        head = await self.read_head(device)
        if links and head is not None:
            last_hash, last = links[-1]
            if head.seq > last.seq:
                problems.append(f"the head names segment {head.seq} but the newest is {last.seq}")
            elif head.seq == last.seq and head.segment != last_hash:
                problems.append(f"the head's hash for segment {head.seq} does not match it")
        return links, problems

    def open_changes(self, segment: Segment) -> list[tuple[str, ChangeList]]:
        """The change lists of a segment, per source, for the sources this device can read."""
        out = []
        for part in segment.parts:
            keys = self.keys.scope(part.scope, part.epoch)
            what = f"changes of {part.scope} in segment {segment.seq}"
            _, plain = open_object(part.sealed, keys.data_key, expect=Kind.SEGMENT_PART,
                                   what=what)
            out.append((part.scope, ChangeList.decode(plain, what)))
        return out

    async def recover_tail(self, device: str) -> tuple[int, bytes]:
        """Where the chain continues: (seq, hash) of the newest good segment.

        A newest segment that does not read back (a torn or damaged write) is set aside to
        `quarantine/` with a log line, and the chain continues from the one before it.
        """
        head = await self.read_head(device)
        seqs = await self.segment_seqs(device)
        while seqs:
            seq = seqs[-1]
            try:
                h, _ = await self.load_segment(device, seq)
                if head is not None and head.seq > seq:
                    break  # the head is ahead of the last readable segment: follow the head
                return seq, h
            except P2PError as exc:
                log.warning("segment %d is torn or damaged (%s); discarded, the chain continues "
                            "from segment %d", seq, exc, seq - 1)
                name = segment_name(device, seq)
                try:
                    data = await self.repo.store.get(name)
                    await self.repo.store.put(f"quarantine/{name}", data)
                except P2PError:
                    pass
                await self.repo.store.delete(name)
                seqs.pop()
        if head is not None and head.seq > 0:
            return head.seq, head.segment  # heads never go backwards, so the chain goes on
        return 0, GENESIS
