"""Opening another device's store as a BlobStore: `--from peer:DEVICE[@HOST:PORT]`.

The device is found by its mDNS advert (its rotating tag, which only members recognise), at
the signaling address given after `@`, or, with a broker (`[broker] url`) and not on the LAN,
through the broker's signaling relay with its STUN/TURN servers; the session is the same signed
WebRTC session the daemons use, and the first frame makes it a fetch session (protocol/fetch.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .blobs import is_peer_location  # noqa: F401  (callers import it from here too)
from .blobs.peer import PeerStore
from .config import PeerSettings, host_port
from .crypto.identity import DeviceIdentity
from .crypto.tags import which_device
from .errors import ConfigError, PeerUnreachable
from .format.membership import Membership

if TYPE_CHECKING:
    from .session import Signaling, Unverified
    from .transport.datachannel import IceConfig, PeerLink

T = TypeVar("T")
PEER_SERVICE = "_p2pbackup._tcp.local."
FIND_TIMEOUT = 10.0
FIND_WITH_BROKER = 3.0     # how long to look on the LAN before asking the broker
BROKER_TIMEOUT = 30.0      # to connect to the broker


@dataclass(frozen=True, slots=True)
class PeerLocation:
    """`peer:WHICH` or `peer:WHICH@HOST:PORT` (WHICH: a device name or id prefix)."""

    which: str
    host: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, location: str) -> "PeerLocation":
        rest = location.removeprefix("peer:")
        which, at, address = rest.partition("@")
        if not which:
            raise ConfigError(f"{location!r}: name the device, as in peer:laptop or "
                              "peer:laptop@192.168.1.20:7890")
        if not at:
            return cls(which)
        got = host_port(address)
        if got is None:
            raise ConfigError(f"{location!r}: the address after @ must be HOST:PORT (the "
                              "peer's signaling port, shown by its `p2pbackup status`)")
        return cls(which, *got)


def ice_for(peers: PeerSettings, host: str | None = None) -> IceConfig:
    """The `[ice]` servers; loopback-only ICE when the config keeps peers on `lo` (a demo on
    one machine) or the peer's address is a loopback one."""
    import ipaddress

    from .transport.datachannel import IceConfig  # aiortc: only when a peer is reached

    try:
        loopback_host = host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback_host = host == "localhost"
    if list(peers.interfaces) == ["lo"] or loopback_host:
        return IceConfig(host_addresses=("127.0.0.1",))
    return IceConfig(servers=peers.ice.servers, relay_only=peers.ice.relay_only)


async def find_on_lan(device: str, tag_keys: list[bytes], peers: PeerSettings,
                      timeout: float = FIND_TIMEOUT) -> list[tuple[str, int]]:
    """Signaling addresses of `device`'s daemon from its mDNS advert (its tag under any of
    `tag_keys`); [] if not seen."""
    from .discovery import mdns

    def ours(txt: dict[str, str]) -> bool:
        return any(which_device(key, txt.get("tag", ""), [device], time.time()) is not None
                   for key in tag_keys)

    found = await mdns.find(PEER_SERVICE, ours, timeout=timeout,
                            interfaces=list(peers.interfaces) or None)
    if found is None:
        return []
    return [(a, found.signaling_port) for a in found.addresses]


async def through_broker(url: str, account: str, identity: DeviceIdentity, peer: str,
                         peers: PeerSettings, label: str,
                         open_link: "Callable[[Signaling, IceConfig], Awaitable[T]]", *,
                         control_socket: Path | None = None) -> T:
    """`open_link(signaling, ice)` with signaling to device `peer` through the broker at `url`
    (as `identity` of `account`) and the broker's ICE servers before the configured ones.
    When this device's daemon runs with a broker (`control_socket`), its broker socket
    carries the signals (the broker holds one per device); else the CLI opens its own, closed
    once the link is open (the data channel does not need it)."""
    from .discovery.broker import BrokerClient, BrokerIce, BrokerSignaling, DaemonSignaling

    client = BrokerClient(url, identity, account)
    try:
        if control_socket is not None and await _daemon_has_broker(control_socket):
            ice = await BrokerIce(client, ice_for(peers), reachable=lambda: True).current()
            return await open_link(DaemonSignaling(control_socket, peer), ice)
        client.start()
        try:
            await asyncio.wait_for(client.connected.wait(), BROKER_TIMEOUT)
        except asyncio.TimeoutError:
            raise PeerUnreachable(f"cannot reach {label}: no connection to the broker at "
                                  f"{url} within {BROKER_TIMEOUT:g} s"
                                  + (f" ({client.last_error})" if client.last_error else "")
                                  ) from None
        ice = await BrokerIce(client, ice_for(peers)).current()
        return await open_link(BrokerSignaling(client, peer), ice)
    finally:
        await client.close()


async def _daemon_has_broker(control_socket: Path) -> bool:
    """Whether this device's daemon runs, with a broker socket of its own."""
    from . import control
    from .errors import DaemonNotRunning

    try:
        status = await control.request(control_socket, "status", timeout=BROKER_TIMEOUT)
    except DaemonNotRunning:
        return False
    return status.get("broker") is not None


async def open_peer(location: PeerLocation, device: str, *, identity: DeviceIdentity,
                    membership: Membership, tag_keys: list[bytes], peers: PeerSettings,
                    label: str, on_step: Callable[[str], None] | None = None,
                    broker: str = "", account: str = "",
                    control_socket: Path | None = None) -> PeerStore:
    """Find `device`, open a signed session as `identity` and return its store (through the
    `broker` of `account` when it is not on the LAN, if one is given; over the socket of this
    device's daemon if it runs, at `control_socket`)."""
    from . import session

    step = on_step or (lambda s: None)
    if location.host is not None and location.port is not None:
        addresses = [(location.host, location.port)]
    elif not peers.lan and not broker:
        raise ConfigError("finding peers on the LAN is off ([peers] lan = false or "
                          "P2PBACKUP_LAN=off); give the peer's address as "
                          f"peer:{location.which}@HOST:PORT")
    else:
        addresses = []
        if peers.lan:
            step(f"looking for {label} on the LAN")
            addresses = await find_on_lan(device, tag_keys, peers,
                                          FIND_WITH_BROKER if broker else FIND_TIMEOUT)
        if not addresses and broker:
            step(f"asking the broker at {broker} for {label}")

            async def open_link(signaling: Signaling, ice: IceConfig) -> PeerLink:
                return await session.connect(identity, device, membership, signaling, ice=ice)

            link = await through_broker(broker, account, identity, device, peers, label,
                                        open_link, control_socket=control_socket)
            store = await PeerStore(link, identity.device_id, location=label).start()
            store.via = _via(link)
            step(f"connected to {label} through the broker"
                 + (f" ({store.via})" if store.via else ""))
            return store
        if not addresses:
            raise PeerUnreachable(f"{label} is not on the LAN (no advert within "
                                  f"{FIND_TIMEOUT:g} s): is its daemon running? Or give its "
                                  f"address as peer:{location.which}@HOST:PORT")
    errors = []
    for host, port in addresses:
        try:
            link = await session.connect(identity, device, membership,
                                         session.LanSignaling(host, port),
                                         ice=ice_for(peers, host))
        except PeerUnreachable as exc:
            errors.append(str(exc))
            continue
        store = await PeerStore(link, identity.device_id, location=label).start()
        store.via = _via(link)
        step(f"connected to {label} at {host}" + (f" ({store.via})" if store.via else ""))
        if peers.direct_lane and _lane_reachable(link):
            await direct_lane(store, host)
        step(f"reading from {label} over the {store.path}")
        return store
    raise PeerUnreachable(f"cannot reach {label}: {'; '.join(errors)}")


def _via(link) -> str | None:
    from .views import ice_path_words

    route = link.ice_path()
    return ice_path_words(route.kind) if route else None


def _lane_reachable(link) -> bool:
    """Whether a direct TCP lane may connect: not when the data channel had to cross a NAT
    (hole punched or relayed), where a connection to any port but the forwarded signaling
    one waits for its timeout and fails."""
    route = link.ice_path()
    return route is None or route.kind == "host"


async def direct_lane(store: PeerStore, host: str) -> bool:
    """Move `store`'s reads onto a direct TLS lane to `host` (a LAN address), if the peer
    offers one; the certificate is made for this session and pinned inside it."""
    from .transport.tls_lane import LaneIdentity, connect_lane

    identity = LaneIdentity.generate(days=1)

    async def dial(h: str, port: int, fingerprint: str):
        return await connect_lane(h, port, fingerprint, identity)

    return await store.use_lane(host, identity.fingerprint, dial)


@dataclass(slots=True)
class RecoveryCandidate:
    """A daemon that may belong to the account being recovered (checked once connected): at
    a signaling address, or (`broker`, `account` given) device `host` through that broker."""

    host: str
    port: int
    peers: PeerSettings
    unverified: "Unverified | None" = None
    broker: str = ""
    account: str = ""

    async def open(self, signer: DeviceIdentity) -> PeerStore:
        """A session as the recovery signer; the caller checks who answered (`unverified`)."""
        from . import session

        if self.broker:
            async def open_link(signaling: Signaling, ice: IceConfig) -> Unverified:
                return await session.connect_recovering(signer, signaling, ice=ice)

            label = f"device {self.host[:12]}"
            self.unverified = await through_broker(self.broker, self.account, signer,
                                                   self.host, self.peers, label, open_link)
        else:
            label = f"the peer at {self.host}"
            self.unverified = await session.connect_recovering(
                signer, session.LanSignaling(self.host, self.port),
                ice=ice_for(self.peers, self.host))
        store = await PeerStore(self.unverified.link, signer.device_id, location=label).start()
        store.via = _via(self.unverified.link)
        if not self.broker and self.peers.direct_lane and \
                _lane_reachable(self.unverified.link):
            await direct_lane(store, self.host)
        return store


async def recovery_candidates(location: PeerLocation, peers: PeerSettings,
                              on_step: Callable[[str], None] | None = None,
                              seconds: float = 3.0, *, broker: str = "", account: str = "",
                              signer: DeviceIdentity | None = None
                              ) -> list[RecoveryCandidate]:
    """Where to try recovering from: the address given, or every p2pbackup daemon on the LAN,
    then (with a `broker`) the account's devices connected to it, as the recovery `signer`.

    A new device knows no device ids yet, so it cannot read the rotating tags (unless the
    account never changed key epochs); each candidate checks the recovery code's signature
    against its own membership and refuses strangers.
    """
    if location.host is not None and location.port is not None:
        return [RecoveryCandidate(location.host, location.port, peers)]
    if not peers.lan and not broker:
        raise ConfigError("finding peers on the LAN is off (P2PBACKUP_LAN=off); give the "
                          f"peer's address as peer:{location.which}@HOST:PORT")
    out = await _lan_candidates(peers, on_step, seconds) if peers.lan else []
    if broker and signer is not None:
        out += await _broker_candidates(location, peers, broker, account, signer, on_step)
    return out


async def _broker_candidates(location: PeerLocation, peers: PeerSettings, broker: str,
                             account: str, signer: DeviceIdentity,
                             on_step: Callable[[str], None] | None
                             ) -> list[RecoveryCandidate]:
    """The devices the broker lists as connected: the one whose id starts with the name
    given first (names are not the broker's to know: a name tries each)."""
    from .discovery.broker import BrokerClient

    (on_step or (lambda s: None))(f"asking the broker at {broker} for the account's devices")
    client = BrokerClient(broker, signer, account)
    try:
        devices = [d for d in await client.devices() if d.get("connected")]
    finally:
        await client.close()
    ids = sorted((str(d.get("id")) for d in devices),
                 key=lambda i: not i.startswith(location.which))
    return [RecoveryCandidate(i, 0, peers, broker=broker, account=account) for i in ids]


async def _lan_candidates(peers: PeerSettings, on_step: Callable[[str], None] | None,
                          seconds: float) -> list[RecoveryCandidate]:
    from .discovery import mdns

    (on_step or (lambda s: None))("looking for the account's devices on the LAN")
    found: dict[str, mdns.Found] = {}
    async with mdns.Browser(PEER_SERVICE, interfaces=list(peers.interfaces) or None) as b:
        try:
            async with asyncio.timeout(seconds):
                while True:
                    ev = await b.get()
                    if isinstance(ev, mdns.Removed):
                        found.pop(ev.found.name, None)
                    else:
                        found[ev.found.name] = ev.found
        except TimeoutError:
            pass
    out = []
    for f in found.values():
        out += [RecoveryCandidate(a, f.signaling_port, peers) for a in f.addresses]
    return out
