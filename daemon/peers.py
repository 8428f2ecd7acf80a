"""Finding the account's other devices on the LAN and keeping a session open to each.

Advertise `_p2pbackup._tcp` with a per-device rotating tag and the signaling port; browse for
adverts whose tag names another member; the device with the smaller id dials (so two devices
never race to open two sessions), the other answers. What runs over an open session is the
sync protocol's business (`on_session`). A session whose first frame is a fetch hello is a
member's CLI reading this store (`restore --from peer:...`): it goes to `on_fetch` instead.

Beyond the LAN, a device is reached at its static address (`[peers.addresses]`, a port its
router forwards) or through the broker's signaling relay: `_routes` lists every way to reach a
device, and one dial loop (`_dial`) tries them. Whichever way signaling went, the data channel
itself crosses NATs by ICE: the `[ice]` STUN/TURN servers, and with a broker its servers first
(fresh TURN credentials, discovery/broker.BrokerIce), on the dialing and the answering side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from p2pbackup import session
from p2pbackup.config import Config, PeerSettings
from p2pbackup.discovery.broker import BrokerClient, BrokerIce, BrokerSignaling
from p2pbackup.crypto.tags import TAG_PERIOD, discovery_tag, member_tag_keys, which_device
from p2pbackup.device import Device
from p2pbackup.errors import ConfigError, P2PError, PeerUnreachable
from p2pbackup.format.membership import Membership
from p2pbackup.logthrottle import ThrottledLog
from p2pbackup.repo import membership as store_membership
from p2pbackup.peer_fetch import PEER_SERVICE, ice_for
from p2pbackup.replication import reads_store
from p2pbackup.transport.datachannel import IceConfig, PeerLink
from p2pbackup.transport.pending import ConnectionLimits

log = logging.getLogger("p2pbackupd")
SERVICE = PEER_SERVICE
RETRY_SECONDS = 5.0
FIRST_FRAME_TIMEOUT = 30.0
BROKER_DIAL_SECONDS = 30.0   # how often members off the LAN are dialed through the broker

SessionHandler = Callable[[str, PeerLink, "PeerState", "bytes | None"], Awaitable[None]]
FetchHandler = Callable[[str, PeerLink, bytes], Awaitable[None]]


@dataclass(slots=True)
class PeerState:
    """What `status` shows for one peer device."""

    device: str
    name: str = ""
    on_lan: bool = False
    addresses: list[str] = field(default_factory=list)
    port: int = 0
    connected: bool = False
    path: str | None = None          # "data channel" or "direct lane"
    ice_path: str | None = None      # the data channel's route: "host", "reflexive", "relay"
    signaled: str | None = None      # how the session was set up: "LAN", "static address",
                                     # "broker" (None: answered on our signaling port)
    static: list[str] = field(default_factory=list)   # its [peers.addresses], "HOST:PORT"
    since: float | None = None
    last_seen: float | None = None
    last_sync: float | None = None
    objects_behind: int | None = None
    bytes_behind: int | None = None
    held_objects: int | None = None  # what it holds of ours (its inventory, then its acks)
    held_bytes: int | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "name": self.name, "on_lan": self.on_lan,
                "addresses": self.addresses, "connected": self.connected, "path": self.path,
                "ice_path": self.ice_path, "signaled": self.signaled,
                "static_addresses": self.static,
                "since": self.since, "last_seen": self.last_seen, "last_sync": self.last_sync,
                "objects_behind": self.objects_behind,
                "bytes_behind": self.bytes_behind, "held_objects": self.held_objects,
                "held_bytes": self.held_bytes, "error": self.error}


def connection_limits(peers: PeerSettings) -> ConnectionLimits:
    """The bounds on connections to our ports that have not authenticated yet."""
    return ConnectionLimits(handshake_timeout=peers.handshake_timeout)


@dataclass(frozen=True, slots=True)
class Route:
    """One way to carry a signed offer to a device: LAN addresses from its mDNS advert, its
    static address ([peers.addresses]), the broker's relay."""

    via: str        # "LAN", "static address", "broker"
    where: str      # for logs: "192.168.1.20:7890", the broker's URL
    signaling: session.Signaling

    @classmethod
    def direct(cls, via: str, host: str, port: int) -> "Route":
        return cls(via, f"{host}:{port}", session.LanSignaling(host, port))


async def _hold(device: str, link: PeerLink, state: PeerState, first: bytes | None) -> None:
    """Without a sync protocol: keep the channel open until either side closes it."""
    while await link.recv() is not None:
        pass


class PeerManager:
    """Discovery, signaling and the sessions to the other devices of the account."""

    def __init__(self, config: Config, dev: Device, *,
                 on_session: SessionHandler | None = None,
                 on_fetch: FetchHandler | None = None) -> None:
        self.config, self.dev = config, dev
        # Refused offers and links that did not connect: a hostile member or partner can
        # cause them twenty times a second (one line a minute per kind of refusal).
        self.refusals = ThrottledLog(log)
        self.on_session = on_session or _hold
        self.on_fetch = on_fetch
        # Told who may still connect after every membership change (it closes the rest).
        self.on_members: Callable[[Callable[[str], bool]], Awaitable[None]] | None = None
        self.peers: dict[str, PeerState] = {}
        self.membership: Membership | None = None
        self.port = 0
        self._tasks: list[asyncio.Task[Any]] = []
        self._dialing: set[str] = set()
        self._pushed_meanwhile: set[str] = set()   # pushed since its dialer's last attempt
        self._lan_dials: dict[str, bool] = {}   # device -> whether we dial it on the LAN
        self._stack = contextlib.AsyncExitStack()
        interfaces = list(config.peers.interfaces) or None
        self._interfaces = interfaces
        self._ice = ice_for(config.peers)
        self._signaling: session.SignalingServer | None = None
        self.broker: BrokerClient | None = None
        self._broker_ice: BrokerIce | None = None

    @property
    def bind_address(self) -> str:
        """Loopback only when the config limits peers to `lo` (a demo on one machine)."""
        return "127.0.0.1" if self._interfaces == ["lo"] else "0.0.0.0"

    @property
    def me(self) -> str:
        return self.dev.identity.device_id

    async def refresh(self) -> None:
        """Re-read the membership (after pairing or a removal); drop removed devices' sessions."""
        got = await store_membership.load(self.dev.repo)
        self.membership = got[0] if got else None
        for device, st in list(self.peers.items()):
            if not self.allowed(device):
                st.error = "removed from the account"
        if self.membership:
            for m in self.membership.members:
                if m.device_id != self.me and m.device_id in self.peers:
                    self.peers[m.device_id].name = m.name
        if self.on_members is not None:
            await self.on_members(self.allowed)
        if self.broker is not None and self.broker.connected.is_set():
            await self._publish_roster()

    def allowed(self, device: str) -> bool:
        """Whether `device` may have a session here: a member, or the recovery signer."""
        m = self.membership
        return m is not None and (m.admits(device) or device in session.recovery_signer_of(m))

    def _members(self) -> list[str]:
        if self.membership is None:
            return []
        return [m.device_id for m in self.membership.members
                if m.device_id != self.me and m.role != "partner"]

    def _partners(self) -> list[str]:
        if self.membership is None:
            return []
        return [m.device_id for m in self.membership.members if m.role == "partner"]

    def _recognise(self, tag: str) -> tuple[str, bool] | None:
        """The member or storage partner an advert's tag names, if any, and whether it is
        a member still on an older key epoch (it cannot recognise our tag: we dial it)."""
        now = time.time()
        for i, key in enumerate(member_tag_keys(self.dev.keys.record_keys)):
            device = which_device(key, tag, self._members(), now)
            if device is not None:
                return device, i > 0
        for m in (self.membership.members if self.membership else ()):
            if m.role == "partner" and which_device(m.tag_key, tag, [m.device_id], now):
                return m.device_id, False
        return None

    def advert_txt(self, now: float) -> dict[str, str]:
        """This device's advert: the tag of the newest key epoch it holds, and its port."""
        key = member_tag_keys(self.dev.keys.record_keys)[0]
        return {"v": "1", "port": str(self.port), "tag": discovery_tag(key, self.me, now)}

    async def start(self) -> None:
        """Start answering and, on the LAN, advertising and browsing."""
        from p2pbackup.discovery import mdns

        await self.refresh()
        if self.config.broker.url:
            self._start_broker()
        self._dial_static()
        if not self.config.peers.lan:
            return
        self._signaling = session.SignalingServer(
            self.dev.identity, lambda: self._current(), self._incoming, ice=self._ice,
            ice_source=self.ice_now, on_refused=self.refusals.warning,
            limits=connection_limits(self.config.peers))
        self.port = await self._signaling.start(self.bind_address, self.config.peers.port)
        try:
            # Browse first: the advertisement returns only after its announcements (~0.5 s),
            # and peers already on the LAN need not wait for those to be found.
            self._browser = await self._stack.enter_async_context(mdns.Browser(
                SERVICE, interfaces=self._interfaces))
            self._ad = await self._stack.enter_async_context(mdns.advertise(
                SERVICE, self.port, self.advert_txt(time.time()), interfaces=self._interfaces))
        except (OSError, ValueError) as exc:
            log.warning("LAN discovery is off: %s", exc)
            return
        # A new tag window (or new addresses): the advert is published again under fresh
        # names, so nothing links it to the last one.
        self._tasks = [asyncio.create_task(self._browse()),
                       asyncio.create_task(mdns.keep_rotating(self._ad, self.advert_txt,
                                                              period=TAG_PERIOD))]
        log.info("peers: signaling on port %d, advertising on the LAN", self.port)

    def _current(self) -> Membership:
        assert self.membership is not None
        return self.membership

    async def ice_now(self) -> IceConfig:
        """The ICE servers for a session opened now, dialed or answered."""
        return await self._broker_ice.current() if self._broker_ice else self._ice

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        if self._signaling is not None:
            await self._signaling.close()
        if self.broker is not None:
            await self.broker.close()
        with contextlib.suppress(Exception):
            await self._stack.aclose()

    # -- the broker: signaling to members off the LAN, pushes ------------------------------

    def _start_broker(self) -> None:
        answerer = session.OfferAnswerer(self.dev.identity, self._current, ice=self._ice,
                                         ice_source=self.ice_now)
        self.broker = BrokerClient(self.config.broker.url, self.dev.identity,
                                   self.dev.keys.fingerprint(), answerer=answerer,
                                   on_link=self._incoming_through_broker, on_push=self._pushed,
                                   on_refused=self.refusals.warning,
                                   before_connect=self._publish_roster,
                                   on_ready=self._broker_ready)
        self._broker_ice = BrokerIce(self.broker, self._ice)
        self.broker.start()
        self._tasks.append(asyncio.create_task(self._broker_loop()))

    async def _broker_loop(self) -> None:
        assert self.broker is not None
        while True:
            await self.broker.connected.wait()
            self._dial_through_broker()
            await asyncio.sleep(BROKER_DIAL_SECONDS)

    async def _broker_ready(self) -> None:
        """Connected (again) to the broker: a push tells the members that dial us that we are
        here (else they would find out at their next round, BROKER_DIAL_SECONDS); we dial the
        others."""
        try:
            await self.push_new()
        except P2PError as exc:
            log.warning("broker: %s", exc)

    def _broker_dials(self, device: str) -> bool:
        """Whether we dial `device` through the broker: as on the LAN, the smaller id dials
        (both sides know each other there, so two would race to open two sessions), and a
        storage partner never dials (it has nothing of its own to send): we do."""
        return self.broker is not None and (
            self.me < device and device in self._members() or device in self._partners())

    def _dial_through_broker(self) -> None:
        for device in self._members() + self._partners():
            if self._broker_dials(device):
                self._start_dial(device)

    async def _publish_roster(self) -> None:
        """Tell the broker the account's newest roster (an owner registers the account)."""
        from p2pbackup.repo.roster import PREFIX

        assert self.broker is not None
        store = self.dev.repo.store
        names = sorted([n async for n in store.list(PREFIX)])
        try:
            await self.broker.publish_rosters([bytes(await store.get(n)) for n in names])
        except P2PError as exc:
            log.warning("broker: %s", exc)

    def _start_dial(self, device: str) -> None:
        st = self.peers.setdefault(device, PeerState(device))
        if st.connected or device in self._dialing or not self.allowed(device):
            return
        m = self.membership.member(device) if self.membership else None
        st.name = m.name if m else st.name
        self._tasks.append(asyncio.create_task(self._dial(device)))

    async def _pushed(self, sender: str, head: bytes) -> None:
        """A member sealed or snapshotted (or a storage partner's socket came up): open a
        session to it if none is open (an open session hears of new objects itself) and we
        are the side that dials; otherwise the sender dials us after its push (push_new)."""
        if not self.allowed(sender) or sender == self.me:
            return
        if sender not in self._partners():
            log.info("peer %s has new data (broker push)", sender[:12])
        elif sender not in self._dialing and not self.peers.get(sender, PeerState("")).connected:
            # A partner pushes only to say its socket is up: said once, not for each push
            # (a hostile one may push 20 a second, into a log nothing rotates)
            log.info("storage partner %s is on the broker", sender[:12])
        if self._broker_dials(sender):
            if sender in self._dialing:
                self._pushed_meanwhile.add(sender)
            self._start_dial(sender)

    async def push_new(self) -> None:
        """Tell the account's other devices through the broker that this one has new data."""
        if self.broker is None:
            return
        head = b""
        with contextlib.suppress(P2PError):
            head = bytes(await self.dev.repo.store.get(f"heads/{self.me}"))
        await self.broker.push(head if len(head) <= 2048 else b"")
        self._dial_through_broker()   # the members we dial hear of it over a session

    async def relay_signal(self, to: str, offer: bytes) -> bytes:
        """Relay a signed offer this device's CLI made (`restore --from peer:` and the like)
        to device `to` over this daemon's broker socket (the broker holds one per device: a
        socket of the CLI's own would replace this one); the reply as it came."""
        if self.broker is None:
            raise ConfigError("p2pbackupd runs without a broker ([broker] url): restart it")
        return await self.broker.relay(to, offer)

    def broker_status(self) -> dict[str, Any] | None:
        if self.broker is None:
            return None
        return {"url": self.config.broker.url, "connected": self.broker.connected.is_set(),
                "last_error": self.broker.last_error}

    async def _browse(self) -> None:
        from p2pbackup.discovery.mdns import Removed

        async for ev in self._browser:
            found = ev.found
            got = self._recognise(found.txt.get("tag", ""))
            if got is None:
                continue  # another account's device, or our own advert
            device, behind = got
            st = self.peers.setdefault(device, PeerState(device))
            if isinstance(ev, Removed):
                st.on_lan = False
                continue
            st.on_lan, st.addresses, st.last_seen = True, list(found.addresses), time.time()
            st.port = found.signaling_port
            # A partner never dials: it has nothing of its own to send. A member behind on
            # the key epoch does not recognise our tag: we dial it.
            dials = self.me < device or device in self._partners() or behind
            self._lan_dials[device] = dials
            if not st.connected and dials and device not in self._dialing:
                self._tasks.append(asyncio.create_task(self._dial(device)))

    def _static_routes(self, device: str) -> list[Route]:
        return [Route.direct("static address", a.host, a.port)
                for a in self.config.peers.addresses
                if device.startswith(a.device)]

    def _routes(self, device: str) -> list[Route]:
        """Where to dial `device` now: on the LAN its advert's addresses, off it its static
        addresses, then the broker (when we are the side that dials there). The dialer kept
        for a static address stays off the LAN when the LAN rule says the other side dials
        there (it would race it)."""
        st = self.peers[device]
        if not st.on_lan:
            routes = self._static_routes(device)
            if self._broker_dials(device) and self.broker is not None \
                    and self.broker.connected.is_set():
                routes.append(Route("broker", self.broker.base,
                                    BrokerSignaling(self.broker, device)))
            return routes
        if not self._lan_dials.get(device, True) and self._static_routes(device):
            return []
        return [Route.direct("LAN", a, st.port) for a in st.addresses]

    def _dial_static(self) -> None:
        """Start a dialer for every member with a static address. Off the LAN only the side
        that knows the address can dial, so the smaller-id rule applies on the LAN alone."""
        for device in self._members():
            static = [r.where for r in self._static_routes(device)]
            if static and device not in self._dialing:
                st = self.peers.setdefault(device, PeerState(device))
                m = self.membership.member(device) if self.membership else None
                st.static, st.name = static, m.name if m else st.name
                self._tasks.append(asyncio.create_task(self._dial(device)))

    async def _dial(self, device: str) -> None:
        self._dialing.add(device)
        try:
            while True:
                st = self.peers[device]
                routes = self._routes(device)
                if st.connected or not routes:
                    if not self._static_routes(device):
                        return   # LAN only: its next advert starts a dialer again
                    # With a static address nothing else would: watch for the session's end
                    # (the link dropped, the device left the LAN), whoever opened it.
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                opened = answered = False   # answered: a failure the peer's answer made
                self._pushed_meanwhile.discard(device)
                for route in routes:
                    try:
                        link = await session.connect(
                            self.dev.identity, device, self._current(), route.signaling,
                            ice=await self.ice_now())
                    except P2PError as exc:
                        answered = answered or not isinstance(exc, PeerUnreachable)
                        st.error = str(exc)
                        self.refusals.warning(f"peer {device[:12]} at {route.where} "
                                              f"({route.via}): {exc}")
                        continue
                    opened = True
                    await self._run(device, link, signaled=route.via)
                    break
                if not opened and not st.on_lan and not self._static_routes(device):
                    if not answered:
                        return   # through the broker: its loop, or a push, dials again
                    # It answered, refusing: not at once again. A device that pushes and
                    # refuses every offer would have each of its pushes (20 a second) cost us
                    # a whole offer. Pushes meanwhile are one dial after the wait.
                    await asyncio.sleep(RETRY_SECONDS)
                    if device not in self._pushed_meanwhile:
                        return
                    continue
                await asyncio.sleep(RETRY_SECONDS)
        finally:
            self._dialing.discard(device)

    async def _incoming_through_broker(self, device: str, link: PeerLink) -> None:
        await self._incoming(device, link, signaled="broker")

    async def _incoming(self, device: str, link: PeerLink, signaled: str | None = None
                        ) -> None:
        # The dialer speaks first in both protocols: its first frame says which this is.
        try:
            first = await asyncio.wait_for(link.recv(), FIRST_FRAME_TIMEOUT)
        except (P2PError, asyncio.TimeoutError):
            first = None
        if first is None:
            await link.close()
            return
        if not reads_store(first):
            await self._run(device, link, first, signaled=signaled)
            return
        m = self.membership.member(device) if self.membership else None
        recovering = m is None and self.membership is not None and \
            device in session.recovery_signer_of(self.membership)
        if self.on_fetch is None or (m is None and not recovering) or \
                (m is not None and m.role == "partner"):
            log.warning("device %s asked to read this store; refused (%s)", device[:12],
                        "a storage partner reads nothing" if m else "not a member")
            await link.close()
            return
        log.info("%s is reading this store", f"device {device[:12]} ({m.name})" if m else
                 "a new device holding the recovery code")
        try:
            await self.on_fetch(device, link, first)
        except Exception:
            log.exception("serving device %s failed", device[:12])
        finally:
            with contextlib.suppress(Exception):
                await link.close()
            log.info("device %s finished reading", device[:12])

    async def _run(self, device: str, link: PeerLink, first: bytes | None = None, *,
                   signaled: str | None = None) -> None:
        st = self.peers.setdefault(device, PeerState(device))
        if self.membership is not None:
            m = self.membership.member(device)
            st.name = m.name if m else st.name
        st.connected, st.path, st.since, st.error = True, "data channel", time.time(), None
        st.signaled = signaled
        route = link.ice_path()
        st.ice_path = route.kind if route else None
        log.info("peer %s (%s) connected over the data channel (%s)%s", device[:12], st.name,
                 route, " through the broker" if signaled == "broker" else "")
        try:
            await self.on_session(device, link, st, first)
        except P2PError as exc:
            st.error = str(exc)
            log.warning("session with %s ended: %s", device[:12], exc)
        except Exception:
            log.exception("session with %s failed", device[:12])
        finally:
            st.connected, st.path, st.ice_path, st.signaled = False, None, None, None
            with contextlib.suppress(Exception):
                await link.close()
            log.info("peer %s disconnected", device[:12])

    def status(self) -> list[dict[str, Any]]:
        return [st.to_json() for st in self.peers.values()]
