"""An account's store as a storage partner keeps it: the grant, who may write what, and the
checks a keeper without keys makes on every object (no read of anything sealed).

Both kinds of storage partner use these, so that each rule has one copy: a friend's device
(replication/partner.py, objects arriving by replication) and the storage server
(p2pbackup/server, objects arriving by signed HTTP requests). What a partner checks and why
is in replication/partner.py's docstring and docs/THREAT_MODEL.md.
"""

from __future__ import annotations

import logging

import contextlib
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from .. import grants as grant_files
from ..blobs.base import BlobStore, Buffer
from ..blobs import open_store
from ..blobs.quota import QuotaStore
from ..crypto.identity import device_id_for, verify_signature
from ..errors import IntegrityError, NameMismatch, ObjectChanged, P2PError
from ..format.membership import MEMBER, OWNER, keyring_envelope
from ..format.pack import pack_name
from ..format.removal import REMOVABLE, Removal, read_removal
from ..format.roster import Roster, check_next, read_roster, roster_hash, roster_name
from ..ids import object_kind
from . import removals
from .replica import kind_of

log = logging.getLogger("p2pbackup.partner")


@dataclass(slots=True)
class Grant:
    """One account this device stores for, and who may use it (its roster)."""

    home: Path
    file: grant_files.GrantFile
    roster: Roster | None               # None: a grant from before rosters (see `legacy`)
    store: QuotaStore
    seen: removals.FirstSeen
    legacy: dict[str, bytes] = field(default_factory=dict)
    connected: set[str] = field(default_factory=set)
    last_error: str | None = None
    last_sync: float | None = None
    tombstones: set[str] = field(default_factory=set)
    deleted: bool = False               # an owner deleted the account: forget_grant it

    @property
    def account(self) -> str:
        return self.file.account

    @property
    def quota(self) -> int | None:
        return self.file.quota

    def devices(self) -> dict[str, bytes]:
        """Device id -> public key of every device that may connect, read and push."""
        if self.roster is None:
            return dict(self.legacy)
        return {e.device_id: e.public_key for e in self.roster.members}

    def role_of(self, device: str) -> str | None:
        if self.roster is None:   # no roles known: nobody may remove, owners' names stay
            return MEMBER if device in self.legacy else None
        return self.roster.role_of(device)

    def owner_key(self, device: str) -> bytes | None:
        """Who may sign removal records now: the roster's owners (never scoped members)."""
        return self.roster.owner_key(device) if self.roster is not None else None

    def removed(self) -> tuple[str, ...]:
        return self.roster.removed if self.roster is not None else ()

    def recovery_signer(self) -> tuple[str, bytes] | None:
        """(device id, key) of the recovery signer the roster names, who may read here."""
        if self.roster is None or not self.roster.recovery_key:
            return None
        return device_id_for(self.roster.recovery_key), self.roster.recovery_key

    async def refresh_removals(self) -> dict[str, Removal]:
        """The removal records that count here (signed by an owner of the roster in force
        when this partner first held them: the grace period starts then too)."""
        records = await removals.held(self.store, self.owner_key, self.seen)
        self.tombstones = removals.tombstones(records)
        return records

    async def apply_removals(self, grace_seconds: float, now_ns: int | None = None
                             ) -> list[str]:
        """Delete what the owners removed, once the grace period has passed since this
        partner first held the record (all of it: a partner cannot tell which data is still
        used, the owners decided). Returns the names deleted."""
        return await removals.apply_due(self.store, await self.refresh_removals(),
                                        grace_seconds, kinds=REMOVABLE, seen=self.seen,
                                        now_ns=now_ns)

    def take_roster(self, name: str, data: bytes) -> Roster:
        """Check the next roster version against the one held, keep it (in the grant file
        too: it is what this partner trusts from now on) and return it."""
        if self.roster is None:
            raise IntegrityError("this grant predates rosters: pair this partner again to "
                                 "follow the account's devices")
        new = check_next(self.roster, roster_hash(self.file.roster), data, verify_signature,
                         device_id_for, name)
        if roster_name(new.seq) != name:
            raise IntegrityError(f"{name} holds roster version {new.seq}: the wrong name")
        self.file.roster = bytes(data)
        self.file.owners = [(e.device_id, e.public_key) for e in new.members]
        grant_files.write_grant(self.home, self.file)
        self.roster = new
        return new


class ServedStore(BlobStore):
    """A grant's store as its devices read it: the objects, and the newest roster (kept in
    the grant file, outside the store and its quota), so that a device recovering the account
    can sign the version after it. Writes go through `StoragePartner.accept`, not here."""

    def __init__(self, grant: Grant) -> None:
        self.grant, self.location = grant, grant.store.location

    def _roster(self, name: str) -> bytes | None:
        r = self.grant.roster
        if r is None or self.grant.deleted or name != roster_name(r.seq):
            return None
        return self.grant.file.roster

    async def get(self, name: str) -> bytes:
        raw = self._roster(name)
        return raw if raw is not None else await self.grant.store.get(name)

    async def get_range(self, name: str, offset: int, length: int) -> bytes:
        raw = self._roster(name)
        if raw is None:
            return await self.grant.store.get_range(name, offset, length)
        start = offset if offset >= 0 else max(0, len(raw) + offset)
        return raw[start:start + length]

    async def has(self, name: str) -> bool:
        return self._roster(name) is not None or await self.grant.store.has(name)

    async def size(self, name: str) -> int:
        raw = self._roster(name)
        return len(raw) if raw is not None else await self.grant.store.size(name)

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        async for name in self.grant.store.list(prefix):
            yield name
        newest = roster_name(self.grant.roster.seq) if self.grant.roster is not None else ""
        if newest.startswith(prefix) and self._roster(newest) is not None:
            yield newest

    async def put(self, name: str, data: Buffer) -> None:
        raise IntegrityError("a storage partner stores what its devices send through its "
                             "checks only")

    async def delete(self, name: str) -> None:
        raise IntegrityError("objects at a storage partner are deleted by removal records only")


def _check_account_deletion(grant: Grant, r: Removal, name: str) -> None:
    """IntegrityError unless `r` (signed by an owner the roster names now) deletes this very
    account, and was made after this grant: a recorded deletion neither deletes another
    account the owner's key belongs to, nor the account paired here again later."""
    if r.account != grant.account:
        raise IntegrityError(f"{name[:60]}: deletes account {r.account}, not {grant.account}")
    if r.time_ns <= grant_files.since_ns(grant.file):
        raise IntegrityError(f"{name[:60]}: deletes account {grant.account} as it was before "
                             "this grant was made (a recorded deletion, replayed)")


async def forget_grant(grant: Grant) -> int:
    """Delete everything held of `grant`'s account, then its grant and notes (the owner
    deleted the account); how many objects went. The grant file goes last, so a failure
    part-way leaves the grant as it was (not `deleted`: writes are taken again) and the next
    account deletion finishes the work."""
    try:
        names = [n async for n in grant.store.list("")]
        for n in names:
            await grant.store.delete(n)
        grant_files.remove_grant(grant.home, grant.account)
    except BaseException:
        grant.deleted = False
        raise
    await grant.store.close()
    log.info("account %s deleted by its owner: %d objects and the grant are gone",
             grant.account, len(names))
    return len(names)


async def apply_removals(grants: Iterable[Grant], grace_seconds: float,
                        now_ns: int | None = None,
                        lock_of: Callable[[Grant], contextlib.AbstractAsyncContextManager[Any]]
                        | None = None) -> int:
    """`Grant.apply_removals` for each grant (under `lock_of(grant)`, if given: the storage
    server's writes of that account wait meanwhile), each failure logged; how many objects
    went in all."""
    total = 0
    for g in list(grants):
        async with (lock_of(g) if lock_of is not None else contextlib.nullcontext()):
            try:
                gone = await g.apply_removals(grace_seconds, now_ns)
            except P2PError as exc:
                log.error("account %s: applying removals failed: %s", g.account, exc)
                continue
        if gone:
            log.info("account %s: deleted %d objects its owners removed", g.account, len(gone))
        total += len(gone)
    return total


def load_grants(home: Path, store_for: Callable[[str, Path], BlobStore] | None = None,
                skip: Collection[str] = ()) -> list[Grant]:
    """The grants in `home/partners` (one per account); damaged or newer ones are skipped,
    and those of the accounts in `skip` (held already).

    `store_for(account, account_dir)` opens an account's store (default: a directory
    `store/` in its account folder; the storage server may keep objects elsewhere)."""
    out = []
    for g in grant_files.read_grants(home):
        if g.account in skip:
            continue
        roster, legacy = None, {}
        if g.roster:
            try:
                roster = read_roster(g.roster, device_id_for, f"the roster of account "
                                                              f"{g.account}")[0]
            except IntegrityError as exc:
                log.warning("%s; grant skipped (pair again)", exc)
                continue
        else:
            legacy = {d: k for d, k in g.owners if device_id_for(k) == d}
            log.warning("the grant for account %s predates rosters: its devices may store "
                        "and read, none may remove, and this partner is not found on the LAN; "
                        "pair again", g.account)
        out.append(open_grant(home, g, roster, legacy, store_for))
    return out


def open_grant(home: Path, g: grant_files.GrantFile, roster: Roster | None,
               legacy: dict[str, bytes] | None = None,
               store_for: Callable[[str, Path], BlobStore] | None = None) -> Grant:
    """The Grant of file `g`: its store (within its quota) and its removal notes."""
    where = grant_files.account_dir(home, g.account)
    inner = store_for(g.account, where) if store_for is not None else \
        open_store(str(where / "store"))
    store = QuotaStore(inner, g.quota, owner=f"account {g.account}")
    return Grant(home, g, roster, store, removals.FirstSeen(where / removals.FIRST_SEEN),
                 legacy or {})


def refusal(grant: Grant, device: str, name: str) -> str | None:
    """Why `device` may not write `name` into `grant`'s store, or None if it may."""
    if grant.deleted:   # a session still open when its owner deleted the account
        return f"account {grant.account} was deleted by its owner"
    got = object_kind(name)
    if got is None:
        return "not an object name"
    kind, m = got
    if kind == "roster":   # checked by its signature (take_roster), whoever brings it
        if grant.roster is not None and int(m.group(1)) <= grant.roster.seq:
            return f"an older roster than version {grant.roster.seq}, held here"
        return None
    role = grant.role_of(device)
    if role is None:
        return f"device {device[:12]} is not a device of account {grant.account} (any more)"
    return role_refusal(role, device, name)


def role_refusal(role: str, device: str, name: str) -> str | None:
    """Why a device of the account with `role` may not write object `name` to a partner
    (or the storage server), or None if it may: the log and head only under its own id, a
    device record its own (an owner: any), the config, membership and keyring an owner.
    (Rosters are checked by their signature, whoever brings them.)"""
    got = object_kind(name)
    if got is None:
        return "not an object name"
    kind, m = got
    if kind in ("segment", "anchor", "head") and m.group(1) != device:
        return f"only device {m.group(1)[:12]} writes {kind}s under its id"
    if kind == "device" and m.group(1) != device and role != OWNER:
        return "only that device or an owner writes a device record"
    if kind in ("config", "membership", "keyring") and role != OWNER:
        return f"only an owner device writes the {kind}"
    return None


async def partner_accept(grant: Grant, device: str, name: str, data: bytes) -> bool:
    """Store an object `device` sent for `grant`'s account, after the checks a partner can
    make without keys (module docstring); False if it was here already."""
    why = refusal(grant, device, name)
    if why is not None:
        raise IntegrityError(f"{name[:60]}: {why}")
    kind, m = kind_of(name)
    store = grant.store
    if kind == "pack" and pack_name(data) != m.group(1) or \
            kind in ("snapshot", "removal") and blake3.blake3(data).hexdigest() != m.group(1):
        raise NameMismatch(f"{name[:60]}: its content does not match its name")
    if kind == "removal":  # signed in the clear: checked against the roster's owners
        r = read_removal(data, grant.owner_key, verify_signature, name)
        if r.account:      # not stored: the caller forgets the whole grant (forget_grant)
            _check_account_deletion(grant, r, name)
            grant.deleted = True
            return True
    if kind == "keyring":  # an owner's (refusal); its signer is for devices to check
        keyring_envelope(data, int(m.group(1)), name)
    if kind == "roster":   # kept in the grant, outside the quota: a full store must not
        grant.take_roster(name, data)   # keep a removed device's rights
        return True
    if kind not in ("head", "anchor") and await store.has(name):
        if kind in ("pack", "snapshot") or await store.get(name) == data:
            return False
        raise ObjectChanged(f"{name[:60]} differs from the copy already here (objects never "
                            "change)")
    await store.put(name, data)   # QuotaExceeded: said to the device in words
    return True


