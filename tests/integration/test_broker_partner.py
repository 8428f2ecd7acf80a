"""A storage partner off the LAN, reached through the broker: an owner daemon and a partner
daemon (a home with no account of its own) that share no LAN and no static address, both with
`[broker] url`, replicate through one real `p2pbackup-broker`. The owner's status shows the
partner connected over a session the broker signaled; the partner holds the owner's objects,
says so in its own status, and serves them back (`verify --read-data --from peer:`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

import pytest

from p2pbackup.device import open_device
from p2pbackup.format.membership import PARTNER
from tests.adversary.test_partner_roster import join
from tests.conftest import Cli
from tests.eventually import eventually_sync
from tests.integration.test_broker_daemons import status, through_broker
from tests.integration.test_daemon import Daemon
from tests.servers import broker_server

pytestmark = pytest.mark.timeout(240)


async def pair_partner(owner: Path, partner: Path) -> str:
    async with open_device(owner, write=True) as dev:
        return (await join(dev, partner, PARTNER)).device_id


def objects(store: Path) -> set[str]:
    return {str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()
            and p.relative_to(store).parts[0] in ("packs", "snapshots", "heads", "membership")}


def test_a_partner_off_the_lan_is_reached_and_replicated_to_through_the_broker(
        tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("kept by a friend\n")
    a, p = Cli(tmp_path / "a"), Cli(tmp_path / "friends-nas")
    a("init", "--source", str(src))
    partner_id = asyncio.run(pair_partner(a.home, p.home))
    account = next((p.home / "partners").glob("*.grant")).stem
    kept = p.home / "partners" / account / "store"
    with broker_server(tmp_path / "broker") as broker, contextlib.ExitStack() as stack:
        daemons = []
        for c in (a, p):
            through_broker(c, broker.url)
            (tmp_path / f"d-{c.home.name}").mkdir()
            d = Daemon(c, tmp_path / f"d-{c.home.name}")
            stack.callback(d.stop)
            daemons.append(d)
        for d in daemons:
            d.wait_for("READY=1", 60)

        def partner_peer() -> dict:
            return next((x for x in status(a)["peers"] if x["device"] == partner_id), {})
        eventually_sync(lambda: partner_peer().get("connected"), 90)
        # (the partner said so with a push when its socket came up: queued, or at once)
        eventually_sync(lambda: f"storage partner {partner_id[:12]} is on the broker" in
                        (tmp_path / "d-a" / "daemon.log").read_text(errors="replace"), 60)
        assert partner_peer()["signaled"] == "broker"
        assert "signaled through the broker" in a("status").stdout
        # The owner's first snapshot reaches the partner over that session.
        eventually_sync(lambda: any(n.startswith("snapshots/") for n in objects(kept)), 90)
        mine = objects(a.home / "store")
        eventually_sync(lambda: mine <= objects(kept), 90)
        held = json.loads(p("status", "--json").stdout)["partner_for"]
        assert held[0]["account"] == account and held[0]["used"] > 0
        assert held[0]["broker"]["connected"]
        assert f"broker {broker.url} for it: connected" in p("status").stdout
        eventually_sync(lambda: (partner_peer().get("held_objects") or 0) > 0, 60)
        # With the owner's daemon stopped (the CLI takes its broker socket), the owner reads
        # its data back from the partner through the broker (LAN off: no other way).
        daemons[0].stop()
        stack.pop_all()
        stack.callback(daemons[1].stop)
        got = a("verify", "--read-data", "--from", "peer:friends-nas")
        assert "no problems found" in got.stdout, got.stdout + got.stderr
        assert f"account {account} follows roster" in broker.log_text() or \
            f"account {account} registered" in broker.log_text()


async def test_a_partner_closes_its_broker_socket_for_an_account_it_forgot(tmp_path: Path):
    """An owner deleted the account at the partner (grant and data gone): the partner's socket
    for that account goes too, at its next removal round, so it is not online there for the
    broker nor answers offers it would refuse anyway."""
    from p2pbackup.config import set_broker
    from p2pbackup.daemon.partner import PartnerService
    from p2pbackup.discovery.broker import BrokerClient
    from p2pbackup.repo import roster
    from p2pbackup.repo.partner_store import load_grants
    from tests.adversary.accounts import make_owner
    from tests.eventually import eventually

    await make_owner(tmp_path / "a", [])
    partner_home = tmp_path / "friends-nas"
    with broker_server(tmp_path / "broker") as broker:
        async with open_device(tmp_path / "a", write=True) as dev:
            me = await join(dev, partner_home, PARTNER)
            owner = BrokerClient(broker.url, dev.identity, dev.keys.fingerprint())
            await owner.publish_rosters([(await roster.newest(dev.repo.store))[1]])
            await owner.close()
        with open(partner_home / "config.toml", "a") as f:
            f.write("\n[peers]\nlan = false\nremoval_grace = 2\n")
        (grant,) = load_grants(partner_home)
        service = PartnerService(set_broker(partner_home, broker.url), me, [grant])
        await service.start()
        try:
            client = service.brokers[grant.account]
            await eventually(client.connected.is_set)
            await service._forget(grant, bringer="")   # as an owner's account deletion does
            await eventually(lambda: not client.connected.is_set() and not service.brokers)
            assert f"socket {me.device_id[:12]}" not in broker.log_text()   # closed, not refused
        finally:
            await service.close()
