"""The control socket: `p2pbackup status` and `p2pbackup snapshot` talk to the daemon here."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from p2pbackup import control
from p2pbackup.errors import LocalProtocolError, P2PError

log = logging.getLogger("p2pbackupd")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
# A lease's grant lasts until the client closes its connection (or dies).
Lease = Callable[[dict[str, Any]], AbstractAsyncContextManager[dict[str, Any]]]


class ControlServer:
    """Serves one request per connection on a Unix socket only the owner can open."""

    def __init__(self, path: Path, handlers: dict[str, Handler],
                 leases: dict[str, Lease] | None = None) -> None:
        self.path = path
        self.handlers = handlers
        self.leases = leases or {}
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        try:
            self.path.unlink()  # left by a daemon that was killed
        except FileNotFoundError:
            pass
        old = os.umask(0o177)  # created 0600: no window in which others could connect
        try:
            self._server = await asyncio.start_unix_server(self._serve, str(self.path),
                                                           limit=control.MAX_MESSAGE)
        finally:
            os.umask(old)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        # A lease held open would otherwise keep the daemon from stopping.
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        cmd = "?"
        try:
            try:
                req = control.decode(await asyncio.wait_for(reader.readline(), 10))
                cmd = str(req.get("cmd"))
                args = req.get("args") or {}
                if not isinstance(args, dict):
                    raise LocalProtocolError("control request arguments must be an object")
                lease = self.leases.get(cmd)
                if lease is not None:
                    await self._hold(lease, args, reader, writer)
                    return
                handler = self.handlers.get(cmd)
                if handler is None:
                    raise LocalProtocolError(f"unknown command {req.get('cmd')!r}")
                reply = {"ok": True, "result": await handler(args)}
            except P2PError as exc:
                reply = {"ok": False, "error": str(exc), "exit": exc.exit_code}
            except (asyncio.TimeoutError, ValueError) as exc:
                reply = {"ok": False, "error": f"bad control request: {exc}", "exit": 20}
            except Exception as exc:  # a bug: said once in the log, the daemon goes on
                log.error("internal error in control command %s: %s: %s", cmd,
                          type(exc).__name__, exc, exc_info=True)
                reply = {"ok": False, "error": f"internal error in p2pbackupd: "
                         f"{type(exc).__name__}: {exc}", "exit": 70}
            writer.write(control.encode(reply))
            await writer.drain()
        except (ConnectionError, OSError) as exc:
            log.warning("control client went away: %s", exc)
        finally:
            self._connections.discard(task)
            writer.close()

    @staticmethod
    async def _hold(lease: Lease, args: dict[str, Any], reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        """Grant, answer, and keep the grant until the client's end of the connection closes."""
        async with lease(args) as granted:
            writer.write(control.encode({"ok": True, "result": granted}))
            await writer.drain()
            try:
                while await reader.read(4096):
                    pass  # nothing more is expected; EOF (or a reset) ends the lease
            except (ConnectionError, OSError):
                pass
