"""Head replay: a peer (or a store) hands back a head the device signed earlier. Heads of one
device are strictly ordered (a higher seq, or the same seq and segment written later); a head
that is not newer than the one held is refused, whatever else it shares with it."""

from __future__ import annotations

import time

import pytest

from p2pbackup.errors import IntegrityError
from p2pbackup.format.header import Kind
from p2pbackup.format.log import GENESIS, Head, Segment
from p2pbackup.format.records import HEAD_SIG
from p2pbackup.repo import replica
from p2pbackup.repo.logstore import LogStore

from .conftest import A

HEAD = f"heads/{A.device_id}"


@pytest.fixture
async def history(repos):
    """Repository a, where device A wrote every kind of head move (segments, then snapshots on
    the same segment, then a segment again), every stored head as it was; and b, a replica of
    a holding A's newest head."""
    a, b = repos
    logs = LogStore(a)
    heads: list[bytes] = []

    async def keep() -> None:
        heads.append(bytes(await a.store.get(HEAD)))

    h = await logs.append(A, Segment(A.device_id, 1, GENESIS, time.time_ns(), ()))
    await keep()
    h = await logs.append(A, Segment(A.device_id, 2, h.segment, time.time_ns(), ()))
    await keep()
    for snap in ("1" * 64, "2" * 64, "3" * 64):   # snapshots covering segment 2
        await logs.write_head(A, Head(A.device_id, 2, h.segment, snap, time.time_ns()))
        await keep()
    await logs.append(A, Segment(A.device_id, 3, h.segment, time.time_ns(), ()))
    await keep()
    assert await replica.accept(b, HEAD, heads[-1])
    return a, b, heads


async def test_replaying_any_older_head_is_refused(history):
    """Whichever head a peer holds, every head the device wrote before it is refused."""
    a, b, heads = history
    assert len(set(heads)) == len(heads) == 6
    for i in range(1, len(heads)):
        await b.store.put(HEAD, heads[i])   # b held this one when the replays came
        for old in heads[:i]:
            with pytest.raises(IntegrityError, match="backwards|not newer"):
                await replica.accept(b, HEAD, old)
            assert bytes(await b.store.get(HEAD)) == heads[i]
    # The same on the device itself: no older head replaces the one it holds.
    logs = LogStore(a)
    for i in range(1, len(heads)):
        await a.store.put(HEAD, heads[i])
        for old in heads[:i]:
            head = await logs.check_head(old, A.device_id, "head")
            with pytest.raises(IntegrityError, match="backwards|not newer"):
                await logs.write_head(A, head)
            assert bytes(await a.store.get(HEAD)) == heads[i]


async def test_replaying_an_older_head_of_the_same_segment_is_refused(history):
    """The replay the issue showed: same seq and segment, an older snapshot."""
    a, b, heads = history
    await b.store.put(HEAD, heads[3])      # b held the head of the second snapshot...
    with pytest.raises(IntegrityError, match="not newer"):
        await replica.accept(b, HEAD, heads[2])   # ... and is offered the first one's again
    assert await replica.accept(b, HEAD, heads[4])   # the third one's is newer: taken
    assert await replica.accept(b, HEAD, heads[4]) is False   # the same again: nothing to do


async def test_a_head_that_is_not_newer_is_refused(history):
    a, b, heads = history
    logs = LogStore(a)
    newest = await logs.check_head(heads[-1], A.device_id, "head")
    # Signed by the device itself, same seq and segment, another snapshot, not written later.
    for time_ns in (newest.time_ns, newest.time_ns - 1):
        twin = Head(newest.device, newest.seq, newest.segment, "9" * 64, time_ns)
        raw = bytes(logs._seal_signed(A, Kind.HEAD, HEAD_SIG, twin.encode()))
        with pytest.raises(IntegrityError, match="not newer"):
            await replica.accept(b, HEAD, raw)
    assert bytes(await b.store.get(HEAD)) == heads[-1]
