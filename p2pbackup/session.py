"""Opening an authenticated peer session: signed offer/answer over a signaling path, then an
aiortc data channel whose DTLS fingerprints those signatures cover.

The LAN signaling path is a tiny TCP endpoint on the daemon (its port is in the mDNS TXT
record): one length-prefixed signed offer in, one signed answer out. Signaling is untrusted;
everything rests on the device signatures checked against the membership record, so a removed
or unknown device never gets a channel. The broker's WebSocket relay is another `Signaling`
(discovery/broker.py), whose offers `OfferAnswerer` answers as the LAN endpoint's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from .crypto.identity import DeviceIdentity, device_id_for, verify_signature
from .errors import P2PError, PeerNotPaired, PeerUnreachable, RemoteProtocolError
from .format.membership import Membership
from .format.records import Signed
from .format.signaling import (ANSWER, OFFER, ReplayGuard, SessionDescription,
                               check_description, sign_description)
from .transport import CONNECTING
from .transport.datachannel import IceConfig, PeerLink
from .transport.pending import ConnectionLimits, PendingConnections

log = logging.getLogger("p2pbackup.session")
_LEN = struct.Struct(">I")
MAX_SIGNAL = 64 * 1024       # an SDP is a few KiB
CONNECT_TIMEOUT = 30.0
MAX_UNCONNECTED = 4   # links answered to one device that have not connected yet (a newer
                      # offer closes the oldest): its retries, a CLI beside its daemon


class Signaling(Protocol):
    """Carries one signed offer to a peer and its signed answer back."""

    async def exchange(self, offer: bytes) -> bytes: ...


async def _read_frame(reader: asyncio.StreamReader, timeout: float) -> bytes:
    head = await asyncio.wait_for(reader.readexactly(4), timeout)
    (n,) = _LEN.unpack(head)
    if n > MAX_SIGNAL:
        raise RemoteProtocolError(f"a signaling message of {n} bytes is too large")
    return await asyncio.wait_for(reader.readexactly(n), timeout)


@dataclass(slots=True)
class LanSignaling:
    """Signaling straight to a peer's endpoint on the LAN (address from mDNS)."""

    host: str
    port: int
    timeout: float = 15.0

    async def exchange(self, offer: bytes) -> bytes:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise PeerUnreachable(f"cannot reach the peer's signaling endpoint at "
                                  f"{self.host}:{self.port}: {exc}") from None
        try:
            writer.write(_LEN.pack(len(offer)) + offer)
            await writer.drain()
            reply = await _read_frame(reader, self.timeout * 2)
        except asyncio.IncompleteReadError:
            raise PeerNotPaired(f"the peer at {self.host}:{self.port} refused the session") \
                from None
        except (OSError, asyncio.TimeoutError) as exc:
            raise PeerUnreachable(f"signaling with {self.host}:{self.port} failed: {exc}") \
                from None
        finally:
            writer.close()
        return answer_or_refusal(reply)


def answer_or_refusal(reply: bytes) -> bytes:
    """A peer's reply to an offer: its answer, or PeerNotPaired with the refusal it sent in
    words (b"!" and a line: what the answering side says whichever path carried it)."""
    if reply[:1] == b"!":
        raise PeerNotPaired(reply[1:200].decode("utf-8", "replace"))
    return reply


def refusal(exc: P2PError) -> bytes:
    """The reply that refuses an offer, saying why (answer_or_refusal reads it)."""
    return b"!" + str(exc).encode()[:190]


def _now() -> int:
    return time.time_ns()


async def connect(me: DeviceIdentity, peer: str, membership: Membership,
                  signaling: Signaling, *, ice: IceConfig | None = None,
                  guard: ReplayGuard | None = None) -> PeerLink:
    """Open a data channel to device `peer`; both ends are checked against `membership`."""
    if not membership.admits(peer):
        raise PeerNotPaired(f"device {peer[:12]} is not a member of this account")
    link = PeerLink(ice)
    try:
        sdp = await link.create_offer()
        nonce = os.urandom(16)
        offer = sign_description(SessionDescription(OFFER, me.device_id, peer, sdp, _now(),
                                                    nonce), me.sign)
        raw = await signaling.exchange(offer)
        answer = check_description(raw, me=me.device_id, membership=membership, now_ns=_now(),
                                   guard=guard or ReplayGuard(), verify=verify_signature,
                                   expect=ANSWER, reply_to=nonce)
        if answer.sender != peer:
            raise PeerNotPaired(f"device {answer.sender[:12]} answered for {peer[:12]}")
        await link.accept_answer(answer.sdp)
        await link.wait_connected(CONNECT_TIMEOUT)
    except BaseException:
        with contextlib.suppress(Exception):
            await link.close()
        raise
    return link


@dataclass(slots=True)
class Unverified:
    """A channel opened before we know the account's members: `check` it once we do."""

    link: PeerLink
    answer: bytes
    nonce: bytes
    sender: str

    def check(self, me: str, membership: Membership) -> None:
        """PeerNotPaired unless the answer was signed by a member of `membership`."""
        check_description(self.answer, me=me, membership=membership, now_ns=_now(),
                          guard=ReplayGuard(), verify=verify_signature, expect=ANSWER,
                          reply_to=self.nonce)


async def connect_recovering(signer: DeviceIdentity, signaling: Signaling, *,
                             ice: IceConfig | None = None) -> Unverified:
    """Open a data channel as the recovery signer to whichever device answers there.

    The peer checks our offer against its membership (signed by the recovery code's key);
    we hold no membership yet, so the answer's signature is checked later (`Unverified`).
    """
    link = PeerLink(ice)
    try:
        sdp = await link.create_offer()
        nonce = os.urandom(16)
        offer = sign_description(SessionDescription(OFFER, signer.device_id, "", sdp, _now(),
                                                    nonce), signer.sign)
        raw = await signaling.exchange(offer)
        try:
            signed = Signed.decode(raw, "session answer")
            answer = SessionDescription.decode(signed.body)
        except Exception as exc:  # untrusted bytes
            raise RemoteProtocolError(f"a malformed session answer arrived ({exc})") from None
        if answer.kind != ANSWER or answer.reply_to != nonce or signed.device != answer.sender:
            raise RemoteProtocolError("the answer does not answer our offer")
        await link.accept_answer(answer.sdp)
        await link.wait_connected(CONNECT_TIMEOUT)
    except BaseException:
        with contextlib.suppress(Exception):
            await link.close()
        raise
    return Unverified(link, raw, nonce, answer.sender)


def recovery_signer_of(m: Membership) -> dict[str, bytes]:
    """The membership's recovery signer (device id -> public key), if it names one."""
    return {device_id_for(m.recovery_key): m.recovery_key} if m.recovery_key else {}


class OfferAnswerer:
    """The one copy of answering a signed offer, whichever path brought it (the LAN endpoint
    here, the broker's relay in discovery/broker.py): `check` it against the membership (and a
    recovery signer: by default the membership's), then `accept` it, which opens the link and
    signs the answer to send back. `ice_source`, when given, is asked for the ICE servers at
    each offer (a broker's TURN credentials expire), instead of the fixed `ice`."""

    def __init__(self, me: DeviceIdentity, membership: Callable[[], Membership], *,
                 ice: IceConfig | None = None,
                 recovery: Callable[[], Mapping[str, bytes]] | None = None,
                 ice_source: Callable[[], Awaitable[IceConfig]] | None = None) -> None:
        self.me, self.membership, self.ice = me, membership, ice
        self.ice_source = ice_source
        self.recovery = recovery or (lambda: recovery_signer_of(self.membership()))
        self.guard = ReplayGuard()
        # Each signed, fresh offer costs a link (sockets, ICE gathering, a TURN allocation)
        # until it connects or CONNECT_TIMEOUT: a device (a storage partner through the
        # broker, from anywhere) that offers and never connects must not hold hundreds.
        self._unconnected: dict[str, list[PeerLink]] = {}

    def check(self, raw: bytes) -> SessionDescription:
        """The offer, if a member (or the recovery signer) made it for us, fresh and once;
        PeerNotPaired or RemoteProtocolError otherwise."""
        return check_description(raw, me=self.me.device_id, membership=self.membership(),
                                 now_ns=_now(), guard=self.guard, verify=verify_signature,
                                 expect=OFFER, recovery=self.recovery())

    async def accept(self, offer: SessionDescription) -> tuple[PeerLink, bytes]:
        """A link answering `offer` (not yet connected) and the signed answer."""
        link = PeerLink(await self.ice_source() if self.ice_source else self.ice)
        try:
            sdp = await link.accept_offer(offer.sdp)
        except BaseException:
            with contextlib.suppress(Exception):
                await link.close()
            raise
        answer = sign_description(SessionDescription(ANSWER, self.me.device_id, offer.sender,
                                                     sdp, _now(), os.urandom(16), offer.nonce),
                                  self.me.sign)
        waiting = [x for x in self._unconnected.get(offer.sender, []) if x.state == CONNECTING]
        while len(waiting) >= MAX_UNCONNECTED:
            with contextlib.suppress(Exception):
                await waiting.pop(0).close()
        self._unconnected[offer.sender] = waiting + [link]
        return link, answer


async def hand_over(sender: str, link: PeerLink,
                    on_link: Callable[[str, PeerLink], Awaitable[None]],
                    on_refused: Callable[[str], None]) -> None:
    """Wait for an answered link to connect, then give it to `on_link`."""
    try:
        await link.wait_connected(CONNECT_TIMEOUT)
    except P2PError as exc:
        on_refused(f"session with {sender[:12]} did not connect: {exc}")
        await link.close()
        return
    await on_link(sender, link)


class SignalingServer:
    """The daemon's LAN signaling endpoint: answers offers from members (and from a recovery
    signer, `recovery()`: by default the membership's), refuses the rest.

    A connection has `limits.handshake_timeout` seconds to deliver a signed offer; until it
    has, it counts against `limits` (transport.pending), so a flood of idle connections from
    the LAN neither exhausts the daemon's descriptors nor keeps members out."""

    def __init__(self, me: DeviceIdentity, membership: Callable[[], Membership],
                 on_link: Callable[[str, PeerLink], Awaitable[None]], *,
                 ice: IceConfig | None = None,
                 on_refused: Callable[[str], None] | None = None,
                 limits: ConnectionLimits = ConnectionLimits(),
                 recovery: Callable[[], Mapping[str, bytes]] | None = None,
                 ice_source: Callable[[], Awaitable[IceConfig]] | None = None) -> None:
        self.answerer = OfferAnswerer(me, membership, ice=ice, recovery=recovery,
                                      ice_source=ice_source)
        self.on_link = on_link
        self.on_refused = on_refused or (lambda why: log.warning("%s", why))
        self.limits = limits
        self.pending = PendingConnections(limits, "signaling")
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str = "0.0.0.0", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        for t in list(self._tasks):
            t.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.pending.admit(writer):
            writer.transport.abort()
            return
        peer = writer.get_extra_info("peername")
        where = f"{peer[0]}:{peer[1]}" if peer else "?"
        link: PeerLink | None = None
        try:
            timeout = self.limits.handshake_timeout
            raw = await asyncio.wait_for(_read_frame(reader, timeout), timeout)
            offer = self.answerer.check(raw)
            self.pending.done(writer)   # a member (or the recovery signer): no longer counted
            link, answer = await self.answerer.accept(offer)
            writer.write(_LEN.pack(len(answer)) + answer)
            await writer.drain()
        except P2PError as exc:
            self.on_refused(f"session from {where} refused: {exc}")
            with contextlib.suppress(Exception):
                msg = refusal(exc)
                writer.write(_LEN.pack(len(msg)) + msg)
                await writer.drain()
            if link is not None:
                await link.close()
            return
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, OSError):
            if link is not None:
                await link.close()
            return
        finally:
            self.pending.done(writer)
            writer.close()
        task = asyncio.create_task(hand_over(offer.sender, link, self.on_link, self.on_refused))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
