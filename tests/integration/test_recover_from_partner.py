"""Recovery when every owner device is gone: the account's only other copy is at a storage
partner. A new device recovers from it (`recover --from peer:PARTNER@HOST:PORT`, as the
recovery signer, which the partner's roster names), publishes the next roster version signed
by that signer, and from then on the partner admits the new device as an owner: it reads the
account's data back and may write the owners' records there.

Library level over real aiortc sessions on loopback: the partner is the daemon's
PartnerService with its signaling endpoint, the new device runs the real `account.recover`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from p2pbackup import account
from p2pbackup.config import PeerSettings, load_config
from p2pbackup.daemon.partner import PartnerService
from p2pbackup.repo.partner_store import load_grants, refusal
from p2pbackup.device import open_device
from p2pbackup.format.membership import PARTNER
from p2pbackup.peer_fetch import PeerLocation, open_peer
from p2pbackup.repo import membership as store_membership
from tests.adversary.accounts import make_owner, snapshot
from tests.adversary.test_partner_roster import join

pytestmark = pytest.mark.timeout(180)
LOOPBACK = PeerSettings(interfaces=("lo",), direct_lane=False)


async def test_a_device_recovered_from_the_partner_is_its_owner_once_no_owner_is_left(
        tmp_path: Path):
    src = tmp_path / "docs"
    src.mkdir()
    (src / "taxes.txt").write_bytes(os.urandom(50_000))
    a = tmp_path / "a"
    code = await make_owner(a, [src])
    snap = await snapshot(a)
    async with open_device(a, write=True) as dev:
        p = await join(dev, tmp_path / "p", PARTNER)
        owner = dev.identity.device_id
        (grant,) = load_grants(tmp_path / "p")
        service = PartnerService(load_config(tmp_path / "p"), p, [grant])
        # The owner's daemon replicates everything the partner asks for.
        async for name in dev.repo.store.list(""):
            if refusal(grant, owner, name) is None:
                await service.accept(grant, owner, name, bytes(await dev.repo.store.get(name)))
    shutil.rmtree(a)   # the owner device is lost: the partner holds the only copy

    port = await service.listen("127.0.0.1")
    try:
        new = tmp_path / "new"
        got = await account.recover(new, f"peer:p@127.0.0.1:{port}", code, "replacement",
                                    peers=LOOPBACK)
        assert got.joined
        async with open_device(new) as dev:
            me = dev.identity.device_id
            # The partner took the roster the recovery signer signed: the new device is an
            # owner there (it may write the owners' records, e.g. its membership version).
            assert service.admits(me) and grant.roster.role_of(me) == "owner"
            assert refusal(grant, me, "membership/000000000004") is None
            assert {n async for n in dev.repo.store.list("roster/")} == \
                {f"roster/{grant.roster.seq:012d}"}
            # It reads the account's data back from the partner, as a device of the account.
            current, _ = await store_membership.load(dev.repo)
            store = await open_peer(PeerLocation("p", "127.0.0.1", port), p.device_id,
                                    identity=dev.identity, membership=current, tag_keys=[],
                                    peers=LOOPBACK, label="peer p")
            try:
                assert await store.has(f"snapshots/{snap}")
            finally:
                await store.close()
    finally:
        await service.close()


async def test_an_owners_daemon_names_the_recovery_signer_in_a_roster_written_before(
        tmp_path: Path):
    """A roster from before rosters named the recovery signer: the partners would refuse the
    one a recovering device signs. An owner's daemon states the devices again at start."""
    from dataclasses import replace

    from p2pbackup.daemon.main import _restate_roster
    from p2pbackup.format.roster import roster_object, roster_of
    from p2pbackup.repo import roster

    a = tmp_path / "a"
    await make_owner(a, [])
    async with open_device(a, write=True) as dev:
        await _restate_roster(dev)     # no partner, no roster: none is made
        assert await roster.newest(dev.repo.store) is None
        m, _ = await store_membership.load(dev.repo)
        old = replace(roster_of(m, 1, b"", 1), recovery_key=b"")
        await dev.repo.store.put("roster/000000000001",
                                 roster_object(old, dev.identity.device_id, dev.identity.sign))
        await _restate_roster(dev)
        r, _ = await roster.newest(dev.repo.store)
        assert r.seq == 2 and r.recovery_key == m.recovery_key != b""
        await _restate_roster(dev)     # up to date: nothing more
        assert (await roster.newest(dev.repo.store))[0].seq == 2
