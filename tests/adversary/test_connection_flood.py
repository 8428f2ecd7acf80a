"""Connection floods: a LAN stranger opens hundreds of idle TCP connections (from several
addresses) to the signaling endpoint and the direct lane. Each server holds at most its caps
of them, a paired peer still gets through while the flood goes on, and the idle ones are
closed once the handshake timeout passes. (The daemon under a flood: tests/integration/
test_flood.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import struct

from p2pbackup import session
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.format.membership import OWNER, Member, Membership
from p2pbackup.transport.pending import ConnectionLimits
from p2pbackup.transport.tls_lane import LaneIdentity, LaneServer, connect_lane
from tests.eventually import eventually
from tests.integration.flood_agent import Flood

LIMITS = ConnectionLimits(per_source=4, total=16, handshake_timeout=1.0)
SOURCES = [f"127.0.0.{i}" for i in range(2, 12)]    # ten addresses, 30 connections each
FLOOD = 300


@contextlib.asynccontextmanager
async def flooding(port: int):
    """A flood that re-opens what the server closes, until the block ends."""
    flood = Flood("127.0.0.1", port, SOURCES, FLOOD)
    await flood.fill()

    async def refill() -> None:
        while True:
            await asyncio.sleep(0.1)
            await flood.fill()

    task = asyncio.get_running_loop().create_task(refill())
    try:
        yield flood
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_flood_of_idle_connections_keeps_no_paired_peer_off_the_direct_lane():
    srv, cli = LaneIdentity.generate(), LaneIdentity.generate()

    async def welcome(link) -> None:
        await link.send(b"welcome")

    server = LaneServer(srv, welcome, expected=[cli.fingerprint], limits=LIMITS)
    _, port = await server.start("127.0.0.1")
    try:
        async with flooding(port) as flood:
            await eventually(lambda: flood.opened >= FLOOD)
            assert len(server.pending) <= LIMITS.total
            for _ in range(3):   # a paired peer (another address) gets through, every time
                lane = await connect_lane("127.0.0.1", port, srv.fingerprint, cli)
                assert await lane.recv() == b"welcome"
                await lane.close()
            assert len(server.pending) <= LIMITS.total
        # The flood stops re-opening: what the server still holds is closed after the timeout.
        await eventually(lambda: not server.pending, timeout=LIMITS.handshake_timeout + 5)
        await flood.close()
    finally:
        await server.close()


async def test_a_flood_of_idle_connections_keeps_signaling_answering():
    me = DeviceIdentity.generate()
    members = Membership(1, b"", 0, (Member(me.device_id, me.public_key, "me", OWNER),))
    refused: list[str] = []

    async def never(sender, link) -> None:   # no offer here is valid: none gets this far
        raise AssertionError("a link was opened")

    server = session.SignalingServer(me, lambda: members, never, on_refused=refused.append,
                                     limits=LIMITS)
    port = await server.start("127.0.0.1", 0)
    try:
        async with flooding(port) as flood:
            await eventually(lambda: flood.opened >= FLOOD)
            assert len(server.pending) <= LIMITS.total
            # A request from another address is read and answered (here: refused in words).
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(struct.pack(">I", 5) + b"hello")
            (n,) = struct.unpack(">I", await asyncio.wait_for(reader.readexactly(4), 10))
            assert (await reader.readexactly(n)).startswith(b"!")
            writer.close()
            assert len(refused) == 1 and len(server.pending) <= LIMITS.total
        await eventually(lambda: not server.pending, timeout=LIMITS.handshake_timeout + 5)
        await flood.close()
    finally:
        await server.close()
