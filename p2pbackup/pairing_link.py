"""Pairing over the network: a rendezvous finds the host, TCP carries the sans-I/O machines.

The host listens on a TCP port on every interface and advertises it through a `Rendezvous`
under a tag derived from the code's nameplate (never from its words). Anyone on the LAN can
connect, so a connection counts only once it runs SPAKE2: junk, silence and hang-ups are dropped
with one log line and the host keeps waiting; a wrong guess uses the code up; a joiner that
proved the code is the one attempt, and gets the welcome (the keys) only after the host's user
confirmed the verification number.

Across the internet the same machines run over a pairing mailbox (magic-wormhole's mailbox
server protocol, `discovery/mailbox.py`): the host allocates a nameplate there, which becomes
the number of its code, and serves the LAN and the mailbox at once; a joiner given a mailbox
(`pair CODE --mailbox URL`) goes through it only. The mailbox admits two sides per nameplate,
so the first device that claims the code there is the one attempt through it: whatever it
sends, the code is then used up. The mailbox sees the nameplate, the SPAKE2 messages and
ciphertext: nothing that helps guess the words (one online guess per code, as on the LAN).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from .crypto.pairing import (CODE_LIFETIME, Completed, Event, Failed, HostPairing,
                             JoinerPairing, JoinRequest, PakeDone, PairingCode, State, Welcome,
                             make_code, parse_code, rendezvous_tag)
from .errors import ConfigError, P2PError, PairingFailed
from .transport.pending import ConnectionLimits, PendingConnections

if TYPE_CHECKING:
    from .discovery.mailbox import MailboxMessage, MailboxSession

log = logging.getLogger("p2pbackup.pairing")
SERVICE = "_p2pbackup-pair._tcp.local."
READ_TIMEOUT = 60.0  # a peer that goes quiet mid-exchange ends the attempt
# Connections that have not proved the code (transport/pending.py): one device needs one, so
# 4 per address is plenty, and 16 in all; when full, a newcomer pushes out the oldest of the
# address holding the most, so a stranger holding idle connections does not lock the
# rightful joiner out. The handshake (from connecting to a join box that opens) is two round
# trips and two SPAKE2 computations (~10 ms here), no person involved: 10 s is long enough
# for a loaded machine on a slow LAN, short enough that a connection which proves nothing
# does not hold a place for long.
LIMITS = ConnectionLimits(per_source=4, total=16, handshake_timeout=10.0)
# How long the host's user has to compare the verification number; the joiner waits this long
# (and READ_TIMEOUT more) for the welcome.
CONFIRM_TIMEOUT = 120.0
# Through a mailbox, each message crosses the internet twice; and no LAN stranger can crowd
# it (it admits two sides), so the one joiner there gets as long as a quiet peer gets.
MAILBOX_HANDSHAKE_TIMEOUT = READ_TIMEOUT
# Out-of-order pieces a mailbox may hold back before we call it broken.
MAX_EARLY_PIECES = 16

T = TypeVar("T")


class Rendezvous(Protocol):
    """How the two devices of a pairing find each other."""

    def offer(self, tag: str, port: int) -> contextlib.AbstractAsyncContextManager[None]:
        """Make the host's listening port findable under `tag` while the context is open."""

    async def locate(self, tag: str, timeout: float) -> list[tuple[str, int]]:
        """Addresses (host, port) offering `tag`; empty after `timeout` seconds."""


class MdnsRendezvous:
    """Rendezvous on the LAN through multicast DNS (`_p2pbackup-pair._tcp`)."""

    def __init__(self, interfaces: list[str] | None = None) -> None:
        self.interfaces = interfaces

    @contextlib.asynccontextmanager
    async def offer(self, tag: str, port: int) -> AsyncIterator[None]:
        from .discovery import mdns

        async with mdns.advertise(SERVICE, port, {"v": "1", "tag": tag},
                                  interfaces=self.interfaces):
            yield

    async def locate(self, tag: str, timeout: float) -> list[tuple[str, int]]:
        from .discovery import mdns

        found = await mdns.find(SERVICE, lambda txt: txt.get("tag") == tag, timeout=timeout,
                                interfaces=self.interfaces)
        return [(a, found.port) for a in found.addresses] if found else []


class StaticRendezvous:
    """A known address (`pair CODE --peer HOST:PORT`): no discovery, for tests and odd LANs."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    @contextlib.asynccontextmanager
    async def offer(self, tag: str, port: int) -> AsyncIterator[None]:
        yield

    async def locate(self, tag: str, timeout: float) -> list[tuple[str, int]]:
        return [(self.host, self.port)]


class Pipe(Protocol):
    """The bytes of one pairing session, both ways: a TCP connection or a mailbox."""

    who: str

    async def read(self) -> bytes:
        """The peer's next bytes; b"" once it hung up; PairingFailed if the path broke."""

    def write(self, data: bytes) -> None:
        """Queue bytes for the peer (in order)."""

    async def drain(self) -> None:
        """Wait until what was written has left (errors show on the next read)."""

    def close(self) -> None:
        """Stop: what was written still leaves; nothing more is read."""

    async def aclose(self, mood: str = "errory") -> None:
        """Close and wait for it (`mood`: how the pairing went, for a mailbox's statistics)."""


class TcpPipe:
    """A pairing session on a TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        peer = writer.get_extra_info("peername")
        self.who = f"{peer[0]}:{peer[1]}" if peer else "?"

    async def read(self) -> bytes:
        try:
            return await self.reader.read(65536)
        except (ConnectionError, OSError):
            return b""

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):  # the next read notices
            await self.writer.drain()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    async def aclose(self, mood: str = "errory") -> None:
        self.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


class MailboxPipe:
    """A pairing session through a mailbox: our bytes go out as messages with phases "0",
    "1", ... (pieces of at most BODY_PIECE bytes); the other side's are read back in phase
    order, since a mailbox server promises neither order nor a single delivery. A repeated
    phase with the same body is dropped; with another body, a third side, an unknown phase
    or a flood, the mailbox is misbehaving and the session ends with one line."""

    def __init__(self, session: MailboxSession) -> None:
        self.session = session
        self.who = f"the pairing mailbox at {session.url}"
        self.peer: str | None = None
        self._sent = 0
        self._next = 0
        self._early: dict[int, bytes] = {}
        self._seen: dict[int, bytes] = {}   # delivered phases, to recognise repeats
        self._outgoing: asyncio.Queue[bytes] = asyncio.Queue()
        self._sender: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def nameplate(self) -> int:
        assert self.session.nameplate is not None
        return int(self.session.nameplate)

    async def arrived(self, timeout: float | None) -> bool:
        """Wait for the other side's first message (kept for read()); False after timeout."""
        while self.peer is None:
            message = await self.session.next_message(timeout)
            if message is None:
                return False
            self._take(message)
        return True

    async def read(self) -> bytes:
        while self._next not in self._early:
            if self._closed:
                return b""
            message = await self.session.next_message(None)
            assert message is not None
            self._take(message)
        body = self._early.pop(self._next)
        self._seen[self._next] = body
        self._next += 1
        return body

    def _take(self, message: MailboxMessage) -> None:
        if self.peer is None:
            self.peer = message.side
        elif message.side != self.peer:
            raise self._broken("a third device wrote into the pairing's mailbox")
        if message.phase == "offer":  # the host's "I am here"; nothing to read
            return
        if not message.phase.isdigit() or len(message.phase) > 6:
            raise self._broken(f"it sent a message of an unknown phase "
                               f"{message.phase[:20]!r}")
        phase = int(message.phase)
        known = self._seen.get(phase, self._early.get(phase))
        if known is not None:
            if known != message.body:
                raise self._broken(f"it sent two different messages as phase {phase} "
                                   "(replayed or tampered with)")
            return
        if phase < self._next:
            raise self._broken(f"it sent phase {phase} late (replayed)")
        if len(self._early) >= MAX_EARLY_PIECES:
            raise self._broken("it held back too many messages")
        self._early[phase] = message.body

    def _broken(self, why: str) -> PairingFailed:
        return PairingFailed(f"pairing failed: {self.who}: {why}")

    def write(self, data: bytes) -> None:
        from .discovery.mailbox import BODY_PIECE

        for at in range(0, len(data), BODY_PIECE):
            self._outgoing.put_nowait(data[at:at + BODY_PIECE])
        if self._sender is None:
            self._sender = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        while True:
            piece = await self._outgoing.get()
            try:
                await self.session.add(str(self._sent), piece)
                self._sent += 1
            except PairingFailed:
                pass  # the reader sees the session's end and says why
            finally:
                self._outgoing.task_done()

    async def drain(self) -> None:
        await self._outgoing.join()

    def close(self) -> None:
        self._closed = True

    async def aclose(self, mood: str = "errory") -> None:
        self._closed = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._outgoing.join(), 10)
        if self._sender is not None:
            self._sender.cancel()
        await self.session.aclose(mood)


async def open_mailbox(url: str) -> MailboxPipe:
    """The host's side of a mailbox: allocate a nameplate for a new code, open its mailbox,
    say we are here."""
    from .discovery.mailbox import MailboxSession

    session = await MailboxSession.connect(url)
    try:
        nameplate = await session.allocate()
        if not 1 <= int(nameplate) <= 999:  # pairing codes hold three digits
            raise PairingFailed(f"pairing failed: the pairing mailbox at {url} is too busy "
                                f"(it allocated nameplate {nameplate}); try again later")
        await session.claim(nameplate)
        await session.open()
        await session.add("offer", b"")
    except BaseException:
        await session.aclose()
        raise
    return MailboxPipe(session)


async def new_code(mailbox: str | None) -> tuple[str, MailboxPipe | None]:
    """A fresh code to host; with a mailbox URL, its number is a nameplate allocated there
    (and the pipe that serves it is returned, for PairingHost(mailbox=...))."""
    if not mailbox:
        return make_code(), None
    pipe = await open_mailbox(mailbox)
    return make_code(pipe.nameplate), pipe


@dataclass(slots=True)
class HostOutcome:
    """How a hosted pairing ended."""

    ok: bool
    message: str
    verifier: str | None = None
    peer: str | None = None


async def _pump_write(pipe: Pipe, machine: HostPairing | JoinerPairing) -> None:
    data = machine.data_to_send()
    if data:
        pipe.write(data)
        await pipe.drain()


class _Dropped(Exception):
    """This connection ends: `reason` (about "the other device") for the log or the outcome,
    `tell` for the peer when its session has not already told it why."""

    def __init__(self, reason: str, tell: str = "") -> None:
        super().__init__(reason)
        self.reason, self.tell = reason, tell


def _about_peer(failed: Failed) -> str:
    return failed.reason.removeprefix("pairing failed: ")


class _Connection:
    """One session with the host (a TCP connection, or the mailbox) and its HostPairing.

    `ticket` is what counts it among the connections that proved nothing (PendingConnections),
    None for the mailbox, which admits one joiner by itself; `decisive`: whatever ends this
    session ends the code (the mailbox, which admits nobody after it)."""

    def __init__(self, pipe: Pipe, machine: HostPairing, *,
                 ticket: asyncio.StreamWriter | None = None, decisive: bool = False) -> None:
        self.pipe, self.machine, self.ticket, self.decisive = pipe, machine, ticket, decisive
        self.who = pipe.who
        self.proved = False  # its join box opened: it holds the code
        self.stopped = False  # closed by this host, which has said why already
        self._read: asyncio.Task[bytes] | None = None

    def pending_read(self) -> asyncio.Task[bytes]:
        """The read under way (one at a time, so no byte is lost when another wait wins)."""
        if self._read is None:
            self._read = asyncio.ensure_future(self.pipe.read())
        return self._read

    async def read(self, timeout: float | None) -> bytes:
        """The peer's next bytes; _Dropped if it hangs up or says nothing for `timeout` s."""
        read = self.pending_read()
        done, _ = await asyncio.wait({read}, timeout=timeout)
        if not done:
            raise _Dropped("the other device stopped answering", "no answer")
        self._read = None
        try:
            data = read.result()
        except P2PError as exc:  # the mailbox misbehaved, or its connection broke
            raise _Dropped(str(exc).removeprefix("pairing failed: ")) from None
        if not data:
            raise _Dropped("the other device hung up")
        return data

    def stop(self, tell: str) -> None:
        """Close now; a session still open first tells the peer `tell` (an error frame).

        Whatever waits on this connection then reads its end and finishes by itself."""
        self.stopped = True
        if not self.machine.finished:
            self.machine.reject(tell)
        with contextlib.suppress(Exception):
            data = self.machine.data_to_send()
            if data:
                self.pipe.write(data)
            self.pipe.close()


class PairingHost:
    """Serves one pairing code: listen, advertise, wait for the device that holds the code.

    Each connection gets its own SPAKE2 session (a fresh HostPairing). One that sends junk (a
    malformed or truncated frame, another protocol version), hangs up or proves nothing within
    `limits.handshake_timeout` seconds is dropped with one log line, and the host keeps
    waiting; connections that proved nothing yet are bounded by `limits`. The
    code is used up only by a well-formed exchange whose key confirmation fails (a wrong guess;
    from then on no join box is opened, so a code allows one guess whatever runs in parallel)
    or by a joiner that proved it: that attempt is the only one. The host checks its request
    (`on_request` returns the welcome), asks its user to compare the verification number
    (`confirm`), and sends the welcome only on yes; the joiner giving up meanwhile ends it.

    With `mailbox` (from `new_code`, whose nameplate is the code's number) the code is served
    there too, and closed with the host; the first device there is decisive (see above).
    """

    def __init__(self, code: str | PairingCode,
                 on_request: Callable[[bytes, str], Awaitable[bytes]],
                 on_complete: Callable[[], Awaitable[str]], *,
                 confirm: Callable[[str], Awaitable[bool]],
                 rendezvous: Rendezvous, lifetime: float = CODE_LIFETIME,
                 bind: str = "0.0.0.0", port: int = 0,
                 limits: ConnectionLimits = LIMITS,
                 confirm_timeout: float = CONFIRM_TIMEOUT,
                 mailbox: MailboxPipe | None = None,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.code = parse_code(code)
        if mailbox is not None and mailbox.nameplate != self.code.nameplate:
            raise ValueError("the code's number must be the mailbox's nameplate")
        self.mailbox = mailbox
        self.on_request, self.on_complete, self.confirm = on_request, on_complete, confirm
        self.rendezvous, self.bind, self.port = rendezvous, bind, port
        self.limits, self.confirm_timeout = limits, confirm_timeout
        self.pending = PendingConnections(limits, "pairing", push_out=self._push_out)
        self._now = now
        self.expires_at = now() + lifetime
        self.outcome: asyncio.Future[HostOutcome] | None = None
        self._connections: list[_Connection] = []  # oldest first
        self._handlers: set[asyncio.Task[None]] = set()
        self._claimed = False  # a joiner proved the code: the one attempt is under way

    async def run(self, started: Callable[[int], None] | None = None) -> HostOutcome:
        """Serve until the attempt ends or the code expires; never raises for peer trouble."""
        self.outcome = asyncio.get_running_loop().create_future()
        try:
            server = await asyncio.start_server(self._serve, self.bind, self.port)
        except OSError as exc:  # the user's --port is taken, or not theirs to use
            if self.mailbox is not None:
                await self.mailbox.aclose()
            raise ConfigError(f"cannot listen for pairing on port {self.port}: "
                              f"{exc.strerror or exc}; choose another --port (0: any free "
                              "port)") from None
        port = server.sockets[0].getsockname()[1]
        through_mailbox = None
        try:
            async with self.rendezvous.offer(rendezvous_tag(self.code), port):
                if self.mailbox is not None:
                    through_mailbox = asyncio.ensure_future(self._serve_mailbox(self.mailbox))
                if started:
                    started(port)
                try:
                    return await asyncio.wait_for(asyncio.shield(self.outcome),
                                                  max(0.0, self.expires_at - self._now()))
                except asyncio.TimeoutError:
                    self._expire()
                    return self.outcome.result()
        finally:
            server.close()
            self._finish(HostOutcome(False, "pairing failed: stopped on this device"))
            for conn in list(self._connections):
                conn.stop("this pairing code is no longer offered")
            if self._handlers:  # they see their connection closed and end
                await asyncio.wait(self._handlers, timeout=5)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
            if through_mailbox is not None:
                through_mailbox.cancel()
                await asyncio.wait({through_mailbox}, timeout=5)
            if self.mailbox is not None:
                out = self.outcome.result()
                await self.mailbox.aclose("happy" if out.ok else "scary" if out.verifier
                                          else "errory")

    @property
    def _over(self) -> bool:
        return self.outcome is None or self.outcome.done()

    def _finish(self, outcome: HostOutcome) -> None:
        if self.outcome is not None and not self.outcome.done():
            self.outcome.set_result(outcome)

    def _expire(self) -> None:
        reason = ("pairing failed: the pairing code expired; run `p2pbackup pair` again for a "
                  "new code")
        for conn in list(self._connections):
            conn.machine.check_expiry()  # queues "expired" for a joiner still in its session
            conn.stop("the pairing code expired")
        self._finish(HostOutcome(False, reason))

    def _push_out(self, writer: asyncio.StreamWriter) -> None:
        """Close a connection that proved nothing, to make room for a newcomer (it is told)."""
        for conn in self._connections:
            if conn.ticket is writer:
                conn.stop("too many connections to the pairing host")
                return
        writer.transport.abort()

    async def _serve_mailbox(self, pipe: MailboxPipe) -> None:
        """Wait for the device that claims the code on the mailbox, and run its session."""
        try:
            await pipe.arrived(None)
        except PairingFailed as exc:  # before anyone came there: the mailbox itself failed
            if self._claimed:  # a device on the LAN is pairing: its attempt goes on
                log.warning("%s", exc)
            else:
                self._finish(HostOutcome(False, f"{exc}; run `p2pbackup pair` again"))
            return
        if self._over:
            return
        machine = HostPairing(self.code, expires_at=self.expires_at, now=self._now)
        await self._session(_Connection(pipe, machine, decisive=True),
                            MAILBOX_HANDSHAKE_TIMEOUT)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        machine = HostPairing(self.code, expires_at=self.expires_at, now=self._now)
        conn = _Connection(TcpPipe(reader, writer), machine, ticket=writer)
        if self._over:
            conn.stop("this pairing code is no longer offered")
            return
        if not self.pending.admit(writer):
            conn.stop("too many connections to the pairing host from this address")
            return
        try:
            await self._session(conn, self.limits.handshake_timeout)
        finally:
            self.pending.done(writer)

    async def _session(self, conn: _Connection, handshake_timeout: float) -> None:
        """One joiner's SPAKE2 session, to the end; what it costs the code is said above."""
        machine = conn.machine
        self._connections.append(conn)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        tell = "pairing ended on the other device"
        try:
            try:
                async with asyncio.timeout(handshake_timeout):
                    request = await self._handshake(conn)
            except TimeoutError:
                raise _Dropped(f"the other device did not prove the code within "
                               f"{handshake_timeout:g} s", "too slow; try again") from None
            if request is not None:
                await self._attempt(conn, request)
        except _Dropped as dropped:
            tell = dropped.tell or tell
            # (A mailbox joiner that came second to one on the LAN does not end its attempt.)
            if conn.proved or (conn.decisive and not self._claimed):
                self._finish(HostOutcome(False, f"pairing failed: {dropped.reason}; this code is "
                                         "used up, run `p2pbackup pair` again",
                                         machine.verifier, conn.who))
            elif not conn.stopped:
                log.warning("pairing: ignored a connection from %s: %s; still waiting for the "
                            "device with the code", conn.who, dropped.reason)
        except Exception as exc:  # a bug must end this attempt, not the daemon
            log.exception("pairing with %s failed unexpectedly", conn.who)
            if conn.proved or conn.decisive:
                self._finish(HostOutcome(False, f"pairing failed: {exc}", peer=conn.who))
        finally:
            if conn in self._connections:
                self._connections.remove(conn)
            conn.stop(tell)
            self._handlers.discard(task)  # type: ignore[arg-type]

    async def _handshake(self, conn: _Connection) -> JoinRequest | None:
        """Run SPAKE2 until the join box opens (the request), or the code is used up (None)."""
        m = conn.machine
        while True:
            data = await conn.read(None)
            # Before the machine sees these bytes: once a guess failed or another device proved
            # the code, no further join box is opened.
            if self._over:
                raise _Dropped("the code was already used up", "the pairing code is used up")
            if self._claimed:
                raise _Dropped("another device was pairing",
                               "another device is pairing with this code")
            for ev in m.receive_data(data):
                if isinstance(ev, Failed):
                    if ev.wrong_code or ev.expired:  # a guess was made, or time is up
                        await self._end(conn, HostOutcome(False, ev.reason, None, conn.who))
                        return None
                    await _pump_write(conn.pipe, m)  # its error frame tells the peer why
                    raise _Dropped(_about_peer(ev))
                if isinstance(ev, JoinRequest):
                    # No await since the box opened, so no other session can claim it too.
                    self._claimed = conn.proved = True
                    if conn.ticket is not None:  # it proved the code: no longer bounded
                        self.pending.done(conn.ticket)
                    return ev
            await _pump_write(conn.pipe, m)

    async def _attempt(self, conn: _Connection, request: JoinRequest) -> None:
        """The device that proved the code: check it, ask our user, then send the welcome."""
        m = conn.machine
        try:
            welcome = await self._while_listening(conn, self.on_request(request.payload,
                                                                        request.verifier))
        except P2PError as exc:  # e.g. a removed device, or one that has an account already
            m.reject(str(exc))
            await self._end(conn, HostOutcome(False, str(exc), request.verifier, conn.who))
            return
        why = "the verification number was not confirmed"
        try:
            yes = await self._while_listening(conn, asyncio.wait_for(
                self.confirm(request.verifier), self.confirm_timeout))
        except asyncio.TimeoutError:
            yes, why = False, (f"nobody confirmed the verification number within "
                               f"{self.confirm_timeout:g} s")
        try:
            if not yes:
                m.reject(why)
                raise PairingFailed(m.failure.reason if m.failure else why)
            m.accept(welcome)  # the keys leave only now
        except PairingFailed as exc:  # declined, or the code expired while our user looked
            await self._end(conn, HostOutcome(False, str(exc), request.verifier, conn.who))
            return
        await _pump_write(conn.pipe, m)
        while True:
            for ev in m.receive_data(await conn.read(READ_TIMEOUT)):
                if isinstance(ev, Completed):
                    try:
                        message = await self.on_complete()
                    except P2PError as exc:
                        self._finish(HostOutcome(False, str(exc), m.verifier, conn.who))
                        return
                    self._finish(HostOutcome(True, message, m.verifier, conn.who))
                    return
                if isinstance(ev, Failed):
                    await self._end(conn, HostOutcome(False, ev.reason, m.verifier, conn.who))
                    return

    async def _end(self, conn: _Connection, outcome: HostOutcome) -> None:
        self._finish(outcome)  # before any await: from now on no join box is opened
        await _pump_write(conn.pipe, conn.machine)  # the error frame says why

    async def _while_listening(self, conn: _Connection, step: Awaitable[T]) -> T:
        """Await `step` (our checks, our user) while noticing the joiner give up meanwhile."""
        task = asyncio.ensure_future(step)
        try:
            while True:
                read = conn.pending_read()
                await asyncio.wait({task, read}, return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    return task.result()
                for ev in conn.machine.receive_data(await conn.read(0)):
                    if isinstance(ev, Failed):  # the joiner cancelled, or sent nonsense
                        raise _Dropped(_about_peer(ev))
        finally:
            task.cancel()


async def _reach(code: PairingCode, rendezvous: Rendezvous, mailbox: str | None,
                 find_timeout: float) -> Pipe:
    """The joiner's way to the host: through the mailbox if given one, else the rendezvous."""
    if mailbox:
        from .discovery.mailbox import MailboxSession

        session = await MailboxSession.connect(mailbox)
        try:
            await session.claim(str(code.nameplate))
            await session.open()
            pipe = MailboxPipe(session)
            if not await pipe.arrived(find_timeout):
                raise PairingFailed(f"no device offers pairing code {code.nameplate}-… through "
                                    f"the pairing mailbox at {mailbox}; is `p2pbackup pair` "
                                    "still running there, with the same --mailbox? (codes "
                                    f"expire after {int(CODE_LIFETIME // 60)} minutes)")
        except BaseException:
            await session.aclose("lonely")
            raise
        return pipe
    addrs = await rendezvous.locate(rendezvous_tag(code), find_timeout)
    if not addrs:
        raise PairingFailed(f"no device on this network offers pairing code {code.nameplate}-"
                            "…; is `p2pbackup pair` still running there? (codes expire after "
                            f"{int(CODE_LIFETIME // 60)} minutes)")
    last: Exception | None = None
    for host, port in addrs:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
            return TcpPipe(reader, writer)
        except (OSError, asyncio.TimeoutError) as exc:
            last = exc
    raise PairingFailed(f"cannot reach the device offering the code: {last}")


async def join(code: str | PairingCode, payload: bytes,
               on_welcome: Callable[[bytes, str], Awaitable[None]], *,
               rendezvous: Rendezvous, mailbox: str | None = None, find_timeout: float = 10.0,
               on_verifier: Callable[[str], None] | None = None) -> str:
    """Join the device offering `code` (through `mailbox`, a URL, if given); returns the
    verifier once the welcome is stored."""
    parsed = parse_code(code)
    pipe = await _reach(parsed, rendezvous, mailbox, find_timeout)
    m = JoinerPairing(parsed, payload)
    mood = "errory"
    try:
        await _pump_write(pipe, m)
        while True:
            # Once our join is sent, the host's user compares the numbers before answering.
            timeout = READ_TIMEOUT if m.state is State.WAIT_PAKE else CONFIRM_TIMEOUT + READ_TIMEOUT
            try:
                data = await asyncio.wait_for(pipe.read(), timeout)
            except asyncio.TimeoutError:
                raise PairingFailed("pairing failed: the other device stopped answering") from None
            except PairingFailed as exc:  # the mailbox misbehaved: tell the host, if it can
                m.cancel(str(exc).removeprefix("pairing failed: "))
                await _pump_write(pipe, m)
                raise
            if not data:
                raise PairingFailed("pairing failed: the other device closed the connection "
                                    "(its code may be used up or expired; ask for a new one)")
            for ev in m.receive_data(data):
                if isinstance(ev, PakeDone) and on_verifier:
                    on_verifier(ev.verifier)
                elif isinstance(ev, Welcome):
                    try:
                        await on_welcome(ev.payload, ev.verifier)
                    except P2PError as exc:
                        m.cancel(str(exc))
                        await _pump_write(pipe, m)
                        raise
                    m.confirm()
                    await _pump_write(pipe, m)
                    mood = "happy"
                    return ev.verifier
                elif isinstance(ev, Failed):
                    mood = "scary" if ev.wrong_code else mood
                    await _pump_write(pipe, m)
                    raise PairingFailed(ev.reason)
            await _pump_write(pipe, m)
    except asyncio.CancelledError:
        # Our user stopped (Ctrl-C), maybe because the numbers differ: tell the host, whose
        # user may still be looking at the question.
        m.cancel("interrupted by its user")
        with contextlib.suppress(Exception):
            pipe.write(m.data_to_send())
        raise
    finally:
        await pipe.aclose(mood)
