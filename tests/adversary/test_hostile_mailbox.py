"""A pairing mailbox gone bad, and devices that crowd a code on it.

The mailbox is untrusted: it may drop, replay, inject or tamper with messages, or answer junk.
Each attack ends the pairing with one line for the user and no keys handed over; only the
order of messages is its to change (the protocol promises none), and that is undone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web

from p2pbackup import pairing_link
from p2pbackup.broker.mailbox import MemoryMailboxes
from p2pbackup.errors import PairingFailed
from p2pbackup.pairing_link import HostOutcome, PairingHost, StaticRendezvous, join, new_code
from tests.mailboxes import our_mailbox
from tests.servers import serving

WELCOME = b"the account key and the device records"
Tamper = Callable[[dict[str, Any], bool], list[dict[str, Any]]]


class Tampering(MemoryMailboxes):
    """Our mailbox, with `tamper(message, from_host)` deciding what is delivered instead."""

    def __init__(self, tamper: Tamper) -> None:
        super().__init__()
        self.tamper = tamper
        self.sides: list[str] = []

    async def add(self, app: str, mailbox: str, message: dict[str, Any]) -> None:
        if message["side"] not in self.sides:
            self.sides.append(message["side"])  # the host's "offer" comes first
        for m in self.tamper(message, message["side"] == self.sides[0]):
            await super().add(app, mailbox, m)


class Pairing:
    """A host on a (tampering) mailbox and a joiner, in this loop; what each got."""

    def __init__(self) -> None:
        self.welcomes: list[bytes] = []
        self.completed = 0
        self.asked = asyncio.Event()
        self.answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.answer.set_result(True)

    async def on_request(self, payload: bytes, verifier: str) -> bytes:
        return WELCOME

    async def confirm(self, verifier: str) -> bool:
        self.asked.set()
        return await self.answer

    async def on_complete(self) -> str:
        self.completed += 1
        return "joined"

    async def on_welcome(self, payload: bytes, verifier: str) -> None:
        self.welcomes.append(payload)


@contextlib.asynccontextmanager
async def hosted(tamper: Tamper | None = None, pairing: Pairing | None = None
                 ) -> AsyncIterator[tuple[str, str, Pairing, asyncio.Task[HostOutcome]]]:
    state = Tampering(tamper or (lambda m, from_host: [m]))
    p = pairing or Pairing()
    async with our_mailbox(state=state) as (url, _):
        code, pipe = await new_code(url)
        host = PairingHost(code, p.on_request, p.on_complete, confirm=p.confirm,
                           rendezvous=StaticRendezvous("", 0), bind="127.0.0.1", lifetime=120,
                           mailbox=pipe)
        task = asyncio.ensure_future(host.run())
        try:
            yield url, code, p, task
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def joined_through(tamper: Tamper) -> tuple[PairingFailed, Pairing, HostOutcome | None]:
    """Pair through a mailbox that tampers; return the joiner's error and what the host did."""
    async with hosted(tamper) as (url, code, p, task):
        with pytest.raises(PairingFailed) as failed:
            await asyncio.wait_for(join(code, b"me", p.on_welcome,
                                        rendezvous=StaticRendezvous("", 0), mailbox=url), 60)
        done, _ = await asyncio.wait({task}, timeout=10)
        outcome = task.result() if done else None
    message = str(failed.value)
    assert "\n" not in message and message.startswith("pairing failed: ")
    return failed.value, p, outcome


def host_phase(n: int, change: Callable[[dict[str, Any]], list[dict[str, Any]]]) -> Tamper:
    """Apply `change` to the host's message of phase `n`; pass everything else."""
    def tamper(m: dict[str, Any], from_host: bool) -> list[dict[str, Any]]:
        return change(m) if from_host and m["phase"] == str(n) else [m]
    return tamper


def never_paired(p: Pairing, outcome: HostOutcome | None, *, host_told: bool = True) -> bool:
    """No keys arrived, nothing was recorded; and the host heard of the end (the joiner tells
    it through the mailbox, unless the mailbox drops that too)."""
    told = outcome is not None and not outcome.ok
    return not p.welcomes and p.completed == 0 and (told or not host_told)


async def test_a_mailbox_that_drops_the_welcome_never_pairs(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(pairing_link, "READ_TIMEOUT", 1.0)  # time to wait for a dropped message
    monkeypatch.setattr(pairing_link, "CONFIRM_TIMEOUT", 1.0)
    error, p, outcome = await joined_through(host_phase(1, lambda m: []))
    assert "stopped answering" in str(error)
    assert never_paired(p, outcome, host_told=False)


async def test_a_mailbox_that_injects_a_third_side_never_pairs():
    intruder = lambda m: [m, {**m, "side": "intruder", "phase": "1"}]  # noqa: E731
    error, p, outcome = await joined_through(host_phase(0, intruder))
    assert "a third device wrote into the pairing's mailbox" in str(error)
    assert never_paired(p, outcome)


async def test_a_mailbox_that_replays_the_pake_as_the_welcome_never_pairs():
    first: list[str] = []

    def replay(m: dict[str, Any], from_host: bool) -> list[dict[str, Any]]:
        if from_host and m["phase"] == "0":
            first.append(m["body"])
        if from_host and m["phase"] == "1":
            return [{**m, "body": first[0]}]
        return [m]

    error, p, outcome = await joined_through(replay)
    assert "replayed or out of order" in str(error)
    assert never_paired(p, outcome)


async def test_a_mailbox_that_delivers_two_bodies_for_one_phase_never_pairs():
    twice = lambda m: [m, {**m, "body": m["body"][:-2] + ("01" if m["body"][-2:] == "00"  # noqa: E731
                                                         else "00")}]
    error, p, outcome = await joined_through(host_phase(0, twice))
    assert "two different messages as phase 0" in str(error)
    assert never_paired(p, outcome)


async def test_a_mailbox_that_tampers_with_the_welcome_never_pairs():
    def flip(m: dict[str, Any]) -> list[dict[str, Any]]:
        body = bytearray.fromhex(m["body"])
        body[-1] ^= 1  # the last byte of the AEAD tag
        return [{**m, "body": body.hex()}]

    error, p, outcome = await joined_through(host_phase(1, flip))
    assert "could not be decrypted" in str(error)
    assert never_paired(p, outcome)


async def test_a_mailbox_that_reorders_and_repeats_messages_is_undone():
    # The protocol allows both (the server keeps no order and may deliver twice).
    from p2pbackup.discovery.mailbox import MailboxMessage
    from p2pbackup.pairing_link import MailboxPipe

    class Delivered:
        url, nameplate = "ws://mailbox", "5"

        def __init__(self, messages: list[MailboxMessage]) -> None:
            self.messages = messages

        async def next_message(self, timeout: float | None) -> MailboxMessage | None:
            return self.messages.pop(0) if self.messages else None

    host = "h"
    pipe = MailboxPipe(Delivered([MailboxMessage(host, "offer", b""),  # type: ignore[arg-type]
                                  MailboxMessage(host, "1", b"second"),
                                  MailboxMessage(host, "1", b"second"),
                                  MailboxMessage(host, "0", b"first"),
                                  MailboxMessage(host, "0", b"first")]))
    assert await pipe.arrived(1)
    assert [await pipe.read(), await pipe.read()] == [b"first", b"second"]


async def test_a_second_device_claiming_the_code_on_the_mailbox_is_refused():
    p = Pairing()
    p.answer = asyncio.get_running_loop().create_future()  # the host's user is still looking
    async with hosted(pairing=p) as (url, code, _, task):
        first = asyncio.ensure_future(join(code, b"me", p.on_welcome,
                                           rendezvous=StaticRendezvous("", 0), mailbox=url))
        await asyncio.wait_for(p.asked.wait(), 30)
        with pytest.raises(PairingFailed, match="another device is already pairing with this "
                                                "code there"):
            await asyncio.wait_for(join(code, b"me too", p.on_welcome,
                                        rendezvous=StaticRendezvous("", 0), mailbox=url), 30)
        p.answer.set_result(True)  # the first device's attempt goes on, and pairs
        await asyncio.wait_for(first, 30)
        assert (await asyncio.wait_for(task, 30)).ok and p.welcomes == [WELCOME]


@contextlib.asynccontextmanager
async def junk_mailbox(after_bind: list[str | bytes]) -> AsyncIterator[str]:
    """A 'mailbox' that welcomes, then answers anything with `after_bind`."""
    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        await sock.send_str('{"type": "welcome", "welcome": {}}')
        async for _ in sock:
            for junk in after_bind:
                await (sock.send_bytes(junk) if isinstance(junk, bytes) else sock.send_str(junk))
        return sock

    app = web.Application()
    app.router.add_get("/v1", ws)
    async with serving(app) as url:
        yield url.replace("http://", "ws://") + "/v1"


@pytest.mark.parametrize("junk, said", [
    (["not json at all"], "not JSON"),
    ([b"\xff\xfe"], "not JSON"),
    (['["a", "list"]'], "without a type"),
    (['{"type": "allocated", "nameplate": "12abc"}'], "malformed nameplate"),
    (['{"type": "allocated", "nameplate": "4000"}'], "too busy"),
    (['{"type": "error", "error": "go\\naway\\u001b[31m", "orig": {"type": "allocate"}}'],
     "refused our 'allocate': go away [31m"),
    (['{"type": "message", "side": "x", "phase": "0", "body": "zz"}'], "not hex"),
])
async def test_a_mailbox_answering_junk_is_one_line(junk: list[str | bytes], said: str):
    async with junk_mailbox(junk) as url:
        with pytest.raises(PairingFailed) as failed:
            await asyncio.wait_for(new_code(url), 30)
    assert said in str(failed.value) and "\n" not in str(failed.value)
