"""The session driver over whatever links it is handed: a control link, then a bulk lane that
comes up and drops (in-memory links here; the data channel and the TLS lane in the product)."""

from __future__ import annotations

import asyncio
import os

from p2pbackup.protocol.sync import ObjectReceived, ObjectWanted, SyncSession
from p2pbackup.replication.driver import SessionDriver
from p2pbackup.transport.memory import memory_pair

from tests.eventually import eventually

OBJECTS = {f"packs/{i:064x}": os.urandom(700_000) for i in range(6)}
LATER = {"packs/" + "f" * 64: os.urandom(300_000)}


def session(device: str, have: set[str]) -> SyncSession:
    return SyncSession(device, have, valid_name=lambda name: name.startswith("packs/"),
                       sizes={n: len(OBJECTS.get(n) or LATER[n]) for n in have})


async def test_objects_go_over_the_bulk_lane_it_is_handed_and_back_on_control_when_it_drops():
    sender = session("a", set(OBJECTS))
    receiver = session("b", set())
    sender.await_bulk_lane()   # as when both sides offered a lane: nothing starts on control
    held = {**OBJECTS, **LATER}
    got: dict[str, bytes] = {}

    async def give(ev) -> None:
        if isinstance(ev, ObjectWanted):
            sender.send_object(ev.name, held[ev.name])

    async def take(ev) -> None:
        if isinstance(ev, ObjectReceived):
            got[ev.name] = bytes(ev.data)
            receiver.ack(ev.name)

    control_a, control_b = memory_pair()
    lane_a, lane_b = memory_pair(max_message_size=4 * 1024 * 1024)
    a, b = SessionDriver(sender, control_a, give), SessionDriver(receiver, control_b, take)
    tasks = [asyncio.create_task(a.run()), asyncio.create_task(b.run())]
    lanes = [asyncio.create_task(a.run_lane(lane_a)), asyncio.create_task(b.run_lane(lane_b))]
    try:
        await eventually(lambda: got.keys() == OBJECTS.keys())
        assert got == OBJECTS
        total = sum(len(v) for v in OBJECTS.values())
        assert lane_a.bytes_sent >= total > control_a.bytes_sent   # the parts took the lane

        await lane_a.close()   # the lane drops: what comes next goes over the control link
        await asyncio.gather(*lanes)
        assert a.lane is None and b.lane is None
        await a.lane_down()
        await b.lane_down()
        before = control_a.bytes_sent
        sender.have |= set(LATER)
        sender.announce(sorted(LATER))
        await a.send()
        await eventually(lambda: set(LATER) <= got.keys())
        assert got[next(iter(LATER))] == next(iter(LATER.values()))
        assert control_a.bytes_sent - before >= len(next(iter(LATER.values())))
    finally:
        await control_a.close()
        await control_b.close()
        await asyncio.gather(*tasks, *lanes, return_exceptions=True)
