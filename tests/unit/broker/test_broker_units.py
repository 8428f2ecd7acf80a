"""The broker's parts without a network (its state: test_broker_state.py): coturn's
credential formula, the flood bucket, the client's reconnection backoff; and, in this event loop, the per-account socket limit and a
client that reconnects after being cut off."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import make_mocked_request
import pytest

from p2pbackup.broker.ice import IceSettings, ice_servers, turn_credentials
from p2pbackup.broker.registration import InviteRegistration
from p2pbackup.broker.service import Broker, TokenBucket
from p2pbackup.broker.state import SqliteState
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.discovery.broker import BACKOFF_MAX, BrokerClient, backoff
from p2pbackup.protocol.store_requests import INVITE
from p2pbackup.server import invites
from p2pbackup.server.refusals import Refused
from tests.brokers import device, membership, online
from tests.eventually import eventually
from tests.servers import StorageAccount, free_port, serving

pytestmark = pytest.mark.timeout(60)
A, B, C = "a" * 32, "b" * 32, "c" * 32


def test_turn_credentials_are_coturns_rest_formula() -> None:
    user, password = turn_credentials("s3cret", B, 1_000.0, 600)
    assert user == f"1600:{B}"
    assert password == base64.b64encode(
        hmac.new(b"s3cret", user.encode(), hashlib.sha1).digest()).decode()
    assert ice_servers(IceSettings(), B, 0.0) == []     # nothing public unless configured
    assert ice_servers(IceSettings(turn_urls=("turn:x",)), B, 0.0) == []   # no secret: none


def test_the_flood_bucket_allows_bursts_then_its_rate() -> None:
    t = [0.0]
    bucket = TokenBucket(10.0, 5.0, lambda: t[0])
    assert [bucket.take() for _ in range(6)] == [True] * 5 + [False]
    t[0] += 0.1
    assert bucket.take() and not bucket.take()


def test_backoff_doubles_with_jitter_up_to_a_cap() -> None:
    assert [backoff(n, lambda: 1.0) for n in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff(3, lambda: 0.0) == 4.0                # half, at the least
    assert backoff(50, lambda: 1.0) == BACKOFF_MAX


async def test_a_client_backs_off_while_the_broker_is_away_then_connects(
        tmp_path: Path) -> None:
    acct = StorageAccount()
    port = free_port()
    waits: list[float] = []
    up = asyncio.Event()

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) >= 3:
            await up.wait()

    client = BrokerClient(f"http://127.0.0.1:{port}", acct.owner, acct.fingerprint,
                          sleep=sleep, rand=lambda: 1.0)
    client.start()
    await eventually(lambda: len(waits) >= 3)
    assert waits[:3] == [1.0, 2.0, 4.0] and "cannot reach the broker" in client.last_error
    broker = Broker(SqliteState(tmp_path / "b.sqlite"))
    runner = web.AppRunner(broker.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await client.publish_rosters([acct.roster()[1]])
        up.set()
        await asyncio.wait_for(client.connected.wait(), 30)
        assert client.last_error is None
    finally:
        await client.close()
        await runner.cleanup()


async def test_sockets_per_account_are_limited_and_the_others_still_served(
        tmp_path: Path) -> None:
    acct = StorageAccount(members=[DeviceIdentity.generate(), DeviceIdentity.generate()])
    held = [membership(acct)]
    broker = Broker(SqliteState(tmp_path / "b.sqlite"), max_connections=2)
    async with serving(broker.app()) as url:
        a, b, c = (device(url, acct, who, held) for who in (acct.owner, *acct.members))
        await a.client.publish_rosters([acct.roster()[1]])
        await online(a, b)
        c.client.start()
        await eventually(lambda: "sockets open" in (c.client.last_error or ""))
        assert await a.client.push(b"head")
        await eventually(lambda: b.pushes == [(acct.owner.device_id, b"head")])
        for d in (a, b, c):
            await d.client.close()


async def test_a_command_reaches_its_device_at_once_and_once_across_reconnections(
        tmp_path: Path) -> None:
    acct = StorageAccount(members=[DeviceIdentity.generate()])
    held = [membership(acct)]
    broker = Broker(SqliteState(tmp_path / "b.sqlite"))
    async with serving(broker.app()) as url:
        a, b = (device(url, acct, who, held) for who in (acct.owner, acct.members[0]))
        await a.client.publish_rosters([acct.roster()[1]])
        await online(a, b)
        me, other = acct.owner.device_id, acct.members[0].device_id
        first = await a.client.invoke_command(other, "sync-now", b"sealed", 600)
        await eventually(lambda: b.commands == [(first, me, "sync-now", b"sealed")])
        # The broker cuts B off; B reconnects and is sent its queued commands again (they
        # are kept until their TTL): B's callback hears the new one only.
        b.client.connected.clear()
        await broker._close(broker._accounts[acct.fingerprint].sockets[other], "cut off")
        await asyncio.wait_for(b.client.connected.wait(), 30)
        second = await a.client.invoke_command(other, "sync-now", b"again", 600)
        await eventually(lambda: any(c[0] == second for c in b.commands))
        assert b.commands == [(first, me, "sync-now", b"sealed"),
                              (second, me, "sync-now", b"again")]
        assert a.commands == []
        for d in (a, b):
            await d.client.close()


async def test_an_invitation_printed_before_the_state_held_them_registers_once(
        tmp_path: Path) -> None:
    old = invites.create(tmp_path, 3600, time.time_ns())    # a file in --data, as before
    state = SqliteState(tmp_path / "broker.sqlite")
    try:
        admission = InviteRegistration(state, tmp_path)
        request = make_mocked_request("POST", "/", headers={INVITE: old})
        assert await admission.admit(request) is None
        with pytest.raises(Refused, match="not valid"):
            await admission.admit(request)
    finally:
        await state.close()


def test_sockets_opened_together_ping_apart_and_the_broker_never_pings_a_live_device():
    """Keepalive periods: each socket draws its own (10,000 sockets opened in a burst pinged
    in one burst every 30 s, the relay's p99 went past 50 ms), and the broker's shortest
    period is longer than any device's, so a live device's pings keep the broker from
    pinging it."""
    from p2pbackup.protocol.broker_wire import BROKER_PING, DEVICE_PING, ping_period

    devices = [ping_period(DEVICE_PING, i / 100) for i in range(100)]
    assert max(devices) - min(devices) >= 15 and len(set(devices)) == 100
    assert ping_period(BROKER_PING, 0.0) > ping_period(DEVICE_PING, 0.999999)
