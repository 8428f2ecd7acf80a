"""mDNS/DNS-SD over python-zeroconf's asyncio API: advertise a service, find one, watch a type.

Privacy: the instance name and the SRV host name are random per advertisement, and
`keep_rotating` withdraws the advert and publishes it again under fresh ones whenever its TXT
changes window (a rotating tag), so nothing on the wire names the device or links two of its
adverts; what the TXT record says is the caller's business.
TXT records from the network are untrusted: a service whose TXT is not all UTF-8 `key=value`
is ignored, and a `match` that raises counts as "no match".
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

import ifaddr
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_MS = 3000

Match = Callable[[dict[str, str]], bool]


@dataclass
class Found:
    """One resolved service: where to connect and what its TXT record says."""

    addresses: list[str]
    port: int
    txt: dict[str, str]
    name: str = ""  # the (random) instance name: identifies the service within a Browser
    server: str = ""  # the (random) host name its SRV record names

    @property
    def signaling_port(self) -> int:
        """The port its TXT record names (p2pbackup's signaling endpoint), else the SRV one:
        a neighbour's TXT may say anything, so only 1-65535 in ASCII digits counts."""
        said = self.txt.get("port", "")
        if said.isascii() and said.isdigit() and 0 < int(said) < 65536:
            return int(said)
        return self.port


@dataclass(frozen=True)
class Added:
    found: Found


@dataclass(frozen=True)
class Updated:
    found: Found


@dataclass(frozen=True)
class Removed:
    found: Found  # as last seen


Event = Added | Updated | Removed


def ipv4_addresses(interfaces: list[str] | None = None) -> list[str]:
    """IPv4 addresses of the named interfaces, or all non-loopback ones when None."""
    out: list[str] = []
    for adapter in ifaddr.get_adapters():
        if interfaces is not None and adapter.nice_name not in interfaces:
            continue
        for ip in adapter.ips:
            if not ip.is_IPv4:
                continue
            assert isinstance(ip.ip, str)
            if interfaces is None and ipaddress.ip_address(ip.ip).is_loopback:
                continue
            out.append(ip.ip)
    return out


def _zeroconf(interfaces: list[str] | None) -> AsyncZeroconf:
    if interfaces is None:
        return AsyncZeroconf(ip_version=IPVersion.V4Only)
    addrs = ipv4_addresses(interfaces)
    if not addrs:
        raise ValueError(f"no IPv4 address on {interfaces}")
    return AsyncZeroconf(interfaces=addrs, ip_version=IPVersion.V4Only)


def decode_txt(properties: dict[bytes, bytes | None]) -> dict[str, str] | None:
    """TXT properties as str -> str, or None if any key or value is missing or not UTF-8."""
    out: dict[str, str] = {}
    for key, value in properties.items():
        if value is None:
            return None
        try:
            out[key.decode("utf-8")] = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return out


def _found(name: str, info: AsyncServiceInfo) -> Found | None:
    txt = decode_txt(info.properties)
    addresses = sorted(info.parsed_addresses())  # sorted: zeroconf's order varies per resolve
    if txt is None or not addresses or not info.port:
        return None
    return Found(addresses, info.port, txt, name, info.server or "")


class Advertisement:
    """A registered service; `async with advertise(...)` makes one."""

    def __init__(self, service_type: str, port: int, txt: dict[str, str],
                 interfaces: list[str] | None) -> None:
        self.service_type = service_type
        self.port = port
        self.interfaces = interfaces
        self.addresses = ipv4_addresses(interfaces)
        if not self.addresses:
            raise ValueError("no IPv4 address to advertise")
        self.name, self.server = _fresh_names(service_type)
        self._info = self._make_info(txt)
        self._zc: AsyncZeroconf | None = None

    def _make_info(self, txt: dict[str, str]) -> AsyncServiceInfo:
        return AsyncServiceInfo(self.service_type, self.name, port=self.port,
                                properties=dict(txt), server=self.server,
                                parsed_addresses=self.addresses)

    async def renew(self, txt: dict[str, str]) -> None:
        """Withdraw this advert and publish `txt` under fresh random names, at this host's
        current addresses: nothing but `txt` relates the new advert to the old one."""
        assert self._zc is not None, "not registered"
        # Goodbye first: browsers then see the old name leave before the new one comes.
        await (await self._zc.async_unregister_service(self._info))
        self.addresses = ipv4_addresses(self.interfaces) or self.addresses
        self.name, self.server = _fresh_names(self.service_type)
        self._info = self._make_info(txt)
        await (await self._zc.async_register_service(self._info, cooperating_responders=True))

    async def __aenter__(self) -> Advertisement:
        self._zc = _zeroconf(self.interfaces)
        try:
            # No probing: the names are 64 random bits, fresh each run, so nobody else holds
            # them, and the three probes (~0.7 s) delayed every peer's discovery of us. The
            # inner awaitable ends after the announcements (~0.5 s).
            await (await self._zc.async_register_service(self._info,
                                                         cooperating_responders=True))
        except BaseException:
            await self._zc.async_close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        zc, self._zc = self._zc, None
        if zc is None:
            return
        try:
            # Await the goodbye packets too, or browsers never see the service leave.
            await (await zc.async_unregister_service(self._info))
        finally:
            await zc.async_close()


def _fresh_names(service_type: str) -> tuple[str, str]:
    """A random instance name and SRV host name: a stable one would let anyone on the LAN
    track the device."""
    return f"{secrets.token_hex(8)}.{service_type}", f"{secrets.token_hex(8)}.local."


async def keep_rotating(ad: Advertisement, txt_at: Callable[[float], dict[str, str]], *,
                        period: float, now: Callable[[], float] = time.time,
                        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                        every: float = 2.0,
                        on_renewed: Callable[[Advertisement], object] | None = None) -> None:
    """Publish `ad` again under fresh names with `txt_at(now)` at each new time window of
    `period` seconds (a rotated tag) and whenever this host's addresses change; runs until
    cancelled. A failed renewal is logged and tried again at the next check."""
    window = int(now() // period)
    addresses = ipv4_addresses(ad.interfaces)
    while True:
        await sleep(every)
        current = ipv4_addresses(ad.interfaces)
        t = now()
        if int(t // period) == window and current == addresses:
            continue
        try:
            await ad.renew(txt_at(t))
        except Exception as exc:  # zeroconf closing under us, an interface gone: next time
            log.warning("renewing the mDNS advert failed: %s", exc)
            continue
        window, addresses = int(t // period), current
        if on_renewed is not None:
            on_renewed(ad)


def advertise(service_type: str, port: int, txt: dict[str, str], *,
              interfaces: list[str] | None = None) -> Advertisement:
    """Register `service_type` on `port` with `txt` while the `async with` lasts."""
    return Advertisement(service_type, port, txt, interfaces)


class Browser:
    """Live view of one service type: `services` by instance name, and an `events` queue."""

    def __init__(self, service_type: str, *, match: Match | None = None,
                 interfaces: list[str] | None = None) -> None:
        self.service_type = service_type
        self.interfaces = interfaces
        self._match = match
        self.services: dict[str, Found] = {}
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None

    async def get(self) -> Event:
        """The next event (Added, Updated or Removed)."""
        return await self.events.get()

    def __aiter__(self) -> Browser:
        return self

    async def __anext__(self) -> Event:
        return await self.events.get()

    async def __aenter__(self) -> Browser:
        self._zc = _zeroconf(self.interfaces)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, self.service_type,
                                            handlers=[self._on_change])
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        for task in self._resolving.values():
            task.cancel()
        self._resolving.clear()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_close()
        self._browser = self._zc = None

    def _accepts(self, found: Found) -> bool:
        if self._match is None:
            return True
        try:
            return bool(self._match(found.txt))
        except Exception:  # a neighbour's odd TXT must not break discovery
            log.debug("match raised on %s", found.name, exc_info=True)
            return False

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        # Runs in the event loop (AsyncServiceBrowser); only the newest resolve of a name counts.
        pending = self._resolving.pop(name, None)
        if pending is not None:
            pending.cancel()
        if state_change is ServiceStateChange.Removed:
            self._forget(name)
        else:
            self._resolving[name] = asyncio.get_running_loop().create_task(
                self._resolve(service_type, name))

    def _forget(self, name: str) -> None:
        found = self.services.pop(name, None)
        if found is not None:
            self.events.put_nowait(Removed(found))

    async def _resolve(self, service_type: str, name: str) -> None:
        assert self._zc is not None
        try:
            info = AsyncServiceInfo(service_type, name)
            if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
                return  # gone or unanswered: keep what we knew, zeroconf reports a removal
            found = _found(name, info)
            if found is None or not self._accepts(found):
                if found is None:
                    log.debug("ignoring %s: incomplete or undecodable TXT", name)
                self._forget(name)  # it no longer matches (e.g. its tag rotated away)
                return
            old = self.services.get(name)
            if old == found:
                return
            self.services[name] = found
            self.events.put_nowait(Added(found) if old is None else Updated(found))
        finally:
            if self._resolving.get(name) is asyncio.current_task():
                del self._resolving[name]


async def find(service_type: str, match: Match, *, timeout: float,
               interfaces: list[str] | None = None) -> Found | None:
    """The first service of `service_type` whose TXT satisfies `match`; None after `timeout`."""
    async with Browser(service_type, match=match, interfaces=interfaces) as browser:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = await browser.get()
                    if not isinstance(event, Removed):
                        return event.found
        except TimeoutError:
            return None
