"""A storage partner reached through the broker: the broker relays an offer to partner P only
within an account whose owner-signed roster names P, and only to the socket P opened itself for
that account (P does so for the accounts whose grant it holds). A stranger account, an account
that removed P, a removed member, and another partner of the same account are refused, each
with one log line on the broker. A real `p2pbackup-broker` process, real aiortc sessions on
loopback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from p2pbackup import session
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.discovery.broker import BrokerSignaling
from p2pbackup.errors import PeerNotPaired, PeerUnreachable, RemoteProtocolError
from p2pbackup.format.membership import PARTNER, Member, Membership
from p2pbackup.protocol.broker_wire import socket_auth_message
from tests.brokers import (LOOPBACK, Device, closed_with, device, echoed, membership,
                           online, raw_socket)
from tests.eventually import eventually
from tests.servers import Postgres, StorageAccount, broker_server

pytestmark = pytest.mark.timeout(180)


def with_partners(acct: StorageAccount, removed: tuple[DeviceIdentity, ...] = ()) -> Membership:
    """The membership the account's devices hold, its partners listed as partners."""
    m = membership(acct, removed)
    gone = {r.device_id for r in removed}
    return Membership(1, b"", 0, m.members + tuple(
        Member(p.device_id, p.public_key, "friends-nas", PARTNER) for p in acct.partners
        if p.device_id not in gone), m.removed)


async def account_naming_a_partner(url: str) -> tuple[StorageAccount, DeviceIdentity,
                                                     list[Membership], Device, Device]:
    """Account X (an owner, a member) naming partner P, its roster on the broker at `url`:
    (X, P, what X's devices hold, the owner's and P's clients, not started)."""
    p = DeviceIdentity.generate()
    x = StorageAccount(members=[DeviceIdentity.generate()], partners=[p])
    held = [with_partners(x)]
    owner, partner = device(url, x, x.owner, held), device(url, x, p, held)
    await owner.client.publish_rosters([x.roster()[1]])
    return x, p, held, owner, partner


async def socket_refusal(url: str, acct: StorageAccount, who: DeviceIdentity) -> str:
    """What the broker says when `who` answers the challenge of `acct`'s socket."""
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{url}/v1/account/{acct.fingerprint}/ws")
        nonce = (await ws.receive_json())["nonce"]
        sig = who.sign(socket_auth_message(acct.fingerprint, who.device_id, nonce))
        await ws.send_json({"t": "auth", "device": who.device_id,
                            "sig": base64.b64encode(sig).decode()})
        return await closed_with(ws)


async def refused_offer(sender, acct: StorageAccount, held: Membership, to: DeviceIdentity
                        ) -> str:
    with pytest.raises(PeerUnreachable) as e:
        await session.connect(sender.identity, to.device_id, held,
                              BrokerSignaling(sender.client, to.device_id), ice=LOOPBACK)
    return str(e.value)


async def test_only_the_account_naming_a_partner_reaches_it_and_strangers_are_refused(
        tmp_path: Path) -> None:
    p = DeviceIdentity.generate()
    x = StorageAccount(members=[DeviceIdentity.generate()], partners=[p])
    stranger = StorageAccount()
    claims = StorageAccount(partners=[p])   # a stranger that names P in its own roster
    held = [with_partners(x)]
    with broker_server(tmp_path) as broker:
        owner = device(broker.url, x, x.owner, held)
        partner = device(broker.url, x, p, held)   # answers as its grant of X allows
        s = device(broker.url, stranger, stranger.owner, [membership(stranger)])
        c_held = [with_partners(claims)]
        c = device(broker.url, claims, claims.owner, c_held)
        await owner.client.publish_rosters([x.roster()[1]])
        await s.client.publish_rosters([stranger.roster()[1]])
        await c.client.publish_rosters([claims.roster()[1]])
        await online(owner, partner, s, c)

        # X's owner reaches its partner through the broker.
        assert await echoed(owner, partner, held[0], b"ping") == b"ping"
        assert partner.links[-1][0] == x.owner.device_id
        # The partner gets ICE servers, but no list of the account's devices (nor who is on).
        await partner.client.ice()
        with pytest.raises(RemoteProtocolError, match="403"):
            await partner.client.devices()

        # A stranger account does not: P is nothing of it.
        before = len(partner.links)
        assert "not connected to the broker" in await refused_offer(
            s, stranger, with_partners(x), p)
        log = broker.log_text()
        assert f"account {stranger.fingerprint}: signal from {stranger.owner.device_id[:12]} " \
               f"to {p.device_id[:12]} refused" in log

        # A stranger naming P in its own roster finds no socket of P there: P opens sockets
        # only for the accounts whose grant it holds.
        assert "not connected to the broker" in await refused_offer(c, claims, c_held[0], p)
        # ... and P cannot be made to hold one for an account that does not name it.
        assert "is not a device of account" in await socket_refusal(broker.url, stranger, p)
        assert len(partner.links) == before
        for d in (owner, partner, s, c):
            await d.client.close()


async def test_an_account_that_removed_its_partner_no_longer_reaches_it(tmp_path: Path) -> None:
    with broker_server(tmp_path) as broker:
        x, p, held, owner, partner = await account_naming_a_partner(broker.url)
        await online(owner, partner)
        assert await echoed(owner, partner, held[0], b"ping") == b"ping"

        # The owner removes P: the broker closes its socket and refuses the owner's offers.
        await owner.client.publish_rosters([x.roster(removed=(p.device_id,))[1]])
        await eventually(lambda: f"device {p.device_id[:12]} is no longer listed" in
                         broker.log_text())
        assert "not connected to the broker" in await refused_offer(owner, x, held[0], p)
        assert f"signal from {x.owner.device_id[:12]} to {p.device_id[:12]} refused" in \
            broker.log_text()
        # P's socket for X is refused from now on.
        assert "is not a device of account" in await socket_refusal(broker.url, x, p)
        for d in (owner, partner):
            await d.client.close()


async def test_a_removed_member_and_another_partner_cannot_signal_a_partner(
        tmp_path: Path) -> None:
    p, q = DeviceIdentity.generate(), DeviceIdentity.generate()
    x = StorageAccount(members=[DeviceIdentity.generate()], partners=[p, q])
    held = [with_partners(x)]
    with broker_server(tmp_path) as broker:
        owner = device(broker.url, x, x.owner, held)
        member = device(broker.url, x, x.members[0], held)
        partner = device(broker.url, x, p, held)
        other = device(broker.url, x, q, held)
        await owner.client.publish_rosters([x.roster()[1]])
        await online(owner, member, partner, other)
        # Partners of one account are strangers to each other: the broker relays nothing.
        assert "not connected to the broker" in await refused_offer(other, x, held[0], p)
        assert f"signal from {q.device_id[:12]} to {p.device_id[:12]} refused: storage " \
               "partners do not signal each other" in broker.log_text()
        # A member removed from the account loses its socket, and with it the partner.
        gone = x.members.pop()
        await owner.client.publish_rosters([x.roster(removed=(gone.device_id,))[1]])
        await eventually(lambda: not member.client.connected.is_set())
        assert "not connected to the broker" in await refused_offer(member, x, held[0], p)
        assert not any(sender == gone.device_id for sender, _ in partner.links)
        for d in (owner, member, partner, other):
            await d.client.close()


async def test_a_partner_cannot_answer_an_offer_made_to_another_device(tmp_path: Path) -> None:
    """A hostile partner of the account answers an owner's offer to a member (offer ids are
    counted from 1: easy to guess) before the member does: the owner must wait for the
    member's answer, not take the partner's bytes (which would end the session it asked
    for, to any device, whenever the partner likes)."""
    p = DeviceIdentity.generate()
    x = StorageAccount(members=[DeviceIdentity.generate()], partners=[p])
    held = [with_partners(x)]
    with broker_server(tmp_path) as broker:
        owner = device(broker.url, x, x.owner, held)
        await owner.client.publish_rosters([x.roster()[1]])
        await online(owner)
        async with aiohttp.ClientSession() as http:
            member = await raw_socket(http, broker.url, x, x.members[0])
            partner = await raw_socket(http, broker.url, x, p)
            asked = asyncio.create_task(owner.client.relay(x.members[0].device_id, b"offer"))
            offer = await member.receive_json(timeout=30)
            assert offer["t"] == "signal" and offer["from"] == x.owner.device_id

            def answer(ws: aiohttp.ClientWebSocketResponse, data: bytes) -> Any:
                return ws.send_json({"t": "signal", "to": x.owner.device_id, "id": 1,
                                     "re": offer["id"],
                                     "data": base64.b64encode(data).decode()})
            await answer(partner, b"the partner's forged answer")
            # the owner reads its socket in order: once the partner's next push reached it,
            # so did the forged answer
            await partner.send_json({"t": "push", "data": ""})
            await eventually(lambda: owner.pushes)
            assert not asked.done(), "the owner took the partner's answer as the member's"
            await answer(member, b"the member's answer")
            assert await asyncio.wait_for(asked, 30) == b"the member's answer"
            await member.close()
            await partner.close()
        await owner.client.close()


async def test_a_partner_pushing_through_the_broker_makes_one_dial_and_log_line_per_retry_period(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A hostile partner pushes (a few bytes, 20 a second the broker allows) and refuses every
    offer: each push made the member dial it at once, a whole WebRTC offer for each (an
    amplification onto every member's CPU), and write a log line (its disk: the daemon's log
    is not rotated). Pushes while a dial through the broker it refused waits RETRY_SECONDS
    dial nothing and say nothing."""
    from p2pbackup.daemon import peers as peers_module
    from p2pbackup.daemon.peers import PeerManager
    from p2pbackup.device import init_device, open_device
    from p2pbackup.discovery.broker import BrokerClient
    from tests.adversary.test_partner_roster import join

    monkeypatch.setattr(peers_module, "RETRY_SECONDS", 600.0)
    caplog.set_level(logging.INFO, logger="p2pbackupd")
    dialed: list[str] = []

    async def connect(me, device, membership, signaling, **kw):
        dialed.append(device)
        raise PeerNotPaired("the partner refuses (a hostile one, on purpose)")

    monkeypatch.setattr(peers_module.session, "connect", connect)
    await init_device(tmp_path / "a", [])
    async with open_device(tmp_path / "a", write=True) as a:
        p = (await join(a, tmp_path / "p", PARTNER)).device_id
        pm = PeerManager(a.config, a)
        await pm.refresh()
        pm.broker = BrokerClient("http://127.0.0.1:9", pm.dev.identity, a.keys.fingerprint())
        pm.broker.connected.set()
        try:
            for _ in range(20):
                await pm._pushed(p, b"")
                await eventually(lambda: p not in pm._dialing or pm.peers[p].error, timeout=10)
                await asyncio.sleep(0)
            assert dialed == [p]
            said = [r for r in caplog.records if "is on the broker" in r.getMessage()]
            assert len(said) == 1, len(said)
        finally:
            for t in pm._tasks:
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t


async def test_a_partner_cannot_use_the_accounts_device_api(tmp_path: Path) -> None:
    """A storage partner's signature is good for its socket and ICE servers only: it cannot
    register a device record, push over REST, queue or read commands, nor move the roster,
    and a member cannot queue a command for it."""
    with broker_server(tmp_path) as broker:
        x, p, held, owner, partner = await account_naming_a_partner(broker.url)
        for call in (partner.client.register_device(b"i am a laptop"),
                     partner.client.notify(b"new data"),
                     partner.client.invoke_command(x.owner.device_id, "wipe", b""),
                     partner.client.commands(),
                     partner.client.publish_rosters([x.roster()[1]])):
            with pytest.raises(RemoteProtocolError, match="403"):
                await call
        with pytest.raises(RemoteProtocolError, match="400 `target` is not a device"):
            await owner.client.invoke_command(p.device_id, "sync", b"")
        for d in (owner, partner):
            await d.client.close()


async def test_a_roster_naming_a_member_also_as_a_partner_is_refused(tmp_path: Path) -> None:
    """One id as a device of the account and as its storage partner (a partner's key may
    never stand for a member, nor a member escape the rule between partners): refused at
    registration and as a later version, by the broker as by every reader of the roster."""
    m = DeviceIdentity.generate()
    with broker_server(tmp_path) as broker:
        twice = StorageAccount(members=[m], partners=[m])
        first = device(broker.url, twice, twice.owner, []).client
        with pytest.raises(RemoteProtocolError, match="422 .*lists a device twice"):
            await first.publish_rosters([twice.roster()[1]])
        await first.close()
        x = StorageAccount(members=[m])
        owner = device(broker.url, x, x.owner, [])
        await owner.client.publish_rosters([x.roster()[1]])
        x.partners = [m]
        with pytest.raises(RemoteProtocolError, match="409 .*lists a device twice"):
            await owner.client.publish_rosters([x.roster()[1]])
        await owner.client.close()


async def test_a_partner_flooding_a_member_with_signed_offers_leaves_a_few_links_unconnected(
        ) -> None:
    """A storage partner may offer members sessions (as on the LAN), and through the broker
    it reaches them from anywhere, 20 offers a second: each is signed and fresh, so each was
    answered with a new link (sockets, an ICE gathering, a TURN allocation) left waiting up to
    CONNECT_TIMEOUT for a connection the partner never makes: ~600 at once. A member keeps
    a few answered links per device that have not connected; a newer offer closes the
    oldest."""
    import os
    import time

    from p2pbackup.format.signaling import OFFER, SessionDescription, sign_description
    from p2pbackup.transport import CONNECTING
    from p2pbackup.transport.datachannel import PeerLink

    me, p = DeviceIdentity.generate(), DeviceIdentity.generate()
    held = Membership(1, b"", 0, (Member(me.device_id, me.public_key, "laptop", "owner"),
                                  Member(p.device_id, p.public_key, "nas", PARTNER)), ())
    answerer = session.OfferAnswerer(me, lambda: held, ice=LOOPBACK)
    offering: list[PeerLink] = []
    answered: list[PeerLink] = []
    try:
        for _ in range(20):
            offering.append(PeerLink(LOOPBACK))
            sdp = await offering[-1].create_offer()
            raw = sign_description(SessionDescription(OFFER, p.device_id, me.device_id, sdp,
                                                      time.time_ns(), os.urandom(16)), p.sign)
            answered.append((await answerer.accept(answerer.check(raw)))[0])
        waiting = [link for link in answered if link.state == CONNECTING]
        assert len(waiting) <= session.MAX_UNCONNECTED, len(waiting)
        assert answered[-1] in waiting     # the newest is served
    finally:
        for link in offering + answered:
            await link.close()


async def test_a_partner_removed_on_one_broker_process_loses_its_socket_on_the_other(
        tmp_path: Path, postgres: Postgres) -> None:
    """A fleet: the owner removes its partner through one process while the partner's socket
    is held by the other: that socket is closed too, and the partner cannot open another."""
    from tests.integration.test_broker_fleet import fleet

    with fleet(tmp_path, postgres) as (one, two, _):
        x, p, held, owner, _ = await account_naming_a_partner(one.url)
        partner = device(two.url, x, p, held)
        await online(owner, partner)
        assert await echoed(owner, partner, held[0], b"ping") == b"ping"
        await owner.client.publish_rosters([x.roster(removed=(p.device_id,))[1]])
        await eventually(lambda: f"device {p.device_id[:12]} is no longer listed" in
                         two.log_text())
        assert "is not a device of account" in await socket_refusal(two.url, x, p)
        for d in (owner, partner):
            await d.client.close()
