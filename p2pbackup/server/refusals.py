"""Refusing an HTTP request in one line, the same way in the storage server and the broker:
the status and a sentence for the client, and one log line with the address for the operator
(what fail2ban and operators look for). A bug is logged whole and answered with a 500."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..protocol import store_requests as req

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Refused(Exception):
    """A request refused: its status and one line saying why."""

    def __init__(self, status: int, line: str) -> None:
        super().__init__(line)
        self.status, self.line = status, line


def one_line_errors(log: logging.Logger) -> Callable[[web.Request, Handler],
                                                       Awaitable[web.StreamResponse]]:
    """The aiohttp middleware that turns Refused into its response and log line."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
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
