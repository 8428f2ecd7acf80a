"""The broker's database failing, in units: the relay's heartbeat retries with backoff and
jitter and logs an outage in two lines (failed, answers again), and the socket path's
failures are one line a minute (tests/integration/test_broker_outage.py has the real
PostgreSQL and SQLite)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import pytest

from p2pbackup.broker.postgres import RETRY_MOST, PostgresRelay
from p2pbackup.broker.service import OutageLog
from p2pbackup.errors import StorageError


class Stop(Exception):
    pass


class FlakyRelay(PostgresRelay):
    """A relay whose heartbeats fail `fails` times, then succeed; its sleeps are recorded."""

    def __init__(self, fails: int, jitter: float) -> None:
        super().__init__(cast(Any, None), sleep=self._sleep, jitter=lambda: jitter)
        self.fails, self.slept, self.most = fails, list[float](), fails + 3

    async def _sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        if len(self.slept) == self.most:
            raise Stop

    async def _heartbeat(self) -> None:
        if self.fails:
            self.fails -= 1
            raise StorageError("the broker's database x failed: down")


@pytest.mark.parametrize("jitter, factor", [(1.0, 1.0), (0.0, 0.5)])
def test_a_failing_heartbeat_backs_off_with_jitter_up_to_a_cap(
        jitter: float, factor: float, caplog: pytest.LogCaptureFixture) -> None:
    relay = FlakyRelay(fails=9, jitter=jitter)
    with caplog.at_level(logging.WARNING, "p2pbackup.broker"), pytest.raises(Stop):
        asyncio.run(relay._beat())
    doubling = [min(RETRY_MOST, 0.5 * 2 ** n) * factor for n in range(9)]
    assert relay.slept == [relay.heartbeat, *doubling, relay.heartbeat, relay.heartbeat]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines                 # an outage is two lines, not one a retry
    assert "failed: down: relaying to the other broker processes stops" in lines[0]
    assert "answers again (after 9 failed attempts)" in lines[1]


def test_socket_path_failures_are_one_line_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    outage = OutageLog(lambda: now[0])
    exc = StorageError("the broker's database x failed: down")
    with caplog.at_level(logging.WARNING, "p2pbackup.broker"):
        for _ in range(1000):                     # a second of signals
            outage.failed("a signal could not be relayed", exc)
        now[0] += 61
        outage.failed("a signal could not be relayed", exc)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["a signal could not be relayed: the broker's database x failed: down",
                     "a signal could not be relayed: the broker's database x failed: down "
                     "(999 more failures in the last minute)"]
