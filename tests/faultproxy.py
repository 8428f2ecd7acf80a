"""A fault-injecting HTTP reverse proxy in front of a real storage server.

It runs its own event loop on a thread, so sync tests, async tests and CLI subprocesses can all
go through it. Requests pass unchanged (the Host header too: S3 signatures cover it) until a
test sets `proxy.fault`; each fault applies to the requests it matches, `times` times (None:
until cleared):

    status   answer `status` (500, 503, 507, ...) with an S3-style error `code`
    reset    cut the connection halfway through the request body (PUT) or the response body
    hangup   send half the response body under the whole one's Content-Length, then close
             the connection cleanly (FIN, not reset: what a busy rclone `serve s3` did)
    delay    wait `seconds` before answering
    truncate send half the response body, with a Content-Length that says that is all
    swap     answer with the bytes of another object (one that went through the proxy)
"""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import dataclass, field

from aiohttp import ClientSession, ClientTimeout, web

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding",
        "date", "server"}


@dataclass
class Fault:
    kind: str                     # status | reset | hangup | delay | truncate | swap
    times: int | None = None      # how many matching requests it hits; None: all
    method: str | None = None     # only requests with this method (GET, PUT, HEAD, ...)
    match: str = ""               # only paths containing this
    status: int = 500
    code: str = "InternalError"
    seconds: float = 0.0
    swap_with: str = ""           # (swap) a path, or part of one, of an object sent earlier
    hits: int = field(default=0)

    def applies(self, method: str, path: str) -> bool:
        if self.method and method != self.method or self.match not in path:
            return False
        return self.times is None or self.hits < self.times


class FaultProxy:
    """`url` forwards to `upstream`; set `fault` to misbehave, `None` to behave."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.fault: Fault | None = None
        self.bodies: dict[str, bytes] = {}   # path -> bytes of each PUT that went through
        self.requests: list[tuple[str, str]] = []
        self.sent: list[tuple[str, int]] = []   # (path, body bytes) of each GET answered
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="faultproxy")
        self.url = ""

    # ---- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        if not self._ready.wait(30):
            raise AssertionError("the fault proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _start(self) -> None:
        self._session = ClientSession(timeout=ClientTimeout(total=120), auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        await self._runner.cleanup()
        await self._session.close()

    # ---- the proxy ---------------------------------------------------------------------

    def _take(self, method: str, path: str) -> Fault | None:
        fault = self.fault
        if fault is None or not fault.applies(method, path):
            return None
        fault.hits += 1
        return fault

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.rel_url.path
        self.requests.append((request.method, path))
        fault = self._take(request.method, path)
        kind = fault.kind if fault else None
        if kind == "reset" and request.can_read_body:
            await request.content.read(max(1, (request.content_length or 2) // 2))
            request.transport.abort()   # type: ignore[union-attr]
            raise ConnectionResetError("reset by the fault proxy")
        body = await request.read()
        if kind == "delay":
            await asyncio.sleep(fault.seconds)   # type: ignore[union-attr]
        if kind == "status":
            assert fault is not None
            return web.Response(status=fault.status, content_type="application/xml",
                                body=(f"<Error><Code>{fault.code}</Code><Message>from the "
                                      f"fault proxy</Message></Error>").encode())
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("content-length", "transfer-encoding", "connection")}
        async with self._session.request(request.method, self.upstream + str(request.rel_url),
                                         headers=headers, data=body) as r:
            answer = await r.read()
            out = {k: v for k, v in r.headers.items() if k.lower() not in _HOP}
            status, length = r.status, r.headers.get("Content-Length")
        if request.method == "PUT" and status == 200:
            self.bodies[path] = body
        if request.method == "GET":
            self.sent.append((path, len(answer)))
        if request.method == "HEAD":
            resp = web.StreamResponse(status=status, headers=out)
            if length is not None:
                resp.content_length = int(length)
            await resp.prepare(request)
            return resp
        if kind == "swap" and status in (200, 206):
            assert fault is not None
            other = next((b for p, b in self.bodies.items() if fault.swap_with in p), None)
            if other is None:
                raise LookupError(f"swap: no object matching {fault.swap_with!r} was put "
                                  "through the proxy")
            answer = _ranged(other, request.headers.get("Range"))
        elif kind == "truncate":
            answer = answer[:len(answer) // 2]
        elif kind in ("reset", "hangup"):
            resp = web.StreamResponse(status=status, headers=out)
            resp.content_length = len(answer)
            await resp.prepare(request)
            await resp.write(answer[:len(answer) // 2])
            if kind == "reset":
                request.transport.abort()   # type: ignore[union-attr]
            else:
                request.transport.close()   # type: ignore[union-attr]
            return resp
        return web.Response(status=status, headers=out, body=answer)


def _ranged(data: bytes, header: str | None) -> bytes:
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", header or "")
    if not m:
        return data
    start, end = m.groups()
    if not start:
        return data[-int(end):]
    return data[int(start):int(end) + 1 if end else None]
