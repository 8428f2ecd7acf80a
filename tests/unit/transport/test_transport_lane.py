"""The direct lane on 127.0.0.1: pinned certificates both ways, framing, refusals."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import struct

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from p2pbackup.errors import PeerNotPaired, PeerUnreachable, RemoteProtocolError
from p2pbackup.transport import tls_lane
from p2pbackup.transport.tls_lane import LaneIdentity, LaneServer, connect_lane

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def ids():
    return LaneIdentity.generate(), LaneIdentity.generate(), LaneIdentity.generate()


def test_identity_is_a_self_signed_p256_certificate(ids):
    ident = ids[0]
    cert = x509.load_der_x509_certificate(ident.cert_der)
    assert cert.issuer == cert.subject
    assert isinstance(cert.public_key().curve, ec.SECP256R1)
    assert ident.fingerprint == hashlib.sha256(ident.cert_der).hexdigest()
    assert x509.load_pem_x509_certificate(ident.cert_pem) == cert


class Echo:
    """A lane server that echoes every message and records refusals."""

    def __init__(self, ident, expected):
        self.refused: list[Exception] = []
        self.peers: list[str] = []
        self.server = LaneServer(ident, self.handle, expected=expected,
                                 on_refused=self.refused.append)

    async def handle(self, link):
        self.peers.append(link.peer_fingerprint)
        while (m := await link.recv()) is not None:
            await link.send(m)

    async def __aenter__(self):
        self.addr = await self.server.start("127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc):
        await self.server.close()


async def test_pinned_lane_carries_messages_both_ways(ids):
    srv, cli, _ = ids
    async with Echo(srv, [cli.fingerprint.upper()]) as echo:  # case does not matter
        link = await connect_lane(*echo.addr, srv.fingerprint, cli)
        assert link.peer_fingerprint == srv.fingerprint
        assert link.writer.get_extra_info("ssl_object").version() == "TLSv1.3"
        msgs = [b"", b"a", bytes(range(256)) * 1000, b"z" * (3 * 1024 * 1024)]
        for m in msgs:
            await link.send(m)
        assert [await link.recv() for _ in msgs] == msgs
        await link.close()
        assert link.state == "closed" and await link.recv() is None
        with pytest.raises(PeerUnreachable):
            await link.send(b"late")
        assert echo.peers == [cli.fingerprint] and echo.refused == []


async def test_server_refuses_a_client_certificate_it_does_not_expect(ids):
    srv, cli, other = ids
    async with Echo(srv, [cli.fingerprint]) as echo:
        with pytest.raises(PeerNotPaired, match="refused this device's lane certificate"):
            await connect_lane(*echo.addr, srv.fingerprint, other)
        await asyncio.sleep(0.05)
        assert len(echo.refused) == 1 and isinstance(echo.refused[0], PeerNotPaired)
        assert "not one a paired session announced" in str(echo.refused[0])
        assert echo.peers == []


async def test_client_refuses_a_server_with_another_certificate(ids):
    srv, cli, other = ids
    async with Echo(srv, [cli.fingerprint]) as echo:
        with pytest.raises(PeerNotPaired, match="not the signed fingerprint"):
            await connect_lane(*echo.addr, other.fingerprint, cli)
        await asyncio.sleep(0.05)
        assert len(echo.refused) == 1 and isinstance(echo.refused[0], PeerNotPaired)
        assert "expected another fingerprint" in str(echo.refused[0])
        assert echo.peers == []


async def test_client_that_announces_a_certificate_without_its_key_fails_tls(ids):
    srv, cli, impostor = ids
    async with Echo(srv, [cli.fingerprint]) as echo:
        reader, writer = await asyncio.open_connection(*echo.addr)
        # Announce the expected (public) certificate, then present our own in TLS.
        writer.write(tls_lane._HELLO.pack(tls_lane.MAGIC, tls_lane.VERSION, len(cli.cert_der))
                     + cli.cert_der)
        assert (await reader.readexactly(6))[-1] == tls_lane.ACCEPTED
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await writer.start_tls(tls_lane._client_context(impostor))
            writer.write(tls_lane.VERDICT_OK)
            await writer.drain()
            await reader.readexactly(1)
        writer.close()
        await asyncio.sleep(0.05)
        assert echo.peers == []
        assert len(echo.refused) == 1 and isinstance(echo.refused[0], PeerNotPaired)


async def test_oversized_or_truncated_frames_are_protocol_errors(ids):
    srv, cli, _ = ids
    got: asyncio.Queue = asyncio.Queue()

    async def handle(link):
        try:
            await got.put(await link.recv())
        except Exception as exc:
            await got.put(exc)

    server = LaneServer(srv, handle, expected=[cli.fingerprint], max_message_size=1000)
    addr = await server.start("127.0.0.1")
    try:
        link = await connect_lane(*addr, srv.fingerprint, cli)
        link.writer.write(struct.pack("!I", 1001))
        assert isinstance(await asyncio.wait_for(got.get(), 5), RemoteProtocolError)
        await link.close()

        link = await connect_lane(*addr, srv.fingerprint, cli)
        link.writer.write(struct.pack("!I", 10) + b"abc")
        await link.close()
        exc = await asyncio.wait_for(got.get(), 5)
        assert isinstance(exc, RemoteProtocolError) and "middle of a message" in str(exc)
    finally:
        await server.close()


async def test_garbage_instead_of_a_hello_is_refused(ids):
    srv, cli, _ = ids
    async with Echo(srv, [cli.fingerprint]) as echo:
        reader, writer = await asyncio.open_connection(*echo.addr)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await reader.read() == b""
        writer.close()
        assert isinstance(echo.refused[0], RemoteProtocolError)


async def test_nothing_listening_is_peer_unreachable(ids):
    srv, cli, _ = ids
    server = LaneServer(srv, lambda link: asyncio.sleep(0))
    host, port = await server.start("127.0.0.1")
    await server.close()
    with pytest.raises(PeerUnreachable):
        await connect_lane(host, port, srv.fingerprint, cli)
