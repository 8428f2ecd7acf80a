"""A member's side of replication: the sync protocol between this store and each peer's.

`Replicator.run` takes a session's control link (whatever carries it: the data channel on the
LAN, a relayed link elsewhere), `Replicator.use_lane` a bulk lane for it; each session runs on
a `driver.SessionDriver`. Every object the peer sends is checked by `repo.replica.accept`
before it is stored (a hostile peer plants nothing); what we seal is announced at once, so
peers pull it within a second instead of polling. Damaged packs of ours are checked and asked
for again from the peers; reads of this store by a member (`serve`) run here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from .. import activity
from ..blobs import peer as peer_store
from ..blobs.local import join_for_direct_write
from ..errors import IntegrityError, NotFound, P2PError
from ..format.removal import PREFIX, Removal
from ..protocol.sync import (MISMATCH, Closed, Event, LaneOffered, ObjectAcked, ObjectReceived,
                             ObjectRejected, ObjectWanted, PeerNotice, SyncSession)
from ..repo import intake, removals, replica
from ..repo import membership as store_membership
from ..repo.intake import PackIntake
from ..transport.link import BulkLane, MessageLink
from ..transport.pending import ConnectionLimits
from ..transport.tls_lane import LaneIdentity, LaneLink, LaneServer, _normalize, connect_lane
from .driver import LANE_PIECE, SessionDriver, refuse

log = logging.getLogger("p2pbackup.replication")


class PeerStatus(Protocol):
    """What a session reports about its peer as it goes (the daemon's `status` shows it;
    daemon/peers.py `PeerState` is one)."""

    device: str
    addresses: list[str]             # where its direct lane may be dialled
    path: str | None                 # "data channel" or "direct lane"
    ice_path: str | None             # the data channel's route: "host", "reflexive", "relay"
    last_sync: float | None
    objects_behind: int | None
    bytes_behind: int | None
    held_objects: int | None         # what the peer holds of ours (a partner's share)
    held_bytes: int | None
    error: str | None


def lane_may_reach(st: PeerStatus) -> bool:
    """Whether a direct lane with `st`'s device may come up. It dials the addresses the peer
    has on our network, which a data channel relayed or hole punched across NATs says it does
    not have: both sides waited LANE_WAIT for it there, 2 s of every WAN session. (An unknown
    route, e.g. a test's link, may still be the LAN.)"""
    return st.ice_path in (None, "host")


class WriteGate(Protocol):
    """What objects from peers pass through before they are stored (a daemon's pause closes
    it: they wait, they are not refused)."""

    def passing(self) -> AbstractAsyncContextManager[None]: ...


class OpenGate:
    """A gate that never closes (nothing pauses the writers)."""

    @contextlib.asynccontextmanager
    async def passing(self) -> AsyncIterator[None]:
        yield


PACK_INTAKE = 3              # packs handed to the 2 pack workers at once: one waits its turn
WINDOW = 80 * 1024 * 1024    # unacknowledged bytes in flight: packs arriving, queued, checked
# (A/B of 4 runs each, bench/bench_replication.py (c): 2 packs / 48 MiB gave 133-173 MB/s,
# median 149; 3 / 80 MiB 172-187, median 182; 4 / 128 MiB no better, and more memory.)
STALL = 30.0                 # default seconds without a byte from a peer we wait on: ask again
LANE_WAIT = 2.0              # seconds objects wait for a direct lane both sides offered
RETRY = 5.0                  # seconds before a pack we could not store is asked for again
RETRY_MAX = 600.0            # (the delay grows fourfold each time, up to this)


class Replicator:
    """Runs sessions and fans announcements out to every open one."""

    def __init__(self, repo, me: str, *, direct_lane: bool = False,
                 stall: float = STALL, retry: float = RETRY,
                 connection_limits: ConnectionLimits = ConnectionLimits(),
                 gate: WriteGate | None = None,
                 seen: removals.FirstSeen | None = None) -> None:
        self.repo, self.me = repo, me
        # When this device first held each removal record, and who signed it then.
        self.seen = seen or removals.FirstSeen(None)
        self.connection_limits = connection_limits
        self.gate = gate or OpenGate()  # objects wait at it while the daemon is paused
        self.stall = stall
        self.retry = retry
        self._retries: dict[str, float] = {}   # pack -> delay before asking for it again
        self.sessions: dict[str, SessionDriver] = {}
        self.direct_lane = direct_lane
        self.lane_identity: LaneIdentity | None = None
        self.lane_server: LaneServer | None = None
        self.lane_port = 0
        self._lane_peers: dict[str, str] = {}   # expected fingerprint -> device
        self._fetch_lanes: dict[str, str] = {}  # fingerprint -> device reading this store
        self._reading: dict[str, set[MessageLink]] = {}   # device -> its read sessions
        self._states: dict[str, PeerStatus] = {}
        self.on_membership: Callable[[], Awaitable[None]] | None = None
        # Called when an object from a peer was stored (the configured stores get it too).
        self.on_stored: Callable[[], None] | None = None
        # Called when a pack here was found damaged (the daemon's log must store again the
        # blobs that left the index).
        self.on_damage: Callable[[], Awaitable[None]] | None = None
        self._checking: set[str] = set()   # packs being checked for damage
        # Said by a peer not to match its name, yet intact (a peer that lies, or a copy
        # damaged on the way): each pack is read for that at most once per run, one at a time.
        self._refused_ok: set[str] = set()
        self._check_turn = asyncio.Semaphore(1)
        self.tombstones: set[str] = set()   # removed by an owner: never fetched again
        self._intake = asyncio.Semaphore(PACK_INTAKE)
        self._packs_in: dict[str, set[asyncio.Task[None]]] = {}   # per peer, being taken in
        self._unsynced = False      # packs written without fsync since the last store sync
        self._background: set[asyncio.Task[None]] = set()
        # Packs are checked and written by worker processes, out of this one's GIL.
        self.pack_workers = PackIntake(repo.store.root) \
            if repo.store.capabilities.local_disk and intake.available() else None
        activity.ACTIVITIES.follow(self, lambda r: activity.sessions(
            {device: drv.session for device, drv in r.sessions.items()}))

    def _join_object(self, name: str, parts: list, total: int) -> bytes | memoryview:
        # A pack goes to a worker in shared memory, or is written once and not read soon (an
        # aligned buffer lets the store skip the page cache). Small records stay bytes (they
        # are parsed, compared and hashed here).
        if not name.startswith("packs/"):
            return b"".join(parts)
        if self.pack_workers is not None:
            return self.pack_workers.join(parts, total)
        return join_for_direct_write(parts, total)

    async def refresh_removals(self) -> dict[str, Removal]:
        """Re-read the removal records held here; returns those that count (signed by an owner
        of the membership in force when this device first held them)."""
        got = await store_membership.load(self.repo)
        records = await removals.held(self.repo.store,
                                      removals.owner_keys(got[0] if got else None), self.seen)
        self.tombstones = removals.tombstones(records)
        return records

    async def _accepted(self, name: str) -> None:
        """A new object from a peer is stored: a new membership changes who may connect."""
        if self.on_stored is not None:
            self.on_stored()
        if name.startswith("membership/") and self.on_membership is not None:
            await self.on_membership()
        if name.startswith(PREFIX):
            await self.refresh_removals()

    async def start_lane(self, host: str = "0.0.0.0") -> None:
        """Listen for direct lanes (TLS 1.3, certificates pinned inside the sessions)."""
        if not self.direct_lane:
            return
        self.lane_identity = LaneIdentity.generate()
        self.lane_server = LaneServer(self.lane_identity, self._lane_accepted,
                                      on_refused=lambda e: log.warning("direct lane: %s", e),
                                      limits=self.connection_limits)
        self.lane_port = (await self.lane_server.start(host, 0))[1]

    async def close(self) -> None:
        if self.lane_server is not None:
            await self.lane_server.close()
        if self.pack_workers is not None:
            await self.pack_workers.close()

    async def _lane_accepted(self, lane: LaneLink) -> None:
        reader = self._fetch_lanes.pop(_normalize(lane.peer_fingerprint), None)
        if reader is not None:   # a member reading this store asked for it (see `serve`)
            if self.lane_server is not None:
                self.lane_server.forget(lane.peer_fingerprint)   # one lane per request
            await self.serve(reader, lane, on_lane=True)
            return
        device = self._lane_peers.get(_normalize(lane.peer_fingerprint))
        if device is None or device not in self.sessions:
            return
        await self.use_lane(device, lane)

    async def _dial_lane(self, device: str, fp: str, port: int) -> None:
        st = self._states.get(device)
        assert self.lane_identity is not None
        for addr in (st.addresses if st else []):
            try:
                lane = await connect_lane(addr, port, fp, self.lane_identity)
            except P2PError as exc:
                log.warning("direct lane to %s at %s failed: %s; staying on the data channel",
                            device[:12], addr, exc)
                continue
            try:
                await self.use_lane(device, lane)
            finally:
                await lane.close()
            return
        await self._no_lane(device)

    async def _lane_deadline(self, device: str, s: SyncSession) -> None:
        await asyncio.sleep(LANE_WAIT)
        await self._no_lane(device, f"no direct lane within {LANE_WAIT:g} s", s)

    async def _no_lane(self, device: str, why: str = "", session: SyncSession | None = None
                       ) -> None:
        """The direct lane did not come up: what waited for it goes over the data channel."""
        drv = self.sessions.get(device)
        if drv is None or device not in self._states or drv.session.bulk_up \
                or drv.session.closed or session is not None and drv.session is not session:
            return
        if why:
            log.info("peer %s: %s; sending over the data channel", device[:12], why)
        try:
            await drv.lane_down()
        except P2PError:
            pass   # the session is ending; its loop says why

    async def use_lane(self, device: str, lane: BulkLane) -> None:
        """Carry the bulk of `device`'s open session over `lane` until it drops, then go
        back to the session's control link. The caller closes `lane`."""
        drv = self.sessions.get(device)
        st = self._states.get(device)
        if drv is None or st is None:
            return
        st.path = "direct lane"
        log.info("peer %s: bulk moved to the direct lane", device[:12])
        try:
            await drv.run_lane(lane)
        except P2PError as exc:
            log.warning("direct lane with %s dropped: %s", device[:12], exc)
        finally:
            if not drv.session.closed and device in self.sessions:
                st.path = "data channel"
                log.info("peer %s: back on the data channel", device[:12])
                await drv.lane_down()

    async def close_unless(self, allowed: Callable[[str], bool]) -> None:
        """Close at once every session, direct lane and read of a device no longer `allowed`
        (the membership changed: it was removed), with one log line per device."""
        devices = set(self.sessions) | set(self._reading)
        for device in sorted(d for d in devices if not allowed(d)):
            closing: list[MessageLink] = []
            what: list[str] = []
            if (drv := self.sessions.get(device)) is not None:
                drv.session.close("this device was removed from the account")
                with contextlib.suppress(P2PError):
                    await drv.send()   # it hears why, if it still listens
                closing.append(drv.control)
                what.append("session")
                if (lane := drv.lane) is not None:
                    closing.append(lane)
                    what.append("direct lane")
            if reads := self._reading.pop(device, set()):
                closing += reads
                what.append(f"{len(reads)} reading sessions")
            for fp in [fp for fp, d in [*self._lane_peers.items(), *self._fetch_lanes.items()]
                       if d == device]:   # and it opens no new lane
                self._lane_peers.pop(fp, None)
                self._fetch_lanes.pop(fp, None)
                if self.lane_server is not None:
                    self.lane_server.forget(fp)
            await asyncio.gather(*(c.close() for c in closing), return_exceptions=True)
            log.warning("device %s is no longer in the account: closed its %s", device[:12],
                        ", ".join(what))

    async def announce_new(self) -> None:
        """Tell every open session what this store holds that it has not been told of."""
        if not self.sessions:
            return
        names = await replica.offered_names(self.repo)
        for drv in list(self.sessions.values()):
            s = drv.session
            new = sorted(names - s.have, key=replica.transfer_order)
            head = f"heads/{self.me}"
            if head in names and head not in new:
                new.append(head)  # heads change in place
            if new:
                s.announce(new)
                await drv.send()

    async def run(self, device: str, link: MessageLink, st: PeerStatus,
                  first: bytes | None = None) -> None:
        """One session with `device` over `link` (its control link), until either side closes
        it (`first`: a message already read from it). `st` follows its progress."""
        names = await replica.offered_names(self.repo)
        sizes = {n: await self.repo.store.size(n) for n in names}
        s = SyncSession(self.me, names, valid_name=replica.is_object_name, sizes=sizes,
                        wants=lambda name: name not in self.tombstones, window=WINDOW,
                        join=self._join_object)

        def progress() -> None:
            st.objects_behind, st.bytes_behind = s.pending, s.bytes_behind
            st.held_objects, st.held_bytes = s.peer_holds, s.peer_holds_bytes

        drv = SessionDriver(s, link, lambda ev: self._on_event(drv, st, ev), on_send=progress)
        self._packs_in[device] = set()
        self.sessions[device] = drv
        self._states[device] = st
        if self.lane_server is not None and lane_may_reach(st):
            s.offer_lane(self.lane_server.fingerprint, self.lane_port)
        watch = asyncio.get_running_loop().create_task(self._watch(drv, device))
        try:
            await drv.run(first)
        finally:
            watch.cancel()
            await self._settle(device)
            self._packs_in.pop(device, None)
            self.sessions.pop(device, None)
            self._states.pop(device, None)
            if drv.lane is not None:
                await drv.lane.close()

    async def _watch(self, drv: SessionDriver, device: str) -> None:
        """Ask again for what we wait on when nothing at all arrived for `stall` seconds: an
        object lost on the way (a bug, a peer's) must not stall replication until restart."""
        s = drv.session
        seen, since = s.bytes_in, time.monotonic()
        while not s.closed:
            await asyncio.sleep(self.stall / 4)
            if stalled := s.expire():
                log.warning("peer %s: %d objects sent in parts got no next part for %.0f s; "
                            "asked for them again", device[:12], stalled,
                            s.limits.partial_timeout)
                try:
                    await drv.send()
                except P2PError:
                    return   # the session is ending; its loop says why
            if s.bytes_in != seen or not s.pending:
                seen, since = s.bytes_in, time.monotonic()
                continue
            if time.monotonic() - since >= self.stall:
                n = s.rewant()
                log.warning("peer %s: nothing arrived for %.0f s while %d objects are awaited; "
                            "asked for them again", device[:12], self.stall, n)
                try:
                    await drv.send()
                except P2PError:
                    return   # the session is ending; its loop says why
                since = time.monotonic()

    async def serve(self, device: str, link: MessageLink, first: bytes | None = None,
                    *, on_lane: bool = False) -> None:
        """A member reads this store (restore or recover from a peer): objects only; what it
        writes goes through the same checks as replication; nothing is deleted. It may ask
        for a direct lane, on which it opens a second such session (`on_lane`)."""
        async def put(name: str, data: bytes) -> None:
            async with self.gate.passing():
                stored = await replica.accept(self.repo, name, data)
            if stored:
                await self._accepted(name)
                await self.announce_new()

        offered: list[str] = []

        async def lane(client_fp: str) -> tuple[str, int]:
            assert self.lane_server is not None
            offered.append(_normalize(client_fp))
            self._fetch_lanes[offered[-1]] = device
            self.lane_server.expect(client_fp)
            return self.lane_server.fingerprint, self.lane_port

        offer = lane if self.lane_server is not None and not on_lane else None
        reading = self._reading.setdefault(device, set())
        reading.add(link)
        try:
            why = await peer_store.serve(link, self.repo.store, self.me, first=first, put=put,
                                         read=replica.is_object_name, lane=offer,
                                         message_size=LANE_PIECE if on_lane else
                                         peer_store.MESSAGE)
        finally:
            reading.discard(link)
            if not reading and self._reading.get(device) is reading:
                del self._reading[device]
        log.info("device %s stopped reading%s: %s", device[:12],
                 " over the direct lane" if on_lane else "", why)
        for fp in offered:   # lanes asked for and never opened are not waited for any more
            if self._fetch_lanes.pop(fp, None) is not None and self.lane_server is not None:
                self.lane_server.forget(fp)

    async def _on_event(self, drv: SessionDriver, st: PeerStatus, ev: Event) -> None:
        s = drv.session
        if isinstance(ev, ObjectWanted):
            try:
                if replica.is_damaged(self.repo, ev.name):   # listed before it was found out
                    raise NotFound(ev.name)
                s.send_object(ev.name, bytes(await self.repo.store.get(ev.name)))
            except NotFound:
                s.missing(ev.name)
        elif isinstance(ev, ObjectReceived) and ev.name.startswith("packs/"):
            # Pack workers check (decrypt every blob) and write packs while the next
            # arrive: up to PACK_INTAKE at once.
            tasks = self._packs_in.setdefault(st.device, set())
            task = asyncio.get_running_loop().create_task(
                self._take_pack(drv, st, ev.name, ev.data))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif isinstance(ev, ObjectReceived):
            await self._settle(st.device)  # what follows packs may rest on them
            try:
                async with self.gate.passing():
                    await replica.accept(self.repo, ev.name, ev.data)
            except P2PError as exc:
                log.warning("refused %s from peer %s: %s", ev.name[:40], st.device[:12],
                            exc)
                refuse(s, ev.name, exc)
            else:
                s.ack(ev.name)
                await self._accepted(ev.name)
                st.last_sync = time.time()
        elif isinstance(ev, ObjectAcked):
            st.last_sync = time.time()
            st.held_objects, st.held_bytes = s.peer_holds, s.peer_holds_bytes
        elif isinstance(ev, ObjectRejected):
            if ev.reason != st.error:  # say it once, not once per object
                log.warning("peer %s refused %s: %s", st.device[:12], ev.name[:40],
                            ev.reason)
            st.error = ev.reason
            # A peer checks every pack: ours may have rotted since it was written. Only a
            # refusal saying so counts (a partner over its quota refuses every pack).
            name = ev.name.removeprefix("packs/")
            if ev.code == MISMATCH and name != ev.name and name not in self._refused_ok:
                self.check_pack_soon(name, refused=True)
        elif isinstance(ev, LaneOffered):
            if self.lane_server is not None and lane_may_reach(st):
                self._lane_peers[_normalize(ev.fingerprint)] = st.device
                self.lane_server.expect(ev.fingerprint)
                # Both sides offered: objects wait (briefly) for the lane rather
                # than start on the data channel and be stranded there.
                s.await_bulk_lane()
                self._spawn(self._lane_deadline(st.device, s))
                if self.me < st.device:  # one side dials, as for sessions
                    self._spawn(self._dial_lane(st.device, ev.fingerprint, ev.port))
        elif isinstance(ev, PeerNotice):
            if ev.reason != st.error:   # (e.g. a partner's full quota, at each session)
                log.warning("peer %s: %s", st.device[:12], ev.reason)
            st.error = ev.reason
        elif isinstance(ev, Closed):
            log.warning("session with %s: %s", st.device[:12], ev.reason)

    def check_pack_soon(self, name: str, *, refused: bool = False) -> None:
        """Check pack `name` of this store in the background (a read from it failed, or a
        peer refused it); see `pack_damaged`."""
        if name not in self._checking:
            self._checking.add(name)
            self._spawn(self._check_pack(name, refused))

    async def _check_pack(self, name: str, refused: bool) -> None:
        try:
            async with self.gate.passing(), self._check_turn:  # (it may write the index)
                damaged = await self.pack_damaged(name)
            if not damaged and refused:
                self._refused_ok.add(name)
        except P2PError as exc:
            log.error("checking pack %s failed: %s", name[:12], exc)
        finally:
            self._checking.discard(name)

    async def pack_damaged(self, name: str) -> bool:
        """If pack `name` of this store no longer matches its name, list it as damaged (its
        blobs that still authenticate stay in use) and ask every connected peer for its copy
        (which replaces ours once checked; one that lacks it says so). True if damaged."""
        damage = self.repo.index.damaged.get(name) or await self.repo.recheck_pack(name)
        if damage is None:
            return False
        log.warning("pack %s is damaged: %s; asking peers for an intact copy", name[:12],
                    damage.reason)
        if self.on_damage is not None:
            await self.on_damage()
        for drv in list(self.sessions.values()):
            try:
                await drv.handle(drv.session.lost([f"packs/{name}"]))
            except P2PError:
                pass   # the session is ending; the next one's inventories ask for it
        return True

    def _spawn(self, coro) -> None:
        # The loop keeps only weak references to tasks: hold them until they end.
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _take_pack(self, drv: SessionDriver, st: PeerStatus, name: str, data: bytes
                         ) -> None:
        s = drv.session
        async with self._intake:
            try:
                async with self.gate.passing():
                    await replica.accept(self.repo, name, data, durable=False,
                                         intake=self.pack_workers)
                self._unsynced = True
            except IntegrityError as exc:
                log.warning("refused %s from peer %s: %s", name[:40], st.device[:12], exc)
                refuse(s, name, exc)
            except P2PError as exc:
                # Our failure, not the pack's (a pack worker died, the disk is full): refused
                # for now, asked for again later, and later still if it fails again.
                delay = self._retries.get(name, self.retry)
                self._retries[name] = min(delay * 4, RETRY_MAX)
                log.warning("could not store %s from peer %s: %s; asking for it again in "
                            "%.0f s", name[:40], st.device[:12], exc, delay)
                s.reject(name, str(exc))
                self._spawn(self._ask_again(drv, st, name, delay))
            else:
                self._retries.pop(name, None)
                s.ack(name)
                st.last_sync = time.time()
                if self.on_stored is not None:
                    self.on_stored()
            finally:
                if self.pack_workers is not None:
                    self.pack_workers.release(data)
        st.objects_behind, st.bytes_behind = s.pending, s.bytes_behind
        if s.pending == 0 and len(self._packs_in.get(st.device, ())) <= 1:
            await self._sync_store()   # caught up: make it durable now
        try:
            await drv.send()
        except P2PError:
            pass  # the session is ending; its loop says why

    async def _ask_again(self, drv: SessionDriver, st: PeerStatus, name: str, delay: float
                         ) -> None:
        await asyncio.sleep(delay)
        if self.sessions.get(st.device) is not drv or drv.session.closed:
            return   # the next session's inventories ask for it
        try:
            await drv.handle(drv.session.ask_again([name]))
        except P2PError:
            pass   # the session is ending; its loop says why

    async def _settle(self, device: str) -> None:
        """Wait for the packs being taken in from `device`, then make them durable."""
        tasks = list(self._packs_in.get(device, ()))
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._sync_store()

    async def _sync_store(self) -> None:
        if self._unsynced:
            self._unsynced = False
            await self.repo.store.sync()
