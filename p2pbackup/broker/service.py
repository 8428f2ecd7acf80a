"""The broker: accounts' device registry, signaling relay, push and TURN credentials, over HTTP
and one WebSocket per device (aiohttp; state behind broker/state.py).

It holds no key and reads nothing personal: an account is the roster its owner devices sign
(format/roster.py, the clear-text device list a storage partner follows too), device records
are opaque bytes the devices encrypt, and offers and answers are relayed as they come (each
is signed by its device and checked by the peer, session.py: a broker that changes, replays or
invents one is refused there). REST, in the shape of Firefox Accounts' device API, every
request signed by a device the account's roster lists (protocol/store_requests.py, with this
service's own domain):

    GET  /v1/                                      "p2pbackup-broker 1" (unsigned)
    GET  /v1/registration                          what registering needs (unsigned):
                                                   {"open"}, {"invites"} or {"oidc": {issuer,
                                                   audience}} (broker/registration.py)
    POST /v1/account/{account}/roster              register the account (its first roster,
                                                   brought by an owner it lists) or follow it
                                                   (the next version, signed by an owner of
                                                   the held one); removed devices are
                                                   refused from then on, their socket closed
    POST /v1/account/{account}/device              register/update this device's record
    GET  /v1/account/{account}/devices             the roster's devices, records, connected
    POST /v1/account/{account}/devices/notify      push to the other devices (or `to`)
    POST /v1/account/{account}/devices/invoke_command   queue a command for one device
    GET  /v1/account/{account}/device/commands?index=N  this device's commands after N
    GET  /v1/account/{account}/ice                 STUN/TURN servers, TURN credentials
    GET  /v1/account/{account}/ws                  the WebSocket (module `Connection`)

Refusals are one status line each, and one log line: 400 (a malformed body), 401 (unsigned,
a bad signature, stale, replayed), 403 (a device the roster does not list, or no longer),
404 (no such account), 409 (a roster that does not follow the one held), 413, 422 (a
malformed or badly signed roster); registering refuses with 401 (no, or a bad, sign-in token)
or 403 (no or a spent invitation, a person's or an account's limit), and 503 when the
sign-in issuer cannot be reached.

When its database fails (state.unavailable), requests that need it are refused with 503 and
that line, and so are new sockets (close code 1013, try again later); the sockets already
open relay to each other as before, a signal to a device on another process is answered
"undeliverable", and the log says so once a minute, not once a message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import random
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from ..crypto.identity import device_id_for, verify_signature
from ..errors import IntegrityError, StorageError
from ..format.roster import Roster, check_next, check_signed, read_roster, roster_hash
from ..ids import is_account, is_device
from ..logthrottle import ThrottledLog
from ..protocol.broker_wire import (BROKER_PING, REQUEST_DOMAIN, ping_period,
                                    socket_auth_message)
from ..server.refusals import Refused, SignedRequests, one_line_errors
from .ice import IceSettings, ice_servers
from .pauses import GcFreezer, GcPauses
from .registration import OpenRegistration, Registration
from .relay import LocalRelay, Relay
from .state import BrokerState

log = logging.getLogger("p2pbackup.broker")

MAX_BODY = 64 * 1024           # a roster of a few hundred devices; a device record
MAX_MESSAGE = 96 * 1024        # a socket message: a signed SDP (session.MAX_SIGNAL) in base64
AUTH_TIMEOUT = 10.0            # seconds a new socket has to answer its challenge
RATE = 20.0                    # socket messages per second a connection may send, sustained
BURST = 100.0                  # ... and at once
MAX_CONNECTIONS = 64           # sockets per account (one per device: a new one replaces)
MAX_TTL = 7 * 86400            # the longest a push or command waits for its device
PUSH_TTL = 86400
MAX_PUSH = 4096                # bytes of one push's payload (a signed head is ~200)
MAX_ACCOUNTS_PER_PERSON = 5    # accounts one signed-in person registers (a household's few)
MAX_DEVICES = MAX_CONNECTIONS  # devices (and partners) one account's roster lists


@dataclass(slots=True)
class TokenBucket:
    """`rate` events per second with bursts of `burst` (the socket's flood limit)."""

    rate: float
    burst: float
    now: Callable[[], float]
    tokens: float = -1.0
    at: float = 0.0

    def take(self) -> bool:
        t = self.now()
        if self.tokens < 0:
            self.tokens, self.at = self.burst, t
        self.tokens = min(self.burst, self.tokens + (t - self.at) * self.rate)
        self.at = t
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass(slots=True)
class Connection:
    """One device's socket."""

    account: str
    device: str
    ws: web.WebSocketResponse
    where: str
    bucket: TokenBucket
    closing: bool = False
    batch: int = 0            # GcFreezer's, when it opened

    async def send(self, doc: dict[str, Any]) -> bool:
        if self.ws.closed:
            return False
        try:
            await self.ws.send_str(json.dumps(doc))
            return True
        except (ConnectionError, RuntimeError):
            return False


class OutageLog:
    """The database failing under the socket path as one log line a minute (with how many
    more failures it hid), not a line for each of a thousand messages a second."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._log = ThrottledLog(log, now=now, hidden="more failures")

    def failed(self, what: str, exc: StorageError) -> None:
        self._log.warning(f"{what}: {exc}", kind="")   # one outage: one line, whatever failed


@dataclass(slots=True)
class _Account:
    raw: bytes
    roster: Roster
    sockets: dict[str, Connection] = field(default_factory=dict)


class MessageRefused(Exception):
    """A socket message refused: the connection is closed after one log line."""


def _b64(value: object, what: str, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > limit * 4 // 3 + 4:
        raise MessageRefused(f"{what} is not base64 of at most {limit} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise MessageRefused(f"{what} is not base64") from None


def _int(value: object, what: str, low: int = 0, high: int = 2**53) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise MessageRefused(f"{what} is not a whole number from {low} to {high}")
    return value


class Broker:
    """The service: `app()` is the aiohttp application; `extra_routes` are called with it
    (e.g. the pairing mailbox's `add_mailbox_routes`). `relay` reaches devices whose socket
    another broker process holds (PostgresRelay); the default is a lone process."""

    def __init__(self, state: BrokerState, *, relay: Relay | None = None,
                 ice: IceSettings = IceSettings(),
                 push_ttl: int = PUSH_TTL, rate: float = RATE, burst: float = BURST,
                 max_connections: int = MAX_CONNECTIONS,
                 registration: Registration = OpenRegistration(),
                 max_accounts_per_person: int = MAX_ACCOUNTS_PER_PERSON,
                 max_devices: int = MAX_DEVICES,
                 now: Callable[[], float] = time.time,
                 extra_routes: Iterable[Callable[[web.Application], None]] = (),
                 freezer: GcFreezer | None = None) -> None:
        self.state, self.ice, self.push_ttl = state, ice, push_ttl
        self.relay = relay or LocalRelay()
        self.rate, self.burst, self.max_connections = rate, burst, max_connections
        self.registration = registration
        self.max_accounts_per_person, self.max_devices = max_accounts_per_person, max_devices
        self.now = now
        self.extra_routes = tuple(extra_routes)
        self.requests = SignedRequests(now, REQUEST_DOMAIN)
        self._accounts: dict[str, _Account] = {}
        self._roster_lock = asyncio.Lock()
        self.pauses = GcPauses()
        self.freezer = freezer or GcFreezer.off()
        self.outage = OutageLog(now)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY,
                              middlewares=[one_line_errors(log, (StorageError,))])
        app.router.add_get("/v1/", self._hello)
        app.router.add_get("/v1/registration", self._registration)
        app.router.add_post("/v1/account/{account}/roster", self._roster)
        app.router.add_post("/v1/account/{account}/device", self._device)
        app.router.add_get("/v1/account/{account}/devices", self._devices)
        app.router.add_post("/v1/account/{account}/devices/notify", self._notify)
        app.router.add_post("/v1/account/{account}/devices/invoke_command", self._invoke)
        app.router.add_get("/v1/account/{account}/device/commands", self._commands)
        app.router.add_get("/v1/account/{account}/ice", self._ice)
        app.router.add_get("/v1/account/{account}/ws", self._socket)
        for add in self.extra_routes:
            add(app)
        app.on_startup.append(self._start_relay)
        app.on_shutdown.append(self._close_sockets)
        app.on_cleanup.append(self._close_state)
        return app

    # -- accounts --------------------------------------------------------------------------

    async def _account(self, account: str) -> _Account | None:
        held = self._accounts.get(account)
        if held is None:
            raw = await self.state.roster(account)
            if raw is None:
                return None
            # checked when it was stored
            held = self._accounts.setdefault(account,
                                             _Account(raw, read_roster(raw, device_id_for)[0]))
        return held

    def _account_id(self, request: web.Request) -> str:
        account = request.match_info["account"]
        if not is_account(account):
            raise Refused(404, f"{account[:40]!r} is not an account id")
        return account

    async def _member(self, request: web.Request, body: bytes = b"", *,
                      recovering: bool = False, partners: bool = False
                      ) -> tuple[str, _Account, str]:
        """(account id, account, device) of a request signed by a device the roster lists
        (or, with `recovering`, by the recovery signer it names; with `partners`, by a storage
        partner it names)."""
        account = self._account_id(request)
        held = await self._account(account)
        if held is None:
            raise Refused(404, f"account {account} is not registered on this broker")
        roster, recovery = held.roster, held.roster.next_signer_key(device_id_for)

        def key(d: str) -> bytes | None:
            return roster.key_of(d) or (recovery(d) if recovering else None) or \
                (roster.partner_key(d) if partners else None)
        return account, held, self.requests.signer(request, body, account, key)

    @staticmethod
    async def _body(request: web.Request) -> bytes:
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Refused(413, f"a body larger than the {MAX_BODY} bytes this broker "
                               "takes") from None

    async def _json(self, request: web.Request) -> tuple[bytes, dict[str, Any]]:
        body = await self._body(request)
        try:
            doc = json.loads(body) if body else {}
        except (ValueError, UnicodeDecodeError):
            raise Refused(400, "the body is not JSON") from None
        if not isinstance(doc, dict):
            raise Refused(400, "the body is not a JSON object")
        return body, doc

    async def _hello(self, request: web.Request) -> web.Response:
        return web.Response(text="p2pbackup-broker 1\n")

    async def _registration(self, request: web.Request) -> web.Response:
        return web.json_response(self.registration.describe())

    def _check_size(self, roster: Roster, held: Roster | None = None) -> None:
        """Refuse a roster listing more than `max_devices` (one that shrinks is followed)."""
        n = len(roster.members) + len(roster.partners)
        if n > self.max_devices and (held is None or n > len(held.members) + len(held.partners)):
            raise Refused(403, f"the roster lists {n} devices, more than the "
                               f"{self.max_devices} this broker takes per account")

    async def _roster(self, request: web.Request) -> web.Response:
        """Register an account by its first roster, or follow it to the next version."""
        account = self._account_id(request)
        body = await self._body(request)
        async with self._roster_lock:
            held = await self._account(account)
            if held is None:
                try:
                    # the first roster vouches for itself (as a partner's at pairing)
                    roster = check_signed(body, read_roster(body, device_id_for)[0].owner_key,
                                          verify_signature, device_id_for, "the roster")
                except IntegrityError as exc:
                    raise Refused(422, str(exc)) from None
                try:
                    device = self.requests.signer(request, body, account, roster.owner_key)
                except Refused as r:
                    if r.status != 403:
                        raise
                    raise Refused(403, "only an owner device the roster lists registers an "
                                       "account") from None
                self._check_size(roster)
                person = await self.registration.admit(request)
                if person is not None and not await self.state.bind_person(
                        account, person, self.max_accounts_per_person):
                    raise Refused(403, f"this sign-in has registered {self.max_accounts_per_person}"
                                       " accounts on this broker, the most it takes per person")
                if not await self.state.set_roster(account, roster.seq, body, replaces=None):
                    if person is not None:
                        await self.state.unbind_person(account)
                    raise Refused(409, f"account {account} is registered already")
                self._accounts[account] = _Account(body, roster)
                log.info("account %s registered by device %s%s", account, device[:12],
                         f" (person {person[:12]})" if person is not None else "")
                return web.Response(status=201)
            recovery = held.roster.next_signer_key(device_id_for)
            device = self.requests.signer(
                request, body, account, lambda d: held.roster.key_of(d) or recovery(d))
            if body == held.raw:
                return web.Response(status=200)
            try:
                roster = check_next(held.roster, roster_hash(held.raw), body, verify_signature,
                                    device_id_for, "the roster")
            except IntegrityError as exc:
                raise Refused(409, str(exc)) from None
            self._check_size(roster, held.roster)
            if not await self.state.set_roster(account, roster.seq, body,
                                               replaces=held.roster.seq):
                raise Refused(409, "another roster was stored meanwhile: send it again")
            gone = await self._follow(account, held, body, roster)
        await self.state.forget_devices(account, gone)
        await self.relay.roster_stored(account)
        log.info("account %s follows roster %d (brought by %s)", account, roster.seq,
                 device[:12])
        return web.Response(status=201)

    async def _follow(self, account: str, held: _Account, raw: bytes, roster: Roster
                      ) -> list[str]:
        """Hold `roster` from now on and close the sockets of the devices it removes (here:
        the relay tells the other processes); returns those devices."""
        gone = [e.device_id for e in held.roster.members + held.roster.partners
                if _socket_key(roster, e.device_id) is None]
        held.raw, held.roster = raw, roster
        for d in gone:
            conn = held.sockets.get(d)
            if conn is not None:
                log.info("account %s: device %s is no longer listed: its socket is closed",
                         account, d[:12])
                await self._close(conn, "this device is no longer a device of the account")
        return gone

    async def roster_changed(self, account: str) -> None:
        """Another broker process stored `account`'s next roster (Arrivals)."""
        held = self._accounts.get(account)
        if held is None:
            return     # not cached here: read from the state when next needed
        async with self._roster_lock:
            raw = await self.state.roster(account)
            if raw is not None and raw != held.raw:
                await self._follow(account, held, raw, read_roster(raw, device_id_for)[0])

    # -- devices (FxA's device API) --------------------------------------------------------

    async def _device(self, request: web.Request) -> web.Response:
        body, doc = await self._json(request)
        account, held, device = await self._member(request, body)
        info = _b64_field(doc, "info", MAX_BODY // 2)
        await self.state.put_device(account, device, info, self.now())
        return web.json_response({"id": device, "info": base64.b64encode(info).decode()})

    async def _devices(self, request: web.Request) -> web.Response:
        account, held, device = await self._member(request, recovering=True)
        records = {r.device: r for r in await self.state.devices(account)}
        there = await self.relay.elsewhere(account)
        out = []
        for e in held.roster.members:
            r = records.get(e.device_id)
            out.append({"id": e.device_id, "role": e.role,
                        "isCurrentDevice": e.device_id == device,
                        "info": base64.b64encode(r.info).decode() if r else None,
                        "lastUpdated": r.updated if r else None,
                        "connected": e.device_id in held.sockets or e.device_id in there})
        return web.json_response({"devices": out})

    async def _notify(self, request: web.Request) -> web.Response:
        body, doc = await self._json(request)
        account, held, device = await self._member(request, body)
        payload = _b64_field(doc, "payload", MAX_PUSH)
        to = doc.get("to", "all")
        if to != "all" and not (isinstance(to, list) and all(is_device(d) for d in to)):
            raise Refused(400, "`to` is \"all\" or a list of device ids")
        ttl = _ttl(doc.get("ttl", self.push_ttl))
        sent = await self.push(account, device, payload, ttl,
                               None if to == "all" else set(to))
        return web.json_response({"delivered": sent[0], "queued": sent[1]})

    async def _invoke(self, request: web.Request) -> web.Response:
        body, doc = await self._json(request)
        account, held, device = await self._member(request, body)
        target, command = doc.get("target"), doc.get("command")
        if not is_device(target) or held.roster.key_of(target) is None:
            raise Refused(400, "`target` is not a device of the account")
        if not isinstance(command, str) or not 0 < len(command) <= 100 or command == "push":
            raise Refused(400, "`command` is a name of 1 to 100 characters")
        payload = _b64_field(doc, "payload", MAX_PUSH)
        ttl = _ttl(doc.get("ttl", self.push_ttl))
        index = await self.state.enqueue(account, target, device, command, payload,
                                         self.now() + ttl, collapse=False)
        await self._send(account, target, {
            "t": "command", "index": index, "from": device, "command": command,
            "payload": base64.b64encode(payload).decode()})   # else listed when it asks
        return web.json_response({"index": index})

    async def _commands(self, request: web.Request) -> web.Response:
        account, held, device = await self._member(request)
        try:
            after = int(request.query.get("index", "0"))
        except ValueError:
            raise Refused(400, "`index` is a whole number") from None
        queued = [q for q in await self.state.pending(account, device, self.now(), after=after)
                  if q.kind != "push"]
        return web.json_response({
            "index": max((q.index for q in queued), default=after),
            "messages": [{"index": q.index, "from": q.sender, "command": q.kind,
                          "payload": base64.b64encode(q.payload).decode()} for q in queued]})

    async def _ice(self, request: web.Request) -> web.Response:
        account, held, device = await self._member(request, recovering=True, partners=True)
        return web.json_response({"iceServers": ice_servers(self.ice, device, self.now()),
                                  "ttl": self.ice.ttl})

    # -- push ------------------------------------------------------------------------------

    async def push(self, account: str, sender: str, payload: bytes, ttl: float,
                   to: set[str] | None = None) -> tuple[int, int]:
        """Tell the account's other devices (or `to`): at once over their socket, else queued
        until they connect (one per sender and receiver: a newer push replaces an older).
        Returns (delivered, queued)."""
        held = self._accounts[account]
        delivered = queued = 0
        doc = {"t": "push", "from": sender, "data": base64.b64encode(payload).decode()}
        for e in held.roster.members:
            if e.device_id == sender or (to is not None and e.device_id not in to):
                continue
            if await self._deliver_here(account, e.device_id, doc):
                delivered += 1
                continue
            # queued first: if the process holding it dies before it sends, the device
            # still gets it when it reconnects (that process drops it once sent)
            index = await self.state.enqueue(account, e.device_id, sender, "push", payload,
                                             self.now() + ttl, collapse=True)
            try:
                forwarded = await self.relay.forward(account, e.device_id, doc, index)
            except StorageError as exc:    # queued all the same: it waits for its device
                self.outage.failed("a push could not be relayed", exc)
                forwarded = False
            if forwarded:
                delivered += 1
            else:
                queued += 1
        return delivered, queued

    # -- delivery: here or through the relay ------------------------------------------------

    async def _deliver_here(self, account: str, device: str, doc: dict[str, Any]) -> bool:
        held = self._accounts.get(account)
        conn = held.sockets.get(device) if held is not None else None
        return conn is not None and held is not None and \
            _socket_key(held.roster, device) is not None and await conn.send(doc)

    async def _send(self, account: str, device: str, doc: dict[str, Any]) -> bool:
        """`doc` to `device`'s socket, on this process or another; False if none holds it."""
        return await self._deliver_here(account, device, doc) or \
            await self.relay.forward(account, device, doc, None)

    async def arrived(self, account: str, device: str, doc: dict[str, Any],
                      queued: int | None) -> None:
        """A message another process relayed to a device it believed was here (Arrivals)."""
        if await self._deliver_here(account, device, doc):
            if queued is not None:
                await self.state.drop(account, device, [queued])
        elif doc.get("t") == "signal":   # it left meanwhile: tell the sender as if local
            await self._send(account, doc["from"], {"t": "undeliverable", "id": doc["id"],
                                                    "to": device})
        # a push stays queued; a command is listed when the device asks

    async def missed(self) -> None:
        """The relay may have lost roster changes (Arrivals): check every roster held."""
        for account in list(self._accounts):
            await self.roster_changed(account)

    async def replaced(self, account: str, device: str) -> None:
        """The device opened a socket on another broker process (Arrivals)."""
        held = self._accounts.get(account)
        conn = held.sockets.get(device) if held is not None else None
        if conn is not None:
            await self._close(conn, "replaced by a newer socket of this device (on another "
                                    "broker process)")

    async def _start_relay(self, app: web.Application) -> None:
        self.pauses.install(asyncio.get_running_loop())
        await self.relay.start(self)
        self.freezer.start()

    # -- the socket ------------------------------------------------------------------------

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        """One device's socket. The broker sends {"t": "challenge", "nonce"}; the device
        answers {"t": "auth", "device", "sig"} (socket_auth_message) within AUTH_TIMEOUT and
        gets {"t": "ready"}, then its queued pushes and commands. Then, both ways:

            {"t": "signal", "to"/"from": device, "id": n, "re": n?, "data": base64}
                relayed as is to another device of the account ("to" becomes "from"), or
                answered {"t": "undeliverable", "id", "to"} when it is not connected
            {"t": "push", "data": base64, "ttl"?}   to the other devices (see `push`)
            {"t": "command", ...}                   broker to device (invoke_command)

        Messages of unknown types are skipped (a newer client); malformed or oversized ones,
        and a flood beyond RATE/BURST, close the socket with one log line."""
        account = self._account_id(request)
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE,
                                   heartbeat=ping_period(BROKER_PING, random.random()))
        await ws.prepare(request)
        where = f"{request.remote}"
        conn: Connection | None = None
        try:
            try:
                conn = await self._open(account, ws, where)
            except StorageError as exc:
                self.outage.failed(f"sockets of account {account} refused", exc)
                await self._refuse(ws, where, "", f"{exc} (try again later)",
                                   WSCloseCode.TRY_AGAIN_LATER, logged=False)
                return ws
            if conn is None:
                return ws
            await self._serve(conn)
        finally:
            if conn is not None:
                await self._forget(conn)
            if not ws.closed:
                await ws.close()
        return ws

    async def _forget(self, conn: Connection) -> None:
        """`conn` closed: it no longer holds its device here."""
        self.freezer.closed(conn.batch)
        held = self._accounts.get(conn.account)
        if held is not None and held.sockets.get(conn.device) is conn:
            del held.sockets[conn.device]
            try:
                await self.relay.detached(conn.account, conn.device)
            except StorageError as exc:   # its presence row is redone when the database is back
                self.outage.failed("a closed socket could not be forgotten", exc)

    async def _refuse(self, ws: web.WebSocketResponse, where: str, who: str, line: str,
                      code: int = WSCloseCode.POLICY_VIOLATION, *, logged: bool = True) -> None:
        if logged:
            log.info("socket %s from %s refused: %s", who, where, line)
        with contextlib.suppress(Exception):
            await ws.send_str(json.dumps({"t": "error", "error": line}))
            await ws.close(code=code, message=line[:120].encode())

    async def _open(self, account: str, ws: web.WebSocketResponse, where: str
                    ) -> Connection | None:
        challenge = secrets.token_hex(16)
        await ws.send_str(json.dumps({"t": "challenge", "nonce": challenge}))
        try:
            msg = await ws.receive(timeout=AUTH_TIMEOUT)
        except asyncio.TimeoutError:
            await self._refuse(ws, where, "(unauthenticated)",
                               f"no answer to the challenge within {AUTH_TIMEOUT:.0f} s")
            return None
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
            return None    # it went away: nothing to refuse
        try:
            doc = _message(msg)
            if doc.get("t") != "auth" or not is_device(doc.get("device")):
                raise MessageRefused("the first message is not an auth answer")
            device = doc["device"]
            sig = _b64(doc.get("sig"), "sig", 64)
        except MessageRefused as exc:
            await self._refuse(ws, where, "(unauthenticated)", str(exc))
            return None
        held = await self._account(account)
        if held is None:
            await self._refuse(ws, where, device[:12], f"account {account} is not registered "
                               "on this broker (an owner device registers it"
                               + ("" if self.registration.describe().get("open") else
                                  ": `p2pbackup broker register`") + ")")
            return None
        key = _socket_key(held.roster, device)
        if key is None:
            await self._refuse(ws, where, device[:12], f"device {device[:12]} is not a device "
                               f"of account {account} (any more)")
            return None
        if not verify_signature(key, socket_auth_message(account, device, challenge), sig):
            await self._refuse(ws, where, device[:12], "the challenge's signature does not "
                                                       "verify")
            return None
        old = held.sockets.get(device)
        if old is None and len(held.sockets) >= self.max_connections:
            await self._refuse(ws, where, device[:12], f"account {account} has "
                               f"{len(held.sockets)} sockets open, the most this broker takes",
                               WSCloseCode.TRY_AGAIN_LATER)
            return None
        conn = Connection(account, device, ws, where, TokenBucket(self.rate, self.burst,
                                                                  self.now))
        held.sockets[device] = conn
        try:
            await self.relay.attached(account, device)
            queued = await self.state.pending(account, device, self.now())
        except StorageError:
            # refused: the device comes back for its queue when the database is back
            if held.sockets.get(device) is conn:
                if old is None:
                    del held.sockets[device]
                else:
                    held.sockets[device] = old
            raise
        if old is not None:   # the device reconnected: its old socket is dead or a duplicate
            await self._close(old, "replaced by a newer socket of this device")
        await conn.send({"t": "ready", "device": device})
        for q in queued:
            payload = base64.b64encode(q.payload).decode()
            if q.kind == "push":
                if await conn.send({"t": "push", "from": q.sender, "data": payload}):
                    try:
                        await self.state.drop(account, device, [q.index])
                    except StorageError as exc:    # sent again next time: a push is a hint
                        self.outage.failed("a delivered push could not be unqueued", exc)
            else:
                await conn.send({"t": "command", "index": q.index, "from": q.sender,
                                 "command": q.kind, "payload": payload})
        conn.batch = self.freezer.opened()   # what it holds lives as long as it is open
        return conn

    async def _close(self, conn: Connection, why: str) -> None:
        conn.closing = True
        with contextlib.suppress(Exception):
            await conn.ws.send_str(json.dumps({"t": "error", "error": why}))
            await conn.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=why[:120].encode())

    async def _serve(self, conn: Connection) -> None:
        who = conn.device[:12]
        async for msg in conn.ws:
            if conn.closing:
                return
            if not conn.bucket.take():
                await self._refuse(conn.ws, conn.where, who, f"more than {self.rate:.0f} "
                                   f"messages a second (burst {self.burst:.0f}): a flood")
                return
            try:
                doc = _message(msg)
                await self._handle(conn, doc)
            except StorageError as exc:     # the socket stays: it relays what needs no database
                self.outage.failed(f"a message of device {who} could not be handled", exc)
            except MessageRefused as exc:
                code = WSCloseCode.MESSAGE_TOO_BIG if msg.type == WSMsgType.ERROR else \
                    WSCloseCode.POLICY_VIOLATION
                await self._refuse(conn.ws, conn.where, who, str(exc), code)
                return
        if conn.ws.exception() is not None and not conn.closing:   # e.g. an oversized frame
            log.info("socket %s from %s refused: %s", who, conn.where, conn.ws.exception())

    async def _handle(self, conn: Connection, doc: dict[str, Any]) -> None:
        kind = doc.get("t")
        held = self._accounts[conn.account]
        if _socket_key(held.roster, conn.device) is None:   # removed meanwhile
            raise MessageRefused("this device is no longer a device of the account")
        if kind == "signal":
            to = doc.get("to")
            if not is_device(to):
                raise MessageRefused("a signal's `to` is not a device id")
            n = _int(doc.get("id"), "a signal's id")
            out: dict[str, Any] = {"t": "signal", "from": conn.device, "id": n}
            if "re" in doc:
                out["re"] = _int(doc["re"], "a signal's re")
            _b64(doc.get("data"), "a signal's data", MAX_MESSAGE * 3 // 4)
            out["data"] = doc["data"]
            why = _may_signal(held.roster, conn.device, to)
            if why is not None:
                log.info("account %s: signal from %s to %s refused: %s", conn.account,
                         conn.device[:12], to[:12], why)
            try:
                sent = why is None and await self._send(conn.account, to, out)
            except StorageError as exc:     # where it is cannot be asked: as if away
                self.outage.failed("a signal could not be relayed", exc)
                sent = False
            if not sent:
                await conn.send({"t": "undeliverable", "id": n, "to": to})
        elif kind == "push":
            payload = _b64(doc.get("data"), "a push's data", MAX_PUSH)
            try:
                ttl = _ttl(doc.get("ttl", self.push_ttl))
            except Refused as r:
                raise MessageRefused(r.line) from None
            await self.push(conn.account, conn.device, payload, ttl)
        # other kinds: from a newer client, skipped

    async def _close_sockets(self, app: web.Application) -> None:
        for held in self._accounts.values():
            for conn in list(held.sockets.values()):
                await self._close(conn, "the broker is shutting down")

    async def _close_state(self, app: web.Application) -> None:
        self.pauses.remove()
        await self.registration.close()
        await self.relay.close()
        await self.state.close()


def _message(msg: Any) -> dict[str, Any]:
    """A socket message as a JSON object; MessageRefused if it is not one."""
    if msg.type == WSMsgType.ERROR:
        raise MessageRefused(f"a malformed or oversized message ({msg.data})")
    if msg.type != WSMsgType.TEXT:
        raise MessageRefused("a message that is not JSON text")
    try:
        doc = json.loads(msg.data)
    except ValueError:
        raise MessageRefused("a message that is not JSON") from None
    if not isinstance(doc, dict):
        raise MessageRefused("a message that is not a JSON object")
    return doc


def _b64_field(doc: dict[str, Any], name: str, limit: int) -> bytes:
    try:
        return _b64(doc.get(name, ""), f"`{name}`", limit)
    except MessageRefused as exc:
        raise Refused(400, str(exc)) from None


def _ttl(value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or \
            not 0 < value <= MAX_TTL:
        raise Refused(400, f"`ttl` is a number of seconds from 1 to {MAX_TTL}")
    return float(value)


def _socket_key(roster: Roster, device: str) -> bytes | None:
    """The key of a device that may hold a socket, list the devices and get ICE servers: one
    the roster lists, the recovery signer it names (a new device recovering the account
    from a device of it: it signals to that device, which checks it as on the LAN), or a
    storage partner it names (which opens a socket for this account only if it holds the
    account's grant: both sides agree, see `_may_signal`)."""
    return roster.key_of(device) or roster.next_signer_key(device_id_for)(device) or \
        roster.partner_key(device)


def _may_signal(roster: Roster, sender: str, to: str) -> str | None:
    """Why `sender` may not signal `to` within the account (None: it may). Both must be
    admitted by the roster (`_socket_key`), and at least one must be a device of the account:
    storage partners of one account are strangers to each other. A partner is reached only
    on the socket it opened itself for this account, signed with its key and naming the
    account (socket_auth_message): it does so for the accounts whose grant it holds, so a
    stranger account that names it in its own roster finds no socket of it there."""
    if _socket_key(roster, to) is None:
        return f"{to[:12]} is not a device or storage partner of the account"
    if roster.partner_key(sender) is not None and roster.partner_key(to) is not None:
        return "storage partners do not signal each other"
    return None
