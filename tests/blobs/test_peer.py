"""The peer store (fetch protocol) over a real aiortc data channel on 127.0.0.1.

The conformance suite runs against a peer that lets the client write and delete (a store it
serves as is); the daemon's own policy (append-only, every object checked) has its own tests.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.blobs.peer import PeerRefused, PeerStore, serve
from p2pbackup.errors import IntegrityError, NotFound, PeerUnreachable
from p2pbackup.transport.datachannel import IceConfig, PeerLink

from .conformance import BlobStoreConformance

pytestmark = pytest.mark.timeout(60)
LOOPBACK = IceConfig(host_addresses=("127.0.0.1",))


async def link_pair() -> tuple[PeerLink, PeerLink]:
    a, b = PeerLink(LOOPBACK), PeerLink(LOOPBACK)
    answer = await b.accept_offer(await a.create_offer())
    await a.accept_answer(answer)
    await asyncio.gather(a.wait_connected(20), b.wait_connected(20))
    return a, b


async def served(tmp_path: Path, *, allow_delete: bool = False, **policy
                 ) -> AsyncIterator[tuple[PeerStore, LocalDirStore]]:
    backing = LocalDirStore(tmp_path / "served")
    if allow_delete:
        policy["delete"] = backing.delete
    client_link, server_link = await link_pair()
    server = asyncio.create_task(serve(server_link, backing, "server-device", **policy))
    store = await PeerStore(client_link, "client-device", location="peer:server").start()
    try:
        yield store, backing
    finally:
        await store.close()
        await asyncio.wait_for(server, 10)
        await server_link.close()


class TestPeerStore(BlobStoreConformance):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[PeerStore]:
        async for store, _ in served(tmp_path, allow_delete=True):  # the suite deletes
            yield store


async def test_a_large_object_crosses_in_parts_and_requests_interleave(tmp_path: Path):
    async for store, backing in served(tmp_path):
        big = os.urandom(5 * 1024 * 1024 + 17)
        await backing.put("packs/" + "a" * 64, big)
        got, size, has = await asyncio.gather(store.get("packs/" + "a" * 64),
                                              store.size("packs/" + "a" * 64),
                                              store.has("packs/" + "b" * 64))
        assert got == big and size == len(big) and has is False
        assert await store.get_range("packs/" + "a" * 64, -100, 100) == big[-100:]


async def test_the_peer_refuses_deletes_and_checked_puts_by_default(tmp_path: Path):
    async def checked(name: str, data: bytes) -> None:
        raise IntegrityError(f"{name} from a peer is forged or damaged")

    async for store, backing in served(tmp_path, put=checked):
        await backing.put("snapshots/" + "c" * 64, b"kept")
        with pytest.raises(PeerRefused, match="append-only"):
            await store.delete("snapshots/" + "c" * 64)
        with pytest.raises(PeerRefused, match="forged or damaged"):
            await store.put("snapshots/" + "d" * 64, b"planted")
        # The session goes on after refusals, and nothing was lost or planted.
        assert await store.get("snapshots/" + "c" * 64) == b"kept"
        assert not await backing.has("snapshots/" + "d" * 64)
        with pytest.raises(NotFound):
            await store.get("snapshots/" + "d" * 64)


async def test_names_the_peer_hides_are_not_found(tmp_path: Path):
    async for store, backing in served(tmp_path, read=lambda n: not n.startswith("keys/")):
        await backing.put("keys/secret", b"s")
        await backing.put("config", b"c")
        assert [n async for n in store.list("")] == ["config"]
        with pytest.raises(NotFound):
            await store.get("keys/secret")


async def test_a_peer_that_goes_away_fails_requests_with_a_clear_error(tmp_path: Path):
    backing = LocalDirStore(tmp_path / "served")
    client_link, server_link = await link_pair()
    server = asyncio.create_task(serve(server_link, backing, "server-device"))
    store = await PeerStore(client_link, "client-device", location="peer:server").start()
    await server_link.close()
    await asyncio.wait_for(server, 10)
    with pytest.raises(PeerUnreachable, match="peer:server"):
        for _ in range(50):  # the close reaches the client within a moment
            await store.has("config")
            await asyncio.sleep(0.1)
    await store.close()


async def test_reads_move_to_a_direct_lane_and_fall_back_when_it_breaks(tmp_path: Path):
    """A real TLS lane on 127.0.0.1, pinned inside the fetch session: reads go over it; when
    it breaks they continue over the data channel; a peer without lanes just says no."""
    from p2pbackup.peer_fetch import direct_lane
    from p2pbackup.transport.tls_lane import LaneIdentity, LaneServer

    backing = LocalDirStore(tmp_path / "served")
    big = os.urandom(3 * 1024 * 1024)
    await backing.put("packs/" + "e" * 64, big)
    lanes: list = []

    async def on_lane(link) -> None:   # the server's second fetch session, over the lane
        lanes.append(link)
        await serve(link, backing, "server-device")

    server_id = LaneIdentity.generate(days=1)
    lane_server = LaneServer(server_id, on_lane)
    port = (await lane_server.start("127.0.0.1", 0))[1]

    async def offer(client_fp: str) -> tuple[str, int]:
        lane_server.expect(client_fp)
        return lane_server.fingerprint, port

    client_link, server_link = await link_pair()
    server = asyncio.create_task(serve(server_link, backing, "server-device", lane=offer))
    store = await PeerStore(client_link, "client-device", location="peer:server").start()
    try:
        assert store.path == "data channel"
        assert await direct_lane(store, "127.0.0.1")
        assert store.path == "direct lane" and len(lanes) == 1
        assert await store.get("packs/" + "e" * 64) == big
        assert [n async for n in store.list("packs/")] == ["packs/" + "e" * 64]
        await lanes[0].close()          # the lane breaks: the next read goes the other way
        assert await store.get_range("packs/" + "e" * 64, 5, 10) == big[5:15]
        assert store.path == "data channel"
    finally:
        await store.close()
        await asyncio.wait_for(server, 10)
        await server_link.close()
        await lane_server.close()

    async for store, _ in served(tmp_path):   # serve() without `lane`: refused, no harm
        assert not await direct_lane(store, "127.0.0.1")
        assert store.path == "data channel" and await store.has("packs/" + "e" * 64) is True


async def test_which_path_reads_take_is_declared_on_the_store_interface(tmp_path: Path, capsys):
    # (the CLI once guessed a peer store by its attributes; any store may declare it)
    from p2pbackup.cli import output

    class Relayed(LocalDirStore):
        def read_path(self) -> str:
            return "relay"

    relayed = Relayed(tmp_path / "relayed")
    output.peer_path(relayed)
    output.peer_path(LocalDirStore(tmp_path / "plain"))
    assert capsys.readouterr().err.splitlines() == [
        f"reading from {relayed.location} over the relay"]
    async for store, _ in served(tmp_path):
        assert store.read_path() == "data channel"
