"""A pairing host gone bad: runs the real PAKE host (pairing_link.PairingHost) on loopback in
a thread, and answers the joiner's request with a welcome the test built."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from p2pbackup.crypto.pairing import make_code
from p2pbackup.pairing_link import PairingHost, StaticRendezvous


@contextmanager
def hostile_host(welcome: Callable[[bytes], bytes]) -> Iterator[tuple[str, str]]:
    """(code, "127.0.0.1:PORT") of a host whose welcome is `welcome(join request)`."""
    code = make_code()
    started: list[int] = []
    ready = threading.Event()
    loop = asyncio.new_event_loop()

    async def on_request(payload: bytes, verifier: str) -> bytes:
        return welcome(payload)

    async def on_complete() -> str:
        return "joined"

    async def confirm(verifier: str) -> bool:
        return True   # the hostile host's user says yes to anything

    host = PairingHost(code, on_request, on_complete, confirm=confirm,
                       rendezvous=StaticRendezvous("", 0), bind="127.0.0.1", lifetime=60)

    def serve() -> None:
        def on_started(port: int) -> None:
            started.append(port)
            ready.set()

        task = loop.create_task(host.run(started=on_started))
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass
        finally:
            ready.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(30) and started, "the hostile host did not start"
    try:
        yield code, f"127.0.0.1:{started[0]}"
    finally:
        def stop() -> None:
            for t in asyncio.all_tasks(loop):
                t.cancel()

        loop.call_soon_threadsafe(stop)
        thread.join(30)
        loop.close()
