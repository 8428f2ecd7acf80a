"""The ICE servers a daemon with a broker uses (discovery/broker.BrokerIce): the broker's first,
then the configured ones; fetched again at half the TURN credentials' lifetime; the configured
alone while the broker is away."""

from __future__ import annotations

import asyncio

from p2pbackup.discovery.broker import BrokerIce
from p2pbackup.errors import PeerUnreachable
from p2pbackup.transport.datachannel import IceConfig, IceServer

CONFIGURED = IceConfig((IceServer(("stun:own.example:3478",)),), relay_only=True,
                       host_addresses=("10.0.0.2",))


class FakeBroker:
    """The part of BrokerClient that BrokerIce uses: a connection flag and `ice()`."""

    base = "https://broker.example"

    def __init__(self, now: list[float]) -> None:
        self.connected = asyncio.Event()
        self.now, self.fetched, self.fail = now, 0, False

    async def ice(self) -> IceConfig:
        self.fetched += 1
        if self.fail:
            raise PeerUnreachable("cannot reach the broker")
        expiry = int(self.now[0]) + 600
        return IceConfig((IceServer(("turn:broker.example:3478",), f"{expiry}:dev",
                                    f"cred{self.fetched}"),))


async def test_broker_servers_come_first_and_are_fetched_again_at_half_their_lifetime():
    now = [1_000_000.0]
    broker = FakeBroker(now)
    ice = BrokerIce(broker, CONFIGURED, now=lambda: now[0])   # type: ignore[arg-type]
    assert await ice.current() == CONFIGURED        # not connected: the configured servers
    assert broker.fetched == 0
    broker.connected.set()
    got = await ice.current()
    assert [s.urls[0] for s in got.servers] == ["turn:broker.example:3478",
                                                 "stun:own.example:3478"]
    assert got.relay_only and got.host_addresses == ("10.0.0.2",)
    now[0] += 200
    assert (await ice.current()).servers[0].credential == "cred1"   # still fresh: kept
    now[0] += 150                                   # past half of 600 s
    assert (await ice.current()).servers[0].credential == "cred2"
    now[0] += 400
    broker.fail = True
    assert await ice.current() == CONFIGURED        # the broker failed: no stale credential


def test_a_brokers_mailbox_names_the_broker_and_another_mailbox_none():
    from p2pbackup.discovery.broker import broker_of_mailbox

    assert broker_of_mailbox("wss://broker.example:8444/v1/mailbox") == \
        "https://broker.example:8444"
    assert broker_of_mailbox("ws://127.0.0.1:9/v1/mailbox/") == "http://127.0.0.1:9"
    assert broker_of_mailbox("ws://relay.magic-wormhole.io:4000/v1") is None
