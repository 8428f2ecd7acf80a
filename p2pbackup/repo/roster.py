"""The roster chain in an account's store (format/roster.py): written by owners, replicated
like any object, read by storage partners.

An owner device writes the next version whenever what it would state differs from the newest
one held (a device joined or was removed; a partner is paired), signed by itself; a device
that is not an owner of that newest version leaves it to one that is (partners would refuse
it). A device recovering the account signs one with the recovery signer, which the newest
version names. Member devices take a version from a peer if an owner of their membership or
its recovery signer signed it and it follows the version before it, when they hold that one.
Two owners changing the devices at once fork the roster as they fork the membership: the
version a partner got first stands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..blobs.base import BlobStore
from ..crypto.identity import DeviceIdentity, device_id_for, verify_signature
from ..errors import IntegrityError, NotFound
from ..format.membership import OWNER, Membership
from ..format.roster import (PREFIX, Roster, check_next, check_signed, read_roster, roster_hash,
                             roster_name, roster_object, roster_of)
from ..ids import object_kind
from .removals import owner_keys

log = logging.getLogger("p2pbackup.roster")


async def newest(store: BlobStore) -> tuple[Roster, bytes] | None:
    """The newest roster version in `store` and its object, or None if it holds none."""
    names = sorted([n async for n in store.list(PREFIX) if object_kind(n)])
    for name in reversed(names):
        try:
            raw = bytes(await store.get(name))
            return read_roster(raw, device_id_for, name)[0], raw
        except (IntegrityError, NotFound) as exc:
            log.warning("%s ignored: %s", name, exc)
    return None


def following(got: tuple[Roster, bytes] | None, signer: DeviceIdentity, m: Membership,
              time_ns: int | None = None) -> tuple[str, bytes] | None:
    """The roster version (name, object) that states membership `m` after `got` (the newest
    held, as `newest` gives it), signed by `signer`; None when `got` states it already or
    `signer` may not sign the version after it (only an owner starts the chain)."""
    now = time.time_ns() if time_ns is None else time_ns
    me = signer.device_id
    if got is None:
        mine = m.member(me)
        if mine is None or mine.role != OWNER:
            return None
        r = roster_of(m, 1, b"", now)
    else:
        current, raw = got
        r = roster_of(m, current.seq + 1, roster_hash(raw), now)
        if r.lists_same(current):
            return None
        if current.next_signer_key(device_id_for)(me) is None:
            log.warning("the account's devices changed, but this device is not an owner in "
                        "roster %d: an owner device must tell the storage partners", current.seq)
            return None
    return roster_name(r.seq), roster_object(r, me, signer.sign)


async def publish(store: BlobStore, identity: DeviceIdentity, m: Membership) -> str | None:
    """Store the roster version stating membership `m` if the newest one differs; returns its
    name, or None when nothing was written (up to date, or this device may not sign it)."""
    made = following(await newest(store), identity, m)
    if made is None:
        return None
    await store.put(*made)
    return made[0]


def signer_keys(m: Membership | None) -> Callable[[str], bytes | None]:
    """Who may sign a roster, as a member device sees it: an owner of its membership, or its
    recovery signer (a device recovering the account signs its first version)."""
    owners = owner_keys(m)
    recovery = m.recovery_key if m is not None else b""
    recovery_id = device_id_for(recovery) if recovery else None
    return lambda device: recovery if device == recovery_id else owners(device)


async def check_incoming(store: BlobStore, name: str, data: bytes, m: Membership | None) -> None:
    """A member device's check of a roster a peer sends (IntegrityError if it fails): signed
    by an owner of its membership or its recovery signer, stored under its own seq, and
    following the version before it when that one is held here."""
    what = f"{name} from a peer"
    r = check_signed(data, signer_keys(m), verify_signature, device_id_for, what)
    if roster_name(r.seq) != name:
        raise IntegrityError(f"{what} is stored under the wrong name")
    if r.seq == 1:
        return
    try:
        before = bytes(await store.get(roster_name(r.seq - 1)))
    except NotFound:
        return
    check_next(read_roster(before, device_id_for)[0], roster_hash(before), data,
               verify_signature, device_id_for, what)
