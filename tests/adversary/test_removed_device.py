"""A removed device keeps nothing open: when the membership no longer admits it, its sync
session and its reads of this store (restore --from peer:) are closed at once, with one log
line. (Its direct lane too, with real daemons: tests/integration/test_removal_closes.py.)"""

from __future__ import annotations

import asyncio
import logging

from p2pbackup.daemon.peers import PeerState
from p2pbackup.replication.member import Replicator
from p2pbackup.protocol import fetch
from p2pbackup.protocol.framing import encode
from p2pbackup.transport.memory import memory_pair
from tests.eventually import eventually

from .conftest import A, B


async def test_a_removed_device_loses_its_session_and_its_reads_at_once(repos, caplog):
    a, b = repos
    replicator = Replicator(b, B.device_id)
    sync_ours, sync_theirs = memory_pair()
    read_ours, read_theirs = memory_pair()
    caplog.set_level(logging.INFO)
    tasks = [asyncio.create_task(replicator.run(A.device_id, sync_ours,
                                                PeerState(A.device_id))),
             asyncio.create_task(replicator.serve(A.device_id, read_ours, encode(
                 fetch.VERSION, {"t": fetch.HELLO, "versions": [1], "device": A.device_id})))]
    try:
        await eventually(lambda: A.device_id in replicator.sessions)
        await eventually(lambda: read_ours.bytes_sent)    # the store answered its hello
        await replicator.close_unless(lambda device: True)      # still a member: nothing
        assert not any(t.done() for t in tasks)
        await replicator.close_unless(lambda device: device != A.device_id)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)      # both sessions ended
        back = b""
        while (msg := await sync_theirs.recv()) is not None:
            back += msg
        assert b"this device was removed from the account" in back
        assert A.device_id not in replicator.sessions
        lines = [r.getMessage() for r in caplog.records
                 if "no longer in the account" in r.getMessage()]
        assert len(lines) == 1 and "session" in lines[0] and "reading" in lines[0], lines
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await replicator.close()
