"""The direct lane: TLS 1.3 over TCP between two peers that can reach each other (same LAN).

Each side has a throwaway self-signed certificate (`LaneIdentity`, ECDSA P-256); its
fingerprint is the SHA-256 of the DER certificate, as lowercase hex. The fingerprints travel
inside the data-channel session, signed by the device keys, so a lane is authenticated by
comparing the certificate the peer presents with the fingerprint it signed. A mismatch on
either side refuses the lane with `PeerNotPaired`, and the sync stays on the data channel.

Python's `ssl` has no hook to accept an unknown self-signed client certificate and check it
afterwards (CERT_OPTIONAL still fails the handshake on a self-signed certificate). So the
lane opens with a tiny clear-text hello that carries the client's certificate (public data):
the server checks its fingerprint against the ones it expects, answers accept or refuse, and
on accept starts TLS trusting exactly that certificate (CERT_REQUIRED: the client must prove
it holds the key). The client checks the server's certificate after the handshake
(`getpeercert(binary_form=True)`; TLS 1.3 already made the server prove it holds the key)
and tells the server its verdict in the first encrypted byte, so both sides see a refusal.

Wire: client hello `P2PL | 1 | len:u16 | cert DER`, server reply `P2PL | 1 | status:u8`
(0 accepted, 1 certificate not expected), TLS 1.3, client verdict `0x00` (ok) or `0x01`
(server certificate refused), then messages framed as `len:u32 | bytes`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import hashlib
import logging
import os
import ssl
import struct
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..errors import LocalProtocolError, PeerNotPaired, PeerUnreachable, RemoteProtocolError
from .link import CLOSED, CONNECTED, Buffer, StateCallback
from .pending import ConnectionLimits, PendingConnections

log = logging.getLogger("p2pbackup.transport")

MAGIC = b"P2PL"
VERSION = 1
_HELLO = struct.Struct("!4sBH")
_REPLY = struct.Struct("!4sBB")
_LEN = struct.Struct("!I")
ACCEPTED, CERT_NOT_EXPECTED = 0, 1
VERDICT_OK, VERDICT_REFUSED = b"\x00", b"\x01"
MAX_CERT = 8192

MAX_MESSAGE_SIZE = 16 * 1024 * 1024  # a larger length prefix is a protocol error
HANDSHAKE_TIMEOUT = 10.0
STREAM_LIMIT = 1024 * 1024  # StreamReader buffer before it pauses the socket
WRITE_HIGH_WATER = 1024 * 1024  # send() waits (drain) above this much unsent data


def cert_fingerprint(der: bytes) -> str:
    """The lane fingerprint of a DER certificate: SHA-256, lowercase hex."""
    return hashlib.sha256(der).hexdigest()


def _normalize(fingerprint: str) -> str:
    return fingerprint.replace(":", "").strip().lower()


@dataclass(frozen=True, slots=True)
class LaneIdentity:
    """One side's lane certificate and key (PEM); make a fresh one per daemon run."""

    cert_der: bytes
    cert_pem: bytes
    key_pem: bytes

    @classmethod
    def generate(cls, *, days: int = 7) -> LaneIdentity:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2pbackup direct lane")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(name).issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        return cls(cert_der=cert.public_bytes(serialization.Encoding.DER),
                   cert_pem=cert.public_bytes(serialization.Encoding.PEM),
                   key_pem=key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))

    @property
    def fingerprint(self) -> str:
        return cert_fingerprint(self.cert_der)

    def _load_into(self, ctx: ssl.SSLContext) -> None:
        # ssl loads keys only from files: use an anonymous memory file where Linux has one.
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("p2pbackup-lane", 0)
            try:
                os.write(fd, self.cert_pem + self.key_pem)
                ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
            return
        with tempfile.TemporaryDirectory() as d:  # mode 0700
            path = os.path.join(d, "lane.pem")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self.cert_pem + self.key_pem)
            ctx.load_cert_chain(path)


def _base_context(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    return ctx


def _client_context(identity: LaneIdentity) -> ssl.SSLContext:
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_NONE  # pinned by fingerprint after the handshake
    identity._load_into(ctx)
    return ctx


def _server_context(identity: LaneIdentity, client_der: bytes) -> ssl.SSLContext:
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=client_der)  # trust exactly the announced certificate
    identity._load_into(ctx)
    return ctx


class _Inbox(asyncio.BufferedProtocol):
    """The lane's protocol once TLS is up: TLS decrypts each message straight into a buffer of
    its own (`get_buffer`), so a message costs no copy between the socket and `recv`."""

    def __init__(self, link: LaneLink, transport: asyncio.Transport, stream_protocol) -> None:
        self._link = link
        self._transport = transport
        self._stream_protocol = stream_protocol   # asyncio's, which still owns wait_closed
        self._header = bytearray(_LEN.size)
        self._message: bytearray | None = None    # the message being read, once its size is
        self._got = 0
        self.messages: collections.deque[bytearray] = collections.deque()
        self.queued = 0                 # bytes in `messages`
        self.error: Exception | None = None     # the peer broke the framing: recv raises it
        self.eof = False
        self.lost: Exception | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._readable: asyncio.Future | None = None
        self._writable: asyncio.Future | None = None

    @property
    def partial(self) -> bool:
        return self._message is not None or self._got > 0

    # -- reading

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.error is not None:   # the framing is broken: drop what still comes
            return memoryview(bytearray(64 * 1024))
        if self._message is None:
            return memoryview(self._header)[self._got:]
        return memoryview(self._message)[self._got:]

    def buffer_updated(self, nbytes: int) -> None:
        if self.error is not None:
            return
        self._got += nbytes
        if self._message is None:
            if self._got < _LEN.size:
                return
            (size,) = _LEN.unpack(self._header)
            self._got = 0
            if size > self._link.max_message_size:
                self._fail(RemoteProtocolError(
                    f"the peer announced a {size}-byte message on the direct lane (limit "
                    f"{self._link.max_message_size})"))
                return
            self._message = bytearray(size)
            if size:
                return
        elif self._got < len(self._message):
            return
        message, self._message, self._got = self._message, None, 0
        self.messages.append(message)
        self.queued += len(message)
        if self.queued > 2 * STREAM_LIMIT and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
        self._wake_reader()

    def feed(self, data: bytes) -> None:
        """Bytes the handshake's stream reader had already buffered."""
        view = memoryview(data)
        while len(view) and self.error is None:
            buf = self.get_buffer(-1)
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            view = view[n:]
            self.buffer_updated(n)

    def taken(self, message: bytearray) -> None:
        self.queued -= len(message)
        if self._reading_paused and self.queued <= STREAM_LIMIT and self.error is None:
            self._reading_paused = False
            self._transport.resume_reading()

    def _fail(self, error: Exception) -> None:
        self.error = error
        self._transport.close()
        self._wake_reader()

    def eof_received(self) -> bool | None:
        self.eof = True
        self._wake_reader()
        return None

    def connection_made(self, transport) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.lost = exc
        self._wake_reader()
        self._wake_writer()
        self._link._closed()
        with contextlib.suppress(Exception):
            self._stream_protocol.connection_lost(exc)   # resolves StreamWriter.wait_closed

    def _wake_reader(self) -> None:
        if self._readable is not None and not self._readable.done():
            self._readable.set_result(None)

    async def readable(self) -> None:
        self._readable = asyncio.get_running_loop().create_future()
        await self._readable

    # -- writing

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    async def drain(self) -> None:
        while self._writing_paused and self.lost is None and not self.eof:
            self._writable = asyncio.get_running_loop().create_future()
            await self._writable
        if self._transport.is_closing():
            raise ConnectionResetError("the connection is closed")


SMALL_WRITE = 16 * 1024   # smaller buffers are joined before TLS (each write is a record)


class LaneLink:
    """An established lane: length-prefixed binary messages over the TLS stream.

    Same interface as the data channel's `PeerLink` (send / recv / close / state), plus
    `send_buffers` (one message from several buffers, none copied). `reader` and `writer` are
    the asyncio streams of the handshake: `writer.write` still writes raw bytes (tests use it
    to break the framing); reading goes through `recv` only, which returns each message as a
    bytearray of its own.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 peer_fingerprint: str, *, max_message_size: int = MAX_MESSAGE_SIZE,
                 on_state: StateCallback | None = None) -> None:
        self.reader = reader
        self.writer = writer
        self.peer_fingerprint = peer_fingerprint
        self.max_message_size = max_message_size
        self._on_state = on_state
        self._state = CONNECTED
        self._closing: asyncio.Task | None = None
        self.peername = writer.get_extra_info("peername")
        transport = writer.transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        # Take the transport over from the stream reader, with whatever it already buffered.
        early = bytes(reader._buffer)
        reader._buffer.clear()
        self._inbox = _Inbox(self, transport, transport.get_protocol())
        transport.set_protocol(self._inbox)
        self._inbox.feed(early)
        if reader.at_eof() or reader.exception() is not None:
            self._inbox.eof = True
        if getattr(reader, "_paused", False):
            reader._paused = False
            transport.resume_reading()

    @property
    def state(self) -> str:
        return self._state

    async def send(self, message: Buffer) -> None:
        await self.send_buffers([message])

    async def send_buffers(self, buffers: list[Buffer]) -> None:
        """One message made of `buffers` in order; large ones go to TLS as they are."""
        size = sum(len(b) for b in buffers)
        if size > self.max_message_size:
            raise LocalProtocolError(f"message of {size} bytes exceeds the lane's "
                                     f"limit of {self.max_message_size}")
        if self._state != CONNECTED or self.writer.is_closing():
            raise PeerUnreachable("the direct lane is closed")
        out: list[Buffer] = []
        small = bytearray(_LEN.pack(size))
        for b in buffers:
            if len(b) < SMALL_WRITE:
                small += b
                continue
            if small:
                out.append(bytes(small))
                small = bytearray()
            out.append(b)
        if small:
            out.append(bytes(small))
        try:
            self.writer.transport.writelines(out)
            await self._inbox.drain()
        except (OSError, ssl.SSLError, RuntimeError) as exc:
            self._closed()
            raise PeerUnreachable(f"the direct lane broke: {exc}") from exc

    async def recv(self) -> bytearray | None:
        inbox = self._inbox
        while True:
            if self._closing is not None:
                return None
            if inbox.messages:
                message = inbox.messages.popleft()
                inbox.taken(message)
                return message
            if inbox.error is not None:
                await self.close()
                raise inbox.error
            if inbox.eof or self._state != CONNECTED:
                self._closed()
                if inbox.partial:
                    raise RemoteProtocolError("the direct lane closed in the middle of a "
                                              "message")
                if isinstance(inbox.lost, (OSError, ssl.SSLError)):
                    raise PeerUnreachable(f"the direct lane broke: {inbox.lost}")
                return None
            await inbox.readable()

    async def close(self) -> None:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        self._closed()
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), HANDSHAKE_TIMEOUT)

    def _closed(self) -> None:
        if self._state == CLOSED:
            return
        self._state = CLOSED
        if self._on_state is not None:
            try:
                self._on_state(CLOSED)
            except Exception:
                log.exception("on_state callback failed")


def _translate(exc: BaseException, where: str) -> Exception:
    if isinstance(exc, (PeerNotPaired, RemoteProtocolError, PeerUnreachable)):
        return exc
    if isinstance(exc, ssl.SSLError):
        return PeerNotPaired(f"TLS handshake on the direct lane {where} failed: "
                             f"{exc.reason or exc}")
    if isinstance(exc, asyncio.IncompleteReadError):
        return PeerUnreachable(f"the direct lane {where} closed during its handshake")
    if isinstance(exc, asyncio.TimeoutError):
        return PeerUnreachable(f"the direct lane {where} did not complete its handshake "
                               f"within {HANDSHAKE_TIMEOUT:g} s")
    return PeerUnreachable(f"the direct lane {where} failed: {exc}")


async def connect_lane(host: str, port: int, expected_fingerprint: str,
                       identity: LaneIdentity, *, timeout: float = HANDSHAKE_TIMEOUT,
                       max_message_size: int = MAX_MESSAGE_SIZE,
                       on_state: StateCallback | None = None) -> LaneLink:
    """Open a lane to `host:port`, whose certificate must have `expected_fingerprint`.

    Raises PeerNotPaired when either side refuses the other's certificate, PeerUnreachable
    when the address does not answer (the caller stays on the data channel).
    """
    expected = _normalize(expected_fingerprint)
    where = f"to {host}:{port}"
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=STREAM_LIMIT), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise PeerUnreachable(f"no direct lane {where}: {exc or 'timed out'}") from exc
    try:
        return await asyncio.wait_for(
            _client_handshake(reader, writer, expected, identity, where, max_message_size,
                              on_state), timeout)
    except BaseException as exc:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
        if isinstance(exc, Exception):
            raise _translate(exc, where) from exc
        raise


async def _client_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            expected: str, identity: LaneIdentity, where: str,
                            max_message_size: int, on_state: StateCallback | None) -> LaneLink:
    writer.write(_HELLO.pack(MAGIC, VERSION, len(identity.cert_der)) + identity.cert_der)
    await writer.drain()
    magic, version, status = _REPLY.unpack(await reader.readexactly(_REPLY.size))
    if magic != MAGIC or version != VERSION:
        raise RemoteProtocolError(f"the direct lane {where} does not speak lane v{VERSION}")
    if status == CERT_NOT_EXPECTED:
        raise PeerNotPaired(f"the peer {where} refused this device's lane certificate "
                            f"(fingerprint {identity.fingerprint[:16]}… not the one it expects)")
    if status != ACCEPTED:
        raise RemoteProtocolError(f"the direct lane {where} answered with status {status}")
    await writer.start_tls(_client_context(identity))
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    got = cert_fingerprint(der) if der else "none"
    if got != expected:
        with contextlib.suppress(Exception):
            writer.write(VERDICT_REFUSED)
            await writer.drain()
        raise PeerNotPaired(f"the peer {where} presented lane certificate {got[:16]}…, not "
                            f"the signed fingerprint {expected[:16]}…: lane refused")
    writer.write(VERDICT_OK)
    await writer.drain()
    return LaneLink(reader, writer, got, max_message_size=max_message_size, on_state=on_state)


LaneHandler = Callable[[LaneLink], Awaitable[None]]


class LaneServer:
    """Listens for lanes; accepts only clients whose certificate fingerprint it expects.

    `expect(fp)` / `forget(fp)` manage the accepted fingerprints (each came signed inside a
    data-channel session). `handler(link)` runs for each accepted lane; the link is closed
    when it returns. `on_refused(error)` hears about each refused or failed attempt
    (default: one log line); a connection that only idles until `limits.handshake_timeout`
    is closed without a word. Until its handshake is done a connection counts against
    `limits` (transport.pending): a flood of idle connections keeps no paired peer out.
    """

    def __init__(self, identity: LaneIdentity, handler: LaneHandler, *,
                 expected: Iterable[str] = (), max_message_size: int = MAX_MESSAGE_SIZE,
                 on_refused: Callable[[Exception], None] | None = None,
                 limits: ConnectionLimits = ConnectionLimits()) -> None:
        self.identity = identity
        self._handler = handler
        self._expected = {_normalize(f) for f in expected}
        self._max_message_size = max_message_size
        self._on_refused = on_refused
        self.limits = limits
        self.pending = PendingConnections(limits, "direct lane")
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint

    def expect(self, fingerprint: str) -> None:
        self._expected.add(_normalize(fingerprint))

    def forget(self, fingerprint: str) -> None:
        self._expected.discard(_normalize(fingerprint))

    async def start(self, host: str | None, port: int = 0) -> tuple[str, int]:
        """Listen on host:port (port 0: any free port); return the bound address."""
        self._server = await asyncio.start_server(self._accept, host, port, limit=STREAM_LIMIT)
        return self._server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def __aenter__(self) -> LaneServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.pending.admit(writer):
            writer.transport.abort()
            return
        task = asyncio.current_task()
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        where = f"from {peer[0]}:{peer[1]}" if peer else "from a peer"
        link = None
        hello: list[bytes] = []    # the client's hello, once it came
        try:
            try:
                link = await asyncio.wait_for(
                    self._server_handshake(reader, writer, where, hello),
                    self.limits.handshake_timeout)
            except Exception as exc:
                # Idle, or gone (or dropped for a newer one) before its hello: not worth a
                # line each (a flood is thousands of them; transport.pending says it once).
                if hello or not isinstance(exc, (asyncio.TimeoutError,
                                                 asyncio.IncompleteReadError, ConnectionError)):
                    self._refused(_translate(exc, where))
                return
            finally:
                self.pending.done(writer)
            try:
                await self._handler(link)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("direct lane handler failed (%s)", where)
        finally:
            self._tasks.discard(task)
            if link is not None:
                await link.close()
            else:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _server_handshake(self, reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter, where: str,
                                hello: list[bytes]) -> LaneLink:
        hello.append(await reader.readexactly(_HELLO.size))
        magic, version, size = _HELLO.unpack(hello[0])
        if magic != MAGIC or version != VERSION or not 0 < size <= MAX_CERT:
            raise RemoteProtocolError(f"the connection {where} is not a lane v{VERSION} hello")
        client_der = await reader.readexactly(size)
        fp = cert_fingerprint(client_der)
        if fp not in self._expected:
            writer.write(_REPLY.pack(MAGIC, VERSION, CERT_NOT_EXPECTED))
            await writer.drain()
            raise PeerNotPaired(f"refused the direct lane {where}: its certificate "
                                f"{fp[:16]}… is not one a paired session announced")
        try:
            ctx = _server_context(self.identity, client_der)
        except ssl.SSLError as exc:
            raise RemoteProtocolError(f"the lane certificate {where} does not parse") from exc
        writer.write(_REPLY.pack(MAGIC, VERSION, ACCEPTED))
        await writer.drain()
        await writer.start_tls(ctx)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        if der != client_der:  # OpenSSL verified against exactly this certificate
            raise PeerNotPaired(f"the lane {where} presented another certificate than announced")
        verdict = await reader.readexactly(1)
        if verdict != VERDICT_OK:
            raise PeerNotPaired(f"the peer {where} refused this device's lane certificate "
                                f"(it expected another fingerprint): lane closed")
        return LaneLink(reader, writer, fp, max_message_size=self._max_message_size)

    def _refused(self, error: Exception) -> None:
        if self._on_refused is not None:
            self._on_refused(error)
        else:
            log.warning("%s", error)
