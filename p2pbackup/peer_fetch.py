"""Opening another device's store as a BlobStore: `--from peer:DEVICE[@HOST:PORT]`.

The device is found by its mDNS advert (its rotating tag, which only members recognise) or at
the signaling address given after `@`; the session is the same signed WebRTC session the
daemons use, and the first frame makes it a fetch session (protocol/fetch.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .blobs.peer import PeerStore
from .config import PeerSettings
from .crypto.identity import DeviceIdentity
from .crypto.tags import which_device
from .errors import ConfigError, PeerUnreachable
from .format.membership import Membership

if TYPE_CHECKING:
    from .transport.datachannel import IceConfig

PEER_SERVICE = "_p2pbackup._tcp.local."
FIND_TIMEOUT = 10.0


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
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{location!r}: the address after @ must be HOST:PORT (the "
                              "peer's signaling port, shown by its `p2pbackup status`)")
        return cls(which, host.strip("[]"), int(port))


def is_peer_location(location: str | None) -> bool:
    return bool(location) and location.startswith("peer:")  # type: ignore[union-attr]


def ice_for(peers: PeerSettings) -> IceConfig:
    """Loopback-only ICE when the config keeps peers on `lo` (a demo on one machine)."""
    from .transport.datachannel import IceConfig  # aiortc: only when a peer is reached

    return IceConfig(host_addresses=("127.0.0.1",)) if list(peers.interfaces) == ["lo"] \
        else IceConfig()


async def find_on_lan(device: str, tag_key: bytes, peers: PeerSettings,
                      timeout: float = FIND_TIMEOUT) -> list[tuple[str, int]]:
    """Signaling addresses of `device`'s daemon from its mDNS advert; [] if not seen."""
    from .discovery import mdns

    def ours(txt: dict[str, str]) -> bool:
        return which_device(tag_key, txt.get("tag", ""), [device], time.time()) is not None

    found = await mdns.find(PEER_SERVICE, ours, timeout=timeout,
                            interfaces=list(peers.interfaces) or None)
    if found is None:
        return []
    try:
        port = int(found.txt.get("port", found.port))
    except ValueError:
        port = found.port
    return [(a, port) for a in found.addresses]


async def open_peer(location: PeerLocation, device: str, *, identity: DeviceIdentity,
                    membership: Membership, tag_key: bytes, peers: PeerSettings,
                    label: str, on_step: Callable[[str], None] | None = None) -> PeerStore:
    """Find `device`, open a signed session as `identity` and return its store."""
    from . import session

    step = on_step or (lambda s: None)
    if location.host is not None and location.port is not None:
        addresses = [(location.host, location.port)]
    elif not peers.lan:
        raise ConfigError("finding peers on the LAN is off ([peers] lan = false or "
                          "P2PBACKUP_LAN=off); give the peer's address as "
                          f"peer:{location.which}@HOST:PORT")
    else:
        step(f"looking for {label} on the LAN")
        addresses = await find_on_lan(device, tag_key, peers)
        if not addresses:
            raise PeerUnreachable(f"{label} is not on the LAN (no advert within "
                                  f"{FIND_TIMEOUT:g} s): is its daemon running? Or give its "
                                  f"address as peer:{location.which}@HOST:PORT")
    errors = []
    for host, port in addresses:
        try:
            link = await session.connect(identity, device, membership,
                                         session.LanSignaling(host, port), ice=ice_for(peers))
        except PeerUnreachable as exc:
            errors.append(str(exc))
            continue
        step(f"connected to {label} at {host}")
        return await PeerStore(link, identity.device_id, location=label).start()
    raise PeerUnreachable(f"cannot reach {label}: {'; '.join(errors)}")
