"""Pairing mailboxes for the tests: ours (p2pbackup/broker/mailbox.py) and magic-wormhole's.

`our_mailbox()` runs ours in this event loop (unit and adversary tests, which may give it a
tampering state); `mailbox_server(kind)` starts either as a process on a free 127.0.0.1 port
(for the CLI tests) and yields its WebSocket URL.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from p2pbackup.broker.mailbox import add_mailbox_routes
from tests.servers import _program, _running, free_port, serving

KINDS = ["ours", "magic-wormhole"]


@contextlib.asynccontextmanager
async def our_mailbox(**options: Any) -> AsyncIterator[tuple[str, Any]]:
    """Our mailbox in this loop: (its URL, its state)."""
    app = web.Application()
    state = add_mailbox_routes(app, **options)
    async with serving(app) as url:
        yield url.replace("http://", "ws://") + "/v1/mailbox", state


@contextlib.contextmanager
def mailbox_server(kind: str, workdir: Path) -> Iterator[str]:
    """A mailbox server process of `kind` ("ours" or "magic-wormhole"); yields its URL."""
    port = free_port()
    if kind == "ours":
        argv = [sys.executable, "-m", "p2pbackup.broker.mailbox", "--port", str(port)]
        url = f"ws://127.0.0.1:{port}/v1/mailbox"
    else:
        argv = [_program("twist"), "wormhole-mailbox",
                f"--port=tcp:{port}:interface=127.0.0.1",
                f"--channel-db={workdir / 'mailbox-channels.sqlite'}"]
        url = f"ws://127.0.0.1:{port}/v1"
    with _running(argv, workdir / f"mailbox-{kind}.log", port):
        yield url
