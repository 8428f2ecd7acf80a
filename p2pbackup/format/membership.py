"""The account's membership record: which devices belong, in which role, at which key epoch.

Each change is a whole new record with `seq` one higher and the hash of the previous signed
record, signed by an owner of the previous record (or by the epoch's recovery signer, whose
key only the holder of the recovery code can derive). A version that removes a device also
pins what stays valid of it (`kept`): the snapshots and the log the remover held. Everything
else that device signs is refused, whenever it claims to have written it. Pure: bytes in,
records or errors out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import blake3

from ..errors import IntegrityError
from .cleartext import clear_object, open_clear
from .header import Kind, ObjectHeader
from .records import KEYRING_SIG, MEMBERSHIP_SIG, RECORD_VERSION, Signed, _need, _pack, _unpack

OWNER = "owner"        # holds every key; may change the membership
MEMBER = "member"      # holds the keys of some sources only
PARTNER = "partner"    # holds no key: stores ciphertext within a quota
ROLES = (OWNER, MEMBER, PARTNER)
GENESIS = bytes(32)


@dataclass(frozen=True, slots=True)
class Member:
    """One device of the account."""

    device_id: str
    public_key: bytes
    name: str
    role: str
    scopes: tuple[str, ...] | None = None   # None: every source
    quota: int | None = None                # bytes a partner accepts; None: no limit set
    added_ns: int = 0
    tag_key: bytes = b""                    # a partner's own discovery tag key
    box_key: bytes | None = None            # X25519 key grants are sealed to (newer devices)

    def to_obj(self) -> dict:
        obj = {"id": self.device_id, "pk": self.public_key, "name": self.name,
               "role": self.role, "scopes": list(self.scopes) if self.scopes is not None else None,
               "quota": self.quota, "added": self.added_ns}
        if self.tag_key:
            obj["tag"] = self.tag_key
        if self.box_key is not None:
            obj["box"] = self.box_key
        return obj

    @classmethod
    def from_obj(cls, obj: object, what: str) -> "Member | None":
        """A member, or None for an entry of a role this version does not know (skipped)."""
        if not isinstance(obj, dict):
            raise IntegrityError(f"{what} has a malformed member entry")
        role = _need(obj, "role", str, what)
        if role not in ROLES:
            return None
        scopes = obj.get("scopes")
        if scopes is not None and not (isinstance(scopes, list)
                                       and all(isinstance(s, str) for s in scopes)):
            raise IntegrityError(f"{what} has a malformed scope list")
        quota = obj.get("quota")
        if quota is not None and (not isinstance(quota, int) or isinstance(quota, bool)):
            raise IntegrityError(f"{what} has a malformed quota")
        box = obj.get("box")
        if box is not None and not (isinstance(box, bytes) and len(box) == 32):
            raise IntegrityError(f"{what} has a malformed box key")
        return cls(_need(obj, "id", str, what), _need(obj, "pk", bytes, what),
                   str(obj.get("name", "")), role,
                   tuple(scopes) if scopes is not None else None, quota,
                   int(obj.get("added", 0) or 0),
                   obj["tag"] if isinstance(obj.get("tag"), bytes) else b"", box)

    def may_write(self, sources: Iterable[str]) -> bool:
        """True if this device may sign records about `sources` (snapshots, log segments)."""
        if self.role == PARTNER:
            return False
        return self.role == OWNER or self.scopes is None or set(sources) <= set(self.scopes)


@dataclass(frozen=True, slots=True)
class Kept:
    """What stays valid of a removed device: what the remover's store held of it."""

    snapshots: frozenset[bytes]     # snapshot ids (32 bytes each)
    seq: int = 0                    # its log up to this segment...
    segment: bytes = GENESIS        # ...whose hash is this

    def to_obj(self) -> dict:
        return {"snaps": sorted(self.snapshots), "seq": self.seq, "seg": self.segment}

    @classmethod
    def from_obj(cls, obj: object, what: str) -> "Kept":
        if not isinstance(obj, dict):
            raise IntegrityError(f"{what} has a malformed pin of a removed device")
        snaps = obj.get("snaps", [])
        seq, seg = obj.get("seq", 0), obj.get("seg", GENESIS)
        if not isinstance(snaps, list) or not all(isinstance(s, bytes) and len(s) == 32
                                                  for s in snaps) \
                or not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 \
                or not isinstance(seg, bytes) or len(seg) != 32:
            raise IntegrityError(f"{what} has a malformed pin of a removed device")
        return cls(frozenset(snaps), seq, seg)

    def keeps_segment(self, seq: int) -> bool:
        return seq <= self.seq

    def keeps_head(self, seq: int, segment: bytes) -> bool:
        return seq < self.seq or (seq == self.seq and segment == self.segment)


@dataclass(frozen=True, slots=True)
class Membership:
    """One version of the account's device list."""

    seq: int
    prev: bytes                       # hash of the previous signed record; b"" for the first
    epoch: int                        # the key epoch everything new is written in
    members: tuple[Member, ...]
    removed: tuple[str, ...] = ()     # device ids refused from now on, never re-admitted
    recovery_key: bytes = b""         # public key of this epoch's recovery signer
    grants: dict[str, bytes] = field(default_factory=dict)  # device id -> sealed epoch keys
    time_ns: int = 0
    kept: dict[str, Kept] = field(default_factory=dict)     # removed device id -> its pin

    def encode(self) -> bytes:
        obj = {"v": RECORD_VERSION, "seq": self.seq, "prev": self.prev,
               "epoch": self.epoch, "members": [m.to_obj() for m in self.members],
               "removed": list(self.removed), "recovery": self.recovery_key,
               "grants": dict(self.grants), "time": self.time_ns}
        if self.kept:
            obj["kept"] = {d: k.to_obj() for d, k in sorted(self.kept.items())}
        return _pack(obj)

    @classmethod
    def decode(cls, data: bytes, what: str = "membership record") -> "Membership":
        obj = _unpack(data, what)
        members = tuple(m for m in (Member.from_obj(x, what)
                                    for x in _need(obj, "members", list, what)) if m is not None)
        removed = obj.get("removed", [])
        grants = obj.get("grants", {})
        kept = obj.get("kept", {})
        if not isinstance(removed, list) or not all(isinstance(r, str) for r in removed) \
                or not isinstance(grants, dict) or not isinstance(kept, dict):
            raise IntegrityError(f"{what} is malformed")
        return cls(_need(obj, "seq", int, what), _need(obj, "prev", bytes, what),
                   _need(obj, "epoch", int, what), members, tuple(removed),
                   bytes(obj.get("recovery", b"")),
                   {str(k): bytes(v) for k, v in grants.items()}, int(obj.get("time", 0) or 0),
                   {str(d): Kept.from_obj(k, what) for d, k in kept.items()})

    def member(self, device_id: str) -> Member | None:
        return next((m for m in self.members if m.device_id == device_id), None)

    def may_change(self, signer: str, recovery_id: str | None) -> bool:
        """True if `signer` may sign the next version: an owner, or this epoch's recovery key."""
        m = self.member(signer)
        return (m is not None and m.role == OWNER) or (recovery_id is not None
                                                       and signer == recovery_id)

    def admits(self, device_id: str) -> bool:
        """True if `device_id` is a current member (of any role) and not removed."""
        return device_id not in self.removed and self.member(device_id) is not None

    def with_member(self, m: Member, time_ns: int) -> "Membership":
        """The next version with `m` added (or replaced)."""
        if m.device_id in self.removed:
            raise IntegrityError(f"device {m.device_id[:12]} was removed from the account and "
                                 "cannot join again; pair it with a fresh home")
        others = tuple(x for x in self.members if x.device_id != m.device_id)
        return replace(self, seq=self.seq + 1, members=others + (m,), time_ns=time_ns)


def record_hash(signed_bytes: bytes) -> bytes:
    """The hash that the next membership version names as `prev`."""
    return blake3.blake3(b"p2pbackup membership\x00" + signed_bytes).digest()


def sign_membership(m: Membership, device_id: str, sign: Callable[[bytes], bytes]) -> bytes:
    """The signed encoding of a membership version."""
    return Signed.make(MEMBERSHIP_SIG, m.encode(), device_id, sign).encode()


def check_chain(records: list[bytes], verify: Callable[[bytes, bytes, bytes], bool],
                id_for: Callable[[bytes], str], what: str = "membership") -> Membership:
    """Check a whole chain of signed versions (oldest first) and return the newest.

    `verify(public_key, message, signature)` and `id_for(public_key)` come from crypto, so this
    stays pure. Raises IntegrityError naming the first version that does not follow.
    """
    return check_versions(records, verify, id_for, what)[-1]


def check_versions(records: list[bytes], verify: Callable[[bytes, bytes, bytes], bool],
                   id_for: Callable[[bytes], str], what: str = "membership"
                   ) -> list[Membership]:
    """`check_chain`, returning every version (oldest first)."""
    if not records:
        raise IntegrityError(f"{what}: no membership record")
    versions: list[Membership] = []
    current: Membership | None = None
    prev_hash = b""
    for place, raw in enumerate(records, 1):
        signed = Signed.decode(raw, what)
        new = Membership.decode(signed.body, f"{what} v{place}")
        label = f"{what} version {new.seq}"
        if current is None:
            if new.seq != 1 or new.prev:
                raise IntegrityError(f"{label} does not start the chain (expected version 1)")
            signer_key = _key_of(new, signed.device, id_for)
            if not new.may_change(signed.device, _recovery_id(new, id_for)):
                raise IntegrityError(f"{label} is signed by a device that is not its owner")
        else:
            if new.seq != current.seq + 1:
                raise IntegrityError(f"{label} follows version {current.seq}: versions must "
                                     "go up by one (a rollback or a gap)")
            if new.prev != prev_hash:
                raise IntegrityError(f"{label} does not name the previous version's hash (a fork)")
            if new.epoch < current.epoch:
                raise IntegrityError(f"{label} moves the key epoch backwards")
            if not set(current.removed) <= set(new.removed):
                raise IntegrityError(f"{label} re-admits a removed device")
            if any(new.kept.get(d) != k for d, k in current.kept.items()):
                raise IntegrityError(f"{label} changes what stays valid of a removed device")
            if not current.may_change(signed.device, _recovery_id(current, id_for)):
                raise IntegrityError(f"{label} is signed by {signed.device[:12]}, which may not "
                                     "change the membership")
            signer_key = _key_of(current, signed.device, id_for)
        if not signed.verifies(MEMBERSHIP_SIG, signer_key, verify):
            raise IntegrityError(f"{label} has a bad signature")
        if set(new.removed) & {m.device_id for m in new.members}:
            raise IntegrityError(f"{label} lists a removed device as a member")
        if not set(new.kept) <= set(new.removed):
            raise IntegrityError(f"{label} pins a device that is not removed")
        for m in new.members:
            if id_for(m.public_key) != m.device_id:
                raise IntegrityError(f"{label} lists device {m.device_id[:12]} with a key that "
                                     "is not its own")
        versions.append(new)
        current, prev_hash = new, record_hash(raw)
    return versions


def _recovery_id(m: Membership, id_for: Callable[[bytes], str]) -> str | None:
    return id_for(m.recovery_key) if m.recovery_key else None


def _key_of(m: Membership, signer: str, id_for: Callable[[bytes], str]) -> bytes:
    member = m.member(signer)
    if member is not None:
        return member.public_key
    if m.recovery_key and id_for(m.recovery_key) == signer:
        return m.recovery_key
    raise IntegrityError(f"membership version {m.seq} does not know signer {signer[:12]}")


# ---- who may sign what, by key epoch ---------------------------------------------------------

class SignerRefused(IntegrityError):
    """{}"""
    # A record that authenticates but whose signer may not have written it: not damage to
    # repair, nor something to keep data for (prune passes over it).


class Signers:
    """The checked membership history, asked about the signer of a record.

    A record sealed in key epoch e is valid only if a version of epoch e lists its signer in a
    role that may write it (a partner never; a scoped member only for its sources). A device
    removed later is held to the pin its removal recorded; a device removed by an older
    version (no pin) keeps what it sealed before its removal, as it always did.
    """

    def __init__(self, versions: list[Membership]) -> None:
        self.versions = versions
        self._writers: dict[tuple[str, int], Member] = {}
        self._recovery: dict[int, bytes] = {}
        self._removed: dict[str, tuple[int, int, Kept | None]] = {}  # -> (epoch, version, pin)
        for v in versions:
            for m in v.members:
                self._writers[(m.device_id, v.epoch)] = m
            if v.recovery_key:
                self._recovery.setdefault(v.epoch, v.recovery_key)
            for d in v.removed:
                if d not in self._removed:
                    self._removed[d] = (v.epoch, v.seq, v.kept.get(d))

    @property
    def newest(self) -> Membership:
        return self.versions[-1]

    def ever_listed(self, device: str) -> bool:
        """True if some version lists `device` as a member (it may have been removed since)."""
        return any(d == device for d, _ in self._writers)

    def recovery_key(self, epoch: int) -> bytes | None:
        """The public key of epoch `epoch`'s recovery signer, if a version names it."""
        return self._recovery.get(epoch)

    def writer_key(self, device: str, epoch: int, what: str, *, sources: Iterable[str] = (),
                   kept: Callable[[Kept], bool] | None = None) -> bytes:
        """The public key to check `what` against, signed by `device` and sealed in `epoch`;
        SignerRefused (one line, saying why) if that device may not have written it.

        `kept(pin)` says whether the record is among what a removed device's pin keeps.
        """
        who = f"device {device[:12]}"
        m = self._writers.get((device, epoch))
        if m is None:
            raise SignerRefused(f"{what} is refused: {who} was not a member of the account "
                                f"in key epoch {epoch}")
        sources = list(sources)
        if not m.may_write(sources):
            held = "a storage partner" if m.role == PARTNER else \
                f"a member for {', '.join(m.scopes or ())} only"
            raise SignerRefused(f"{what} is refused: {who} is {held}")
        removal = self._removed.get(device)
        if removal is not None:
            removed_epoch, version, pin = removal
            if epoch >= removed_epoch or (pin is not None and not (kept and kept(pin))):
                raise SignerRefused(f"{what} is refused: {who} was removed from the account "
                                    f"(membership version {version}) and it is not among "
                                    "what that device had written before")
        return m.public_key


# ---- the store's keyring ---------------------------------------------------------------------
#
#     header(kind SIGNED_KEYRING) | Signed{type keyring, body: msgpack {v, epoch, sealed}}
#
# `sealed` is a KEYRING object (every root up to `epoch`) sealed with the epoch's keyring key;
# the envelope is signed by the epoch's recovery signer, so any member can check who wrote it
# (only a holder of that root) without being able to open it.

def keyring_object(epoch: int, sealed: bytes, signer: str, sign: Callable[[bytes], bytes]
                   ) -> bytes:
    body = _pack({"v": RECORD_VERSION, "epoch": epoch, "sealed": sealed})
    return clear_object(Kind.SIGNED_KEYRING, Signed.make(KEYRING_SIG, body, signer, sign))


def read_keyring(data: bytes, what: str = "keyring") -> tuple[int, bytes, Signed]:
    """(epoch, sealed roots, signed envelope) of a keyring object; the caller checks the
    signature against the epoch's recovery key."""
    signed = open_clear(data, Kind.SIGNED_KEYRING, "signed keyring", what)
    obj = _unpack(signed.body, what)
    return _need(obj, "epoch", int, what), _need(obj, "sealed", bytes, what), signed


def keyring_envelope(data: bytes, epoch: int, what: str = "keyring") -> Signed | None:
    """The signed envelope of a keyring stored as `keyring/<epoch>`, its signature unchecked;
    None for one of the old form (sealed whole, nothing in the clear). IntegrityError for
    anything else, or a keyring of another epoch than its name."""
    if ObjectHeader.decode(data, what).kind == Kind.KEYRING:
        return None
    got, _, signed = read_keyring(data, what)
    if got != epoch:
        raise IntegrityError(f"{what} is the keyring of key epoch {got}, stored under epoch "
                             f"{epoch}")
    return signed
