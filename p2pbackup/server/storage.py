"""The storage server: accounts' ciphertext over HTTPS, under a storage partner's rules.

It holds no key and is as untrusted as a storage partner; it enforces what a partner enforces
(repo/partner_store.py: the same functions), with every request signed by a device of the
account (protocol/store_requests.py):

    GET    /v1/                              "p2pbackup-server 1" (unsigned: is it there?)
    PUT    /v1/<account>/<name>              store an object (201 new, 200 already held)
    GET    /v1/<account>/<name>              read it; `Range: bytes=a-b` / `bytes=-n` (206)
    HEAD   /v1/<account>/<name>              its size in X-P2PB-Size
    DELETE /v1/<account>/<name>              only what a removal record released (204)
    GET    /v1/<account>?prefix=P            the names held, one per line

An account comes to exist when one of its owner devices PUTs its roster (roster/<n>, signed
by that owner) with a one-time invitation (`p2pbackup-server invite`) in X-P2PB-Invite, or
without one on a server started with --open-registration. From then on the server follows the
account's newer rosters, as a partner does: listed devices may read and write, the recovery
signer may read and bring the next roster, removed devices are refused. An owner deletes
the account (`p2pbackup account delete`) by PUTting an account-deletion record
(format/removal.py, `account` set), checked as a partner checks it: it goes at once.

Refusals are one line of text with the status: 401 (unsigned, bad signature, stale, replayed),
403 (a device the roster does not admit, a write it may not make, a delete no removal record
released), 404, 409 (other bytes under a name held: objects never change; a head or anchor
going back to one held before), 413, 422 (not an object name, content not matching its name,
a malformed or unfollowing record), 507 (the account's quota).

The server's files (`--data DIR`) use a partner's layout (p2pbackup/grants.py):
`partners/<account>.grant` (quota, roster), `partners/<account>/store/` (objects, unless
`--storage LOCATION` keeps them elsewhere, e.g. in S3), `partners/<account>/removals-first-seen`
and `partners/<account>/heads-held` (digests of every head and anchor held: none comes back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
from aiohttp import web

from .. import grants as grant_files
from ..blobs import open_store
from ..blobs.base import BlobStore
from ..blobs.quota import QuotaExceeded
from ..crypto.identity import device_id_for, verify_signature
from ..errors import IntegrityError, NameMismatch, NotFound, ObjectChanged, P2PError
from ..format.roster import check_signed, read_roster, roster_name
from ..ids import is_account, object_kind
from ..protocol import store_requests as req
from ..repo import removals
from ..repo.partner_store import (Grant, ServedStore, apply_removals, forget_grant,
                                  load_grants, open_grant, partner_accept, refusal)
from ..sizes import format_size
from . import invites
from .refusals import Refused, SignedRequests, one_line_errors

log = logging.getLogger("p2pbackup.server")

MAX_OBJECT = 512 << 20        # the largest object a device writes (a session's bound too)
RECEIVING_MAX = 1 << 30       # bytes of bodies all PUTs in progress may hold in memory
HEADS_HELD_MAX = 10_000       # digests kept per head or anchor: a week of a head a minute
DEFAULT_GRACE = 7 * 86400     # as a partner's removal_grace


class HeadsHeld:
    """Digests of every version of an account's heads and anchors held, per name, so that none
    held before comes back (their order is sealed inside; this much the server can see)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            doc = msgpack.unpackb(path.read_bytes(), raw=False)
            self._held = {str(k): list(v) for k, v in doc["held"].items()}
        except FileNotFoundError:
            self._held = {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError,
                msgpack.UnpackException) as exc:
            log.warning("%s is unreadable (%s): heads are checked from now on", path, exc)
            self._held = {}

    def went_back(self, name: str, digest: bytes, current: bytes | None) -> bool:
        return digest != current and digest in self._held.get(name, ())

    def note(self, name: str, digest: bytes) -> None:
        held = self._held.setdefault(name, [])
        if digest not in held:
            held.append(digest)
            del held[:-HEADS_HELD_MAX]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_bytes(msgpack.packb({"v": 1, "held": self._held}, use_bin_type=True))
            os.replace(tmp, self.path)


class StorageServer:
    """The accounts of one data directory and the HTTP application that serves them."""

    def __init__(self, data: Path, *, quota: int | None = None,
                 removal_grace: float = DEFAULT_GRACE, storage: str | None = None,
                 open_registration: bool = False,
                 now: Callable[[], float] = time.time) -> None:
        self.data, self.quota, self.grace = data, quota, removal_grace
        self.storage, self.open_registration, self.now = storage, open_registration, now
        self.requests = SignedRequests(now)
        self.accounts: dict[str, Grant] = {}
        self.heads: dict[str, HeadsHeld] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._register_lock = asyncio.Lock()
        self._receiving = 0       # bytes of PUT bodies being read now
        for g in load_grants(data, self._store_for):
            self._add(g)

    def _store_for(self, account: str, where: Path) -> BlobStore:
        if self.storage is None:
            from ..blobs.local import LocalDirStore

            return LocalDirStore(where / "store")
        return open_store(self.storage.rstrip("/") + "/" + account)

    def _add(self, g: Grant) -> None:
        g.store.quota = self.quota    # the server's --quota, whatever it was at registration
        self.accounts[g.account] = g
        notes = grant_files.account_dir(self.data, g.account)   # also with --storage elsewhere
        notes.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.heads[g.account] = HeadsHeld(notes / "heads-held")
        self._locks[g.account] = asyncio.Lock()

    # -- the HTTP side ---------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_OBJECT + (1 << 20),
                              middlewares=[one_line_errors(log)])
        app.router.add_get("/v1/", self._hello)
        app.router.add_get("/v1/{account}", self._list)
        app.router.add_route("*", "/v1/{account}/{name:.+}", self._object)
        app.on_startup.append(self._start_removals)
        app.on_cleanup.append(self._close)
        return app

    async def _hello(self, request: web.Request) -> web.Response:
        return web.Response(text="p2pbackup-server 1\n")

    def _signed_now(self, request: web.Request, account: str = "",
                    key_of: Callable[[str], bytes | None] | None = None
                    ) -> tuple[req.RequestSignature, bytes | None]:
        return self.requests.fresh(request, account, key_of)

    async def _body(self, request: web.Request) -> bytes:
        """A PUT's body, within the bytes all uploads in progress may hold in memory."""
        size = request.content_length
        if size is None:
            raise Refused(411, "a PUT needs a Content-Length")
        if size > MAX_OBJECT:
            raise Refused(413, f"an object of {format_size(size)} is larger than the "
                               f"{format_size(MAX_OBJECT)} this server takes")
        if self._receiving + size > RECEIVING_MAX:
            raise Refused(503, "the server is busy receiving other objects: try again later")
        self._receiving += size
        try:
            return await request.read()
        finally:
            self._receiving -= size

    async def _authenticate(self, request: web.Request, body: bytes, account: str,
                            key_of: Callable[[str], bytes | None]) -> str:
        return self.requests.signer(request, body, account, key_of)

    def _account(self, request: web.Request) -> tuple[str, Grant | None]:
        account = request.match_info["account"]
        if not is_account(account):
            raise Refused(404, f"{account[:40]!r} is not an account id")
        return account, self.accounts.get(account)

    @staticmethod
    def _readers(grant: Grant) -> Callable[[str], bytes | None]:
        """Who may read: the roster's devices and its recovery signer."""
        signer = grant.recovery_signer()
        devices = grant.devices()
        return lambda d: devices.get(d) or (signer[1] if signer and d == signer[0] else None)

    async def _list(self, request: web.Request) -> web.Response:
        account, grant = self._account(request)
        if grant is None:
            raise Refused(404, f"account {account} is not registered on this server")
        await self._authenticate(request, b"", account, self._readers(grant))
        prefix = request.query.get("prefix", "")
        names = [n async for n in ServedStore(grant).list(prefix)]
        return web.Response(text="".join(n + "\n" for n in names))

    async def _object(self, request: web.Request) -> web.StreamResponse:
        account, grant = self._account(request)
        name = request.match_info["name"]
        if request.method == "PUT" and grant is None and name.startswith("roster/"):
            self._signed_now(request)
            return await self._register(request, account, name, await self._body(request))
        if grant is None:
            raise Refused(404, f"account {account} is not registered on this server")
        if request.method in ("GET", "HEAD"):
            await self._authenticate(request, b"", account, self._readers(grant))
            return await self._read(request, grant, name)
        signer = grant.recovery_signer()
        devices = grant.devices()

        def writers(d: str) -> bytes | None:   # the recovery signer brings the next roster
            if signer and d == signer[0] and name.startswith("roster/"):
                return signer[1]
            return devices.get(d)

        body = b""
        if request.method == "PUT":
            self._signed_now(request, account, writers)
            body = await self._body(request)
        device = await self._authenticate(request, body, account, writers)
        if object_kind(name) is None:
            raise Refused(422, f"{name[:80]!r} is not an object name")
        if request.method == "PUT":
            return await self._put(grant, device, name, body)
        if request.method == "DELETE":
            return await self._delete(grant, name)
        raise Refused(405, f"{request.method} is not a method of this server")

    async def _read(self, request: web.Request, grant: Grant, name: str) -> web.Response:
        if object_kind(name) is None:
            raise Refused(404, f"{name[:80]!r} is not an object name")
        store = ServedStore(grant)
        try:
            if request.method == "HEAD":
                return web.Response(headers={"X-P2PB-Size": str(await store.size(name))})
            wanted = request.headers.get("Range")
            if wanted is None:
                return web.Response(body=await store.get(name))
            offset, length = _parse_range(wanted)
            return web.Response(status=206, body=await store.get_range(name, offset, length))
        except NotFound:
            raise Refused(404, f"{name} is not held here") from None

    def _still_held(self, grant: Grant) -> None:
        """Refused if the account was deleted while a request waited for its lock."""
        if self.accounts.get(grant.account) is not grant:
            raise Refused(404, f"account {grant.account} is not registered on this server")

    async def _put(self, grant: Grant, device: str, name: str, body: bytes) -> web.Response:
        why = refusal(grant, device, name)
        if why is not None:
            raise Refused(403, f"{name[:60]}: {why}")
        kind = object_kind(name)[0]  # type: ignore[index]
        async with self._locks[grant.account]:
            self._still_held(grant)
            heads = self.heads[grant.account]
            digest = req.body_digest(body).encode()
            if kind in ("head", "anchor"):
                current = await grant.store.get(name) if await grant.store.has(name) else None
                if heads.went_back(name, digest, current and req.body_digest(current).encode()):
                    raise Refused(409, f"{name[:60]}: goes back to a version held here before "
                                       "(heads only move forward)")
            try:
                stored = await partner_accept(grant, device, name, body)
            except QuotaExceeded:
                used = await grant.store.used()
                raise Refused(507, f"account {grant.account} uses {format_size(used)} of its "
                                   f"{format_size(grant.quota or 0)} on this server; "
                                   f"{name[:60]} ({format_size(len(body))}) does not fit"
                              ) from None
            except ObjectChanged as exc:
                raise Refused(409, str(exc)) from None
            except (NameMismatch, IntegrityError) as exc:
                raise Refused(422, str(exc)) from None
            except P2PError as exc:
                log.error("account %s: storing %s failed: %s", grant.account, name[:60], exc)
                raise Refused(503, f"the server could not store {name[:60]}: {exc}") from None
            if grant.deleted:
                await self._forget(grant, device)
                return web.Response(status=201)
            if kind in ("head", "anchor") and stored:
                heads.note(name, digest)
            if stored and name.startswith(removals.PREFIX):
                await grant.refresh_removals()
        return web.Response(status=201 if stored else 200)

    async def _delete(self, grant: Grant, name: str) -> web.Response:
        async with self._locks[grant.account]:
            self._still_held(grant)
            if not await grant.store.has(name):
                return web.Response(status=204)
            records = await grant.refresh_removals()
            now_ns = int(self.now() * 1e9)
            if name in removals.due(records, self.grace, seen=grant.seen, now_ns=now_ns):
                await grant.store.delete(name)
                return web.Response(status=204)
        if name in removals.tombstones(records):
            raise Refused(403, f"{name[:60]} is kept for the grace period "
                               f"({self.grace:.0f} s from when this server first held its "
                               "removal record)")
        raise Refused(403, f"{name[:60]} is kept: nothing is deleted here but what an owner's "
                           "removal record lists, after the grace period")

    async def _forget(self, grant: Grant, device: str) -> None:
        """The account deleted by its owner (an account-deletion record, checked by
        partner_accept): objects, grant and notes go at once, with no grace period (the owner
        asked, and an owner device holds the account key anyway: docs/THREAT_MODEL.md).
        Called under the account's lock: requests waiting for it then find no account."""
        gone = await forget_grant(grant)
        del self.accounts[grant.account]
        self.heads.pop(grant.account, None)
        log.info("account %s deleted (%d objects) at the request of its owner device %s",
                 grant.account, gone, device[:12])

    async def _register(self, request: web.Request, account: str, name: str, body: bytes
                        ) -> web.Response:
        """An account comes to exist: its roster, signed by one of its owners, brought by that
        owner with an invitation."""
        try:
            roster = read_roster(body, device_id_for, name)[0]
            check_signed(body, roster.owner_key, verify_signature, device_id_for, name)
        except IntegrityError as exc:
            raise Refused(422, str(exc)) from None
        if roster_name(roster.seq) != name:
            raise Refused(422, f"{name} holds roster version {roster.seq}: the wrong name")
        try:
            device = await self._authenticate(request, body, account, roster.owner_key)
        except Refused as r:
            if r.status != 403:
                raise
            raise Refused(403, f"only an owner device registers an account: device "
                               f"{request.headers.get(req.DEVICE, '')[:12]} is not an owner "
                               f"in {name}") from None
        async with self._register_lock:
            if account in self.accounts:
                raise Refused(409, f"account {account} is registered already")
            token = request.headers.get(req.INVITE, "")
            if not self.open_registration and \
                    not invites.spend(self.data, token, int(self.now() * 1e9)):
                raise Refused(403, "registering an account needs a valid invitation "
                                   "(`p2pbackup-server invite` on the server)" if not token else
                                   "this invitation is not valid (used, expired or mistyped)")
            g = grant_files.GrantFile(account, self.quota, bytes(body),
                                      [(e.device_id, e.public_key) for e in roster.members],
                                      int(self.now() * 1e9), "p2pbackup-server")
            grant_files.write_grant(self.data, g)
            self._add(open_grant(self.data, g, roster, store_for=self._store_for))
        log.info("account %s registered by device %s", account, device[:12])
        return web.Response(status=201)

    # -- removals in the background --------------------------------------------------------

    async def apply_removals(self) -> int:
        """Delete what removal records released in every account; how many objects went."""
        return await apply_removals(self.accounts.values(), self.grace,
                                    int(self.now() * 1e9), lambda g: self._locks[g.account])

    async def _removals_loop(self) -> None:
        while True:
            await self.apply_removals()
            await asyncio.sleep(min(3600.0, max(1.0, self.grace / 2)))

    async def _start_removals(self, app: web.Application) -> None:
        for g in self.accounts.values():
            await g.store.used()    # counted once, before the first put needs it
        self._removals = asyncio.create_task(self._removals_loop())

    async def _close(self, app: web.Application) -> None:
        self._removals.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._removals
        for g in self.accounts.values():
            await g.store.close()


def _parse_range(value: str) -> tuple[int, int]:
    """`bytes=a-b`, `bytes=a-` or `bytes=-n` as (offset, length); a negative offset counts
    from the end (BlobStore.get_range)."""
    unit, _, spec = value.partition("=")
    first, dash, last = spec.partition("-")
    try:
        if unit.strip() != "bytes" or not dash or "," in spec:
            raise ValueError
        if not first:
            n = int(last)
            if n < 0:
                raise ValueError
            return -n, n
        a = int(first)
        b = int(last) if last else a + MAX_OBJECT - 1
        if a < 0 or b < a:
            raise ValueError
        return a, b - a + 1
    except ValueError:
        raise Refused(416, f"a range this server does not serve: {value[:40]!r}") from None
