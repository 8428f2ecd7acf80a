"""Our pairing mailbox (p2pbackup/broker/mailbox.py) against clients that misbehave.

It refuses what is too large, malformed or too much with one log line per connection and
kind of trouble; admits two sides per mailbox; and forgets nameplates nobody uses. The
WebSocket cases run on each state: memory (the standalone server) and the broker's database
(SQLite here; PostgreSQL in the state cases below and tests/integration/test_broker_fleet.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from p2pbackup.broker import mailbox as server
from p2pbackup.broker.mailbox import (BURST, MAX_MESSAGE, MailboxState, MemoryMailboxes,
                                      StoredMailboxes)
from p2pbackup.broker.relay import LocalRelay
from p2pbackup.broker.state import SqliteState
from tests.mailboxes import our_mailbox
from tests.unit.broker.test_broker_state import Opener, opener  # noqa: F401


@pytest.fixture(params=["memory", "sqlite"])
async def mailbox_state(request: pytest.FixtureRequest, tmp_path: Path
                        ) -> AsyncIterator[MailboxState]:
    if request.param == "memory":
        yield MemoryMailboxes()
        return
    state = SqliteState(tmp_path / "broker.sqlite")
    yield StoredMailboxes(state, LocalRelay())
    await state.close()


class Client:
    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.http, self.ws = http, ws

    async def send(self, **message: Any) -> None:
        await self.ws.send_str(json.dumps(message))

    async def answer(self, *types: str) -> dict[str, Any]:
        """The next message of one of `types` (acks and the like are skipped)."""
        while True:
            got = await asyncio.wait_for(self.ws.receive(), 10)
            if got.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.CLOSING):
                return {"type": "closed-connection"}
            message = json.loads(got.data)
            if message["type"] in types:
                return message


async def connect(url: str, side: str = "aa", bind: bool = True) -> Client:
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(url, max_msg_size=4 * MAX_MESSAGE)
    client = Client(http, ws)
    assert (await client.answer("welcome"))["welcome"] == {}
    if bind:
        await client.send(type="bind", appid="test/app", side=side, id="1")
    return client


async def close(*clients: Client) -> None:
    for c in clients:
        await c.ws.close()
        await c.http.close()


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "p2pbackup.broker.mailbox"]


async def test_an_oversized_message_is_refused_with_one_log_line(caplog, mailbox_state):
    caplog.set_level(logging.WARNING)
    async with our_mailbox(state=mailbox_state) as (url, _):
        c = await connect(url)
        await c.ws.send_str(json.dumps({"type": "ping", "ping": "x" * (MAX_MESSAGE + 1)}))
        assert (await c.answer("pong"))["type"] == "closed-connection"
        await close(c)
    assert len(lines(caplog)) == 1 and "refused a message" in lines(caplog)[0]


async def test_malformed_messages_get_errors_and_one_log_line(caplog, mailbox_state):
    caplog.set_level(logging.WARNING)
    async with our_mailbox(state=mailbox_state) as (url, _):
        c = await connect(url, bind=False)
        await c.ws.send_str("not json")
        assert (await c.answer("error"))["error"] == "not JSON"
        await c.send(type="allocate")
        assert (await c.answer("error"))["error"] == "must bind first"
        await c.send(type="bind", appid="test/app", side="aa")
        await c.send(type="frobnicate")
        assert (await c.answer("error"))["error"] == "unknown type"
        await c.send(type="claim", nameplate="12; DROP TABLE")
        assert "decimal" in (await c.answer("error"))["error"]
        await c.send(type="claim", nameplate="12")
        mailbox = (await c.answer("claimed"))["mailbox"]
        await c.send(type="open", mailbox=mailbox)
        await c.send(type="add", phase="0", body="not hex!")
        assert "hex" in (await c.answer("error"))["error"]
        await close(c)
    assert len(lines(caplog)) == 1, lines(caplog)


async def test_a_flood_is_cut_off_with_one_log_line(caplog, mailbox_state):
    caplog.set_level(logging.WARNING)
    async with our_mailbox(state=mailbox_state) as (url, _):
        c = await connect(url)
        for n in range(BURST * 4):
            await c.send(type="ping", ping=n)
        assert (await c.answer("never"))["type"] == "closed-connection"
        await close(c)
    assert len(lines(caplog)) == 1 and "flood" in lines(caplog)[0]


async def test_a_third_side_is_refused_as_crowded(mailbox_state):
    async with our_mailbox(state=mailbox_state) as (url, _):
        a, b, c = await connect(url, "aa"), await connect(url, "bb"), await connect(url, "cc")
        await a.send(type="allocate")
        nameplate = (await a.answer("allocated"))["nameplate"]
        assert 1 <= int(nameplate) <= 9  # as short as possible
        for client in (a, b):
            await client.send(type="claim", nameplate=nameplate)
            await client.answer("claimed")
        await c.send(type="claim", nameplate=nameplate)
        assert (await c.answer("error", "claimed"))["error"] == "crowded"
        await close(a, b, c)


async def test_messages_reach_the_other_side_and_echo_to_the_sender(mailbox_state):
    async with our_mailbox(state=mailbox_state) as (url, _):
        a, b = await connect(url, "aa"), await connect(url, "bb")
        await a.send(type="claim", nameplate="7")
        box = (await a.answer("claimed"))["mailbox"]
        await a.send(type="open", mailbox=box)
        await a.send(type="add", phase="0", body="abcd")
        await b.send(type="claim", nameplate="7")
        assert (await b.answer("claimed"))["mailbox"] == box
        await b.send(type="open", mailbox=box)
        got = await b.answer("message")  # queued before b opened
        assert (got["side"], got["phase"], got["body"]) == ("aa", "0", "abcd")
        assert (await a.answer("message"))["side"] == "aa"  # the sender's echo
        await close(a, b)


async def test_unused_nameplates_expire_and_closed_mailboxes_go():
    clock = [0.0]
    state = MemoryMailboxes(idle=600, now=lambda: clock[0])
    name = await state.allocate("app", "aa")
    box = await state.claim("app", name, "aa")
    clock[0] = 599
    assert await state.prune() == 0
    clock[0] = 601
    assert await state.prune() == 1 and not state.nameplates and not state.mailboxes
    # A mailbox both sides closed is gone at once, its nameplate with it.
    name = await state.allocate("app", "aa")
    box = await state.claim("app", name, "aa")
    await state.claim("app", name, "bb")
    await state.close("app", box, "aa", object())
    assert state.mailboxes
    await state.close("app", box, "bb", object())
    assert not state.mailboxes and not state.nameplates and state.stored == 0


async def test_a_full_server_refuses_new_mailboxes(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(server, "MAX_MAILBOXES", 3)
    state = MemoryMailboxes()
    for n in range(3):
        await state.claim("app", str(n), "aa")
    with pytest.raises(server.Refused, match="full"):
        await state.claim("app", "99", "aa")


async def test_stored_mailboxes_keep_the_rules_and_expire(opener: Opener,
                                                         monkeypatch: pytest.MonkeyPatch):
    clock = [1000.0]
    state = await opener()
    try:
        mailboxes = StoredMailboxes(state, LocalRelay(), idle=600, now=lambda: clock[0])
        name = await mailboxes.allocate("app", "aa")
        assert 1 <= int(name) <= 9
        box = await mailboxes.claim("app", name, "bb")
        with pytest.raises(server.Refused, match="crowded"):
            await mailboxes.claim("app", name, "cc")
        got: list[dict[str, Any]] = []
        assert await mailboxes.open("app", box, "bb", "b's socket", got.append) == []
        await mailboxes.add("app", box, {"side": "aa", "phase": "0", "body": "ab"})
        assert [m["body"] for m in got] == ["ab"]
        await mailboxes.release("app", name, "aa")
        with pytest.raises(server.Refused, match="reclaimed"):
            await mailboxes.claim("app", name, "aa")
        clock[0] += 601                       # b still listens: kept
        assert await mailboxes.prune() == 0
        await mailboxes.unsubscribe("app", box, "b's socket")
        clock[0] += 599
        assert await mailboxes.prune() == 0
        clock[0] += 2
        assert await mailboxes.prune() == 1
        with pytest.raises(server.Refused, match="no such mailbox"):
            await mailboxes.open("app", box, "bb", "again", got.append)
        # both sides closed: gone at once, its nameplate free again
        name = await mailboxes.allocate("app", "aa")
        box = await mailboxes.claim("app", name, "bb")
        await mailboxes.close("app", box, "aa", "a")
        await mailboxes.add("app", box, {"side": "bb", "phase": "0", "body": "cd"})
        await mailboxes.close("app", box, "bb", "b")
        with pytest.raises(server.Refused, match="the mailbox is gone"):
            await mailboxes.add("app", box, {"side": "bb", "phase": "1", "body": "ef"})
        monkeypatch.setattr(server, "MAX_MAILBOXES", 2)
        for n in (10, 11):
            await mailboxes.claim("app", str(n), "aa")
        with pytest.raises(server.Refused, match="full"):
            await mailboxes.claim("app", "12", "aa")
    finally:
        await state.close()
