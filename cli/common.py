"""Helpers every command module shares: running a coroutine, the home, the daemon."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Coroutine


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def home() -> Path | None:
    return None  # the config loader reads P2PBACKUP_HOME


def via_daemon(cmd: str, args: dict | None = None, timeout: float = 3600) -> dict | None:
    """Ask the running daemon; None when no daemon runs for this home."""
    from p2pbackup import control
    from p2pbackup.config import load_config
    from p2pbackup.errors import DaemonNotRunning

    sock = load_config(home()).control_socket
    if not sock.exists():
        return None
    try:
        return run_async(control.request(sock, cmd, args, timeout=timeout))
    except DaemonNotRunning:
        return None
