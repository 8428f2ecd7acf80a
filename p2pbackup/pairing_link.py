"""Pairing over the network: a rendezvous finds the host, TCP carries the sans-I/O machines.

The host listens on an ephemeral TCP port and advertises it through a `Rendezvous` under a tag
derived from the code's nameplate (never from its words). The first connection that sends a
byte is the one attempt the code allows; later ones are turned away. The broker's pairing
mailbox (internet) will be another `Rendezvous`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from .crypto.pairing import (CODE_LIFETIME, Completed, Failed, HostPairing, JoinerPairing,
                             JoinRequest, PakeDone, PairingCode, Welcome, parse_code,
                             rendezvous_tag)
from .errors import P2PError, PairingFailed

log = logging.getLogger("p2pbackup.pairing")
SERVICE = "_p2pbackup-pair._tcp.local."
READ_TIMEOUT = 60.0  # a peer that goes quiet mid-exchange ends the attempt


class Rendezvous(Protocol):
    """How the two devices of a pairing find each other."""

    def offer(self, tag: str, port: int) -> contextlib.AbstractAsyncContextManager[None]:
        """Make the host's listening port findable under `tag` while the context is open."""

    async def locate(self, tag: str, timeout: float) -> list[tuple[str, int]]:
        """Addresses (host, port) offering `tag`; empty after `timeout` seconds."""


class MdnsRendezvous:
    """Rendezvous on the LAN through multicast DNS (`_p2pbackup-pair._tcp`)."""

    def __init__(self, interfaces: list[str] | None = None) -> None:
        self.interfaces = interfaces

    @contextlib.asynccontextmanager
    async def offer(self, tag: str, port: int) -> AsyncIterator[None]:
        from .discovery import mdns

        async with mdns.advertise(SERVICE, port, {"v": "1", "tag": tag},
                                  interfaces=self.interfaces):
            yield

    async def locate(self, tag: str, timeout: float) -> list[tuple[str, int]]:
        from .discovery import mdns

        found = await mdns.find(SERVICE, lambda txt: txt.get("tag") == tag, timeout=timeout,
                                interfaces=self.interfaces)
        return [(a, found.port) for a in found.addresses] if found else []


class StaticRendezvous:
    """A known address (`pair CODE --peer HOST:PORT`): no discovery, for tests and odd LANs."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    @contextlib.asynccontextmanager
    async def offer(self, tag: str, port: int) -> AsyncIterator[None]:
        yield

    async def locate(self, tag: str, timeout: float) -> list[tuple[str, int]]:
        return [(self.host, self.port)]


@dataclass(slots=True)
class HostOutcome:
    """How a hosted pairing ended."""

    ok: bool
    message: str
    verifier: str | None = None
    peer: str | None = None


async def _pump_write(writer: asyncio.StreamWriter, machine: HostPairing | JoinerPairing) -> None:
    data = machine.data_to_send()
    if data:
        writer.write(data)
        await writer.drain()


class PairingHost:
    """Serves one pairing code: listen, advertise, run the one attempt the code allows."""

    def __init__(self, code: str | PairingCode,
                 on_request: Callable[[bytes, str], Awaitable[bytes]],
                 on_complete: Callable[[], Awaitable[str]], *,
                 rendezvous: Rendezvous, lifetime: float = CODE_LIFETIME,
                 bind: str = "0.0.0.0", port: int = 0,
                 on_verifier: Callable[[str], None] | None = None) -> None:
        self.code = parse_code(code)
        self.machine = HostPairing(self.code, expires_at=time.monotonic() + lifetime)
        self.on_request, self.on_complete = on_request, on_complete
        self.on_verifier = on_verifier
        self.rendezvous, self.bind, self.port = rendezvous, bind, port
        self.lifetime = lifetime
        self.outcome: asyncio.Future[HostOutcome] | None = None
        self._busy = False

    async def run(self, started: Callable[[int], None] | None = None) -> HostOutcome:
        """Serve until the attempt ends or the code expires; never raises for peer trouble."""
        loop = asyncio.get_running_loop()
        self.outcome = loop.create_future()
        server = await asyncio.start_server(self._serve, self.bind, self.port)
        port = server.sockets[0].getsockname()[1]
        try:
            async with self.rendezvous.offer(rendezvous_tag(self.code), port):
                if started:
                    started(port)
                try:
                    return await asyncio.wait_for(asyncio.shield(self.outcome), self.lifetime)
                except asyncio.TimeoutError:
                    events = self.machine.check_expiry()
                    reason = events[0].reason if events else "the pairing code expired"
                    if not self.outcome.done():
                        self.outcome.set_result(HostOutcome(False, reason))
                    return self.outcome.result()
        finally:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)

    def _finish(self, outcome: HostOutcome) -> None:
        assert self.outcome is not None
        if not self.outcome.done():
            self.outcome.set_result(outcome)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        who = f"{peer[0]}:{peer[1]}" if peer else "?"
        try:
            first = await asyncio.wait_for(reader.read(65536), READ_TIMEOUT)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            first = b""
        if not first:
            writer.close()  # connected and left without a word: not an attempt
            return
        if self._busy or self.machine.finished:
            writer.close()  # the code allows one attempt; it is taken
            return
        self._busy = True
        try:
            await self._attempt(reader, writer, first, who)
        except Exception as exc:  # a bug must end this attempt, not the daemon
            log.exception("pairing with %s failed unexpectedly", who)
            self._finish(HostOutcome(False, f"pairing failed: {exc}", peer=who))
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _attempt(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       data: bytes, who: str) -> None:
        m = self.machine
        while True:
            for ev in m.receive_data(data):
                if isinstance(ev, PakeDone):
                    if self.on_verifier:
                        self.on_verifier(ev.verifier)
                elif isinstance(ev, JoinRequest):
                    try:
                        welcome = await self.on_request(ev.payload, ev.verifier)
                    except P2PError as exc:
                        m.reject(str(exc))
                        await _pump_write(writer, m)
                        self._finish(HostOutcome(False, str(exc), ev.verifier, who))
                        return
                    m.accept(welcome)
                elif isinstance(ev, Completed):
                    try:
                        message = await self.on_complete()
                    except P2PError as exc:
                        self._finish(HostOutcome(False, str(exc), m.verifier, who))
                        return
                    self._finish(HostOutcome(True, message, m.verifier, who))
                    return
                elif isinstance(ev, Failed):
                    await _pump_write(writer, m)
                    self._finish(HostOutcome(False, ev.reason, m.verifier, who))
                    return
            await _pump_write(writer, m)
            try:
                data = await asyncio.wait_for(reader.read(65536), READ_TIMEOUT)
            except asyncio.TimeoutError:
                data = None
            except (ConnectionError, OSError):
                data = b""
            if not data:
                m.reject("the other device stopped answering" if data is None
                         else "the other device hung up")
                reason = ("pairing failed: the other device stopped answering" if data is None
                          else "pairing failed: the other device hung up before pairing "
                               "finished; this code is used up, run `p2pbackup pair` again")
                self._finish(HostOutcome(False, reason, m.verifier, who))
                return


async def join(code: str | PairingCode, payload: bytes,
               on_welcome: Callable[[bytes, str], Awaitable[None]], *,
               rendezvous: Rendezvous, find_timeout: float = 10.0,
               on_verifier: Callable[[str], None] | None = None) -> str:
    """Join the device offering `code`; returns the verifier once the welcome is stored."""
    parsed = parse_code(code)
    addrs = await rendezvous.locate(rendezvous_tag(parsed), find_timeout)
    if not addrs:
        raise PairingFailed(f"no device on this network offers pairing code {parsed.nameplate}-"
                            "…; is `p2pbackup pair` still running there? (codes expire after "
                            f"{int(CODE_LIFETIME // 60)} minutes)")
    reader = writer = None
    last: Exception | None = None
    for host, port in addrs:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            break
        except (OSError, asyncio.TimeoutError) as exc:
            last = exc
    if reader is None or writer is None:
        raise PairingFailed(f"cannot reach the device offering the code: {last}")
    m = JoinerPairing(parsed, payload)
    try:
        await _pump_write(writer, m)
        while True:
            try:
                data = await asyncio.wait_for(reader.read(65536), READ_TIMEOUT)
            except asyncio.TimeoutError:
                raise PairingFailed("pairing failed: the other device stopped answering") from None
            except (ConnectionError, OSError) as exc:
                raise PairingFailed(f"pairing failed: the connection broke ({exc})") from None
            if not data:
                raise PairingFailed("pairing failed: the other device closed the connection "
                                    "(its code may be used up or expired; ask for a new one)")
            for ev in m.receive_data(data):
                if isinstance(ev, PakeDone) and on_verifier:
                    on_verifier(ev.verifier)
                elif isinstance(ev, Welcome):
                    try:
                        await on_welcome(ev.payload, ev.verifier)
                    except P2PError as exc:
                        m.cancel(str(exc))
                        await _pump_write(writer, m)
                        raise
                    m.confirm()
                    await _pump_write(writer, m)
                    return ev.verifier
                elif isinstance(ev, Failed):
                    await _pump_write(writer, m)
                    raise PairingFailed(ev.reason)
            await _pump_write(writer, m)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
