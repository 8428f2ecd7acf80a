"""Helpers every command module shares: running a coroutine, the home, the daemon."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Coroutine

if TYPE_CHECKING:
    from p2pbackup.device import Device


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


@contextlib.asynccontextmanager
async def writable_device(command: str, **kwargs: Any) -> AsyncIterator["Device"]:
    """This device opened for writing, by this process.

    A running p2pbackupd holds the store; it is asked to pause its writing and hand the store
    over for as long as this lasts (a lease on its control socket: it takes the store back
    when this process lets go of it, or dies).
    """
    from p2pbackup import control
    from p2pbackup.config import load_config
    from p2pbackup.device import open_device

    from . import output

    config = load_config(home())
    async with control.lease(config.control_socket, "pause",
                             {"pid": os.getpid(), "command": f"p2pbackup {command}"}) as paused:
        if paused is not None:
            output.note(f"p2pbackupd (pid {paused.get('pid')}) pauses its writing while this "
                        "command runs")
        async with open_device(home(), write=True, **kwargs) as dev:
            yield dev
