"""The daemon's control protocol: one JSON request and one JSON reply per connection.

    {"v": 1, "cmd": "status"}      ->  {"v": 1, "ok": true, "result": {...}}
    {"v": 1, "cmd": "snapshot"}    ->  {"v": 1, "ok": false, "error": "...", "exit": 11}

A lease (`pause`) is a request whose grant lasts as long as its connection: the client keeps
it open while it needs what it was granted, and the daemon takes it back when it closes
(also when the client dies).

The socket lives in the home with mode 0600, so only its owner can talk to the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from .errors import DaemonNotRunning, LocalProtocolError, P2PError

PROTOCOL_VERSION = 1
MAX_MESSAGE = 1 << 20


class RemoteError(P2PError):
    """{}"""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps({"v": PROTOCOL_VERSION, **obj}).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """Parse one message; raise LocalProtocolError if it is not one."""
    if not line:
        raise LocalProtocolError("p2pbackupd closed the control connection without answering "
                                 "(it may be stopping)")
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise LocalProtocolError("the control message is not JSON") from None
    except RecursionError:
        raise LocalProtocolError("the control message is nested too deeply") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("v"), int):
        raise LocalProtocolError("the control message has no version")
    if obj["v"] > PROTOCOL_VERSION:
        raise LocalProtocolError(f"the control message is version {obj['v']}; upgrade p2pbackup")
    return obj


def arg(args: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None
        ) -> Any:
    """The argument `name` of a request, checked to be a `kind` (bool is not a number)."""
    value = args.get(name, default)
    if value is default:
        return value
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise LocalProtocolError(f"control request argument {name!r} must be a {names}, "
                                 f"not {type(value).__name__}")
    return value


async def _connect(socket_path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.open_unix_connection(str(socket_path), limit=MAX_MESSAGE)
    except (FileNotFoundError, ConnectionRefusedError):
        raise DaemonNotRunning(socket_path.parent) from None


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cmd: str,
                    args: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
    writer.write(encode({"cmd": cmd, "args": args or {}}))
    await writer.drain()
    reply = decode(await asyncio.wait_for(reader.readline(), timeout))
    if not reply.get("ok"):
        raise RemoteError(str(reply.get("error", "the daemon failed")), int(reply.get("exit", 1)))
    result = reply.get("result")
    return result if isinstance(result, dict) else {}


async def request(socket_path: Path, cmd: str, args: dict[str, Any] | None = None,
                  timeout: float = 3600) -> dict[str, Any]:
    """Send one command to the daemon and return its result."""
    reader, writer = await _connect(socket_path)
    try:
        return await _exchange(reader, writer, cmd, args, timeout)
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def lease(socket_path: Path, cmd: str, args: dict[str, Any] | None = None,
                timeout: float = 3600) -> AsyncIterator[dict[str, Any] | None]:
    """Hold what the daemon grants for `cmd` while the body runs (None: no daemon runs)."""
    try:
        reader, writer = await _connect(socket_path)
    except DaemonNotRunning:
        yield None
        return
    try:
        yield await _exchange(reader, writer, cmd, args, timeout)
    finally:
        writer.close()  # the daemon takes its grant back
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
