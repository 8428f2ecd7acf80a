"""Racing a broker fleet (two real `p2pbackup-broker` processes on one real PostgreSQL): the
pairing mailbox's one claim per code and an invitation's one registration hold when the
claimers or registrations arrive at once, on both processes, not only one after another
(tests/integration/test_broker_fleet.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.adversary.test_broker_registration import register
from tests.brokers import invitation
from tests.integration.test_broker_fleet import fleet
from tests.servers import Postgres, StorageAccount
from tests.unit.broker.test_mailbox_server import close, connect

pytestmark = pytest.mark.timeout(240)
RACERS = 6    # half on each process


async def test_joiners_racing_for_one_code_on_two_broker_processes_get_one_claim(
        tmp_path: Path, postgres: Postgres) -> None:
    with fleet(tmp_path, postgres) as (one, two, _):
        urls = [b.url.replace("http://", "ws://") + "/v1/mailbox" for b in (one, two)]
        host = await connect(urls[0], "host")
        await host.send(type="allocate")
        nameplate = (await host.answer("allocated"))["nameplate"]
        racers = [await connect(urls[i % 2], f"racer{i}") for i in range(RACERS)]
        for r in racers:   # all sent before any answer is read
            await r.send(type="claim", nameplate=nameplate)
        got = [await r.answer("error", "claimed") for r in racers]
        claimed = [g for g in got if g["type"] == "claimed"]
        assert len(claimed) == 1, got
        assert all(g.get("error") == "crowded" for g in got if g["type"] == "error"), got
        await close(host, *racers)


async def test_an_invitation_raced_on_two_broker_processes_registers_one_account(
        tmp_path: Path, postgres: Postgres) -> None:
    with fleet(tmp_path, postgres, "--invites") as (one, two, dsn):
        token = invitation(dsn)
        results = await asyncio.gather(*(
            register((one, two)[i % 2].url, StorageAccount(), invite=token)
            for i in range(RACERS)), return_exceptions=True)
        assert sum(r is None for r in results) == 1, results
        assert all("403 this invitation is not valid" in str(r) for r in results
                   if r is not None), results
