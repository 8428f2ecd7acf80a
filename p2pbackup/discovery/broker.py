"""The broker client: one WebSocket per daemon (reconnecting with backoff and jitter), signaling
through it (`BrokerSignaling`, a session.Signaling like LanSignaling), pushes both ways, and
the broker's signed REST calls (register the account's roster, device records, ICE servers).

The broker is untrusted: an offer it relays is answered only if session.OfferAnswerer (the same
check the LAN endpoint makes) admits it, and an answer it relays is checked by session.connect.
aiohttp exceptions become p2pbackup errors here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from ..crypto.identity import DeviceIdentity
from .. import control
from ..errors import (ConfigError, LocalProtocolError, P2PError, PeerUnreachable,
                      RemoteProtocolError)
from ..protocol import store_requests as req
from ..protocol.broker_wire import DEVICE_PING, REQUEST_DOMAIN, ping_period, socket_auth_message
from ..session import OfferAnswerer, answer_or_refusal, hand_over, refusal
from ..transport.datachannel import IceConfig, IceServer, PeerLink

log = logging.getLogger("p2pbackup.broker.client")

BACKOFF_FIRST = 1.0      # seconds before the first reconnection
BACKOFF_MAX = 60.0       # ... doubling up to this
EXCHANGE_TIMEOUT = 30.0  # an answer through the broker: the peer gathers ICE candidates first
REQUEST_TIMEOUT = 30.0

OnPush = Callable[[str, bytes], Awaitable[None]]
# (index, sender, command, payload): a command another device of the account invoked on this
# one (FxA's invoke_command). The broker keeps it until its TTL and sends it again at each
# connection: the client passes each index on once (per process; a restarted daemon may see
# one again, so a command must be harmless twice).
OnCommand = Callable[[int, str, str, bytes], Awaitable[None]]
OnLink = Callable[[str, PeerLink], Awaitable[None]]


def backoff(attempt: int, rand: Callable[[], float]) -> float:
    """Seconds to wait before reconnection `attempt` (0, 1, ...): doubling from BACKOFF_FIRST
    up to BACKOFF_MAX, each a random fraction (half to all) of it, so that daemons cut off
    together (a broker restart) do not all come back in the same second."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(attempt, 16)) * (0.5 + rand() / 2)


def broker_of_mailbox(mailbox: str) -> str | None:
    """The broker whose pairing mailbox `mailbox` is (wss://HOST/v1/mailbox is
    https://HOST's); None for another mailbox server (magic-wormhole's)."""
    parts = urlsplit(mailbox)
    if parts.path.rstrip("/") != "/v1/mailbox" or not parts.netloc:
        return None
    scheme = {"wss": "https", "ws": "http"}.get(parts.scheme)
    return f"{scheme}://{parts.netloc}" if scheme else None


class BrokerClient:
    """This device's connection to its account's broker at `url` (http[s]://host:port)."""

    def __init__(self, url: str, identity: DeviceIdentity, account: str, *,
                 answerer: OfferAnswerer | None = None, on_link: OnLink | None = None,
                 on_push: OnPush | None = None, on_command: OnCommand | None = None,
                 on_refused: Callable[[str], None] | None = None,
                 before_connect: Callable[[], Awaitable[None]] | None = None,
                 on_ready: Callable[[], Awaitable[None]] | None = None,
                 ssl: Any = None, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 now: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random) -> None:
        self.check_url(url)
        self.base = url.rstrip("/")
        self.identity, self.account = identity, account
        self.answerer, self.on_link, self.on_push = answerer, on_link, on_push
        self.on_command = on_command
        self._commands_seen = 0   # the highest command index passed to on_command
        self.on_refused = on_refused or (lambda why: log.warning("%s", why))
        self.before_connect = before_connect   # e.g. bring the broker the account's roster
        self.on_ready = on_ready               # each time the socket is up (e.g. say so)
        self.ssl, self.sleep, self.now, self.rand = ssl, sleep, now, rand
        self.connected = asyncio.Event()
        self.last_error: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        # our offers' ids -> (the device asked, its answer): only that device answers it
        self._waiting: dict[int, tuple[str, asyncio.Future[bytes]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None

    @staticmethod
    def check_url(url: str) -> None:
        """ConfigError unless `url` can name a broker."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"broker url {url!r}: give http(s)://host:port")
        if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
            raise ConfigError(f"broker url {url!r}: use https:// (http only on loopback)")

    # -- REST ------------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.ssl if self.ssl is not None else True),
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT))
        return self._session

    def _path(self, tail: str) -> str:
        return f"v1/account/{quote(self.account)}/{tail}"

    async def request(self, method: str, tail: str, body: bytes = b"", query: str = "",
                      extra: dict[str, str] | None = None) -> tuple[int, bytes]:
        """One signed request to /v1/account/<account>/<tail>: (status, body)."""
        path = self._path(tail)
        headers = req.sign(self.identity.device_id, self.identity.sign, method, path, query,
                           body, self.now(), REQUEST_DOMAIN) | (extra or {})
        url = f"{self.base}/{path}" + (f"?{query}" if query else "")
        try:
            async with self._http().request(method, url, data=body, headers=headers) as r:
                return r.status, await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise PeerUnreachable(f"cannot reach the broker at {self.base}: "
                                  f"{exc or type(exc).__name__}") from None

    async def _call(self, method: str, tail: str, doc: dict[str, Any] | None = None,
                    query: str = "") -> dict[str, Any]:
        status, body = await self.request(method, tail, json.dumps(doc).encode()
                                          if doc is not None else b"", query)
        if status >= 400:
            raise RemoteProtocolError(f"the broker refused {tail.split('?')[0]}: {status} "
                                      f"{body.decode('utf-8', 'replace').strip()[:200]}")
        try:
            return json.loads(body) if body else {}
        except ValueError:
            raise RemoteProtocolError("the broker's answer is not JSON") from None

    async def registration(self) -> dict[str, Any]:
        """What registering an account on this broker needs (unsigned GET /v1/registration):
        {"open": true}, {"invites": true} or {"oidc": {"issuer", "audience"}}."""
        try:
            async with self._http().get(f"{self.base}/v1/registration") as r:
                doc = await r.json(content_type=None) if r.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            raise PeerUnreachable(f"cannot reach the broker at {self.base}: "
                                  f"{exc or type(exc).__name__}") from None
        return doc if isinstance(doc, dict) else {"open": True}   # a broker before sign-in

    async def publish_rosters(self, rosters: list[bytes], *, token: str | None = None,
                              invite: str | None = None) -> None:
        """Bring the broker to the newest of `rosters` (the account's chain, oldest first):
        the newest alone when the broker holds the one before it (or nothing: registration,
        with the sign-in `token` or the `invite` a broker may ask for), else each in turn
        (those it holds already are refused as not following: skipped)."""
        if not rosters:
            return
        extra = {}
        if token is not None:
            extra["Authorization"] = f"Bearer {token.strip()}"
        if invite is not None:
            extra[req.INVITE] = invite.strip()
        status, body = await self.request("POST", "roster", rosters[-1], extra=extra)
        if status == 409 and len(rosters) > 1:
            for raw in rosters:
                status, body = await self.request("POST", "roster", raw, extra=extra)
        if status >= 400:
            raise RemoteProtocolError(f"the broker refused the roster: {status} "
                                      f"{body.decode('utf-8', 'replace').strip()[:200]}")

    async def register_device(self, info: bytes) -> None:
        """This device's record (opaque to the broker: encrypt anything personal)."""
        await self._call("POST", "device", {"info": base64.b64encode(info).decode()})

    async def devices(self) -> list[dict[str, Any]]:
        return list((await self._call("GET", "devices")).get("devices", []))

    async def notify(self, payload: bytes, to: list[str] | None = None,
                     ttl: int | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {"payload": base64.b64encode(payload).decode(),
                               "to": to if to is not None else "all"}
        if ttl is not None:
            doc["ttl"] = ttl
        return await self._call("POST", "devices/notify", doc)

    async def invoke_command(self, target: str, command: str, payload: bytes,
                             ttl: int | None = None) -> int:
        """Queue `command` for device `target` (FxA's invoke_command); its index."""
        doc: dict[str, Any] = {"target": target, "command": command,
                               "payload": base64.b64encode(payload).decode()}
        if ttl is not None:
            doc["ttl"] = ttl
        return int((await self._call("POST", "devices/invoke_command", doc))["index"])

    async def commands(self, after: int = 0) -> list[tuple[int, str, str, bytes]]:
        """This device's commands queued after index `after`: (index, sender, command,
        payload)."""
        doc = await self._call("GET", "device/commands", query=f"index={after}")
        out = []
        for m in doc.get("messages", []):
            with contextlib.suppress(KeyError, TypeError, ValueError):
                out.append((int(m["index"]), str(m["from"]), str(m["command"]),
                            base64.b64decode(m["payload"], validate=True)))
        return out

    async def ice(self, *, host_addresses: tuple[str, ...] | None = None) -> IceConfig:
        """The STUN/TURN servers the broker hands out, with fresh TURN credentials."""
        doc = await self._call("GET", "ice")
        servers = []
        for s in doc.get("iceServers", []):
            urls = s.get("urls") if isinstance(s, dict) else None
            if isinstance(urls, str):
                urls = [urls]
            if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
                continue   # a shape this client does not know
            servers.append(IceServer(tuple(urls), s.get("username"), s.get("credential")))
        return IceConfig(tuple(servers), host_addresses=host_addresses)

    # -- the socket ------------------------------------------------------------------------

    def start(self) -> None:
        """Keep the socket open in the background until `close()`."""
        if self._runner is None:
            self._runner = asyncio.create_task(self.run())

    async def run(self) -> None:
        """Connect, serve the socket, reconnect after backoff; forever."""
        attempt = 0
        while True:
            try:
                await self._connect_and_serve()
                self.last_error = self.last_error or "the broker closed the connection"
            except asyncio.CancelledError:
                raise
            except P2PError as exc:
                self.last_error = str(exc)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                self.last_error = f"cannot reach the broker at {self.base}: " \
                                  f"{exc or type(exc).__name__}"
            finally:
                if self.connected.is_set():   # it was up: back off from the beginning
                    attempt = 0
                self.connected.clear()
                self._ws = None
                for _, fut in self._waiting.values():
                    if not fut.done():
                        fut.set_exception(PeerUnreachable("the broker connection was lost"))
                self._waiting.clear()
            delay = backoff(attempt, self.rand)
            log.info("broker %s: %s; connecting again in %.1f s", self.base, self.last_error,
                     delay)
            attempt += 1
            await self.sleep(delay)

    async def _connect_and_serve(self) -> None:
        if self.before_connect is not None:
            await self.before_connect()
        url = f"{self.base}/{self._path('ws')}"
        async with self._http().ws_connect(url, heartbeat=ping_period(DEVICE_PING, self.rand()),
                                           max_msg_size=128 * 1024,
                                           timeout=aiohttp.ClientWSTimeout(ws_close=5.0)
                                           ) as ws:
            first = await ws.receive_json(timeout=REQUEST_TIMEOUT)
            if not isinstance(first, dict) or first.get("t") != "challenge" or \
                    not isinstance(first.get("nonce"), str):
                raise RemoteProtocolError("the broker did not send a challenge")
            sig = self.identity.sign(socket_auth_message(self.account,
                                                         self.identity.device_id,
                                                         first["nonce"]))
            await ws.send_json({"t": "auth", "device": self.identity.device_id,
                                "sig": base64.b64encode(sig).decode()})
            self._ws = ws
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                try:
                    doc = json.loads(msg.data)
                except ValueError:
                    continue
                if isinstance(doc, dict):
                    await self._on_message(doc)
            if ws.close_code is not None and ws.close_code != 1000 and self.last_error is None:
                self.last_error = f"the broker closed the connection ({ws.close_code})"

    async def _on_message(self, doc: dict[str, Any]) -> None:
        kind = doc.get("t")
        if kind == "ready":
            self.last_error = None
            self.connected.set()
            if self.on_ready is not None:
                self._spawn(self.on_ready())
        elif kind == "error":
            self.last_error = f"the broker says: {str(doc.get('error'))[:200]}"
        elif kind == "signal":
            self._on_signal(doc)
        elif kind == "undeliverable":
            _, fut = self._waiting.pop(doc.get("id"), (None, None))  # type: ignore[arg-type]
            if fut is not None and not fut.done():
                fut.set_exception(PeerUnreachable(
                    f"device {str(doc.get('to'))[:12]} is not connected to the broker"))
        elif kind == "push" and self.on_push is not None:
            sender, data = doc.get("from"), doc.get("data")
            with contextlib.suppress(ValueError, TypeError):
                await self.on_push(str(sender), base64.b64decode(str(data), validate=True))
        elif kind == "command" and self.on_command is not None:
            index, command = doc.get("index"), doc.get("command")
            if isinstance(index, int) and isinstance(command, str) and \
                    index > self._commands_seen:
                self._commands_seen = index
                with contextlib.suppress(ValueError, TypeError):
                    await self.on_command(index, str(doc.get("from")), command,
                                          base64.b64decode(str(doc.get("payload")),
                                                           validate=True))
        # other kinds: from a newer broker, skipped

    def _on_signal(self, doc: dict[str, Any]) -> None:
        try:
            data = base64.b64decode(str(doc.get("data")), validate=True)
        except ValueError:
            return
        if "re" in doc:    # an answer to one of our offers
            # Offer ids are a count: another device of the account (a storage partner
            # among them) could answer for the one asked, ending the session we wanted.
            n = doc["re"]
            asked, fut = self._waiting.get(n, (None, None)) if isinstance(n, int) else \
                (None, None)
            if fut is None or doc.get("from") != asked:
                return
            del self._waiting[n]
            if not fut.done():
                fut.set_result(data)
            return
        self._spawn(self._answer(str(doc.get("from")), doc.get("id"), data))

    def _spawn(self, work: Awaitable[None]) -> None:
        """Run `work` beside the socket's reading loop (which must not wait for it)."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, sender: str, n: object, offer: bytes) -> None:
        """Answer an offer the broker relayed, as the LAN endpoint would (session.py)."""
        if self.answerer is None or self.on_link is None:
            reply = b"!this device takes no sessions through the broker"
            link = None
        else:
            try:
                desc = self.answerer.check(offer)
                link, reply = await self.answerer.accept(desc)
                sender = desc.sender
            except P2PError as exc:
                self.on_refused(f"session offered through the broker refused: {exc}")
                reply, link = refusal(exc), None
        if not await self._send({"t": "signal", "to": sender, "id": next(self._ids), "re": n,
                                 "data": base64.b64encode(reply).decode()}):
            if link is not None:
                await link.close()
            return
        if link is not None and self.on_link is not None:
            await hand_over(sender, link, self.on_link, self.on_refused)

    async def _send(self, doc: dict[str, Any]) -> bool:
        ws = self._ws
        if ws is None or ws.closed:
            return False
        try:
            await ws.send_str(json.dumps(doc))
            return True
        except (ConnectionError, RuntimeError, aiohttp.ClientError):
            return False

    async def relay(self, peer: str, data: bytes, timeout: float = EXCHANGE_TIMEOUT) -> bytes:
        """Send `data` (a signed offer) to device `peer` through the broker; its reply."""
        n = next(self._ids)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[n] = (peer, fut)
        try:
            if not await self._send({"t": "signal", "to": peer, "id": n,
                                     "data": base64.b64encode(data).decode()}):
                raise PeerUnreachable(f"not connected to the broker at {self.base}"
                                      + (f" ({self.last_error})" if self.last_error else ""))
            try:
                return await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                raise PeerUnreachable(f"device {peer[:12]} did not answer through the broker "
                                      f"within {timeout:.0f} s") from None
        finally:
            self._waiting.pop(n, None)

    async def push(self, payload: bytes, ttl: int | None = None) -> bool:
        """Tell the account's other devices (e.g. a new head); False if not connected (the
        caller's next push, or the peers' own polling, covers it)."""
        doc: dict[str, Any] = {"t": "push", "data": base64.b64encode(payload).decode()}
        if ttl is not None:
            doc["ttl"] = ttl
        return await self._send(doc)

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
            self._runner = None
        for t in list(self._tasks):
            t.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None


class BrokerSignaling:
    """session.Signaling through the broker to device `peer`."""

    def __init__(self, client: BrokerClient, peer: str) -> None:
        self.client, self.peer = client, peer

    async def exchange(self, offer: bytes) -> bytes:
        return answer_or_refusal(await self.client.relay(self.peer, offer))


class DaemonSignaling:
    """session.Signaling through the broker to device `peer`, over the socket this device's
    running daemon holds (asked on its control socket `control_socket`): the broker holds one
    socket per device, so a CLI opening its own would close the daemon's."""

    def __init__(self, control_socket: Path, peer: str) -> None:
        self.control_socket, self.peer = control_socket, peer

    async def exchange(self, offer: bytes) -> bytes:
        got = await control.request(self.control_socket, "broker_signal", {
            "to": self.peer, "offer": base64.b64encode(offer).decode()},
            timeout=EXCHANGE_TIMEOUT + REQUEST_TIMEOUT)
        try:
            answer = base64.b64decode(str(got["answer"]), validate=True)
        except (KeyError, ValueError):
            raise LocalProtocolError("p2pbackupd's answer to broker_signal is not base64") \
                from None
        return answer_or_refusal(answer)


ICE_FETCH_TIMEOUT = 5.0     # a slow broker must not hold up a session: the configured servers
ICE_REFRESH = 300.0         # how long servers without TURN credentials are kept


class BrokerIce:
    """The ICE servers a device uses with a broker: the broker's first (aioice takes the first
    STUN and the first TURN server of a list), then the configured `[ice]` ones; its
    `relay_only` and host addresses. The broker's are kept until half their TURN credentials'
    lifetime has passed, then fetched again; while the broker cannot be reached (or is slow),
    the configured servers alone, so a broker outage never delays a session on the LAN."""

    def __init__(self, client: BrokerClient, configured: IceConfig, *,
                 now: Callable[[], float] = time.time,
                 reachable: Callable[[], bool] | None = None) -> None:
        self.client, self.configured, self.now = client, configured, now
        # the broker answers REST calls (a client whose socket is up; a CLI signaling
        # through the daemon's socket asks it all the same)
        self.reachable = reachable or client.connected.is_set
        self._got: IceConfig | None = None
        self._fresh_until = 0.0
        self._lock = asyncio.Lock()

    async def current(self) -> IceConfig:
        async with self._lock:
            if self._got is not None and self.now() < self._fresh_until:
                return self._got
            if not self.reachable():
                return self.configured
            try:
                got = await asyncio.wait_for(self.client.ice(), ICE_FETCH_TIMEOUT)
            except (P2PError, asyncio.TimeoutError) as exc:
                log.info("broker %s: no ICE servers (%s); using the configured ones",
                         self.client.base, exc or "timed out")
                return self.configured
            now = self.now()
            self._fresh_until = now + _lifetime(got, now) / 2
            self._got = IceConfig(got.servers + self.configured.servers,
                                  relay_only=self.configured.relay_only,
                                  host_addresses=self.configured.host_addresses)
            return self._got


def _lifetime(ice: IceConfig, now: float) -> float:
    """Seconds until the earliest TURN credential expires (coturn's REST usernames start with
    the expiry time); ICE_REFRESH without any."""
    left = [float(s.username.split(":", 1)[0]) - now for s in ice.servers
            if s.username and s.username.split(":", 1)[0].isdigit()]
    return max(0.0, min(left)) if left else ICE_REFRESH
