"""The control socket: `p2pbackup status` and `p2pbackup snapshot` talk to the daemon here."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from p2pbackup import control
from p2pbackup.errors import LocalProtocolError, P2PError

log = logging.getLogger("p2pbackupd")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlServer:
    """Serves one request per connection on a Unix socket only the owner can open."""

    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: asyncio.base_events.Server | None = None

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
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                req = control.decode(await asyncio.wait_for(reader.readline(), 10))
                handler = self.handlers.get(str(req.get("cmd")))
                if handler is None:
                    raise LocalProtocolError(f"unknown command {req.get('cmd')!r}")
                args = req.get("args") or {}
                if not isinstance(args, dict):
                    raise LocalProtocolError("control request arguments must be an object")
                reply = {"ok": True, "result": await handler(args)}
            except P2PError as exc:
                reply = {"ok": False, "error": str(exc), "exit": exc.exit_code}
            except (asyncio.TimeoutError, ValueError) as exc:
                reply = {"ok": False, "error": f"bad control request: {exc}", "exit": 20}
            writer.write(control.encode(reply))
            await writer.drain()
        except (ConnectionError, OSError) as exc:
            log.warning("control client went away: %s", exc)
        finally:
            writer.close()
