"""A peer's store as a BlobStore, over a peer link (the fetch protocol), and the serving side.

`PeerStore` is what `restore --from peer:DEVICE` and `recover --from peer:DEVICE` read
through; `serve` answers such a client from a daemon's store. The link is anything with
`send(bytes)`, `recv() -> bytes | None` and `close()`: an aiortc data channel in the product.

On a LAN the client asks for a direct lane (`PeerStore.use_lane`): reads then go over a TLS
lane, pinned inside the signed session, in a second fetch session; if the lane fails they go
back to the data channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from ..errors import NotFound, P2PError, PeerUnreachable, RemoteProtocolError, StorageError
from ..protocol import fetch
from ..protocol.framing import Limits
from ..transport.pump import pump, send_queued
from .base import BlobStore, Buffer

log = logging.getLogger("p2pbackup.peer")
MESSAGE = 64 * 1024      # the data channel's message size (datachannel.MESSAGE_SIZE)
LANE_MESSAGE = 1024 * 1024
HELLO_TIMEOUT = 15.0
DATA_CHANNEL, DIRECT_LANE = "data channel", "direct lane"

# Opens a lane: (host, port, the server's fingerprint) -> link, or raises P2PError.
LaneDialer = Callable[[str, int, str], Awaitable["Link"]]


class Link(Protocol):
    async def send(self, message: bytes) -> None: ...
    async def recv(self) -> bytes | None: ...
    async def close(self) -> None: ...


class PeerRefused(StorageError):
    """{}"""


async def _next(end: fetch.FetchClient | fetch.FetchServer, link: Link) -> bytes | None:
    """The next message; b"" when an object arriving in parts waited `partial_timeout` for
    it (feeding that to `end` ends the session if it still waits)."""
    if not end.partial_objects:
        return await link.recv()
    try:
        return await asyncio.wait_for(link.recv(), end.limits.partial_timeout)
    except asyncio.TimeoutError:
        return b""


class PeerStore(BlobStore):
    """Reads (and, where the peer allows, writes) another device's store over `link`."""

    def __init__(self, link: Link, me: str, *, location: str,
                 message_size: int = MESSAGE) -> None:
        self.link, self.location, self.me = link, location, me
        self._message = message_size
        self._client = fetch.FetchClient(me)
        self._lane: PeerStore | None = None   # bulk reads go here while it works
        self._waiting: dict[int, asyncio.Future[fetch.Reply]] = {}
        self._hello: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._send = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._error: str | None = None
        self.via: str | None = None   # how the data channel crosses the network, in words

    @property
    def peer(self) -> str | None:
        return self._client.peer

    @property
    def path(self) -> str:
        """Which path reads take: "direct lane" or "data channel"."""
        return DIRECT_LANE if self._lane is not None else DATA_CHANNEL

    def read_path(self) -> str:
        # "data channel (TURN relay)": how it crosses the network, once it is known
        return f"{self.path} ({self.via})" if self.via and self._lane is None else self.path

    async def use_lane(self, host: str, fingerprint: str, dial: LaneDialer) -> bool:
        """Ask the peer for a direct lane to `host` (our certificate: `fingerprint`) and move
        reads onto it; False (staying on the data channel) if the peer or network says no."""
        try:
            server_fp, port = await self._call(lambda: self._client.request_lane(fingerprint))
            link = await dial(host, port, server_fp)
        except P2PError as exc:
            log.info("%s: no direct lane (%s); reading over the data channel", self.location, exc)
            return False
        try:
            self._lane = await PeerStore(link, self.me, location=self.location,
                                         message_size=LANE_MESSAGE).start()
        except P2PError as exc:
            log.info("%s: the direct lane did not start (%s)", self.location, exc)
            with contextlib.suppress(Exception):
                await link.close()
            return False
        return True

    async def _lane_failed(self, exc: P2PError) -> None:
        lane, self._lane = self._lane, None
        log.warning("%s: the direct lane failed (%s); back on the data channel", self.location,
                    exc)
        if lane is not None:
            with contextlib.suppress(Exception):
                await lane.close()

    async def _either(self, op: str, *args: Any) -> Any:
        """Run `op` on the lane while it works, else over the data channel."""
        if self._lane is not None:
            try:
                return await getattr(self._lane, "_dc_" + op)(*args)   # its own link
            except PeerUnreachable as exc:
                await self._lane_failed(exc)
        return await getattr(self, "_dc_" + op)(*args)

    async def start(self, timeout: float = HELLO_TIMEOUT) -> "PeerStore":
        """Say hello and wait for the peer's; PeerUnreachable if it does not answer."""
        self._reader = asyncio.get_running_loop().create_task(self._read())
        async with self._send:
            await send_queued(self._client, self.link, self._message)
        try:
            await asyncio.wait_for(asyncio.shield(self._hello), timeout)
        except asyncio.TimeoutError:
            await self.close()
            raise PeerUnreachable(f"{self.location} did not answer within {timeout:g} s") \
                from None
        return self

    async def _read(self) -> None:
        reason = "the peer closed the connection"

        async def handle(events: list[fetch.Event]) -> None:
            nonlocal reason
            for ev in events:
                if isinstance(ev, fetch.Hello) and not self._hello.done():
                    self._hello.set_result(ev.device)
                elif isinstance(ev, fetch.Reply):
                    fut = self._waiting.pop(ev.id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(ev)
                elif isinstance(ev, fetch.Closed):
                    reason = ev.reason
                    log.warning("%s: %s", self.location, ev.reason)
            if self._client.closed:
                with contextlib.suppress(P2PError):
                    await send_queued(self._client, self.link, self._message)

        try:
            await pump(self._client, self.link, handle,
                       recv=lambda: _next(self._client, self.link))
        except P2PError as exc:
            reason = str(exc)
        finally:
            self._error = reason
            for fut in [self._hello, *self._waiting.values()]:
                if not fut.done():
                    fut.set_exception(PeerUnreachable(f"{self.location}: {reason}"))
            self._waiting.clear()

    async def _call(self, send: Callable[[], int]) -> Any:
        if self._error is not None:
            raise PeerUnreachable(f"{self.location}: {self._error}")
        async with self._send:
            rid = send()
            fut = self._waiting[rid] = asyncio.get_running_loop().create_future()
            await send_queued(self._client, self.link, self._message)
        reply = await fut
        if reply.code == fetch.NOT_FOUND:
            raise NotFound(f"{self.location} has no {reply.reason or 'such object'}")
        if reply.code == fetch.REFUSED:
            raise PeerRefused(f"{self.location} refused: {reply.reason}")
        if reply.code is not None:
            raise StorageError(f"{self.location} failed: {reply.reason}")
        return reply.value

    async def put(self, name: str, data: Buffer) -> None:
        await self._either("put", name, data)

    async def get(self, name: str) -> bytes:
        return await self._either("get", name)

    async def get_range(self, name: str, offset: int, length: int) -> bytes:
        return await self._either("get_range", name, offset, length)

    async def has(self, name: str) -> bool:
        return await self._either("has", name)

    async def size(self, name: str) -> int:
        return await self._either("size", name)

    async def list(self, prefix: str = "") -> AsyncIterator[str]:  # type: ignore[override]
        for name in await self._either("names", prefix):
            yield name

    async def delete(self, name: str) -> None:
        await self._either("delete", name)

    # ---- over this store's own link (the data channel, or the lane for a lane's store) ----

    async def _dc_put(self, name: str, data: Buffer) -> None:
        await self._call(lambda: self._client.put(name, bytes(data)))

    async def _dc_get(self, name: str) -> bytes:
        return await self._call(lambda: self._client.request("get", name))

    async def _dc_get_range(self, name: str, offset: int, length: int) -> bytes:
        return await self._call(lambda: self._client.request("range", name, offset=offset,
                                                             length=length))

    async def _dc_has(self, name: str) -> bool:
        return await self._call(lambda: self._client.request("has", name))

    async def _dc_size(self, name: str) -> int:
        return await self._call(lambda: self._client.request("size", name))

    async def _dc_names(self, prefix: str) -> list[str]:
        return await self._call(lambda: self._client.request("list", prefix=prefix))

    async def _dc_delete(self, name: str) -> None:
        await self._call(lambda: self._client.request("delete", name))

    async def close(self) -> None:
        if self._lane is not None:
            lane, self._lane = self._lane, None
            await lane.close()
        if self._error is None:
            self._client.close("done")
            with contextlib.suppress(P2PError):
                async with self._send:
                    await send_queued(self._client, self.link, self._message)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        with contextlib.suppress(Exception):
            await self.link.close()


PutCheck = Callable[[str, bytes], Awaitable[None]]


async def serve(link: Link, store: BlobStore, me: str, *, first: bytes | None = None,
                put: PutCheck | None = None, delete: Callable[[str], Awaitable[None]] |
                None = None, read: Callable[[str], bool] | None = None,
                lane: Callable[[str], Awaitable[tuple[str, int]]] | None = None,
                message_size: int = MESSAGE, limits: Limits = Limits()) -> str:
    """Answer one fetch client from `store` until it leaves; returns why the session ended.

    `put` stores an object after whatever checks the caller makes (default: store.put);
    `delete` None refuses deletes; `read` says which names the client may see (default: all);
    `lane(client fingerprint)` makes ready for a direct lane and returns (our fingerprint,
    port), None refuses lanes. A failing request is answered with its reason; the session
    goes on, within `limits`.
    """
    server = fetch.FetchServer(me, limits=limits)
    may_read = read or (lambda name: True)
    do_put = put or store.put

    async def answer(req: fetch.Request) -> None:
        if req.op == "lane":
            if lane is None:
                server.fail(req.id, fetch.REFUSED, "this peer offers no direct lane")
                return
            try:
                fp, port = await lane(req.name)
            except P2PError as exc:
                server.fail(req.id, fetch.REFUSED, str(exc))
                return
            server.reply(req.id, {"fp": fp, "port": port})
            return
        if req.op != "list" and not may_read(req.name):
            server.fail(req.id, fetch.NOT_FOUND, req.name)
            return
        try:
            if req.op == "get":
                server.reply(req.id, await store.get(req.name))
            elif req.op == "range":
                server.reply(req.id, await store.get_range(req.name, req.offset, req.length))
            elif req.op == "size":
                server.reply(req.id, await store.size(req.name))
            elif req.op == "has":
                server.reply(req.id, await store.has(req.name))
            elif req.op == "list":
                server.reply(req.id, sorted([n async for n in store.list(req.prefix)
                                             if fetch.store_name(n) and may_read(n)]))
            elif req.op == "put":
                await do_put(req.name, req.data)
                server.reply(req.id, None)
            elif req.op == "delete":
                if delete is None:
                    server.fail(req.id, fetch.REFUSED, "objects on a peer are append-only; "
                                "only a signed prune removes them")
                else:
                    await delete(req.name)
                    server.reply(req.id, None)
        except NotFound:
            server.fail(req.id, fetch.NOT_FOUND, req.name)
        except P2PError as exc:
            server.fail(req.id, fetch.REFUSED, str(exc))

    reason = "the client left"

    async def handle(events: list[fetch.Event]) -> None:
        nonlocal reason
        for ev in events:
            if isinstance(ev, fetch.Request):
                await answer(ev)
            elif isinstance(ev, fetch.Closed):
                reason = ev.reason   # (the last event: the server is closed)
            await send_queued(server, link, message_size)
        await send_queued(server, link, message_size)

    try:
        await pump(server, link, handle, first=first or None, recv=lambda: _next(server, link))
    except (P2PError, RemoteProtocolError) as exc:
        return str(exc)
    return reason
