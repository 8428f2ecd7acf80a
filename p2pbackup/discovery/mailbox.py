"""A client of magic-wormhole's mailbox server protocol: JSON messages over one WebSocket.

It speaks the protocol of magic-wormhole-mailbox-server (docs/server-protocol.md there: welcome,
bind, allocate, claim, open, add/message, release, close, ack, error), so pairing works through
that server as well as through the broker's (p2pbackup/broker/mailbox.py). A nameplate is the
number in front of a pairing code; it points to a mailbox that holds the messages of two
"sides". The mailbox is untrusted: it sees the nameplate and opaque bodies, nothing more, and
whatever it sends is checked here (one malformed message ends the session with one line).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..errors import PairingFailed

log = logging.getLogger("p2pbackup.mailbox")

# The application namespace on a shared mailbox server ("DNSNAME/APPNAME" in its docs): a
# wormhole file transfer and a p2pbackup pairing never meet in one nameplate.
APPID = "p2pbackup.invalid/pair/v1"
# What one message may hold: a pairing frame is at most ~1 MiB (crypto/pairing.MAX_PAYLOAD),
# sent in pieces of BODY_PIECE bytes, hex-encoded (twice the size) in a small JSON envelope.
BODY_PIECE = 32 * 1024
MAX_MESSAGE = 2 * BODY_PIECE + 4096
# Messages from the other side not yet read: a pairing exchanges five frames; a mailbox that
# sends thousands is misbehaving, and must not grow our memory.
MAX_QUEUED = 256
CONNECT_TIMEOUT = 15.0
ANSWER_TIMEOUT = 30.0
HEARTBEAT = 30.0  # keeps NAT bindings and proxies from dropping a host waiting minutes


@dataclass(frozen=True, slots=True)
class MailboxMessage:
    """A message the other side added: its side, phase and body (bytes)."""

    side: str
    phase: str
    body: bytes


class MailboxSession:
    """One WebSocket to a mailbox server, bound to our appid and a fresh random side.

    Commands are sent one at a time (`allocate`, `claim`, `open`, `add`, `release`, `close`);
    `next_message()` returns the other sides' messages (our own echoes are dropped). Any
    protocol trouble raises PairingFailed naming the mailbox."""

    def __init__(self, url: str, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse
                 ) -> None:
        self.url = url
        self.side = secrets.token_hex(8)
        self.nameplate: str | None = None
        self.mailbox: str | None = None
        self._http, self._ws = http, ws
        self._answers: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._messages: asyncio.Queue[MailboxMessage | None] = asyncio.Queue()
        self._failure: PairingFailed | None = None
        self._welcome: asyncio.Future[dict[str, Any]] = \
            asyncio.get_running_loop().create_future()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, url: str, *, timeout: float = CONNECT_TIMEOUT) -> MailboxSession:
        """Connect, wait for the server's welcome, and bind."""
        http = aiohttp.ClientSession()
        try:
            ws = await asyncio.wait_for(http.ws_connect(
                url, max_msg_size=MAX_MESSAGE, heartbeat=HEARTBEAT, autoping=True), timeout)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
            await http.close()
            raise PairingFailed(f"cannot reach the pairing mailbox at {url}: "
                                f"{_describe(exc)}") from None
        session = cls(url, http, ws)
        try:
            welcome = await asyncio.wait_for(asyncio.shield(session._welcome), timeout)
            problem = welcome.get("error")
            if problem is not None:  # the operator's "stop": show it, quoted
                raise session._fail(f"it refuses clients: {_shown(problem)}")
            await session._send("bind", appid=APPID, side=session.side)
        except asyncio.TimeoutError:
            await session.aclose()
            raise PairingFailed(f"the pairing mailbox at {url} did not welcome us within "
                                f"{timeout:g} s") from None
        except BaseException:
            await session.aclose()
            raise
        return session

    # --- commands ---------------------------------------------------------------------------

    async def allocate(self) -> str:
        """Allocate (and claim) a free nameplate; return it (a short decimal number)."""
        answer = await self._request("allocate", "allocated")
        nameplate = answer.get("nameplate")
        if not isinstance(nameplate, str) or not nameplate.isdigit() or len(nameplate) > 40:
            raise self._fail("it allocated a malformed nameplate")
        self.nameplate = nameplate
        return nameplate

    async def claim(self, nameplate: str) -> str:
        """Claim `nameplate` (after allocate too: the protocol says so); return its mailbox."""
        answer = await self._request("claim", "claimed", nameplate=nameplate)
        mailbox = answer.get("mailbox")
        if not isinstance(mailbox, str) or not 0 < len(mailbox) <= 200:
            raise self._fail("it answered a claim with a malformed mailbox name")
        self.nameplate, self.mailbox = nameplate, mailbox
        return mailbox

    async def open(self) -> None:
        """Subscribe to the claimed mailbox: its past and future messages arrive."""
        assert self.mailbox is not None, "claim() first"
        await self._send("open", mailbox=self.mailbox)

    async def add(self, phase: str, body: bytes) -> None:
        await self._send("add", phase=phase, body=body.hex())

    async def next_message(self, timeout: float | None) -> MailboxMessage | None:
        """The other side's next message; None after `timeout` s. PairingFailed once the
        mailbox misbehaved or the connection ended."""
        if self._failure is not None and self._messages.empty():
            raise self._failure
        try:
            got = await asyncio.wait_for(self._messages.get(), timeout)
        except asyncio.TimeoutError:
            return None
        if got is None:
            assert self._failure is not None
            raise self._failure
        return got

    async def release(self) -> None:
        """Give the nameplate back (both sides are in the mailbox, or we are leaving)."""
        if self.nameplate is not None:
            nameplate, self.nameplate = self.nameplate, None
            await self._request("release", "released", nameplate=nameplate)

    async def close(self, mood: str) -> None:
        """Close the mailbox (`mood`: happy, lonely, scary, errory: the server's statistics)."""
        if self.mailbox is not None:
            mailbox, self.mailbox = self.mailbox, None
            await self._request("close", "closed", mailbox=mailbox, mood=mood)

    async def aclose(self, mood: str = "errory") -> None:
        """Release, close and hang up, best effort (the server prunes what we leave)."""
        if self._failure is None and not self._ws.closed:
            with contextlib.suppress(PairingFailed, asyncio.TimeoutError):
                async with asyncio.timeout(5):
                    await self.release()
                    await self.close(mood)
        self._reader.cancel()
        with contextlib.suppress(Exception):
            await self._ws.close()
        await self._http.close()

    # --- the wire ---------------------------------------------------------------------------

    async def _send(self, t: str, **fields: Any) -> None:
        if self._failure is not None:
            raise self._failure
        message = {"type": t, "id": secrets.token_hex(2), **fields}
        try:
            # The protocol: JSON, UTF-8, one WebSocket message each (the Python server sends
            # text frames and reads either kind).
            await self._ws.send_str(json.dumps(message))
        except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
            raise self._fail(f"the connection broke ({_describe(exc)})") from None

    async def _request(self, t: str, answer: str, **fields: Any) -> dict[str, Any]:
        waiter = self._answers[answer] = asyncio.get_running_loop().create_future()
        await self._send(t, **fields)
        try:
            return await asyncio.wait_for(waiter, ANSWER_TIMEOUT)
        except asyncio.TimeoutError:
            raise self._fail(f"it did not answer {t!r} within {ANSWER_TIMEOUT:g} s") from None
        finally:
            self._answers.pop(answer, None)

    def _fail(self, why: str) -> PairingFailed:
        """End the session: every waiter (now and later) gets this one line."""
        if self._failure is None:
            self._failure = PairingFailed(f"pairing failed: the pairing mailbox at {self.url}: "
                                          f"{why}")
            for waiter in self._answers.values():
                if not waiter.done():
                    waiter.set_exception(self._failure)
            if not self._welcome.done():
                self._welcome.set_exception(self._failure)
                self._welcome.exception()  # retrieved: connect() raises its own line
            self._messages.put_nowait(None)
        return self._failure

    async def _read(self) -> None:
        try:
            async for frame in self._ws:
                if frame.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    self._dispatch(frame.data)
                elif frame.type is aiohttp.WSMsgType.ERROR:
                    raise self._fail(f"the connection broke ({_describe(self._ws.exception())})")
            self._fail("it closed the connection")
        except PairingFailed:
            pass
        except Exception as exc:  # a bug here must not leave the pairing waiting forever
            log.exception("mailbox client")
            self._fail(f"unexpected trouble reading from it ({exc})")

    def _dispatch(self, data: str | bytes) -> None:
        try:
            message = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise self._fail("it sent a message that is not JSON") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise self._fail("it sent a message without a type")
        t = message["type"]
        if t == "welcome":
            welcome = message.get("welcome", {})
            if not isinstance(welcome, dict):
                raise self._fail("it sent a malformed welcome")
            if not self._welcome.done():
                self._welcome.set_result(welcome)
        elif t == "message":
            self._received(message)
        elif t == "error":
            if message.get("error") == "crowded":  # two sides are in its mailbox already
                raise self._fail("another device is already pairing with this code there (one "
                                 "attempt per code; ask for a new code)")
            raise self._fail(f"it refused our {_orig_type(message)!r}: "
                             f"{_shown(message.get('error'))}")
        elif t in self._answers:
            waiter = self._answers[t]
            if not waiter.done():
                waiter.set_result(message)
        # Anything else (ack, pong, nameplates, answers nobody waits for, types from a newer
        # server) is ignored, as the protocol asks of clients.

    def _received(self, message: dict[str, Any]) -> None:
        side, phase, body = message.get("side"), message.get("phase"), message.get("body")
        if not (isinstance(side, str) and isinstance(phase, str) and isinstance(body, str)):
            raise self._fail("it sent a message without side, phase or body")
        if side == self.side:
            return  # the echo of our own add
        try:
            raw = bytes.fromhex(body)
        except ValueError:
            raise self._fail("it sent a message body that is not hex") from None
        if self._messages.qsize() >= MAX_QUEUED:
            raise self._fail(f"it sent more than {MAX_QUEUED} messages at once")
        self._messages.put_nowait(MailboxMessage(side, phase, raw))


def _orig_type(message: dict[str, Any]) -> object:
    orig = message.get("orig")
    return _shown(orig.get("type"), 20) if isinstance(orig, dict) else "?"


def _shown(text: object, limit: int = 120) -> str:
    """The server's words reach a terminal: printable, one line, bounded."""
    s = str(text)[:limit * 4]
    s = " ".join("".join(ch if ch.isprintable() else " " for ch in s).split())
    return s if len(s) <= limit else s[:limit - 1] + "…"


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no reason given"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"it is not a mailbox (HTTP {exc.status} to the WebSocket upgrade)"
    return _shown(str(exc) or type(exc).__name__)
