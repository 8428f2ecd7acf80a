"""Unbounded per-session state: a paired peer (or partner) that never ends its inventory,
starts objects and never finishes them, or leaves puts unfinished. Every such session ends
once a bound is crossed, with one reason; what it holds never exceeds the bounds (asserted on
the session's own counters). The protocols are fed frames, sans I/O."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os

from p2pbackup.blobs import peer as peer_store
from p2pbackup.daemon.peers import PeerState
from p2pbackup.replication.member import Replicator
from p2pbackup.protocol import fetch
from p2pbackup.protocol.framing import Limits, encode
from p2pbackup.protocol.sync import Closed, SyncSession
from p2pbackup.transport.memory import memory_pair

from .conftest import A, B

LIMITS = Limits(names=20_000, name_bytes=1_000_000, partial_objects=4,
                partial_bytes=3 * 1024 * 1024, partial_timeout=60.0)
_counter = itertools.count()


def name() -> str:
    return f"packs/{next(_counter):064x}"


def valid(n: str) -> bool:
    return n.startswith(("packs/", "heads/", "snapshots/"))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def frame(msg: dict) -> bytes:
    return encode(1, msg)


def victim(clock: Clock | None = None, have: set[str] | None = None) -> SyncSession:
    s = SyncSession("victim", have or set(), valid_name=valid, limits=LIMITS,
                    now=clock or Clock())
    s.data_to_send()
    s.receive_data(frame({"t": "hello", "versions": [1], "device": "hostile"}))
    return s


def closed_reasons(events: list) -> list[str]:
    return [e.reason for e in events if isinstance(e, Closed)]


def test_an_endless_inventory_ends_the_session_at_the_bound():
    s = victim()
    held = 0
    for batch in range(100):   # up to 200,000 names, ten times the bound
        events = s.receive_data(frame({"t": "inv", "names": [name() for _ in range(2000)],
                                       "last": False}))
        held = max(held, s.names_held)
        assert s.names_held <= LIMITS.names and s.name_bytes_held <= LIMITS.name_bytes
        if s.closed:
            break
    assert s.closed and batch < 20
    (reason,) = closed_reasons(events)
    assert "session limit" in reason and "names" in reason
    assert b"session limit" in s.data_to_send()      # the peer is told why, once
    assert s.receive_data(frame({"t": "inv", "names": [name()], "last": False})) == []


def test_names_the_peer_holds_and_we_hold_too_cost_nothing():
    """A big honest inventory that overlaps ours does not count against the bound."""
    mine = {name() for _ in range(LIMITS.names * 2)}
    s = victim(have=set(mine))
    names = sorted(mine)
    for i in range(0, len(names), 2000):
        s.receive_data(frame({"t": "inv", "names": names[i:i + 2000],
                              "last": i + 2000 >= len(names)}))
    assert not s.closed and s.names_held == 0


def test_endless_announcements_end_the_session_at_the_bound():
    s = victim()
    s.receive_data(frame({"t": "inv", "names": [], "last": True}))
    for _ in range(100):
        events = s.receive_data(frame({"t": "announce",
                                       "names": [name() for _ in range(2000)]}))
        assert s.names_held <= LIMITS.names
        if s.closed:
            break
    assert s.closed and "session limit" in closed_reasons(events)[0]


def asked_for(s: SyncSession, n: int) -> list[str]:
    names = [name() for _ in range(n)]
    s.receive_data(frame({"t": "inv", "names": names, "last": True}))
    return names


def first_part(n: str, total: int, size: int) -> bytes:
    return frame({"t": "obj", "name": n, "off": 0, "total": total, "data": os.urandom(size),
                  "last": False})


def test_many_objects_sent_part_way_end_the_session():
    s = victim()
    for n in asked_for(s, 100):
        events = s.receive_data(first_part(n, 4 * 1024 * 1024, 64 * 1024))
        assert s.partial_objects <= LIMITS.partial_objects
        assert s.partial_bytes <= LIMITS.partial_bytes
        if s.closed:
            break
    assert s.closed and "session limit" in closed_reasons(events)[0]
    assert "objects" in closed_reasons(events)[0]


def test_objects_sent_part_way_may_not_hold_more_than_the_byte_bound_together():
    s = victim()
    for n in asked_for(s, 3):
        events = s.receive_data(first_part(n, 8 * 1024 * 1024, 1024 * 1024 + 512 * 1024))
        assert s.partial_bytes <= LIMITS.partial_bytes
        if s.closed:
            break
    assert s.closed and "bytes" in closed_reasons(events)[0]


def test_one_large_object_in_parts_is_fine():
    """The byte bound is for several objects at once: one object may be as large as any."""
    s = victim()
    (n,) = asked_for(s, 1)
    total, part = 8 * 1024 * 1024, 1024 * 1024
    for off in range(0, total, part):
        events = s.receive_data(frame({"t": "obj", "name": n, "off": off, "total": total,
                                       "data": bytes(part), "last": off + part == total}))
    assert not s.closed and len(events[0].data) == total and s.partial_bytes == 0


def test_a_partial_object_times_out_and_is_asked_for_again():
    clock = Clock()
    s = victim(clock)
    a, b = asked_for(s, 2)
    s.data_to_send()
    s.receive_data(first_part(a, 1000, 100))
    clock.t += LIMITS.partial_timeout / 2
    s.receive_data(first_part(b, 1000, 100))
    assert s.partial_objects == 2 and s.expire() == 0
    clock.t += LIMITS.partial_timeout / 2 + 1
    assert s.expire() == 1               # a waited too long for its next part: dropped
    assert s.partial_objects == 1 and s.partial_bytes == 100 and not s.closed
    assert a.encode() in s.data_to_send()   # and asked for again
    # The rest of the old copy is ignored; a new copy from the start is taken.
    assert s.receive_data(frame({"t": "obj", "name": a, "off": 100, "total": 1000,
                                 "data": bytes(900), "last": True})) == []
    got = s.receive_data(frame({"t": "obj", "name": a, "off": 0, "total": 1000,
                                "data": bytes(1000), "last": True}))
    assert [e.name for e in got if hasattr(e, "data")] == [a] and not s.closed


def test_the_peers_wants_are_bounded_by_what_we_hold():
    """Asked for names we do not have, we say so at once instead of queueing them."""
    s = victim(have={"packs/" + "a" * 64})
    s.data_to_send()
    for _ in range(50):
        s.receive_data(frame({"t": "want", "names": [name() for _ in range(2000)]}))
        assert s.queued == 0 and s.next_wanted() == []
    assert not s.closed and b"not here" in s.data_to_send()


# ---- the fetch protocol (restore --from peer:, partners) --------------------------------------

def fetch_server(clock: Clock | None = None) -> fetch.FetchServer:
    s = fetch.FetchServer("victim", limits=LIMITS, now=clock or Clock())
    s.receive_data(encode(fetch.VERSION, {"t": fetch.HELLO, "versions": [1], "device": "x"}))
    s.data_to_send()
    return s


def put_start(rid: int, total: int, size: int) -> bytes:
    return encode(fetch.VERSION, {"t": "put", "id": rid, "name": name(), "off": 0,
                                  "total": total, "data": os.urandom(size), "last": False})


def test_unfinished_puts_end_the_fetch_session():
    s = fetch_server()
    for rid in range(1, 51):
        events = s.receive_data(put_start(rid, 4 * 1024 * 1024, 64 * 1024))
        assert s.partial_objects <= LIMITS.partial_objects
        assert s.partial_bytes <= LIMITS.partial_bytes
        if s.closed:
            break
    assert s.closed and rid == LIMITS.partial_objects + 1
    (closed,) = [e for e in events if isinstance(e, fetch.Closed)]
    assert "session limit" in closed.reason
    assert b"session limit" in s.data_to_send()


def test_an_unfinished_put_times_out():
    clock = Clock()
    s = fetch_server(clock)
    s.receive_data(put_start(1, 1000, 100))
    assert s.expire() is None and s.partial_objects == 1
    clock.t += LIMITS.partial_timeout + 1
    closed = s.expire()
    assert s.closed and "stalled" in closed.reason and s.partial_objects == 0


def client_with_hello(clock: Clock | None = None) -> fetch.FetchClient:
    c = fetch.FetchClient("victim", limits=LIMITS, now=clock or Clock())
    c.data_to_send()
    c.receive_data(encode(fetch.VERSION, {"t": fetch.HELLO, "versions": [1], "device": "x"}))
    return c


def test_a_list_answer_that_never_ends_ends_the_fetch_session():
    c = client_with_hello()
    rid = c.request("list", prefix="")
    for _ in range(100):
        events = c.receive_data(encode(fetch.VERSION, {
            "t": "names", "id": rid, "names": [name() for _ in range(2000)], "last": False}))
        assert c.names_held <= LIMITS.names
        if c.closed:
            break
    assert c.closed and "session limit" in events[-1].reason


def test_answers_sent_part_way_are_bounded_and_time_out():
    clock = Clock()
    c = client_with_hello(clock)
    rids = [c.request("get", name()) for _ in range(10)]
    for rid in rids:
        events = c.receive_data(encode(fetch.VERSION, {
            "t": "data", "id": rid, "off": 0, "total": 4 * 1024 * 1024,
            "data": bytes(64 * 1024), "last": False}))
        assert c.partial_objects <= LIMITS.partial_objects
        if c.closed:
            break
    assert c.closed and "session limit" in events[-1].reason
    c = client_with_hello(clock)
    rid = c.request("get", name())
    c.receive_data(encode(fetch.VERSION, {"t": "data", "id": rid, "off": 0, "total": 1000,
                                          "data": bytes(10), "last": False}))
    clock.t += LIMITS.partial_timeout + 1
    assert "stalled" in c.expire().reason and c.closed and c.partial_objects == 0


# ---- through the daemon's adapters (real repository, in-memory link) --------------------------

async def hostile_session(session, frames: list[bytes]) -> bytes:
    """Run `session(link)` (the daemon's side), send it `frames` from the other end of the
    link; once it returns (its caller closes the link), what it sent back."""
    ours, theirs = memory_pair()
    task = asyncio.create_task(session(ours))
    for f in frames:
        await theirs.send(f)
    await asyncio.wait_for(task, 30)
    await ours.close()
    back = b""
    while (msg := await theirs.recv()) is not None:
        back += msg
    return back


def limit_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "session limit" in r.getMessage()]


async def test_the_replicator_ends_a_session_past_a_bound_with_one_log_line(repos, caplog):
    a, b = repos
    names = [name() for _ in range(10)]
    frames = [frame({"t": "hello", "versions": [1], "device": A.device_id}),
              frame({"t": "inv", "names": names, "last": True})]
    frames += [first_part(n, 1_000_000, 1000) for n in names]
    replicator = Replicator(b, B.device_id)
    caplog.set_level(logging.INFO)
    try:
        back = await hostile_session(
            lambda link: replicator.run(A.device_id, link, PeerState(A.device_id)), frames)
    finally:
        await replicator.close()
    assert b"session limit" in back            # the peer is told why
    assert len(limit_lines(caplog)) == 1, limit_lines(caplog)


async def test_the_store_server_ends_unfinished_puts_with_one_log_line(repos, caplog):
    a, b = repos
    frames = [encode(fetch.VERSION, {"t": fetch.HELLO, "versions": [1], "device": "x"})]
    frames += [put_start(rid, 1_000_000, 1000) for rid in range(1, 11)]
    replicator = Replicator(b, B.device_id)
    caplog.set_level(logging.INFO)
    try:
        back = await hostile_session(lambda link: replicator.serve(A.device_id, link), frames)
    finally:
        await replicator.close()
    assert b"session limit" in back
    assert len(limit_lines(caplog)) == 1, limit_lines(caplog)


async def test_a_put_left_unfinished_ends_the_session_after_the_timeout(repos):
    a, b = repos
    ours, theirs = memory_pair()
    limits = Limits(partial_timeout=0.3)
    task = asyncio.create_task(peer_store.serve(ours, b.store, "victim", limits=limits))
    await theirs.send(encode(fetch.VERSION, {"t": fetch.HELLO, "versions": [1], "device": "x"}))
    await theirs.send(put_start(1, 1_000_000, 1000))
    why = await asyncio.wait_for(task, 30)       # nothing more comes: the server gives up
    assert "stalled" in why
