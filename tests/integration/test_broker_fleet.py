"""Two real `p2pbackup-broker` processes on one PostgreSQL (the suite's own server): devices
connected to different processes open a session, hear each other's pushes, see a roster change
made on the other process, and lose nothing queued when a process is killed."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from p2pbackup import session
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.format.membership import Membership
from p2pbackup.discovery.broker import BrokerClient, BrokerSignaling
from tests.brokers import (LOOPBACK, Device, closed_with, device, echoed, front, invitation,
                           membership, online, raw_socket, registered)
from tests.eventually import eventually
from tests.servers import Postgres, RunningBroker, StorageAccount, broker_server

pytestmark = pytest.mark.timeout(240)


@contextlib.contextmanager
def fleet(tmp: Path, postgres: Postgres, *args: str
          ) -> Iterator[tuple[RunningBroker, RunningBroker, str]]:
    """Two broker processes (with `args`) sharing a fresh database (its DSN third)."""
    dsn = postgres.new_database()
    with broker_server(tmp / "one", "--database", dsn, *args) as one, \
            broker_server(tmp / "two", "--database", dsn, *args) as two:
        yield one, two, dsn


async def connected(url_a: str, url_b: str, acct: StorageAccount, held: list[Membership]
                    ) -> tuple[Device, Device]:
    """The owner on `url_a` (registering the account) and the first member on `url_b`."""
    a = device(url_a, acct, acct.owner, held)
    b = device(url_b, acct, acct.members[0], held)
    await a.client.publish_rosters([acct.roster()[1]])
    await online(a, b)
    return a, b


async def test_devices_on_two_processes_open_a_session_and_hear_pushes(
        tmp_path: Path, postgres: Postgres) -> None:
    acct = StorageAccount(members=[DeviceIdentity.generate(), DeviceIdentity.generate()])
    held = [membership(acct)]
    with fleet(tmp_path, postgres) as (one, two, dsn):
        a, b = await connected(one.url, two.url, acct, held)
        listed = {d["id"]: d["connected"] for d in await a.client.devices()}
        assert listed == {acct.owner.device_id: True, acct.members[0].device_id: True,
                          acct.members[1].device_id: False}

        assert await echoed(a, b, held[0], b"ping") == b"ping"

        assert await a.client.push(b"head 1")                       # one -> two
        await eventually(lambda: b.pushes == [(acct.owner.device_id, b"head 1")])
        assert await b.client.notify(b"head b") == {"delivered": 1, "queued": 1}  # two -> one
        await eventually(lambda: a.pushes == [(b.identity.device_id, b"head b")])
        # a device no process holds: undeliverable at once, as on one process
        with pytest.raises(session.PeerUnreachable, match="not connected to the broker"):
            await session.connect(acct.owner, acct.members[1].device_id, held[0],
                                  BrokerSignaling(a.client, acct.members[1].device_id),
                                  ice=LOOPBACK)
        for d in (a, b):
            await d.client.close()


async def test_a_device_removed_on_one_process_is_refused_by_the_other(
        tmp_path: Path, postgres: Postgres) -> None:
    acct = StorageAccount(members=[DeviceIdentity.generate()])
    held = [membership(acct)]
    with fleet(tmp_path, postgres) as (one, two, dsn):
        a, gone = await connected(one.url, two.url, acct, held)
        assert await gone.client.devices()          # two caches the roster listing it
        acct.members = []
        await a.client.publish_rosters([acct.roster(removed=(gone.identity.device_id,))[1]])
        await eventually(lambda: "not a device of account" in (gone.client.last_error or "")
                         or "no longer a device" in (gone.client.last_error or ""))
        with pytest.raises(Exception, match="403 device .* is not a device of account"):
            await gone.client.devices()
        await eventually(lambda: "is no longer listed: its socket is closed" in two.log_text())
        for d in (a, gone):
            await d.client.close()


async def test_a_killed_process_loses_nothing_queued_and_its_devices_reconnect(
        tmp_path: Path, postgres: Postgres) -> None:
    acct = StorageAccount(members=[DeviceIdentity.generate()])
    held = [membership(acct)]
    with fleet(tmp_path, postgres) as (one, two, dsn):
        a = device(two.url, acct, acct.owner, held)
        await a.client.publish_rosters([acct.roster()[1]])
        async with front(one.url, two.url) as url:      # one address; one answers first
            b = device(url, acct, acct.members[0], held)
            await online(a, b)
            assert one.process is not None
            one.process.kill()                          # b's process dies: no goodbye
            one.process.wait()
            # before the fleet notices (its heartbeat is still fresh) and after: both kept
            assert await a.client.notify(b"head 2") == {"delivered": 1, "queued": 0}
            await eventually(lambda: b.client.connected.is_set() and
                             b.pushes == [(acct.owner.device_id, b"head 2")], timeout=60)
            assert await a.client.push(b"head 3")
            await eventually(lambda: b.pushes[-1:] == [(acct.owner.device_id, b"head 3")])
            await b.client.close()
        await a.client.close()


async def test_a_signal_larger_than_a_notify_and_a_command_cross_processes(
        tmp_path: Path, postgres: Postgres) -> None:
    with fleet(tmp_path, postgres) as (one, two, dsn):
        acct = await registered(one.url)
        async with aiohttp.ClientSession() as http:
            a = await raw_socket(http, one.url, acct, acct.owner)
            b = await raw_socket(http, two.url, acct, acct.members[0])
            big = base64.b64encode(os.urandom(30_000)).decode()   # NOTIFY takes < 8000 bytes
            await a.send_json({"t": "signal", "to": acct.members[0].device_id, "id": 7,
                               "data": big})
            got = await b.receive_json(timeout=30)
            assert got == {"t": "signal", "from": acct.owner.device_id, "id": 7, "data": big}
            owner = BrokerClient(one.url, acct.owner, acct.fingerprint)
            index = await owner.invoke_command(acct.members[0].device_id, "open-tab", b"x")
            await owner.close()
            got = await b.receive_json(timeout=30)
            assert got["t"] == "command" and got["index"] == index and \
                base64.b64decode(got["payload"]) == b"x"
            await a.close()
            await b.close()


async def test_a_process_whose_listening_connection_is_cut_listens_again(
        tmp_path: Path, postgres: Postgres) -> None:
    acct = StorageAccount(members=[DeviceIdentity.generate(), DeviceIdentity.generate()])
    gone = acct.members[1]
    held = [membership(acct)]
    with fleet(tmp_path, postgres) as (one, two, dsn):
        a, b = await connected(one.url, two.url, acct, held)
        c = device(two.url, acct, gone, held)
        await online(c)
        db = await asyncpg.connect(dsn)      # both processes' LISTEN connections cut
        cut = await db.fetchval("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                "WHERE datname = current_database() AND query LIKE 'LISTEN%'")
        await db.close()
        assert cut == 2
        # a roster change made while two was not listening reaches it all the same
        acct.members = acct.members[:1]
        await a.client.publish_rosters([acct.roster(removed=(gone.device_id,))[1]])

        async def heard() -> bool:
            await a.client.push(b"head")
            await asyncio.sleep(0.5)
            return bool(b.pushes)
        await eventually(heard, timeout=60)
        await eventually(lambda: "listening again" in two.log_text())
        await eventually(lambda: "not a device of account" in (c.client.last_error or "")
                         or "no longer a device" in (c.client.last_error or ""))
        for d in (a, b, c):
            await d.client.close()


async def test_a_device_reconnecting_to_the_other_process_closes_its_old_socket(
        tmp_path: Path, postgres: Postgres) -> None:
    with fleet(tmp_path, postgres) as (one, two, dsn):
        acct = await registered(one.url)
        async with aiohttp.ClientSession() as http:
            a = await raw_socket(http, one.url, acct, acct.owner)
            old = await raw_socket(http, one.url, acct, acct.members[0])
            new = await raw_socket(http, two.url, acct, acct.members[0])
            assert "replaced by a newer socket" in await asyncio.wait_for(closed_with(old), 30)
            # and a signal from a device on the old socket's process reaches the new one
            await a.send_json({"t": "signal", "to": acct.members[0].device_id, "id": 1,
                               "data": base64.b64encode(b"offer").decode()})
            got = await new.receive_json(timeout=30)
            assert got["t"] == "signal" and got["from"] == acct.owner.device_id
            await a.close()
            await new.close()


def test_a_pairing_whose_two_sides_reach_different_processes_meets(
        tmp_path: Path, postgres: Postgres) -> None:
    from tests.conftest import Cli, make_sample_tree
    from tests.integration.test_pairing import Host, devices

    a = Cli(tmp_path / "home-a")
    make_sample_tree(tmp_path / "src", big=10_000)
    a("init", "--source", str(tmp_path / "src"))
    b = Cli(tmp_path / "home-b")
    with fleet(tmp_path, postgres) as (one, two, dsn):
        host = Host(a, "--mailbox", one.url.replace("http://", "ws://") + "/v1/mailbox")
        joined = b("pair", host.code, "--mailbox",
                   two.url.replace("http://", "ws://") + "/v1/mailbox", "--name", "far",
                   check=False)
        assert joined.returncode == 0, joined.stderr
        code, out, err = host.finish()
        assert code == 0 and "joined as owner" in out, err
    assert "far" in {d["name"] for d in devices(a)["devices"]}


async def test_an_invitation_for_the_fleet_works_on_any_process_once(
        tmp_path: Path, postgres: Postgres) -> None:
    from tests.adversary.test_broker_registration import register

    with fleet(tmp_path, postgres, "--invites") as (one, two, dsn):
        token = invitation(dsn)
        await register(two.url, StorageAccount(), invite=token)
        with pytest.raises(Exception, match="403 this invitation is not valid"):
            await register(one.url, StorageAccount(), invite=token)


async def test_a_second_device_on_a_code_is_refused_whichever_process_it_reaches(
        tmp_path: Path, postgres: Postgres) -> None:
    from tests.integration.test_pairing_mailbox import second_device_refused

    with fleet(tmp_path, postgres) as (one, two, dsn):
        mailbox_one = one.url.replace("http://", "ws://") + "/v1/mailbox"
        mailbox_two = two.url.replace("http://", "ws://") + "/v1/mailbox"
        await second_device_refused(mailbox_one, mailbox_two, mailbox_one)
