"""The daemon's control protocol: one JSON request and one JSON reply per connection.

    {"v": 1, "cmd": "status"}      ->  {"v": 1, "ok": true, "result": {...}}
    {"v": 1, "cmd": "snapshot"}    ->  {"v": 1, "ok": false, "error": "...", "exit": 11}

The socket lives in the home with mode 0600, so only its owner can talk to the daemon.
"""

from __future__ import annotations

import asyncio
import json
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
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise LocalProtocolError("the control message is not JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("v"), int):
        raise LocalProtocolError("the control message has no version")
    if obj["v"] > PROTOCOL_VERSION:
        raise LocalProtocolError(f"the control message is version {obj['v']}; upgrade p2pbackup")
    return obj


async def request(socket_path: Path, cmd: str, args: dict[str, Any] | None = None,
                  timeout: float = 3600) -> dict[str, Any]:
    """Send one command to the daemon and return its result."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=MAX_MESSAGE)
    except (FileNotFoundError, ConnectionRefusedError):
        raise DaemonNotRunning(socket_path.parent) from None
    try:
        writer.write(encode({"cmd": cmd, "args": args or {}}))
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    finally:
        writer.close()
    reply = decode(line)
    if not reply.get("ok"):
        raise RemoteError(str(reply.get("error", "the daemon failed")), int(reply.get("exit", 1)))
    result = reply.get("result")
    return result if isinstance(result, dict) else {}
