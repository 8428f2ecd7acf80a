"""The account's membership record: which devices belong, in which role, at which key epoch.

Each change is a whole new record with `seq` one higher and the hash of the previous signed
record, signed by an owner of the previous record (or by the epoch's recovery signer, whose
key only the holder of the recovery code can derive). Pure: bytes in, records or errors out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import blake3

from ..errors import IntegrityError
from .records import RECORD_VERSION, Signed, _need, _pack, _unpack

OWNER = "owner"        # holds every key; may change the membership
MEMBER = "member"      # holds the keys of some sources only
PARTNER = "partner"    # holds no key: stores ciphertext within a quota
ROLES = (OWNER, MEMBER, PARTNER)


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

    def to_obj(self) -> dict:
        obj = {"id": self.device_id, "pk": self.public_key, "name": self.name,
               "role": self.role, "scopes": list(self.scopes) if self.scopes is not None else None,
               "quota": self.quota, "added": self.added_ns}
        if self.tag_key:
            obj["tag"] = self.tag_key
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
        return cls(_need(obj, "id", str, what), _need(obj, "pk", bytes, what),
                   str(obj.get("name", "")), role,
                   tuple(scopes) if scopes is not None else None, quota,
                   int(obj.get("added", 0) or 0),
                   obj["tag"] if isinstance(obj.get("tag"), bytes) else b"")


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

    def encode(self) -> bytes:
        return _pack({"v": RECORD_VERSION, "seq": self.seq, "prev": self.prev,
                      "epoch": self.epoch, "members": [m.to_obj() for m in self.members],
                      "removed": list(self.removed), "recovery": self.recovery_key,
                      "grants": dict(self.grants), "time": self.time_ns})

    @classmethod
    def decode(cls, data: bytes, what: str = "membership record") -> "Membership":
        obj = _unpack(data, what)
        members = tuple(m for m in (Member.from_obj(x, what)
                                    for x in _need(obj, "members", list, what)) if m is not None)
        removed = obj.get("removed", [])
        grants = obj.get("grants", {})
        if not isinstance(removed, list) or not all(isinstance(r, str) for r in removed) \
                or not isinstance(grants, dict):
            raise IntegrityError(f"{what} is malformed")
        return cls(_need(obj, "seq", int, what), _need(obj, "prev", bytes, what),
                   _need(obj, "epoch", int, what), members, tuple(removed),
                   bytes(obj.get("recovery", b"")),
                   {str(k): bytes(v) for k, v in grants.items()}, int(obj.get("time", 0) or 0))

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
    body = m.encode()
    return Signed(body, device_id, sign(body)).encode()


def check_chain(records: list[bytes], verify: Callable[[bytes, bytes, bytes], bool],
                id_for: Callable[[bytes], str], what: str = "membership") -> Membership:
    """Check a whole chain of signed versions (oldest first) and return the newest.

    `verify(public_key, message, signature)` and `id_for(public_key)` come from crypto, so this
    stays pure. Raises IntegrityError naming the first version that does not follow.
    """
    if not records:
        raise IntegrityError(f"{what}: no membership record")
    current: Membership | None = None
    prev_hash = b""
    for raw in records:
        signed = Signed.decode(raw, what)
        new = Membership.decode(signed.body, f"{what} v{len(records)}")
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
            if not current.may_change(signed.device, _recovery_id(current, id_for)):
                raise IntegrityError(f"{label} is signed by {signed.device[:12]}, which may not "
                                     "change the membership")
            signer_key = _key_of(current, signed.device, id_for)
        if not verify(signer_key, signed.body, signed.signature):
            raise IntegrityError(f"{label} has a bad signature")
        if set(new.removed) & {m.device_id for m in new.members}:
            raise IntegrityError(f"{label} lists a removed device as a member")
        for m in new.members:
            if id_for(m.public_key) != m.device_id:
                raise IntegrityError(f"{label} lists device {m.device_id[:12]} with a key that "
                                     "is not its own")
        current, prev_hash = new, record_hash(raw)
    assert current is not None
    return current


def _recovery_id(m: Membership, id_for: Callable[[bytes], str]) -> str | None:
    return id_for(m.recovery_key) if m.recovery_key else None


def _key_of(m: Membership, signer: str, id_for: Callable[[bytes], str]) -> bytes:
    member = m.member(signer)
    if member is not None:
        return member.public_key
    if m.recovery_key and id_for(m.recovery_key) == signer:
        return m.recovery_key
    raise IntegrityError(f"membership version {m.seq} does not know signer {signer[:12]}")
