"""The roster: the account's devices as a storage partner may know them, signed, in the clear.

A partner holds no key, so it cannot read the (sealed) membership record. Owners hand it this
clear-text projection instead: every current device's id, public key and role (owner or
member), the devices removed, and the public key of the key epoch's recovery signer. The
account's storage partners are named apart (`partners`): they are not devices of the account
(a partner never admits another partner), but a broker that follows the roster relays the
account's devices' offers to them (broker/service.py). Like the membership, each version
has `seq` one higher than the one before and the hash of that object, and is signed by an
owner of that previous version or by the recovery signer it names (a device recovering the
account when no owner device is left); the first version a partner holds is the one it got
at pairing. A partner follows the chain: only owners' removal records count, only listed
devices may connect, read and push, and the recovery signer may read.

    header(kind ROSTER, flags 0) | Signed{type roster, body: msgpack {v, seq, prev, time,
                                                                      members, removed,
                                                                      recovery?, partners?}}
    members: [[device id, public key, role], ...]    removed: [device id, ...]
    partners: [[device id, public key], ...]  (absent in rosters written before brokers relayed
              to partners; older readers skip the field)
    recovery: the recovery signer's public key (absent in rosters written before it was added:
              then only an owner signs the next version)

Only envelope version 2 counts (the signature names the type `roster`): no released version
wrote a roster in a version-1 envelope, so none is accepted.

Stored as `roster/<seq, 12 digits>`. Readers skip member entries of roles they do not know.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import blake3
import msgpack

from ..errors import IntegrityError
from ..ids import SEQ_DIGITS, is_device
from .cleartext import check_owner_signed, clear_object, open_clear
from .header import Kind
from .membership import MEMBER, OWNER, PARTNER, Membership
from .records import ROSTER_SIG, Signed

VERSION = 1
PREFIX = "roster/"
ROLES = (OWNER, MEMBER)
MAX_DEVICES = 10_000


@dataclass(frozen=True, slots=True)
class RosterEntry:
    device_id: str
    public_key: bytes
    role: str


@dataclass(frozen=True, slots=True)
class Roster:
    """One version of the account's devices, as partners see them."""

    seq: int
    prev: bytes                        # hash of the previous roster object; b"" for the first
    members: tuple[RosterEntry, ...]
    removed: tuple[str, ...] = ()
    time_ns: int = 0
    recovery_key: bytes = b""          # the epoch's recovery signer; b"": not stated
    partners: tuple[RosterEntry, ...] = ()   # the account's storage partners (role "partner")

    def entry(self, device_id: str) -> RosterEntry | None:
        return next((e for e in self.members if e.device_id == device_id), None)

    def key_of(self, device_id: str) -> bytes | None:
        """A listed device's public key (owners and members: who may connect and push)."""
        e = self.entry(device_id)
        return e.public_key if e else None

    def owner_key(self, device_id: str) -> bytes | None:
        """An owner's public key (who may sign removal records and the next roster)."""
        e = self.entry(device_id)
        return e.public_key if e is not None and e.role == OWNER else None

    def role_of(self, device_id: str) -> str | None:
        e = self.entry(device_id)
        return e.role if e else None

    def partner_key(self, device_id: str) -> bytes | None:
        """A storage partner's public key, if the owners name it as one of the account's."""
        e = next((e for e in self.partners if e.device_id == device_id), None)
        return e.public_key if e else None

    def lists_same(self, other: "Roster") -> bool:
        """True when both name the same devices, keys and roles, the same removals and the
        same recovery signer and partners."""
        return set(self.members) == set(other.members) and \
            set(self.removed) == set(other.removed) and \
            self.recovery_key == other.recovery_key and set(self.partners) == set(other.partners)

    def next_signer_key(self, id_for: Callable[[bytes], str]) -> Callable[[str], bytes | None]:
        """Who may sign the version after this one (device id -> its key, or None): an owner,
        or the recovery signer this one names."""
        recovery = id_for(self.recovery_key) if self.recovery_key else None

        def key_of(device: str) -> bytes | None:
            if recovery is not None and device == recovery:
                return self.recovery_key
            return self.owner_key(device)
        return key_of


def roster_of(m: Membership, seq: int, prev: bytes, time_ns: int) -> Roster:
    """The roster version `seq` that states membership `m` to partners."""
    return Roster(seq, prev, tuple(RosterEntry(x.device_id, x.public_key, x.role)
                                   for x in m.members if x.role in ROLES),
                  tuple(m.removed), time_ns, m.recovery_key,
                  tuple(RosterEntry(x.device_id, x.public_key, PARTNER)
                        for x in m.members if x.role == PARTNER))


def roster_name(seq: int) -> str:
    return f"{PREFIX}{seq:0{SEQ_DIGITS}d}"


def roster_hash(data: bytes | bytearray | memoryview) -> bytes:
    """The hash the next version names as `prev`."""
    return blake3.blake3(b"p2pbackup roster\x00" + bytes(data)).digest()


def roster_object(r: Roster, signer: str, sign: Callable[[bytes], bytes]) -> bytes:
    """The signed object for `r`, signed by device `signer`."""
    doc = {"v": VERSION, "seq": r.seq, "prev": r.prev, "time": r.time_ns,
           "members": [[e.device_id, e.public_key, e.role] for e in r.members],
           "removed": list(r.removed)}
    if r.recovery_key:
        doc["recovery"] = r.recovery_key
    if r.partners:
        doc["partners"] = [[e.device_id, e.public_key] for e in r.partners]
    body = msgpack.packb(doc, use_bin_type=True)
    return clear_object(Kind.ROSTER, Signed.make(ROSTER_SIG, body, signer, sign))


def read_roster(data: bytes | bytearray | memoryview, id_for: Callable[[bytes], str],
                what: str = "roster") -> tuple[Roster, Signed]:
    """Decode a roster object and check that it is self-consistent (ids, keys, roles); the
    signature is the caller's to check (`check_next`), against the version before it."""
    signed = open_clear(data, Kind.ROSTER, "roster", what)
    try:
        doc = msgpack.unpackb(signed.body, raw=False, max_array_len=MAX_DEVICES)
        if doc.get("v") != VERSION:
            raise ValueError(f"version {doc.get('v')!r}")
        members = []
        for row in doc["members"]:
            device, key, role = str(row[0]), bytes(row[1]), str(row[2])
            if role in ROLES:      # a role from a newer version: skipped
                members.append(RosterEntry(device, key, role))
        recovery = doc.get("recovery", b"")
        if not isinstance(recovery, bytes) or len(recovery) not in (0, 32):
            raise ValueError("a recovery key that is not one")
        partners = tuple(RosterEntry(str(row[0]), bytes(row[1]), PARTNER)
                         for row in doc.get("partners", []))
        r = Roster(int(doc["seq"]), bytes(doc["prev"]), tuple(members),
                   tuple(str(d) for d in doc.get("removed", [])), int(doc.get("time", 0)),
                   recovery, partners)
    except Exception as exc:  # untrusted bytes, signed or not
        raise IntegrityError(f"{what} is malformed ({str(exc)[:80]})") from None
    if r.seq < 1 or (r.seq == 1) != (r.prev == b""):
        raise IntegrityError(f"{what} has a malformed sequence number or chain link")
    for e in r.members + r.partners:
        if not is_device(e.device_id) or id_for(e.public_key) != e.device_id:
            raise IntegrityError(f"{what} lists device {e.device_id[:12]!r} with a key that is "
                                 "not its own")
    listed = [e.device_id for e in r.members + r.partners]
    if not all(is_device(d) for d in r.removed) or set(r.removed) & set(listed) or \
            len(set(listed)) != len(listed):
        raise IntegrityError(f"{what} lists a device twice, or a removed one as current")
    return r, signed


def check_next(current: Roster, current_hash: bytes, data: bytes | bytearray | memoryview,
               verify: Callable[[bytes, bytes, bytes], bool], id_for: Callable[[bytes], str],
               what: str = "roster") -> Roster:
    """The roster `data` holds if it may follow `current` (whose object hashes to
    `current_hash`): the next seq, naming `current`, signed by an owner of `current` or the
    recovery signer it names, never re-admitting a removed device. IntegrityError saying why
    not."""
    new, signed = read_roster(data, id_for, what)
    if new.seq != current.seq + 1:
        raise IntegrityError(f"{what} (version {new.seq}) does not follow version "
                             f"{current.seq}, the one held here")
    if new.prev != current_hash:
        raise IntegrityError(f"{what} (version {new.seq}) does not name version "
                             f"{current.seq} held here (a fork)")
    if set(current.removed) - set(new.removed):
        raise IntegrityError(f"{what} (version {new.seq}) re-admits a removed device")
    return _signed_by_owner(new, signed, current.next_signer_key(id_for), verify, what)


def check_signed(data: bytes | bytearray | memoryview, owner_key: Callable[[str], bytes | None],
                 verify: Callable[[bytes, bytes, bytes], bool], id_for: Callable[[bytes], str],
                 what: str = "roster") -> Roster:
    """A roster signed by a device `owner_key` names (a member device checks against its
    membership: an owner, or its recovery signer; a partner at pairing, against the roster
    itself)."""
    new, signed = read_roster(data, id_for, what)
    return _signed_by_owner(new, signed, owner_key, verify, what)


def _signed_by_owner(new: Roster, signed: Signed, owner_key: Callable[[str], bytes | None],
                     verify: Callable[[bytes, bytes, bytes], bool], what: str) -> Roster:
    check_owner_signed(signed, ROSTER_SIG, owner_key, verify, f"{what} (version {new.seq})")
    return new
