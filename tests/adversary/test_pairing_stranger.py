"""A stranger on the LAN against a real pairing host (pairing_link over loopback TCP).

The pairing port listens on every interface, so anyone on the LAN can connect. Only a
well-formed SPAKE2 exchange whose key confirmation fails (a wrong code) may use up the code;
junk is dropped and the host keeps waiting for the device that holds the code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from p2pbackup.crypto.pairing import JoinerPairing, PakeDone, State
from p2pbackup.crypto.wordlist import EVEN_WORDS, ODD_WORDS
from p2pbackup.errors import PairingFailed
from p2pbackup.pairing_link import LIMITS, HostOutcome, PairingHost, StaticRendezvous, join
from tests.eventually import eventually
from tests.pairing_frames import frame, frames

CODE = "7-guitarist-revenge"
WRONG = f"7-{ODD_WORDS[1]}-{EVEN_WORDS[2]}"
WELCOME = b"the account key and the device records"


class Account:
    """What the host device does with a join request, in memory."""

    def __init__(self, answer: bool | None = True) -> None:
        self.answer = answer
        self.withdrawn = False
        self.requests: list[bytes] = []
        self.asked: list[str] = []
        self.completed = 0

    async def on_request(self, payload: bytes, verifier: str) -> bytes:
        self.requests.append(payload)
        return WELCOME

    async def confirm(self, verifier: str) -> bool:
        self.asked.append(verifier)  # the host's user compares the numbers
        if self.answer is None:  # nobody at the host answers
            try:
                await asyncio.Event().wait()
            finally:
                self.withdrawn = True
        return bool(self.answer)

    async def on_complete(self) -> str:
        self.completed += 1
        return "joined"


class Hosting:
    def __init__(self, task: asyncio.Task[HostOutcome], port: int, account: Account) -> None:
        self.task, self.port, self.account = task, port, account

    @property
    def waiting(self) -> bool:
        return not self.task.done()

    async def outcome(self) -> HostOutcome:
        return await asyncio.wait_for(self.task, 60)


@contextlib.asynccontextmanager
async def hosting(confirm_answer: bool | None = True, **options) -> AsyncIterator[Hosting]:
    account = Account(confirm_answer)
    host = PairingHost(CODE, account.on_request, account.on_complete, confirm=account.confirm,
                       rendezvous=StaticRendezvous("", 0), lifetime=600, bind="127.0.0.1",
                       **options)
    started: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(host.run(started=started.set_result))
    try:
        yield Hosting(task, await asyncio.wait_for(started, 30), account)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def joiner(port: int, code: str = CODE) -> list[bytes]:
    """The rightful device: pairs through pairing_link.join; returns the welcomes it got."""
    got: list[bytes] = []

    async def on_welcome(payload: bytes, verifier: str) -> None:
        got.append(payload)

    await asyncio.wait_for(join(code, b"joiner record", on_welcome,
                                rendezvous=StaticRendezvous("127.0.0.1", port)), 60)
    return got


async def connect(port: int, source: str = "127.0.0.1"
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the host from `source` (any 127.x address: other devices on the LAN)."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def dropped(reader: asyncio.StreamReader) -> bool:
    """True once the host has closed this connection (after any error frame it sent)."""
    try:
        while await asyncio.wait_for(reader.read(65536), 30):
            pass
    except (ConnectionError, OSError):
        pass
    return True


async def send_and_wait_for_drop(port: int, data: bytes, *, close: bool = False) -> None:
    reader, writer = await connect(port)
    writer.write(data)
    await writer.drain()
    if close:
        writer.write_eof()
    assert await dropped(reader)
    writer.close()


async def assert_still_waiting_then_joiner_pairs(h: Hosting) -> None:
    await asyncio.sleep(0)  # let the host act on what it just read
    assert h.waiting, h.task.result()
    assert await joiner(h.port) == [WELCOME]
    outcome = await h.outcome()
    assert outcome.ok and h.account.completed == 1, outcome
    assert len(h.account.asked) == 1  # only the rightful joiner's number reached the user


async def test_five_garbage_bytes_do_not_end_pairing():
    async with hosting() as h:
        await send_and_wait_for_drop(h.port, b"hello")  # read as a 1.7 GB length header
        await send_and_wait_for_drop(h.port, b"\x00\x00\x00\x07garbage")
        await assert_still_waiting_then_joiner_pairs(h)


async def test_truncated_frame_does_not_end_pairing():
    hello = JoinerPairing(WRONG, b"x").data_to_send()
    async with hosting() as h:
        await send_and_wait_for_drop(h.port, hello[:-5], close=True)
        await assert_still_waiting_then_joiner_pairs(h)


async def test_wrong_protocol_version_does_not_end_pairing():
    async with hosting() as h:
        await send_and_wait_for_drop(h.port, frame({"v": 2, "t": "hello", "pake": b"x"}))
        await send_and_wait_for_drop(h.port, frame({"v": 0, "t": "hello"}))
        await assert_still_waiting_then_joiner_pairs(h)


async def test_spoofed_error_frame_does_not_end_pairing():
    async with hosting() as h:
        for reason in ("wrong-code", "expired", "rejected", "cancelled"):
            await send_and_wait_for_drop(h.port, frame({"v": 1, "t": "error", "reason": reason,
                                                        "msg": "stop"}))
        await assert_still_waiting_then_joiner_pairs(h)


async def test_port_scan_and_idle_connection_do_not_block_the_joiner():
    async with hosting() as h:
        _, scan = await connect(h.port)
        scan.close()  # a port scan: connect and leave
        idle_reader, idle = await connect(h.port)  # connects and says nothing
        await assert_still_waiting_then_joiner_pairs(h)
        idle.close()


async def test_stranger_who_stops_after_the_pake_does_not_block_the_joiner():
    stranger = JoinerPairing(WRONG, b"stranger")
    async with hosting() as h:
        reader, writer = await connect(h.port)
        writer.write(stranger.data_to_send())
        events = stranger.receive_data(await asyncio.wait_for(reader.read(65536), 30))
        assert isinstance(events[0], PakeDone)  # a well-formed exchange, then silence:
        # no guess was made (no key confirmation), so the code is not used up.
        await assert_still_waiting_then_joiner_pairs(h)
        writer.close()


async def test_silent_connection_is_dropped_after_the_handshake_timeout():
    async with hosting(limits=replace(LIMITS, handshake_timeout=0.5)) as h:
        reader, writer = await connect(h.port)
        writer.write(JoinerPairing(WRONG, b"x").data_to_send()[:-1])  # never completes
        assert await asyncio.wait_for(dropped(reader), 30)
        writer.close()
        await assert_still_waiting_then_joiner_pairs(h)


async def test_many_connections_are_capped_and_the_joiner_still_pairs():
    """Connections that proved nothing: at most 4 per address and 16 in all. A crowd from one
    address keeps 4; crowds from five addresses are cut to 16 by pushing out the oldest of
    the address holding the most; the joiner, at an address of its own, still gets in.
    (None stays long enough to be closed for proving nothing in time.)"""
    async with hosting(limits=replace(LIMITS, handshake_timeout=120)) as h:
        one = [await connect(h.port, "127.0.0.2") for _ in range(10)]
        closed = [asyncio.ensure_future(dropped(r)) for r, _ in one]
        await eventually(lambda: sum(c.done() for c in closed) >= 6)
        assert not any(c.done() for c in closed[:4])   # the first 4 are kept
        more = [await connect(h.port, f"127.0.0.{3 + i // 4}") for i in range(16)]
        closed += [asyncio.ensure_future(dropped(r)) for r, _ in more]
        await eventually(lambda: sum(c.done() for c in closed) >= 6 + 4)
        await assert_still_waiting_then_joiner_pairs(h)
        for _, w in one + more:
            w.close()
        for c in closed:
            c.cancel()


async def test_wrong_code_still_burns_the_code():
    async with hosting() as h:
        with pytest.raises(PairingFailed, match="code was wrong"):
            await joiner(h.port, WRONG)
        outcome = await h.outcome()
        assert not outcome.ok and "wrong code" in outcome.message
        with pytest.raises(PairingFailed):
            await joiner(h.port)  # the right code, too late
        assert h.account.requests == []


@pytest.mark.parametrize("together", [False, True])
async def test_a_guess_in_a_parallel_session_burns_the_code_for_the_other(together):
    # Two sessions reach the join step; the wrong guess arrives first (or in the same instant):
    # the code allows one guess, so the other join box is never opened.
    guesser, other = JoinerPairing(WRONG, b"guess"), JoinerPairing(CODE, b"other")
    async with hosting() as h:
        g_reader, g_writer = await connect(h.port)
        o_reader, o_writer = await connect(h.port)
        for machine, reader, writer in ((guesser, g_reader, g_writer),
                                        (other, o_reader, o_writer)):
            writer.write(machine.data_to_send())
            machine.receive_data(await asyncio.wait_for(reader.read(65536), 30))
        g_writer.write(guesser.data_to_send())  # the guess: its key confirmation fails
        if together:
            await g_writer.drain()
            o_writer.write(other.data_to_send())
        outcome = await h.outcome()
        assert not outcome.ok and "wrong code" in outcome.message
        o_writer.write(other.data_to_send())
        assert await dropped(o_reader)
        assert h.account.requests == [] and h.account.asked == []
        g_writer.close()
        o_writer.close()


async def test_impostor_with_the_code_is_declined_and_gets_no_welcome():
    # Someone who read the code over a shoulder pairs first; the host's user sees a number
    # the rightful device does not show and says no: the welcome (the keys) never leaves.
    impostor = JoinerPairing(CODE, b"impostor")
    async with hosting(confirm_answer=False) as h:
        reader, writer = await connect(h.port)
        writer.write(impostor.data_to_send())
        received = b""
        while data := await asyncio.wait_for(reader.read(65536), 30):
            received += data
            impostor.receive_data(data)
            writer.write(impostor.data_to_send())
        kinds = [m["t"] for m in frames(received)]
        assert kinds == ["pake", "error"] and frames(received)[1]["reason"] == "rejected"
        assert impostor.state is State.FAILED and "declined" in impostor.failure.reason
        outcome = await h.outcome()
        assert not outcome.ok and "not confirmed" in outcome.message
        assert h.account.asked == [impostor.verifier] and h.account.completed == 0
        writer.close()


async def prove_the_code(port: int) -> tuple[JoinerPairing, asyncio.StreamReader,
                                             asyncio.StreamWriter]:
    """A device with the code: runs SPAKE2 and sends its join box, which opens at the host."""
    joiner = JoinerPairing(CODE, b"someone")
    reader, writer = await connect(port)
    writer.write(joiner.data_to_send())
    joiner.receive_data(await asyncio.wait_for(reader.read(65536), 30))
    writer.write(joiner.data_to_send())
    return joiner, reader, writer


async def test_unanswered_question_sends_no_welcome():
    async with hosting(confirm_answer=None, confirm_timeout=0.5) as h:
        joiner, reader, writer = await prove_the_code(h.port)
        received = b""
        while data := await asyncio.wait_for(reader.read(65536), 60):
            received += data
        assert [m["t"] for m in frames(received)] == ["error"]  # and never a welcome
        joiner.receive_data(received)
        assert "nobody confirmed the verification number" in joiner.failure.reason
        outcome = await h.outcome()
        assert not outcome.ok and "nobody confirmed" in outcome.message
        assert h.account.withdrawn and h.account.completed == 0
        writer.close()


async def test_joiner_hanging_up_withdraws_the_question():
    async with hosting(confirm_answer=None) as h:
        _, _, writer = await prove_the_code(h.port)
        await eventually(lambda: h.account.asked)
        writer.close()
        outcome = await h.outcome()  # at once, not after the question's timeout
        assert not outcome.ok and "hung up" in outcome.message and "used up" in outcome.message
        assert h.account.withdrawn and h.account.completed == 0
