"""The in-memory link pair: order, backpressure, closing and failure as PeerLink shows them."""

from __future__ import annotations

import asyncio

import pytest

from p2pbackup.errors import LocalProtocolError, PeerUnreachable
from p2pbackup.transport import CLOSED, CONNECTED, FAILED
from p2pbackup.transport.memory import memory_pair


async def test_messages_arrive_in_order_and_unchanged():
    a, b = memory_pair()
    msgs = [bytes([i]) * (i * 37) for i in range(100)]
    for m in msgs:
        await a.send(m)
    assert [await b.recv() for _ in msgs] == msgs
    await b.send(b"back")
    assert await a.recv() == b"back"
    assert a.state == b.state == CONNECTED


async def test_send_waits_above_high_water_until_the_peer_reads():
    a, b = memory_pair(high_water=1000)
    await a.send(b"x" * 600)
    await a.send(b"x" * 600)  # 600 <= 1000 queued before it: accepted
    blocked = asyncio.ensure_future(a.send(b"y" * 10))
    await asyncio.sleep(0.01)
    assert not blocked.done() and a.buffered_amount == 1200
    assert await b.recv() == b"x" * 600
    await asyncio.wait_for(blocked, 1)
    assert a.buffered_amount == 610


async def test_close_is_seen_after_the_messages_sent_before_it():
    states = []
    a, b = memory_pair(on_state_b=states.append)
    await a.send(b"one")
    await a.send(b"two")
    await a.close()
    assert states == [CLOSED] and a.state == CLOSED
    assert [await b.recv(), await b.recv(), await b.recv()] == [b"one", b"two", None]
    with pytest.raises(PeerUnreachable):
        await b.send(b"late")
    with pytest.raises(PeerUnreachable):
        await a.send(b"late")
    await a.close()  # idempotent


async def test_a_waiting_receiver_and_a_blocked_sender_wake_on_close():
    a, b = memory_pair(high_water=0)
    reader = asyncio.ensure_future(b.recv())
    await a.send(b"z")
    assert await reader == b"z"
    await a.send(b"q")
    blocked = asyncio.ensure_future(a.send(b"r"))
    waiting = asyncio.ensure_future(a.recv())
    await asyncio.sleep(0)
    await b.close()
    with pytest.raises(PeerUnreachable):
        await asyncio.wait_for(blocked, 1)
    assert await asyncio.wait_for(waiting, 1) is None


async def test_break_link_loses_what_is_in_flight_and_fails_both_ends():
    sa, sb = [], []
    a, b = memory_pair(on_state_a=sa.append, on_state_b=sb.append)
    await a.send(b"lost")
    a.break_link()
    assert sa == sb == [FAILED]
    assert await b.recv() is None
    with pytest.raises(PeerUnreachable):
        await b.send(b"x")


async def test_oversized_message_is_refused_locally():
    a, _ = memory_pair(max_message_size=10)
    with pytest.raises(LocalProtocolError):
        await a.send(b"x" * 11)
