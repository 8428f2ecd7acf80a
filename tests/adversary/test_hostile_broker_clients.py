"""Hostile clients of a real `p2pbackup-broker` process: strangers, members writing what only
owners write, removed devices, forged, unsigned and replayed requests, malformed, oversized and
flooding sockets. Each is refused with one log line, and the broker keeps serving the others."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.discovery.broker import BrokerClient
from p2pbackup.protocol import store_requests as req
from p2pbackup.protocol.broker_wire import REQUEST_DOMAIN, socket_auth_message
from tests.brokers import closed_with, raw_socket, registered
from tests.eventually import eventually
from tests.servers import RunningBroker, StorageAccount, broker_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    # One process for the module; every test registers an account of its own.
    with broker_server(tmp_path_factory.mktemp("broker")) as b:
        yield b


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def client(broker: RunningBroker, acct: StorageAccount, who: DeviceIdentity) -> BrokerClient:
    return BrokerClient(broker.url, who, acct.fingerprint)


async def socket(http: aiohttp.ClientSession, broker: RunningBroker, acct: StorageAccount,
                 who: DeviceIdentity) -> aiohttp.ClientWebSocketResponse:
    """An authenticated socket, spoken by hand."""
    return await raw_socket(http, broker.url, acct, who)


async def pushes_still_arrive(http: aiohttp.ClientSession, broker: RunningBroker) -> None:
    """Another account's devices are served: a push goes from one to the other at once."""
    acct = await registered(broker.url)
    a = await socket(http, broker, acct, acct.owner)
    b = await socket(http, broker, acct, acct.members[0])
    await a.send_json({"t": "push", "data": base64.b64encode(b"head").decode()})
    got = await b.receive_json(timeout=30)
    assert got == {"t": "push", "from": acct.owner.device_id,
                   "data": base64.b64encode(b"head").decode()}
    await a.close()
    await b.close()


async def test_a_member_cannot_register_or_move_the_roster(broker: RunningBroker) -> None:
    acct = StorageAccount(members=[DeviceIdentity.generate()])
    member = client(broker, acct, acct.members[0])
    first = acct.roster()[1]
    with pytest.raises(Exception, match="403 only an owner device"):
        await member.publish_rosters([first])      # a member brings the owner's first roster
    owner = client(broker, acct, acct.owner)
    await owner.publish_rosters([first])
    # The next version signed by the member (not an owner of the held one): refused.
    forged = StorageAccount(acct.members[0], [acct.owner], fingerprint=acct.fingerprint,
                            rosters=list(acct.rosters))
    with pytest.raises(Exception, match="409.*not an owner|409.*signed"):
        await member.publish_rosters([forged.roster()[1]])
    skipped = StorageAccount(acct.owner, acct.members, fingerprint=acct.fingerprint,
                             rosters=list(acct.rosters) + [b"x"])
    with pytest.raises(Exception, match="409.*does not follow"):
        await owner.publish_rosters([skipped.roster()[1]])
    await owner.publish_rosters([acct.roster()[1]])    # the owner's next version is followed
    for c in (member, owner):
        await c.close()


async def test_a_removed_device_is_refused_at_rest_and_its_socket_closed(
        broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    acct = await registered(broker.url)
    gone = acct.members[0]
    ws = await socket(http, broker, acct, gone)
    acct.members = []
    owner = client(broker, acct, acct.owner)
    await owner.publish_rosters([acct.roster(removed=(gone.device_id,))[1]])
    assert "no longer a device of the account" in await closed_with(ws)
    with pytest.raises(Exception, match="403 device .* is not a device of account"):
        await client(broker, acct, gone).devices()
    again = await http.ws_connect(f"{broker.url}/v1/account/{acct.fingerprint}/ws")
    challenge = (await again.receive_json())["nonce"]
    sig = gone.sign(socket_auth_message(acct.fingerprint, gone.device_id, challenge))
    await again.send_json({"t": "auth", "device": gone.device_id,
                           "sig": base64.b64encode(sig).decode()})
    assert "is not a device of account" in await closed_with(again)
    # Nor can the owner bring back a roster that lists it again.
    acct.members = [gone]
    with pytest.raises(Exception, match="409.*re-admits a removed device"):
        await owner.publish_rosters([acct.roster()[1]])
    await owner.close()
    await eventually(lambda: f"{gone.device_id[:12]} from 127.0.0.1 refused" in
                     broker.log_text())


async def test_unsigned_forged_and_replayed_requests_are_refused(
        broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    acct = await registered(broker.url)
    path = f"v1/account/{acct.fingerprint}/devices"
    url = f"{broker.url}/{path}"
    async with http.get(url) as r:
        assert r.status == 401 and "unsigned request" in await r.text()
    stranger = DeviceIdentity.generate()
    forged = req.sign(acct.owner.device_id, stranger.sign, "GET", path, "", b"",
                      time.time(), REQUEST_DOMAIN)
    async with http.get(url, headers=forged) as r:
        assert r.status == 401 and "does not verify" in await r.text()
    # Signed for the storage server (its domain), replayed at the broker: worth nothing.
    other = req.sign(acct.owner.device_id, acct.owner.sign, "GET", path, "", b"",
                     time.time())
    async with http.get(url, headers=other) as r:
        assert r.status == 401
    good = req.sign(acct.owner.device_id, acct.owner.sign, "GET", path, "", b"",
                    time.time(), REQUEST_DOMAIN)
    async with http.get(url, headers=good) as r:
        assert r.status == 200
    async with http.get(url, headers=good) as r:
        assert r.status == 401 and "replayed" in await r.text()
    async with http.get(url, headers=req.sign(stranger.device_id, stranger.sign, "GET", path,
                                              "", b"", time.time(),
                                              REQUEST_DOMAIN)) as r:
        assert r.status == 403
    log = broker.log_text()
    assert "401 an unsigned request" in log and "401 a replayed request" in log


async def test_malformed_oversized_and_unauthenticated_sockets_are_cut_off(
        broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    acct = await registered(broker.url)
    ws = await socket(http, broker, acct, acct.owner)
    await ws.send_str("{not json")
    assert "not JSON" in await closed_with(ws)

    ws = await socket(http, broker, acct, acct.owner)
    await ws.send_json({"t": "signal", "to": acct.members[0].device_id, "id": 1,
                        "data": "A" * (200 * 1024)})
    await closed_with(ws)
    assert ws.close_code == 1009      # message too big

    ws = await socket(http, broker, acct, acct.owner)
    await ws.send_json({"t": "signal", "to": "../../etc", "id": 1, "data": ""})
    assert "not a device id" in await closed_with(ws)

    # A challenge answer captured from one connection opens no other.
    first = await http.ws_connect(f"{broker.url}/v1/account/{acct.fingerprint}/ws")
    nonce = (await first.receive_json())["nonce"]
    captured = {"t": "auth", "device": acct.owner.device_id, "sig": base64.b64encode(
        acct.owner.sign(socket_auth_message(acct.fingerprint, acct.owner.device_id,
                                            nonce))).decode()}
    second = await http.ws_connect(f"{broker.url}/v1/account/{acct.fingerprint}/ws")
    await second.receive_json()
    await second.send_json(captured)
    assert "signature does not verify" in await closed_with(second)
    await first.close()

    # A newer client's message kind is skipped, not refused.
    ws = await socket(http, broker, acct, acct.owner)
    await ws.send_json({"t": "from-the-future"})
    await ws.send_json({"t": "push", "data": ""})
    await pushes_still_arrive(http, broker)
    assert not ws.closed
    await ws.close()
    log = broker.log_text()
    for line in ("a message that is not JSON", "challenge's signature does not verify",
                 "not a device id"):
        assert log.count(line) == 1, line


async def test_a_flooding_socket_is_cut_off_while_other_devices_are_served(
        broker: RunningBroker, http: aiohttp.ClientSession) -> None:
    acct = await registered(broker.url)
    ws = await socket(http, broker, acct, acct.owner)
    for _ in range(1000):
        if ws.closed:
            break
        try:
            await ws.send_json({"t": "from-the-future"})
        except ConnectionError:
            break
    assert "a flood" in await closed_with(ws)
    await pushes_still_arrive(http, broker)
    assert broker.log_text().count("a flood") == 1


async def test_an_oversized_body_is_refused_with_one_line(broker: RunningBroker) -> None:
    acct = StorageAccount()
    owner = client(broker, acct, acct.owner)
    with pytest.raises(Exception, match="413 a body larger than"):
        await owner.publish_rosters([b"x" * (1 << 20)])
    await owner.close()
    assert broker.log_text().count("413 a body larger than") == 1
