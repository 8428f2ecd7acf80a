"""The broker's database failing under it (issue 18 §3): PostgreSQL stopped while two broker
processes serve devices, and a locked SQLite file. Each process says so in its log in a line
(no traceback), answers REST requests with a one-line 503, keeps relaying between sockets it
holds itself, loses no push it had accepted, and relays across processes again once the
database is back, its presence rows written anew if the others dropped them as stale."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from p2pbackup.discovery.broker import BrokerClient
from tests.brokers import raw_socket, registered
from tests.eventually import eventually
from tests.servers import Postgres, RunningBroker, broker_server, free_port, postgres_server

pytestmark = pytest.mark.timeout(240)

DOWN = "the broker's database"


async def signal(ws: aiohttp.ClientWebSocketResponse, to: str, n: int) -> None:
    await ws.send_json({"t": "signal", "to": to, "id": n,
                        "data": base64.b64encode(b"offer").decode()})


async def next_of(ws: aiohttp.ClientWebSocketResponse, kind: str, timeout: float = 30
                  ) -> dict[str, object]:
    """The next message of type `kind` on `ws` (others skipped)."""
    async def wait() -> dict[str, object]:
        while True:
            doc = await ws.receive_json()
            if doc.get("t") == kind:
                return doc   # type: ignore[no-any-return]
    return await asyncio.wait_for(wait(), timeout)


def no_traceback(*brokers: RunningBroker) -> None:
    for b in brokers:
        assert "Traceback" not in b.log_text(), b.log_text()[-3000:]


async def test_a_postgres_outage_is_a_line_per_process_and_the_fleet_relays_again_after(
        tmp_path: Path) -> None:
    with postgres_server() as pg:
        dsn = pg.new_database()
        with broker_server(tmp_path / "one", "--database", dsn) as one, \
                broker_server(tmp_path / "two", "--database", dsn) as two:
            acct = await registered(one.url, members=3)
            near, far, late = acct.members
            owner = BrokerClient(one.url, acct.owner, acct.fingerprint)
            # accepted before the outage, for a device not connected: kept through it
            assert await owner.notify(b"head 1", to=[late.device_id]) == \
                {"delivered": 0, "queued": 1}
            async with aiohttp.ClientSession() as http:
                a = await raw_socket(http, one.url, acct, acct.owner)
                b = await raw_socket(http, one.url, acct, near)       # same process as a
                c = await raw_socket(http, two.url, acct, far)        # the other process
                await signal(a, far.device_id, 1)
                assert (await next_of(c, "signal"))["id"] == 1

                pg.stop()
                # sockets on one process keep relaying to each other
                await signal(a, near.device_id, 2)
                assert (await next_of(b, "signal"))["id"] == 2
                # the other process cannot be reached: undeliverable, as for a device away
                await signal(a, far.device_id, 3)
                assert (await next_of(a, "undeliverable"))["id"] == 3
                status, body = await owner.request("GET", "devices")
                assert status == 503 and DOWN in body.decode() and \
                    body.decode().count("\n") == 1, body
                await eventually(lambda: DOWN in one.log_text() and DOWN in two.log_text(),
                                 timeout=60)

                pg.start()
                n = 100

                async def crosses() -> bool:
                    nonlocal n
                    n += 1
                    await signal(a, far.device_id, n)
                    try:
                        return (await next_of(c, "signal", timeout=1))["id"] == n
                    except asyncio.TimeoutError:
                        return False
                await eventually(crosses, timeout=90, interval=0.5)
                # the push accepted before the outage reaches its device
                d = await raw_socket(http, two.url, acct, late)
                got = await next_of(d, "push")
                assert base64.b64decode(str(got["data"])) == b"head 1"
                for ws in (a, b, c, d):
                    await ws.close()
            await owner.close()
            no_traceback(one, two)


async def test_a_locked_sqlite_database_is_a_503_and_a_line_then_serves_again(
        tmp_path: Path) -> None:
    with broker_server(tmp_path) as broker:
        acct = await registered(broker.url)
        owner = BrokerClient(broker.url, acct.owner, acct.fingerprint)
        lock = sqlite3.connect(tmp_path / "data" / "broker.sqlite", isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")        # another program holding the file
        try:
            status, body = await owner.request("POST", "device", b'{"info": ""}')
            assert status == 503 and "database is locked" in body.decode() and \
                body.decode().count("\n") == 1, body
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        await owner.register_device(b"info")     # served again
        await owner.close()
        await eventually(lambda: "database is locked" in broker.log_text())
        no_traceback(broker)


def test_a_broker_starting_on_a_locked_sqlite_database_exits_with_one_line(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    lock = sqlite3.connect(data / "broker.sqlite", isolation_level=None)
    lock.execute("CREATE TABLE other (x)")
    lock.execute("BEGIN EXCLUSIVE")
    try:
        done = subprocess.run([sys.executable, "-m", "p2pbackup.broker.main", "--data",
                               str(data), "--listen", f"127.0.0.1:{free_port()}"],
                              capture_output=True, text=True, timeout=120)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert done.returncode == 11, done.stderr
    assert done.stderr.count("\n") == 1 and "database is locked" in done.stderr, done.stderr


async def test_a_process_whose_presence_was_dropped_as_stale_announces_it_again(
        tmp_path: Path, postgres: Postgres) -> None:
    dsn = postgres.new_database()
    with broker_server(tmp_path / "one", "--database", dsn) as one, \
            broker_server(tmp_path / "two", "--database", dsn) as two:
        acct = await registered(one.url)
        async with aiohttp.ClientSession() as http:
            a = await raw_socket(http, one.url, acct, acct.owner)
            c = await raw_socket(http, two.url, acct, acct.members[0])
            db = await asyncpg.connect(dsn)
            # as the others do to a process whose heartbeat stopped during a long outage,
            # and that process's connections cut as by the outage itself
            await db.execute("DELETE FROM presence WHERE device = $1", acct.members[0].device_id)
            await db.fetchval("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                              "WHERE datname = current_database() AND query LIKE 'LISTEN%'")
            await db.close()
            n = 0

            async def crosses() -> bool:
                nonlocal n
                n += 1
                await signal(a, acct.members[0].device_id, n)
                try:
                    return (await next_of(c, "signal", timeout=1))["id"] == n
                except asyncio.TimeoutError:
                    return False
            await eventually(crosses, timeout=60, interval=0.5)
            await a.close()
            await c.close()
        no_traceback(one, two)


async def test_a_locked_database_under_the_pairing_mailbox_is_an_error_message_not_a_dropped_socket(
        tmp_path: Path) -> None:
    """The mailbox's state is the broker's database: while it cannot be written, a mailbox
    command is answered with an error in the mailbox protocol (the client says it in one line),
    the socket stays, the broker logs a line, and the next command after it is served."""
    with broker_server(tmp_path) as broker:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(broker.url.replace("http", "ws") + "/v1/mailbox")
            assert (await ws.receive_json())["type"] == "welcome"
            await ws.send_json({"type": "bind", "appid": "p2pbackup.test", "side": "a1"})
            lock = sqlite3.connect(tmp_path / "data" / "broker.sqlite", isolation_level=None)
            lock.execute("BEGIN EXCLUSIVE")        # another program holding the file
            try:
                await ws.send_json({"type": "allocate"})
                while (reply := await asyncio.wait_for(ws.receive_json(), 60))["type"] == "ack":
                    pass
                assert reply["type"] == "error" and DOWN in reply["error"], reply
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            await ws.send_json({"type": "allocate"})
            while (reply := await asyncio.wait_for(ws.receive_json(), 60))["type"] == "ack":
                pass
            assert reply["type"] == "allocated", reply
            await ws.close()
        await eventually(lambda: DOWN in broker.log_text())
        no_traceback(broker)
