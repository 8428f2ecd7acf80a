"""Keeping other accounts' ciphertext as their storage partner, within the quota granted.

A partner holds no key of the accounts it stores for. It answers sessions from the devices
each account's roster lists, takes what they replicate and serves it back (`restore --from
peer:PARTNER`). How they find it (one mDNS advert with one tag, keyed by its own tag key, so
nobody learns how many accounts it stores for) and its signaling port are the daemon's
(daemon/partner.py); `StoragePartner` is what runs over the sessions it is handed.

Who may do what follows the account's roster (format/roster.py): the one from pairing, then
each next version an owner (or the recovery signer the roster names) signs, which reaches the
partner by replication like any object. Listed devices may connect, read and push; only
owners' removal records count; a device dropped from the roster is refused from then on, and
its open sessions are closed. The roster's recovery signer (a new device holding only the
recovery code, when every owner device may be gone) may read, and write the next roster
version, which makes that device an owner here.

What a partner checks without keys, for every object a device sends it:
- the name is exactly an object name (p2pbackup.ids);
- content-addressed names (packs, snapshots, removal records) match the content;
- a removal record is signed by an owner in the roster; a roster follows the one held (next
  version, naming it, signed by one of its owners or its recovery signer, re-admitting nobody
  removed), whoever brings it;
- names under a device id (segments/<id>/..., heads/<id>) are written by that device only,
  devices/<id> by that device or an owner, config, membership/ and keyring/ by owners only:
  their content is sealed, so who sent them is all the partner can check;
- a keyring is pushed by an owner, and is a whole signed keyring of the epoch its name says
  (or one of the old form, sealed whole). Its envelope is signed by that epoch's recovery
  signer, whose key is in the sealed membership only, so the partner does not check the
  signature: it relies on the roster's owners alone, who hold every root and so could write
  any keyring anyway, while a scoped member (holding record keys but no root) or a removed
  device is refused by who it is. Devices check the signature when they read a keyring back
  (repo/membership.py: replication against the membership, recovery against the code);
- objects never change, except a device's own head and log anchor (rewritten each time its
  prune folds more of its log), which only it replaces;
- the quota, which it reports to the device in words (rosters are kept in the grant file,
  outside the quota and the store: a full store must not keep a removed device's rights).
What it cannot check is what is sealed: whether a segment, device record, membership version
or keyring holds what its name says (owners check that when they read them back, as from any
store), and the order of heads and anchors, which is inside their sealed bodies: a device could
move its own head or anchor back here (only it can write them), and owners refuse one that
goes back when they read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from ..blobs import peer as peer_store
from ..blobs.quota import QuotaExceeded, QuotaStore
from ..crypto.identity import DeviceIdentity
from ..errors import NotFound, P2PError
from ..format.membership import OWNER, PARTNER, Member, Membership
from ..format.removal import PREFIX as REMOVALS
from ..ids import object_kind
from ..protocol.sync import Closed, Event, InventoryDone, ObjectReceived, ObjectWanted, SyncSession
from ..repo import replica
# The rules live in the repository layer, shared with the storage server (p2pbackup/server).
from ..repo.partner_store import (Grant, ServedStore, apply_removals, forget_grant,
                                  partner_accept, refusal)
from ..transport.link import MessageLink
from . import reads_store
from .driver import SessionDriver, refuse

log = logging.getLogger("p2pbackup.replication")

FIRST_FRAME_TIMEOUT = 30.0   # seconds a device has to say which protocol its session runs


class PackRoom:
    """What is left of a grant's quota for the packs one session asks for: a pack is asked for
    only while what is stored and what was asked for fit (one of unknown size, announced
    rather than listed, while some room is left; the quota still has the last word)."""

    def __init__(self, store: QuotaStore) -> None:
        self.store = store
        self.left = None if store.quota is None else store.quota - (store.used_so_far or 0)
        self.declined = 0     # bytes of the packs not asked for (1 for one of unknown size)

    def take(self, size: int | None) -> bool:
        """Whether a pack of `size` bytes (None: not known) fits; if it does, it is counted."""
        if self.left is None:
            return True
        if self.left <= 0 or (size or 0) > self.left:
            self.declined += size or 1
            return False
        self.left -= size or 0
        return True

    def refusal(self) -> QuotaExceeded | None:
        """Why packs were not asked for, in the words a put over the quota is refused with
        (None if none was left out)."""
        if not self.declined:
            return None
        return self.store.exceeded("packs", (self.store.used_so_far or 0) + self.declined)


class StoragePartner:
    """Answers the devices of every grant over the sessions it is handed: replication in,
    reads out."""

    def __init__(self, identity: DeviceIdentity, grants: list[Grant], *,
                 removal_grace: float) -> None:
        self.identity, self.grants = identity, grants
        self.removal_grace = removal_grace
        self._links: dict[str, set[MessageLink]] = {}
        self._follow_rosters()

    @property
    def me(self) -> str:
        return self.identity.device_id

    def _follow_rosters(self) -> None:
        """Who may open a session, in the shape the signaling checks expect."""
        self._by_device = {d: g for g in self.grants for d in g.devices()}
        self._recovering = {signer[0]: (g, signer[1]) for g in self.grants
                            if (signer := g.recovery_signer()) is not None}
        members = tuple(Member(d, pk, "", OWNER) for d, pk in
                        {d: pk for g in self.grants for d, pk in g.devices().items()}.items())
        removed = tuple({d for g in self.grants for d in g.removed()} - self._by_device.keys())
        self.membership = Membership(1, b"", 0, members + (
            Member(self.identity.device_id, self.identity.public_key, "", PARTNER),), removed)

    def admits(self, device: str) -> bool:
        """True if `device` may open a session here (some grant's roster lists it, or names
        it as its recovery signer)."""
        return device in self._by_device or device in self._recovering

    def recovery_signers(self) -> dict[str, bytes]:
        """The recovery signers the grants' rosters name (device id -> key): they may read."""
        return {d: key for d, (_, key) in self._recovering.items()}

    async def _roster_changed(self, grant: Grant) -> None:
        """A new roster for `grant`: refuse the devices it dropped, and end their sessions."""
        self._follow_rosters()
        for device, links in list(self._links.items()):
            if grant.role_of(device) is None and not self.admits(device):
                log.warning("account %s: device %s is no longer one of its devices; its "
                            "sessions are closed", grant.account, device[:12])
                for link in list(links):
                    with contextlib.suppress(Exception):
                        await link.close()

    def add_grants(self, grants: list[Grant]) -> list[Grant]:
        """Take the grants of accounts this partner does not hold yet (paired since it
        started); returns those taken."""
        known = {g.account for g in self.grants}
        new = [g for g in grants if g.account not in known]
        if new:
            self.grants.extend(new)
            self._follow_rosters()
        return new

    async def apply_removals(self, now_ns: int | None = None) -> int:
        """Delete what the owners removed, once the grace period has passed since this
        partner first held the record (all of it: a partner cannot tell which data is still
        used, the owners decided). Returns how many objects went."""
        return await apply_removals(self.grants, self.removal_grace, now_ns)

    def status(self) -> list[dict[str, Any]]:
        return [{"account": g.account, "quota": g.quota, "used": g.store.used_so_far,
                 "owners_connected": sorted(g.connected), "last_sync": g.last_sync,
                 "error": g.last_error} for g in self.grants]

    async def accept(self, grant: Grant, device: str, name: str, data: bytes) -> bool:
        """`partner_accept`, and what a new roster changes (who may connect)."""
        stored = await partner_accept(grant, device, name, data)
        if grant.deleted:
            await self._forget(grant, device)
            return stored
        if stored and name.startswith(REMOVALS):
            await grant.refresh_removals()
        if stored and object_kind(name) is not None and object_kind(name)[0] == "roster":
            await self._roster_changed(grant)
        return stored

    async def _forget(self, grant: Grant, bringer: str) -> None:
        """An owner deleted the account (an account-deletion record, checked by
        partner_accept): its devices are refused from now on, their sessions end (but the
        one of the device that brought the record, which is still to be answered: it leaves,
        and can do nothing meanwhile: refusal), and its grant and data go at once."""
        await forget_grant(grant)   # a failure keeps the grant: the owner sends it again
        if grant in self.grants:
            self.grants.remove(grant)
        self._follow_rosters()
        for device, links in list(self._links.items()):
            if not self.admits(device) and device != bringer:
                for link in list(links):
                    with contextlib.suppress(Exception):
                        await link.close()

    async def answer(self, device: str, link: MessageLink) -> None:
        """Run the session `device` opened over `link` (its first frame says whether it
        replicates or reads), until it ends."""
        self._links.setdefault(device, set()).add(link)
        try:
            await self._session(device, link)
        finally:
            self._links[device].discard(link)
            if not self._links[device]:
                del self._links[device]

    async def _session(self, device: str, link: MessageLink) -> None:
        try:
            first = await asyncio.wait_for(link.recv(), FIRST_FRAME_TIMEOUT)
        except (P2PError, asyncio.TimeoutError):
            first = None
        # (the roster may have changed meanwhile)
        grant = self._by_device.get(device) or self._recovering.get(device, (None,))[0]
        reads = first is not None and reads_store(first)
        if grant is None or first is None or device not in self._by_device and not reads:
            await link.close()   # (the recovery signer reads, and brings the next roster)
            return
        grant.connected.add(device)
        try:
            if reads:
                async def put(name: str, data: bytes) -> None:
                    await self.accept(grant, device, name, data)

                why = await peer_store.serve(link, ServedStore(grant), self.me, first=first,
                                             put=put, read=replica.is_object_name)
                log.info("%s stopped reading account %s: %s", f"device {device[:12]}"
                         if device in self._by_device else "a device holding the recovery "
                         "code", grant.account, why)
            else:
                await self._replicate(grant, device, link, first)
        except Exception:
            log.exception("session with %s (account %s) failed", device[:12], grant.account)
        finally:
            grant.connected.discard(device)
            with contextlib.suppress(Exception):
                await link.close()

    async def _replicate(self, grant: Grant, device: str, link: MessageLink, first: bytes
                         ) -> None:
        names = {n async for n in grant.store.list("") if replica.is_object_name(n)}
        sizes = {n: await grant.store.size(n) for n in names}
        await grant.store.used()
        await grant.refresh_removals()
        room = PackRoom(grant.store)

        def wants(name: str) -> bool:
            # Ask only for what this device may write here, and packs only while they fit:
            # nothing is fetched to be refused (the device would send each, every session).
            return name not in grant.tombstones and refusal(grant, device, name) is None \
                and (not name.startswith("packs/") or room.take(s.offered_size(name)))

        s = SyncSession(self.me, names, valid_name=replica.is_object_name, sizes=sizes,
                        wants=wants)
        log.info("device %s of account %s connected", device[:12], grant.account)

        async def on_event(ev: Event) -> None:
            if isinstance(ev, ObjectWanted):
                try:
                    s.send_object(ev.name, await grant.store.get(ev.name))
                except NotFound:
                    s.missing(ev.name)
            elif isinstance(ev, ObjectReceived):
                try:
                    await self.accept(grant, device, ev.name, ev.data)
                except P2PError as exc:
                    if str(exc) != grant.last_error:
                        log.warning("account %s: refused %s from %s: %s", grant.account,
                                    ev.name[:40], device[:12], exc)
                    grant.last_error = str(exc)
                    refuse(s, ev.name, exc)
                else:
                    s.ack(ev.name)
                    grant.last_sync = time.time()
            elif isinstance(ev, InventoryDone) and (full := room.refusal()) is not None:
                # Said once, in words (the device's status shows it), rather than by
                # refusing every pack it would send.
                if str(full) != grant.last_error:
                    log.warning("account %s: %s", grant.account, full)
                grant.last_error = str(full)
                s.notice(str(full))
            elif isinstance(ev, Closed):
                log.warning("session with %s: %s", device[:12], ev.reason)

        await SessionDriver(s, link, on_event).run(first)
