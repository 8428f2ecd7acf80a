"""One aiortc RTCPeerConnection carrying one ordered, reliable data channel of binary messages.

Signaling is not done here: `create_offer()` / `accept_offer()` return complete SDP (ICE
gathering finished, no trickle) for the signaling layer to sign and relay, and
`accept_answer()` takes the answer back. The SDP holds this side's DTLS certificate fingerprint;
aiortc refuses a DTLS handshake whose certificate does not match the fingerprint in the remote
SDP, so a signature over the SDP authenticates the whole channel.

Flow control: `send()` waits while the channel's `bufferedAmount` is above a high-water mark
and is woken by the `bufferedamountlow` event, so at most `high_water` + one message is ever
queued inside aiortc. On the receiving side aiortc delivers messages as events with no way to
push back, so the receive queue is bounded only by what the sender has outstanding: the sync
protocol above must window its frames (acknowledgements), which it does anyway.

aiortc and aioice exceptions become p2pbackup errors here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import threading
from collections import deque
from dataclasses import dataclass
from types import ModuleType

from ..errors import LocalProtocolError, PeerUnreachable, RemoteProtocolError
from .link import CLOSED, CONNECTED, CONNECTING, FAILED, StateCallback

log = logging.getLogger("p2pbackup.transport")

# Message size the sync protocol should use on the data channel. Measured with
# bench/bench_transport.py (two processes, loopback, aiortc 1.16): 16, 64, 128 and 256 KiB all
# give 25-30 MB/s at about one core per side, because aiortc cuts every message into ~1.2 KB
# SCTP chunks in Python whatever its size; 64 KiB is the size every WebRTC stack accepts
# (RFC 8841's default) and keeps head-of-line delay for control messages small.
MESSAGE_SIZE = 64 * 1024
# aiortc advertises 256 KiB; RFC 8841 says assume 64 KiB when the peer advertises nothing.
LOCAL_MAX_MESSAGE_SIZE = 262144
DEFAULT_REMOTE_MAX_MESSAGE_SIZE = 65536

# send() waits while more than HIGH_WATER bytes are queued in the channel, until the
# bufferedamountlow event says the queue fell to LOW_WATER. 128 KiB to 4 MiB measured the same
# throughput; a small queue keeps memory and the wait of a control message behind bulk data low.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
CLOSE_TIMEOUT = 5.0  # how long close() waits for the peer to take what was sent
CHANNEL_ID = 0  # both sides create the channel themselves (negotiated): no DCEP round trip


# --------------------------------------------------------------------------- configuration

@dataclass(frozen=True, slots=True)
class IceServer:
    """One STUN or TURN server: `stun:host:3478`, `turn:host:3478?transport=tcp`, `turns:...`."""

    urls: str | tuple[str, ...]
    username: str | None = None
    credential: str | None = None


@dataclass(frozen=True, slots=True)
class IceConfig:
    """How a link finds its way to the peer.

    `servers` empty means host candidates only (LAN). aiortc would otherwise fall back to a
    public Google STUN server; this adapter never lets it. aioice uses at most one STUN and one
    TURN server of the list. `relay_only` forces TURN (iceTransportPolicy "relay").
    `host_addresses` replaces aioice's own host-address discovery (every address on every
    interface except 127.0.0.1 and ::1) with exactly these addresses; it may name 127.0.0.1,
    which is how two peers on one machine connect over loopback alone.
    """

    servers: tuple[IceServer, ...] = ()
    relay_only: bool = False
    host_addresses: tuple[str, ...] | None = None


# aioice 0.13 has no option to choose host addresses (aiortc/aioice issue #2, PR #57 not
# merged). Connection.gather_candidates() looks up the module-level function
# aioice.ice.get_host_addresses at call time, so one wrapper installed once consults a
# context variable that PeerLink sets around its own gathering: other RTCPeerConnections in
# the process keep aioice's default.
_host_addresses: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "p2pbackup_ice_host_addresses", default=None)


def _install_host_address_hook(ice: ModuleType) -> None:
    original = ice.get_host_addresses
    if getattr(original, "_p2pbackup_hook", False):
        return

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        wanted = _host_addresses.get()
        if wanted is None:
            return original(use_ipv4, use_ipv6)
        return [a for a in wanted if (use_ipv6 if ":" in a else use_ipv4)]

    get_host_addresses._p2pbackup_hook = True  # type: ignore[attr-defined]
    ice.get_host_addresses = get_host_addresses


_rtc: ModuleType | None = None
_rtc_lock = threading.Lock()


def _aiortc() -> ModuleType:
    """aiortc, imported (and aioice hooked) at the first connection: its import takes ~0.27 s
    that a starting daemon should not spend before it is on the LAN (mDNS, signaling)."""
    global _rtc
    if _rtc is None:
        with _rtc_lock:
            if _rtc is None:
                import aioice.ice
                import aiortc

                _install_host_address_hook(aioice.ice)
                _rtc = aiortc
    return _rtc


def preload() -> None:
    """Import aiortc now (a daemon calls this in a thread once it is on the LAN, so the first
    connection does not wait for the import)."""
    _aiortc()

# Left alone on purpose: aioice's 256 KiB SO_RCVBUF (aioice.turn.UDP_SOCKET_BUFFER_SIZE). At
# full speed on loopback the receiver drops some datagrams and SCTP recovers them; a 4 MiB
# buffer removed the drops but measured slower (~18 vs ~27 MB/s), since a larger window costs
# aiortc's pure-Python SACK processing more CPU than the retransmissions do.


def _rtc_configuration(ice: IceConfig):
    rtc = _aiortc()
    from aiortc.rtcicetransport import RTCIceTransportPolicy

    servers = [rtc.RTCIceServer(urls=list(s.urls) if isinstance(s.urls, tuple) else s.urls,
                                username=s.username, credential=s.credential)
               for s in ice.servers]
    policy = RTCIceTransportPolicy.RELAY if ice.relay_only else RTCIceTransportPolicy.ALL
    # An empty list, not None: None makes aiortc use stun.l.google.com.
    return rtc.RTCConfiguration(iceServers=servers, iceTransportPolicy=policy)


@dataclass(frozen=True, slots=True)
class IcePath:
    """The candidate pair ICE selected: each end's candidate type (host, srflx, prflx, relay)."""

    local: str
    remote: str

    @property
    def kind(self) -> str:
        """"relay" (through TURN), "reflexive" (hole punched through a NAT) or "host"."""
        ends = {self.local, self.remote}
        if "relay" in ends:
            return "relay"
        return "reflexive" if ends & {"srflx", "prflx"} else "host"


# --------------------------------------------------------------------------- SDP helpers

@dataclass(frozen=True, slots=True)
class Fingerprint:
    """A DTLS certificate fingerprint as SDP states it (`a=fingerprint:sha-256 AB:CD:...`)."""

    algorithm: str  # lower case, e.g. "sha-256"
    value: str  # upper-case hex pairs joined by ':'

    def __str__(self) -> str:
        return f"{self.algorithm} {self.value}"


_FINGERPRINT_LINE = re.compile(
    r"^a=fingerprint:([A-Za-z0-9-]+)[ \t]+((?:[0-9A-Fa-f]{2}:)*[0-9A-Fa-f]{2})[ \t]*$",
    re.MULTILINE)


def sdp_fingerprints(sdp: str) -> list[Fingerprint]:
    """Every distinct `a=fingerprint` of an SDP (session or media level), in order."""
    out: list[Fingerprint] = []
    for m in _FINGERPRINT_LINE.finditer(sdp.replace("\r\n", "\n")):
        fp = Fingerprint(m.group(1).lower(), m.group(2).upper())
        if fp not in out:
            out.append(fp)
    return out


def sdp_fingerprint(sdp: str, algorithm: str = "sha-256") -> Fingerprint:
    """The SDP's fingerprint with `algorithm`; RemoteProtocolError if it has none or several."""
    found = {fp.value for fp in sdp_fingerprints(sdp) if fp.algorithm == algorithm}
    if len(found) != 1:
        raise RemoteProtocolError(
            f"the peer's session description has {len(found) or 'no'} {algorithm} DTLS "
            f"fingerprints (exactly one expected)")
    return Fingerprint(algorithm, found.pop())


def _sdp_max_message_size(sdp: str) -> int:
    m = re.search(r"^a=max-message-size:(\d+)", sdp, re.MULTILINE)
    if m is None:
        return DEFAULT_REMOTE_MAX_MESSAGE_SIZE
    size = int(m.group(1))
    return LOCAL_MAX_MESSAGE_SIZE if size == 0 else size  # 0 = any size


# --------------------------------------------------------------------------- the link

@dataclass
class _Counters:
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0


class PeerLink:
    """An offer or answer side of one data channel; see the module docstring.

    Offer side: `sdp = await link.create_offer()`, send it, `await link.accept_answer(answer)`.
    Answer side: `answer = await link.accept_offer(offer_sdp)`, send it back. Then both:
    `await link.wait_connected(timeout)`, `send()`, `recv()`, `close()`.
    """

    def __init__(self, ice: IceConfig | None = None, *, on_state: StateCallback | None = None,
                 label: str = "p2pbackup", high_water: int = HIGH_WATER,
                 low_water: int = LOW_WATER) -> None:
        if not 0 <= low_water <= high_water:
            raise ValueError("need 0 <= low_water <= high_water")
        self._ice = ice or IceConfig()
        self._on_state = on_state
        self._label = label
        self._high_water = high_water
        self._low_water = low_water
        self._pc = _aiortc().RTCPeerConnection(_rtc_configuration(self._ice))
        self._pc.on("connectionstatechange", self._pc_state_changed)
        self._channel = None
        self._state = CONNECTING
        self._role: str | None = None
        self._error: str | None = None
        self._inbox: deque[bytes | str] = deque()
        self._inbox_ready = asyncio.Event()
        self._eof = False  # no more messages will be appended to the inbox
        self._writable = asyncio.Event()
        self._connected = asyncio.Event()
        self._done = asyncio.Event()  # failed or closed
        self._closing: asyncio.Task | None = None
        self.max_message_size = DEFAULT_REMOTE_MAX_MESSAGE_SIZE
        self.counters = _Counters()

    # -- signaling

    async def create_offer(self) -> str:
        """This side's complete offer SDP (all candidates gathered)."""
        self._start("offer")
        self._open_channel()
        token = _host_addresses.set(self._ice.host_addresses)
        try:
            await self._pc.setLocalDescription(await self._pc.createOffer())
        finally:
            _host_addresses.reset(token)
        return self._pc.localDescription.sdp

    async def accept_offer(self, sdp: str) -> str:
        """Take the peer's offer; return this side's complete answer SDP."""
        self._start("answer")
        await self._set_remote(sdp, "offer")
        self._open_channel()
        token = _host_addresses.set(self._ice.host_addresses)
        try:
            await self._pc.setLocalDescription(await self._pc.createAnswer())
        finally:
            _host_addresses.reset(token)
        return self._pc.localDescription.sdp

    async def accept_answer(self, sdp: str) -> None:
        """Take the peer's answer to our offer; connecting starts."""
        if self._role != "offer" or self._pc.remoteDescription is not None:
            raise LocalProtocolError("accept_answer() needs a pending offer from create_offer()")
        await self._set_remote(sdp, "answer")

    def local_fingerprint(self) -> Fingerprint:
        """This side's DTLS fingerprint (sha-256), as in the SDP we produced."""
        if self._pc.localDescription is None:
            raise LocalProtocolError("no local description yet")
        return sdp_fingerprint(self._pc.localDescription.sdp)

    def remote_fingerprint(self) -> Fingerprint:
        """The peer's DTLS fingerprint (sha-256), as in the SDP it sent."""
        if self._pc.remoteDescription is None:
            raise LocalProtocolError("no remote description yet")
        return sdp_fingerprint(self._pc.remoteDescription.sdp)

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Return once the channel is open; PeerUnreachable if it fails, closes or times out.

        ICE between two NATs without a working STUN/TURN server stays in "checking" and
        never fails on its own, so give a timeout; on timeout the link is closed.
        """
        waiter = asyncio.ensure_future(self._connected.wait())
        done_waiter = asyncio.ensure_future(self._done.wait())
        try:
            await asyncio.wait({waiter, done_waiter}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            done_waiter.cancel()
        if self._connected.is_set() and not self._done.is_set():
            return
        if not self._done.is_set():
            self._error = f"no connection to the peer within {timeout:g} s" + (
                "" if self._ice.servers or self._ice.host_addresses else
                " (no STUN/TURN server is configured: a NAT between the two needs one)")
            await self.close()
        raise PeerUnreachable(self._error or "the peer closed the data channel")

    def ice_path(self) -> IcePath | None:
        """The selected candidate pair once connected; None before (or if aioice changed)."""
        # aiortc exposes no selected pair (getSelectedCandidatePair is not implemented); aioice
        # keeps the nominated pair per component, and a data channel uses component 1.
        try:
            pair = self._pc.sctp.transport.transport._connection._nominated.get(1)
            return None if pair is None else IcePath(pair.local_candidate.type,
                                                     pair.remote_candidate.type)
        except AttributeError:
            return None

    # -- messages

    @property
    def state(self) -> str:
        return self._state

    @property
    def buffered_amount(self) -> int:
        return self._channel.bufferedAmount if self._channel is not None else 0

    async def send(self, message: bytes) -> None:
        if len(message) > self.max_message_size:
            raise LocalProtocolError(
                f"message of {len(message)} bytes exceeds the data channel's limit of "
                f"{self.max_message_size}")
        await self._connected_or_raise()
        while self._channel.bufferedAmount > self._high_water:
            self._writable.clear()
            await self._writable.wait()
            self._raise_if_done()
        try:
            self._channel.send(bytes(message))
        except Exception as exc:  # InvalidStateError, ValueError (size), ConnectionError
            raise PeerUnreachable(f"data channel send failed: {exc}") from exc
        self.counters.bytes_sent += len(message)
        self.counters.messages_sent += 1

    async def recv(self) -> bytes | None:
        while not self._inbox:
            if self._eof:
                return None
            self._inbox_ready.clear()
            await self._inbox_ready.wait()
        message = self._inbox.popleft()
        if isinstance(message, str):
            await self.close()
            raise RemoteProtocolError("the peer sent a text message on the binary channel")
        self.counters.bytes_received += len(message)
        self.counters.messages_received += 1
        return message

    async def close(self) -> None:
        """Let the peer take what was sent (up to CLOSE_TIMEOUT), then tear down; idempotent."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    # -- internals

    def _start(self, role: str) -> None:
        if self._role is not None:
            raise LocalProtocolError(f"this link already made an {self._role}")
        self._role = role

    async def _set_remote(self, sdp: str, kind: str) -> None:
        if not isinstance(sdp, str) or "m=application" not in sdp:
            raise RemoteProtocolError(f"the peer's {kind} has no data channel section")
        sdp_fingerprint(sdp)  # exactly one sha-256 fingerprint, or refuse
        try:
            await self._pc.setRemoteDescription(_aiortc().RTCSessionDescription(sdp=sdp,
                                                                                 type=kind))
        except Exception as exc:  # aiortc raises ValueError/InvalidStateError on bad SDP
            raise RemoteProtocolError(f"the peer's {kind} was refused: {exc}") from exc
        self.max_message_size = min(LOCAL_MAX_MESSAGE_SIZE, _sdp_max_message_size(sdp))

    def _open_channel(self) -> None:
        ch = self._pc.createDataChannel(self._label, ordered=True, negotiated=True,
                                        id=CHANNEL_ID)
        ch.bufferedAmountLowThreshold = self._low_water
        ch.on("open", self._channel_open)
        ch.on("close", self._channel_closed)
        ch.on("message", self._channel_message)
        ch.on("bufferedamountlow", self._writable.set)
        self._channel = ch
        if ch.readyState == "open":
            self._channel_open()

    def _set_state(self, state: str) -> None:
        if state == self._state:
            return
        log.debug("data channel %s -> %s", self._state, state)
        self._state = state
        if self._on_state is not None:
            try:
                self._on_state(state)
            except Exception:
                log.exception("on_state callback failed")

    def _channel_open(self) -> None:
        if self._state == CONNECTING:
            self._connected.set()
            self._set_state(CONNECTED)

    def _channel_message(self, message: bytes | str) -> None:
        if self._eof:
            return
        self._inbox.append(message)
        self._inbox_ready.set()

    def _channel_closed(self) -> None:
        self._finish(CLOSED, "the peer closed the data channel")
        if self._closing is None:  # closed by the peer: release ICE/DTLS too
            self._closing = asyncio.ensure_future(self._close())

    def _pc_state_changed(self) -> None:
        state = self._pc.connectionState
        if state == "failed":
            self._finish(FAILED, "the connection to the peer failed (ICE or DTLS)")
            if self._closing is None:
                self._closing = asyncio.ensure_future(self._close())
        elif state == "closed":
            self._finish(CLOSED, "the data channel is closed")

    def _finish(self, state: str, reason: str) -> None:
        if self._done.is_set():
            return
        self._error = self._error or reason
        self._eof = True
        self._inbox_ready.set()
        self._writable.set()
        self._done.set()
        self._set_state(state)

    def _raise_if_done(self) -> None:
        if self._done.is_set() or self._closing is not None:
            raise PeerUnreachable(self._error or "the data channel is closed")

    async def _connected_or_raise(self) -> None:
        self._raise_if_done()
        if not self._connected.is_set():
            await self.wait_connected()
        self._raise_if_done()

    async def _close(self) -> None:
        ch = self._channel
        if ch is not None and ch.readyState == "open":
            # A stream reset goes out after every queued message (aiortc follows W3C
            # WebRTC 6.2.4); the channel closes once the peer has answered it.
            closed = asyncio.Event()
            ch.on("close", closed.set)
            ch.close()
            if ch.readyState != "closed":
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(closed.wait(), CLOSE_TIMEOUT)
        self._finish(CLOSED, "the data channel is closed")
        with contextlib.suppress(Exception):
            await self._pc.close()
