"""Keeping other accounts' ciphertext as their storage partner, within the quota granted.

A partner holds no key of the accounts it stores for. It advertises one mDNS service whose
tag field lists one tag per account (keyed by the tag key that account gave at pairing, so only
that account's devices recognise it), answers sessions from the owner devices named in each
grant, takes what they replicate and serves it back (`restore --from peer:PARTNER`). Without
keys it checks what it can: object names, content-addressed names (packs, snapshots), that an
object never changes (heads excepted: the owners check those when they read them back), and
the quota, which it reports to the owner in words.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import msgpack

from p2pbackup import ids, session
from p2pbackup.blobs import peer as peer_store
from p2pbackup.blobs.base import BlobStore
from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.blobs.quota import QuotaStore
from p2pbackup.config import Config
from p2pbackup.crypto.identity import DeviceIdentity, verify_signature
from p2pbackup.crypto.tags import TAG_PERIOD, discovery_tag
from p2pbackup.errors import IntegrityError, NotFound, P2PError
from p2pbackup.format.membership import OWNER, PARTNER, Member, Membership
from p2pbackup.format.pack import pack_name
from p2pbackup.format.removal import PREFIX as REMOVALS
from p2pbackup.format.removal import REMOVABLE, Removal, read_removal
from p2pbackup.peer_fetch import PEER_SERVICE, ice_for
from p2pbackup.protocol import fetch
from p2pbackup.protocol.framing import peek_type
from p2pbackup.protocol.sync import (Closed, Event, ObjectReceived, ObjectWanted, SyncSession)
from p2pbackup.repo import removals, replica
from p2pbackup.transport.datachannel import PeerLink

from .peers import connection_limits
from .replicate import flush

log = logging.getLogger("p2pbackupd")
GRANT_VERSION = 1


@dataclass(slots=True)
class Grant:
    """One account this device stores for."""

    account: str
    quota: int | None
    owners: dict[str, bytes]          # device id -> public key
    tag_key: bytes
    store: QuotaStore
    connected: set[str] = field(default_factory=set)
    last_error: str | None = None
    last_sync: float | None = None
    tombstones: set[str] = field(default_factory=set)

    seen: removals.FirstSeen = field(default_factory=lambda: removals.FirstSeen(None))

    async def refresh_removals(self) -> dict[str, Removal]:
        records = await removals.held(self.store, self.owners.get)
        self.tombstones = removals.tombstones(records)
        self.seen.since(records, time.time_ns())   # the grace period starts at receipt
        return records


def load_grants(home: Path) -> list[Grant]:
    """The grants in `home/partners` (one per account); damaged or newer ones are skipped."""
    out = []
    for path in sorted((home / "partners").glob("*.grant")):
        try:
            doc = msgpack.unpackb(path.read_bytes(), raw=False)
            if not isinstance(doc, dict) or doc.get("v") != GRANT_VERSION:
                log.warning("%s: a grant of another version; skipped (upgrade p2pbackup)", path)
                continue
            account = doc["account"]
            owners = {str(d): bytes(pk) for d, pk in doc.get("owners", [])}
            tag_key = bytes(doc.get("tag_key", b""))
        except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            log.warning("%s is damaged (%s); skipped", path, exc)
            continue
        if not ids.is_account(account) or path.name != f"{account}.grant":
            log.warning("%s names account %s, not its own file name; skipped", path,
                        ids.shown(account))
            continue
        if not tag_key:
            log.warning("the grant for account %s predates partner discovery; pair again to "
                        "be found on the LAN", account)
        store = QuotaStore(LocalDirStore(home / "partners" / account / "store"),
                           doc.get("quota"), owner=f"account {account}")
        seen = removals.FirstSeen(home / "partners" / account / removals.FIRST_SEEN)
        out.append(Grant(account, doc.get("quota"), owners, tag_key, store, seen=seen))
    return out


async def partner_accept(store: BlobStore, name: str, data: bytes,
                         owners: dict[str, bytes]) -> bool:
    """Store an object for an account without its keys; False if it was here already."""
    kind, m = replica.kind_of(name)
    if kind == "pack" and pack_name(data) != m.group(1) or \
            kind in ("snapshot", "removal") and blake3.blake3(data).hexdigest() != m.group(1):
        raise IntegrityError(f"{name[:60]}: its content does not match its name")
    if kind == "removal":  # signed in the clear: the one record a partner can check
        read_removal(data, owners.get, verify_signature, name)
    if kind != "head" and await store.has(name):
        if kind in ("pack", "snapshot") or await store.get(name) == data:
            return False
        raise IntegrityError(f"{name[:60]} differs from the copy already here (objects never "
                             "change)")
    await store.put(name, data)   # QuotaExceeded: said to the owner in words
    return True


class PartnerService:
    """Answers the owner devices of every grant: replication in, reads out."""

    def __init__(self, config: Config, identity: DeviceIdentity, grants: list[Grant]) -> None:
        self.config, self.identity, self.grants = config, identity, grants
        self.port = 0
        self._by_owner = {d: g for g in grants for d in g.owners}
        members = tuple(Member(d, pk, "", OWNER) for d, pk in
                        {d: pk for g in grants for d, pk in g.owners.items()}.items())
        # Who may open a session, in the shape the signaling checks expect.
        self._membership = Membership(1, b"", 0, members + (
            Member(identity.device_id, identity.public_key, "", PARTNER),))
        self._signaling: session.SignalingServer | None = None
        self._stack = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def me(self) -> str:
        return self.identity.device_id

    def _tags(self) -> str:
        now = time.time()
        return ",".join(discovery_tag(g.tag_key, self.me, now) for g in self.grants if g.tag_key)

    async def start(self) -> None:
        """Listen for sessions and advertise on the LAN (when the LAN is on)."""
        if not self.config.peers.lan or not self.grants:
            return
        from p2pbackup.discovery import mdns

        interfaces = list(self.config.peers.interfaces) or None
        host = "127.0.0.1" if interfaces == ["lo"] else "0.0.0.0"
        self._signaling = session.SignalingServer(
            self.identity, lambda: self._membership, self._incoming,
            ice=ice_for(self.config.peers), on_refused=lambda why: log.warning("%s", why),
            limits=connection_limits(self.config.peers))
        self.port = await self._signaling.start(host, 0)
        try:
            self._ad = await self._stack.enter_async_context(mdns.advertise(
                PEER_SERVICE, self.port, {"v": "1", "port": str(self.port), "tag": self._tags()},
                interfaces=interfaces))
        except (OSError, ValueError) as exc:
            log.warning("partner: LAN discovery is off: %s", exc)
            return
        self._tasks.append(asyncio.create_task(self._rotate()))
        self._tasks.append(asyncio.create_task(self._apply_removals()))
        log.info("storage partner for %d accounts, signaling on port %d", len(self.grants),
                 self.port)

    async def _rotate(self) -> None:
        window = int(time.time() // TAG_PERIOD)
        while True:
            await asyncio.sleep(2.0)
            if int(time.time() // TAG_PERIOD) != window:
                window = int(time.time() // TAG_PERIOD)
                with contextlib.suppress(Exception):
                    await self._ad.update_txt({"v": "1", "port": str(self.port),
                                               "tag": self._tags()})

    async def apply_removals(self, now_ns: int | None = None) -> int:
        """Delete what the owners removed, once the grace period has passed since this
        partner first held the record (all of it: a partner cannot tell which data is still
        used, the owners decided). Returns how many objects went."""
        total = 0
        for g in self.grants:
            try:
                gone = await removals.apply_due(g.store, await g.refresh_removals(),
                                                self.config.peers.removal_grace,
                                                kinds=REMOVABLE, seen=g.seen, now_ns=now_ns)
            except P2PError as exc:
                log.error("account %s: applying removals failed: %s", g.account, exc)
                continue
            if gone:
                log.info("account %s: deleted %d objects its owners removed", g.account,
                         len(gone))
            total += len(gone)
        return total

    async def _apply_removals(self) -> None:
        while True:
            await self.apply_removals()
            await asyncio.sleep(min(60.0, max(1.0, self.config.peers.removal_grace / 2)))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._signaling is not None:
            await self._signaling.close()
        with contextlib.suppress(Exception):
            await self._stack.aclose()

    def status(self) -> list[dict[str, Any]]:
        return [{"account": g.account, "quota": g.quota, "used": g.store.used_so_far,
                 "owners_connected": sorted(g.connected), "last_sync": g.last_sync,
                 "error": g.last_error} for g in self.grants]

    async def _incoming(self, device: str, link: PeerLink) -> None:
        grant = self._by_owner.get(device)
        try:
            first = await asyncio.wait_for(link.recv(), 30)
        except (P2PError, asyncio.TimeoutError):
            first = None
        if grant is None or first is None:
            await link.close()
            return
        grant.connected.add(device)
        try:
            if peek_type(first) == fetch.HELLO:
                async def read_only(name: str, data: bytes) -> None:
                    raise IntegrityError("a storage partner takes objects by replication only")

                why = await peer_store.serve(link, grant.store, self.me, first=first,
                                             put=read_only, read=replica.is_object_name)
                log.info("owner %s stopped reading account %s: %s", device[:12],
                         grant.account, why)
            else:
                await self._replicate(grant, device, link, first)
        except Exception:
            log.exception("session with %s (account %s) failed", device[:12], grant.account)
        finally:
            grant.connected.discard(device)
            with contextlib.suppress(Exception):
                await link.close()

    async def _replicate(self, grant: Grant, device: str, link: PeerLink, first: bytes) -> None:
        names = {n async for n in grant.store.list("") if replica.is_object_name(n)}
        sizes = {n: await grant.store.size(n) for n in names}
        await grant.store.used()
        await grant.refresh_removals()
        s = SyncSession(self.me, names, valid_name=replica.is_object_name, sizes=sizes,
                        wants=lambda name: name not in grant.tombstones)
        log.info("owner %s of account %s connected", device[:12], grant.account)
        msg: bytes | None = first
        while msg is not None and not s.closed:
            events: list[Event] = s.receive_data(msg)
            while events:
                for ev in events:
                    if isinstance(ev, ObjectWanted):
                        try:
                            s.send_object(ev.name, await grant.store.get(ev.name))
                        except NotFound:
                            s.missing(ev.name)
                    elif isinstance(ev, ObjectReceived):
                        try:
                            await partner_accept(grant.store, ev.name, ev.data, grant.owners)
                        except P2PError as exc:
                            if str(exc) != grant.last_error:
                                log.warning("account %s: refused %s: %s", grant.account,
                                            ev.name[:40], exc)
                            grant.last_error = str(exc)
                            s.reject(ev.name, str(exc))
                        else:
                            s.ack(ev.name)
                            grant.last_sync = time.time()
                            if ev.name.startswith(REMOVALS):
                                await grant.refresh_removals()
                    elif isinstance(ev, Closed):
                        log.warning("session with %s: %s", device[:12], ev.reason)
                await flush(s, link)
                events = s.next_wanted()
            await flush(s, link)
            msg = await link.recv()
