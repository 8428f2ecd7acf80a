"""A hostile broker: it swaps the DTLS fingerprint in a relayed offer or answer, replays an offer
it relayed before, and injects an offer a removed device signed. The broker is untrusted; the
peer's own checks (session.OfferAnswerer, session.connect) refuse each, and no channel opens."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from p2pbackup import session
from p2pbackup.broker.service import Broker, Connection
from p2pbackup.broker.state import SqliteState
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.discovery.broker import BrokerSignaling
from p2pbackup.errors import PeerNotPaired
from p2pbackup.format.records import Signed
from p2pbackup.format.signaling import OFFER, SessionDescription, sign_description
from tests.brokers import LOOPBACK, device, membership, online
from tests.eventually import eventually
from tests.servers import StorageAccount, serving

pytestmark = pytest.mark.timeout(120)


class HostileBroker(Broker):
    """A broker that passes every relayed signal through `tamper` and keeps what it relayed."""

    tamper: Callable[[dict[str, Any]], dict[str, Any]] = staticmethod(lambda doc: doc)
    relayed: list[dict[str, Any]]

    async def _handle(self, conn: Connection, doc: dict[str, Any]) -> None:
        if doc.get("t") == "signal":
            self.relayed.append(dict(doc, sender=conn.device))
            doc = self.tamper(doc)
        await super()._handle(conn, doc)

    async def inject(self, account: str, to: str, sender: str, data: bytes) -> None:
        """Deliver `data` to `to` as a signal from `sender`, whoever that is."""
        await self._accounts[account].sockets[to].send(
            {"t": "signal", "from": sender, "id": 999, "data": base64.b64encode(data).decode()})


def swap_fingerprint(doc: dict[str, Any]) -> dict[str, Any]:
    """The signed description with another DTLS fingerprint in its SDP (the signature kept:
    the broker has no device key to sign again)."""
    signed = Signed.decode(base64.b64decode(doc["data"]), "x")
    desc = SessionDescription.decode(signed.body)
    sdp = re.sub(r"(a=fingerprint:sha-256 )[0-9A-F:]+", r"\g<1>" + ":".join(["AB"] * 32),
                 desc.sdp)
    assert sdp != desc.sdp
    forged = SessionDescription(desc.kind, desc.sender, desc.recipient, sdp, desc.time_ns,
                                desc.nonce, desc.reply_to)
    raw = Signed(forged.encode(), signed.device, signed.signature, signed.type,
                 signed.version).encode()
    return dict(doc, data=base64.b64encode(raw).decode())


@pytest.fixture
async def hostile(tmp_path: Path):
    broker = HostileBroker(SqliteState(tmp_path / "broker.sqlite"))
    broker.relayed = []
    async with serving(broker.app()) as url:
        yield broker, url


async def pair_online(url: str, acct: StorageAccount, held: list):
    a = device(url, acct, acct.owner, held)
    b = device(url, acct, acct.members[0], held)
    await a.client.publish_rosters([acct.roster()[1]])
    await online(a, b)
    return a, b


async def test_a_swapped_fingerprint_in_an_offer_is_refused_by_the_peer(hostile) -> None:
    broker, url = hostile
    acct = StorageAccount(members=[DeviceIdentity.generate()])
    held = [membership(acct)]
    a, b = await pair_online(url, acct, held)
    broker.tamper = lambda doc: swap_fingerprint(doc) if "re" not in doc else doc
    with pytest.raises(PeerNotPaired, match="bad signature"):
        await session.connect(acct.owner, b.identity.device_id, held[0],
                              BrokerSignaling(a.client, b.identity.device_id), ice=LOOPBACK)
    assert any("bad signature" in r for r in b.refused) and not b.links
    for d in (a, b):
        await d.client.close()


async def test_a_swapped_fingerprint_in_an_answer_is_refused_by_the_offerer(hostile) -> None:
    broker, url = hostile
    acct = StorageAccount(members=[DeviceIdentity.generate()])
    held = [membership(acct)]
    a, b = await pair_online(url, acct, held)
    broker.tamper = lambda doc: swap_fingerprint(doc) if "re" in doc else doc
    with pytest.raises(PeerNotPaired, match="bad signature"):
        await session.connect(acct.owner, b.identity.device_id, held[0],
                              BrokerSignaling(a.client, b.identity.device_id), ice=LOOPBACK)
    for d in (a, b):
        await d.client.close()


async def test_a_replayed_offer_is_refused_by_the_peer(hostile) -> None:
    broker, url = hostile
    acct = StorageAccount(members=[DeviceIdentity.generate()])
    held = [membership(acct)]
    a, b = await pair_online(url, acct, held)
    link = await session.connect(acct.owner, b.identity.device_id, held[0],
                                 BrokerSignaling(a.client, b.identity.device_id), ice=LOOPBACK)
    await eventually(lambda: len(b.links) == 1)
    offer = next(d for d in broker.relayed if "re" not in d)
    await broker.inject(acct.fingerprint, b.identity.device_id, acct.owner.device_id,
                        base64.b64decode(offer["data"]))
    await eventually(lambda: any("replayed" in r for r in b.refused))
    assert len(b.links) == 1
    await link.close()
    await b.links[0][1].close()
    for d in (a, b):
        await d.client.close()


async def test_an_offer_injected_from_a_removed_device_is_refused_by_the_peer(hostile) -> None:
    broker, url = hostile
    gone = DeviceIdentity.generate()
    acct = StorageAccount(members=[DeviceIdentity.generate(), gone])
    held = [membership(acct, removed=(gone,))]     # B's membership: `gone` was removed
    a, b = await pair_online(url, acct, held)
    # The removed device still holds its key and signs an offer; the broker delivers it.
    offer = sign_description(SessionDescription(OFFER, gone.device_id, b.identity.device_id,
                                                "v=0\r\n", time.time_ns(), b"\x01" * 16),
                             gone.sign)
    await broker.inject(acct.fingerprint, b.identity.device_id, gone.device_id, offer)
    await eventually(lambda: any("removed from the account" in r for r in b.refused))
    assert not b.links
    for d in (a, b):
        await d.client.close()
