"""Two devices and a real `p2pbackup-broker` process on 127.0.0.1: a real aiortc session opened
through broker signaling, pushes delivered at once and (collapsed) on reconnect, and TURN
credentials in coturn's REST scheme."""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pbackup import session
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.discovery.broker import BrokerClient, BrokerSignaling
from p2pbackup.transport.datachannel import IceConfig
from tests.brokers import LOOPBACK, device, echoed, membership, online
from tests.eventually import eventually
from tests.servers import StorageAccount, broker_server, free_port, running

pytestmark = pytest.mark.timeout(180)


async def test_a_session_opens_through_the_broker_and_pushes_reach_the_peer(
        tmp_path: Path) -> None:
    acct = StorageAccount(members=[DeviceIdentity.generate()])
    held = [membership(acct)]
    with broker_server(tmp_path) as broker:
        a = device(broker.url, acct, acct.owner, held)
        b = device(broker.url, acct, acct.members[0], held)
        await a.client.publish_rosters([acct.roster()[1]])
        await a.client.register_device(b"sealed name")
        await online(a, b)
        listed = {d["id"]: d for d in await b.client.devices()}
        assert listed[acct.owner.device_id]["connected"] and \
            base64.b64decode(listed[acct.owner.device_id]["info"]) == b"sealed name"

        assert await echoed(a, b, held[0], b"ping") == b"ping"

        assert await a.client.push(b"head 1")
        await eventually(lambda: b.pushes == [(acct.owner.device_id, b"head 1")])

        # B goes away; A seals twice: B hears the newer only, when it comes back.
        await b.client.close()
        await eventually(lambda: not b.client.connected.is_set())
        # (notify, the REST twin of a socket push, answers once the push is queued)
        assert await a.client.notify(b"head 2") == {"delivered": 0, "queued": 1}
        assert await a.client.notify(b"head 3") == {"delivered": 0, "queued": 1}
        b2 = device(broker.url, acct, acct.members[0], held)
        await online(b2)
        await eventually(lambda: b2.pushes == [(acct.owner.device_id, b"head 3")])
        for c in (a.client, b2.client):
            await c.close()


async def test_an_offer_to_a_device_not_connected_fails_at_once(tmp_path: Path) -> None:
    acct = StorageAccount(members=[DeviceIdentity.generate()])
    held = [membership(acct)]
    with broker_server(tmp_path) as broker:
        a = device(broker.url, acct, acct.owner, held)
        await a.client.publish_rosters([acct.roster()[1]])
        await online(a)
        with pytest.raises(session.PeerUnreachable, match="not connected to the broker"):
            await session.connect(acct.owner, acct.members[0].device_id, held[0],
                                  BrokerSignaling(a.client, acct.members[0].device_id),
                                  ice=LOOPBACK)
        await a.client.close()


def coturn_password(secret: str, username: str) -> str:
    """coturn's REST password, computed by openssl (another implementation than ours):
    base64(HMAC-SHA1(secret, username))."""
    mac = subprocess.run(["openssl", "dgst", "-sha1", "-hmac", secret, "-binary"],
                         input=username.encode(), capture_output=True, check=True).stdout
    return base64.b64encode(mac).decode()


async def test_turn_credentials_follow_coturns_rest_scheme(tmp_path: Path) -> None:
    acct = StorageAccount()
    (tmp_path / "secret").write_text("north-wind\n")
    with broker_server(tmp_path, "--turn-url", "turn:127.0.0.1:3478",
                       "--stun-url", "stun:127.0.0.1:3478",
                       "--turn-secret-file", str(tmp_path / "secret"),
                       "--turn-ttl", "600") as broker:
        c = BrokerClient(broker.url, acct.owner, acct.fingerprint)
        await c.publish_rosters([acct.roster()[1]])
        ice = await c.ice()
        await c.close()
    stun, turn = ice.servers
    assert stun.urls == ("stun:127.0.0.1:3478",) and stun.username is None
    assert turn.urls == ("turn:127.0.0.1:3478",)
    expiry, _, user = turn.username.partition(":")
    assert user == acct.owner.device_id
    assert 0 < int(expiry) - time.time() <= 600
    assert turn.credential == coturn_password("north-wind", turn.username)


async def test_no_ice_server_is_named_unless_configured(tmp_path: Path) -> None:
    acct = StorageAccount()
    with broker_server(tmp_path) as broker:
        c = BrokerClient(broker.url, acct.owner, acct.fingerprint)
        await c.publish_rosters([acct.roster()[1]])
        assert (await c.ice()).servers == ()
        await c.close()


@pytest.mark.parametrize("args, says", [
    (["--listen", "nowhere"], "--listen 'nowhere': give HOST:PORT"),
    (["--turn-url", "turn:127.0.0.1:3478"], "--turn-url needs the TURN server's shared secret"),
    (["--turn-secret-file", "/nonexistent"], "cannot read --turn-secret-file /nonexistent"),
    (["--turn-ttl", "5"], "--turn-ttl 5: give 60 to"),
    (["--database", "mysql://x/y"], "--database mysql://x/y: give a postgresql:// URL"),
    (["--database", "postgresql://nobody:s3cret@/none?host=/nonexistent"],
     "cannot reach the broker's database postgresql://nobody:…@/none"),
])
def test_broker_usage_errors_are_one_line_with_exit_10(tmp_path: Path, args: list[str],
                                                       says: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "p2pbackup.broker.main", "--data",
                           str(tmp_path / "data"), *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 10, proc.stderr
    assert proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr
    assert "s3cret" not in proc.stderr         # a database password is never shown


async def test_a_real_coturn_relays_with_the_brokers_credentials(tmp_path: Path) -> None:
    """coturn with use-auth-secret takes the broker's credentials: a relay-only session
    opens through it (a wrong password would get no relay candidate, and no session)."""
    turnserver = shutil.which("turnserver")
    if turnserver is None:
        pytest.skip("coturn's turnserver is not installed (apt-get install coturn)")
    port = free_port()
    argv = [turnserver, "-n", "--log-file", "stdout", "--listening-ip", "127.0.0.1",
            "--listening-port", str(port), "--relay-ip", "127.0.0.1", "--use-auth-secret",
            "--static-auth-secret", "north-wind", "--realm", "p2pbackup.test", "--no-tls",
            "--no-dtls", "--no-cli", "--allow-loopback-peers", "--fingerprint", "--verbose",
            "--pidfile", str(tmp_path / "turnserver.pid"), "--userdb", str(tmp_path / "turndb")]
    acct = StorageAccount(members=[DeviceIdentity.generate()])
    held = [membership(acct)]
    (tmp_path / "secret").write_text("north-wind")
    with running(argv, tmp_path / "turnserver.log", port), \
            broker_server(tmp_path / "broker", "--turn-url", f"turn:127.0.0.1:{port}",
                          "--turn-secret-file", str(tmp_path / "secret")) as broker:
        a = device(broker.url, acct, acct.owner, held)
        b = device(broker.url, acct, acct.members[0], held)
        await a.client.publish_rosters([acct.roster()[1]])
        await online(a, b)
        ice = await a.client.ice(host_addresses=("127.0.0.1",))
        relay = IceConfig(ice.servers, relay_only=True, host_addresses=("127.0.0.1",))
        assert await echoed(a, b, held[0], b"through the relay", relay) == \
            b"through the relay"
        for d in (a, b):
            await d.client.close()


async def test_a_command_invoked_on_a_device_is_listed_for_it_until_its_ttl(
        tmp_path: Path) -> None:
    acct = StorageAccount(members=[DeviceIdentity.generate()])
    with broker_server(tmp_path) as broker:
        a = BrokerClient(broker.url, acct.owner, acct.fingerprint)
        b = BrokerClient(broker.url, acct.members[0], acct.fingerprint)
        await a.publish_rosters([acct.roster()[1]])
        first = await a.invoke_command(acct.members[0].device_id, "sync-now", b"sealed", 600)
        second = await a.invoke_command(acct.members[0].device_id, "sync-now", b"again", 600)
        assert await b.commands() == [(first, acct.owner.device_id, "sync-now", b"sealed"),
                                      (second, acct.owner.device_id, "sync-now", b"again")]
        assert [c[0] for c in await b.commands(after=first)] == [second]
        assert await a.commands() == []
        with pytest.raises(session.RemoteProtocolError, match="400 `target` is not a device"):
            await a.invoke_command(DeviceIdentity.generate().device_id, "x", b"")
        for c in (a, b):
            await c.close()


async def test_the_broker_serves_the_pairing_mailbox(tmp_path: Path) -> None:
    import aiohttp

    with broker_server(tmp_path) as broker:
        async with aiohttp.ClientSession() as http, \
                http.ws_connect(f"{broker.url}/v1/mailbox") as ws:
            assert (await ws.receive_json(timeout=30))["type"] == "welcome"
