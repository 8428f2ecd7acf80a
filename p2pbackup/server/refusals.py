"""Checking and refusing HTTP requests the same way in the storage server and the broker.

A refusal is one line: the status and a sentence for the client, and one log line with the
address for the operator (what fail2ban and operators look for); a bug is logged whole and
answered with a 500. Requests are signed by a device (protocol/store_requests.py):
`SignedRequests` checks the signature headers, the clock, the key and the nonce."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..crypto.identity import verify_signature
from ..protocol import store_requests as req

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Refused(Exception):
    """A request refused: its status and one line saying why."""

    def __init__(self, status: int, line: str) -> None:
        super().__init__(line)
        self.status, self.line = status, line


def one_line_errors(log: logging.Logger, unavailable: tuple[type[Exception], ...] = ()
                    ) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """The aiohttp middleware that turns Refused into its response and log line, and the
    `unavailable` exceptions (the server's database failing: one line each) into a 503 with
    their line. One middleware: it stays on the stack of every open WebSocket."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            try:
                return await handler(request)
            except unavailable as exc:
                raise Refused(503, str(exc)) from None
        except Refused as r:
            log.info("%s %s %s from %s: %d %s", request.method, request.path[:120],
                     request.headers.get(req.DEVICE, "(unsigned)")[:12], request.remote,
                     r.status, r.line)
            # 503 is a busy server: a client may come back soon (RFC 9110 Retry-After).
            return web.Response(status=r.status, text=r.line + "\n",
                                headers={"Retry-After": "10"} if r.status == 503 else None)
        except web.HTTPException:
            raise
        except Exception:   # a bug or the server's own storage failing: logged whole here
            log.exception("%s %s failed", request.method, request.path[:120])
            return web.Response(status=500, text="the server failed on this request (its log "
                                                 "says why)\n")
    return middleware


class SignedRequests:
    """Who signed a request, under `domain` (each service its own), with each nonce once and
    nothing stamped before `now()` at creation (the nonce cache is in memory)."""

    def __init__(self, now: Callable[[], float], domain: bytes = req.DOMAIN) -> None:
        self.now, self.domain = now, domain
        self.started = now()
        self.nonces = req.NonceCache()

    def fresh(self, request: web.Request, account: str = "",
              key_of: Callable[[str], bytes | None] | None = None
              ) -> tuple[req.RequestSignature, bytes | None]:
        """The request's signature headers, if present, fresh and (with `key_of`) naming a
        device that may make it, and that device's key; Refused otherwise. Checked before a
        body is read: a stranger's upload costs the server no memory."""
        got = req.parse(request.headers)
        if got is None:
            raise Refused(401, "an unsigned request: it needs the X-P2PB-Device, -Time, "
                               "-Nonce and -Signature headers of a device of the account")
        why = req.stale(got.time, self.now(), self.started)
        if why:
            raise Refused(401, why)
        key = key_of(got.device) if key_of is not None else None
        if key_of is not None and key is None:
            raise Refused(403, f"device {got.device[:12]} is not a device of account "
                               f"{account} (any more)")
        return got, key

    def signer(self, request: web.Request, body: bytes, account: str,
               key_of: Callable[[str], bytes | None]) -> str:
        """The device that signed `request` (its key from `key_of`); Refused otherwise."""
        got, key = self.fresh(request, account, key_of)
        assert key is not None
        path = request.rel_url.raw_path
        at = path.find("/" + req.API)
        signed = req.message(request.method, path[at + 1:], request.rel_url.raw_query_string,
                             req.body_digest(body), got.device, got.time, got.nonce,
                             self.domain)
        if at < 0 or not verify_signature(key, signed, got.signature):
            raise Refused(401, "the request's signature does not verify")
        why = self.nonces.add(got.device, got.nonce, self.now())
        if why:
            raise Refused(401, why)
        return got.device
