"""Account operations: a recovered device keeps its store's keyring object (one of its own under
the same name would differ from every peer's copy), and device names that name no device."""

from __future__ import annotations

import os
from pathlib import Path

from p2pbackup import account
from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.device import open_device
from p2pbackup.repo import replica, roster
from tests.adversary.accounts import make_owner, pair, remove


async def test_a_recovered_device_keeps_the_keyring_its_store_had(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a\n")
    a = tmp_path / "a"
    await make_owner(a, [src])
    await pair(a, tmp_path / "b", "laptop")
    code = await remove(a, "laptop")   # epoch 1: keyring/000001
    c = tmp_path / "c"
    await account.recover(c, str(a / "store"), code, "replacement")
    name = "keyring/000001"
    ours, theirs = LocalDirStore(c / "store"), LocalDirStore(a / "store")
    assert bytes(await ours.get(name)) == bytes(await theirs.get(name))
    async with open_device(a) as dev:   # what replication does with it: nothing to take
        assert not await replica.accept(dev.repo, name, bytes(await ours.get(name)))
    assert os.listdir(c / "store")


def test_an_empty_device_name_names_no_device():
    """`devices remove ""` (or a control request without a device) must not match every
    device by the empty id prefix."""
    import pytest

    from p2pbackup.errors import ConfigError
    from p2pbackup.format.membership import OWNER, Member, Membership

    only = Member("ab" * 16, b"k" * 32, "laptop", OWNER)
    m = Membership(1, b"", 0, (only,))
    for which in ("", "  "):
        with pytest.raises(ConfigError, match="name"):
            account.find_device(m, which)


async def test_a_declined_partner_pairing_leaves_no_roster_and_an_accepted_one_stores_the_one_sent(
        tmp_path: Path):
    """Nothing is stored before the user confirmed the number: the roster a partner's welcome
    carries is stored when the join is committed, the very object sent (the partner follows
    its chain from it), and not at all when the pairing is declined."""
    import secrets

    import msgpack

    from p2pbackup import grants
    from p2pbackup.crypto.identity import DeviceIdentity
    from p2pbackup.format.membership import PARTNER

    a = tmp_path / "a"
    await make_owner(a, [])
    async with open_device(a, write=True) as dev:
        invite = account.invitation(dev, PARTNER, None, 1 << 30)
        request = account.joiner_payload(DeviceIdentity.generate(), "nas", False,
                                         secrets.token_bytes(grants.TAG_KEY_SIZE))
        declined = await account.prepare_welcome(dev, invite, request)   # then: no
        assert [n async for n in dev.repo.store.list("roster/")] == []
        pending = await account.prepare_welcome(dev, invite, request)
        await account.commit_join(dev, pending)                          # yes
        sent = msgpack.unpackb(pending.welcome, raw=False)["roster"]
        # The one sent, then the one that names the new partner (a broker relays to it).
        assert sorted([n async for n in dev.repo.store.list("roster/")]) == [
            "roster/000000000001", "roster/000000000002"]
        assert bytes(await dev.repo.store.get("roster/000000000001")) == sent
        assert [e.device_id for e in (await roster.newest(dev.repo.store))[0].partners] == \
            [msgpack.unpackb(request, raw=False)["id"]]
        assert declined.welcome != pending.welcome
