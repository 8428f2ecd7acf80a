"""Where the daemon dials a member: on the LAN by the smaller-id rule, off it at its static
address ([peers.addresses]); a member with a static address is dialed again whenever its
session ends, whoever opened it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path

import pytest

from p2pbackup.config import StaticAddress
from p2pbackup.daemon import peers as peers_module
from p2pbackup.daemon.peers import PeerManager, PeerState
from p2pbackup.device import init_device, open_device
from p2pbackup.errors import PeerNotPaired, PeerUnreachable
from p2pbackup.format.membership import OWNER
from tests.adversary.test_partner_roster import join
from tests.eventually import eventually


@pytest.fixture
async def manager(tmp_path: Path):
    """A's PeerManager (not started) with a static address for owner B; B's device id."""
    await init_device(tmp_path / "a", [])
    async with open_device(tmp_path / "a", write=True) as a:
        await join(a, tmp_path / "b", OWNER)
        pm = PeerManager(a.config, a)
        await pm.refresh()
        b = next(m.device_id for m in pm.membership.members if m.device_id != pm.me)
        pm.config = dataclasses.replace(a.config, peers=dataclasses.replace(
            a.config.peers, addresses=(StaticAddress(b[:8], "192.0.2.7", 7890),)))
        yield pm, b


def _where(pm: PeerManager, device: str) -> list[str]:
    return [f"{r.via} {r.where}" for r in pm._routes(device)]


async def test_on_the_lan_only_the_lan_rule_dials_and_off_it_the_static_address(manager):
    pm, b = manager
    st = pm.peers.setdefault(b, PeerState(b, on_lan=True, addresses=["10.0.0.2"], port=5000))
    pm._lan_dials[b] = False            # the other device dials on the LAN: not us
    assert _where(pm, b) == []          # (dialing its public address too would race it)
    pm._lan_dials[b] = True
    assert _where(pm, b) == ["LAN 10.0.0.2:5000"]
    st.on_lan = False                   # it left the LAN
    assert _where(pm, b) == ["static address 192.0.2.7:7890"]


async def test_a_member_with_a_static_address_is_dialed_again_after_a_session_it_opened(
        manager, monkeypatch):
    pm, b = manager
    monkeypatch.setattr(peers_module, "RETRY_SECONDS", 0.01)
    dialed: list[str] = []

    async def connect(me, device, membership, signaling, **kw):
        dialed.append(f"{signaling.host}:{signaling.port}")
        raise PeerUnreachable("not reachable in this test")

    monkeypatch.setattr(peers_module.session, "connect", connect)
    # B dialed us first (say, on the LAN, before it left): we are connected when we start.
    pm.peers[b] = PeerState(b, connected=True)
    pm._dial_static()
    await asyncio.sleep(0.2)
    assert dialed == []                 # connected: nothing to dial
    pm.peers[b].connected = False       # its session ended (it left home)
    await eventually(lambda: dialed, timeout=10)
    assert dialed[0] == "192.0.2.7:7890"
    for t in pm._tasks:
        t.cancel()
        with contextlib.suppress(BaseException):
            await t


@pytest.mark.parametrize("smaller", [True, False])
async def test_off_the_lan_the_broker_is_one_more_route_for_the_smaller_id(manager, monkeypatch,
                                                                           smaller):
    from p2pbackup.discovery.broker import BrokerClient

    pm, b = manager
    # Which side dials through the broker: the smaller device id, as on the LAN.
    monkeypatch.setattr(PeerManager, "me", property(lambda self: "" if smaller else "~"))
    url = "http://127.0.0.1:9"
    pm.broker = BrokerClient(url, pm.dev.identity, pm.dev.keys.fingerprint())
    pm.peers.setdefault(b, PeerState(b))
    assert _where(pm, b) == ["static address 192.0.2.7:7890"]   # the broker is not connected
    pm.broker.connected.set()
    assert _where(pm, b) == ["static address 192.0.2.7:7890"] + \
        ([f"broker {url}"] if smaller else [])


@pytest.mark.parametrize("smaller", [True, False])
async def test_a_push_through_the_broker_is_dialed_only_by_the_smaller_id(manager, monkeypatch,
                                                                          smaller):
    from p2pbackup.discovery.broker import BrokerClient, BrokerSignaling

    pm, b = manager
    pm.config = dataclasses.replace(pm.config, peers=dataclasses.replace(
        pm.config.peers, addresses=()))
    monkeypatch.setattr(PeerManager, "me", property(lambda self: "" if smaller else "~"))
    pm.broker = BrokerClient("http://127.0.0.1:9", pm.dev.identity, pm.dev.keys.fingerprint())
    pm.broker.connected.set()
    dialed: list[str] = []

    async def connect(me, device, membership, signaling, **kw):
        assert isinstance(signaling, BrokerSignaling)
        dialed.append(device)
        raise PeerUnreachable("not reachable in this test")

    monkeypatch.setattr(peers_module.session, "connect", connect)
    await pm._pushed(b, b"")
    if smaller:
        await eventually(lambda: dialed, timeout=10)
        assert dialed == [b]
    else:   # the sender dials us (after its push): a second session would race it
        await asyncio.sleep(0.3)
        assert dialed == []
    for t in pm._tasks:
        t.cancel()
        with contextlib.suppress(BaseException):
            await t


async def test_a_push_while_a_refused_broker_dial_waits_is_dialed_after_the_wait(manager,
                                                                                monkeypatch):
    """A dial through the broker that the peer refused waits RETRY_SECONDS before another
    (see tests/adversary/test_broker_partners.py): a push meanwhile is dialed then, not
    dropped; a dial that found the peer away from the broker waits for nothing."""
    from p2pbackup.discovery.broker import BrokerClient

    pm, b = manager
    pm.config = dataclasses.replace(pm.config, peers=dataclasses.replace(
        pm.config.peers, addresses=()))
    monkeypatch.setattr(PeerManager, "me", property(lambda self: ""))
    monkeypatch.setattr(peers_module, "RETRY_SECONDS", 0.2)
    pm.broker = BrokerClient("http://127.0.0.1:9", pm.dev.identity, pm.dev.keys.fingerprint())
    pm.broker.connected.set()
    dialed: list[str] = []

    async def connect(me, device, membership, signaling, **kw):
        dialed.append(device)
        raise PeerNotPaired(f"device {device[:12]} refused the session")

    monkeypatch.setattr(peers_module.session, "connect", connect)
    await pm._pushed(b, b"")
    await eventually(lambda: dialed, timeout=10)
    await pm._pushed(b, b"")            # while the refused dial waits
    await eventually(lambda: len(dialed) == 2, timeout=10)
    await eventually(lambda: b not in pm._dialing, timeout=10)
    assert dialed == [b, b]             # no push meanwhile: no third dial
    for t in pm._tasks:
        t.cancel()
        with contextlib.suppress(BaseException):
            await t
    # The peer was not on the broker (our offer was undeliverable): its push when it comes
    # (it says it is there) is dialed at once.
    dialed.clear()

    async def away(me, device, membership, signaling, **kw):
        dialed.append(device)
        raise PeerUnreachable(f"device {device[:12]} is not connected to the broker")

    monkeypatch.setattr(peers_module, "RETRY_SECONDS", 600.0)
    monkeypatch.setattr(peers_module.session, "connect", away)
    await pm._pushed(b, b"")
    await eventually(lambda: dialed and b not in pm._dialing, timeout=10)
    await pm._pushed(b, b"")
    await eventually(lambda: len(dialed) == 2, timeout=10)
    for t in pm._tasks:
        t.cancel()
        with contextlib.suppress(BaseException):
            await t
