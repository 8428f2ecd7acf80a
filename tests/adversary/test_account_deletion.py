"""Account deletion (`p2pbackup account delete`): the keepers of an account's objects (the
storage server, a storage partner) forget it on an account-deletion record signed by an owner
the roster names now, made for that account, after the account came there; any other is
refused and the account stays."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from p2pbackup import account as account_ops
from p2pbackup import grants
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.errors import IntegrityError, NotFound, PeerNotPaired
from p2pbackup.format.removal import Removal, removal_name, removal_object

from ..servers import RunningServer, StorageAccount, storage_server
from .test_partner_roster import roster_reaches_partner, world  # noqa: F401 (a fixture)

pytestmark = pytest.mark.timeout(120)


def deletion(signer: DeviceIdentity, account: str, time_ns: int | None = None
             ) -> tuple[str, bytes]:
    """An account-deletion record (name, object), as `account delete` makes it."""
    data = removal_object(Removal(signer.device_id, time_ns or time.time_ns(), (), account),
                          signer.sign)
    return removal_name(data), data


# -- at the storage server ---------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with storage_server(tmp_path_factory.mktemp("server"), "--open-registration") as s:
        yield s


async def registered(server: RunningServer, account: StorageAccount) -> StorageAccount:
    """`account` registered on `server` (its newest roster)."""
    store = account.store(server)
    await store.put(*account.roster())
    await store.close()
    return account


async def names_held(server: RunningServer, account: StorageAccount) -> list[str]:
    store = account.store(server)
    try:
        return [n async for n in store.list("")]
    finally:
        await store.close()


async def put_as(server: RunningServer, account: StorageAccount, device: DeviceIdentity,
                 name: str, data: bytes) -> None:
    store = account.store(server, device)
    try:
        await store.put(name, data)
    finally:
        await store.close()


async def test_the_server_refuses_an_account_deletion_signed_by_a_member(
        server: RunningServer) -> None:
    member = DeviceIdentity.generate()
    account = await registered(server, StorageAccount(members=[member]))
    with pytest.raises(IntegrityError, match="which is not an owner device of the account"):
        await put_as(server, account, member, *deletion(member, account.fingerprint))
    assert await names_held(server, account)    # the roster: the account is still there


async def test_the_server_refuses_an_account_deletion_signed_by_a_removed_device(
        server: RunningServer) -> None:
    gone, member = DeviceIdentity.generate(), DeviceIdentity.generate()
    account = await registered(server, StorageAccount(members=[gone, member]))
    account.members.remove(gone)
    await put_as(server, account, account.owner, *account.roster(removed=(gone.device_id,)))
    record = deletion(gone, account.fingerprint)
    with pytest.raises(PeerNotPaired, match="is not a device of account"):
        await put_as(server, account, gone, *record)
    with pytest.raises(IntegrityError, match="not an owner device"):   # brought by another
        await put_as(server, account, member, *record)
    assert await names_held(server, account)


async def test_the_server_refuses_an_account_deletion_replayed_to_another_account(
        server: RunningServer) -> None:
    # The one owner device of two accounts: its key is valid in both.
    a = await registered(server, StorageAccount())
    b = await registered(server, StorageAccount(owner=a.owner))
    record = deletion(a.owner, a.fingerprint)
    with pytest.raises(IntegrityError, match=f"deletes account {a.fingerprint}, not "
                                             f"{b.fingerprint}"):
        await put_as(server, b, b.owner, *record)
    assert await names_held(server, b)
    await put_as(server, a, a.owner, *record)     # ... and it deletes the account it names
    with pytest.raises(NotFound, match="is not registered on this server"):
        await names_held(server, a)
    assert await names_held(server, b)


async def test_the_server_refuses_a_replayed_account_deletion(server: RunningServer) -> None:
    member = DeviceIdentity.generate()
    account = await registered(server, StorageAccount(members=[member]))
    record = deletion(account.owner, account.fingerprint)
    await put_as(server, account, account.owner, *record)
    # The owner registers the account again; the recorded deletion, brought back by a
    # member, does not delete it.
    again = await registered(server, StorageAccount(owner=account.owner, members=[member],
                                                    fingerprint=account.fingerprint))
    with pytest.raises(IntegrityError, match="replayed"):
        await put_as(server, again, member, *record)
    assert await names_held(server, again)


# -- at a storage partner (its daemon's PartnerService, fed as its sessions feed it) -----------

async def test_a_partner_refuses_an_account_deletion_signed_by_a_member(world) -> None:  # noqa: F811
    a, b, s, p, service, grant = world
    with pytest.raises(IntegrityError, match="not an owner device"):
        await service.accept(grant, s.device_id, *deletion(s, grant.account))
    assert grant in service.grants and grants.read_grants(grant.home)


async def test_a_partner_refuses_an_account_deletion_signed_by_a_removed_device(world) -> None:  # noqa: F811
    a, b, s, p, service, grant = world
    await account_ops.remove_device(a, b.device_id)
    await roster_reaches_partner(a, service, grant)
    with pytest.raises(IntegrityError, match="not an owner device"):
        await service.accept(grant, a.identity.device_id, *deletion(b, grant.account))
    assert grant in service.grants and grants.read_grants(grant.home)


async def test_a_partner_refuses_an_account_deletion_for_another_account_or_replayed(world) -> None:  # noqa: F811
    a, b, s, p, service, grant = world
    me = a.identity
    with pytest.raises(IntegrityError, match="not " + grant.account):
        await service.accept(grant, me.device_id, *deletion(me, "0123456789abcdef"))
    before = grants.since_ns(grant.file) - 1     # made before this grant: a recording
    with pytest.raises(IntegrityError, match="replayed"):
        await service.accept(grant, me.device_id, *deletion(me, grant.account, before))
    assert grant in service.grants and grants.read_grants(grant.home)


async def test_a_partner_forgets_the_account_on_its_owners_deletion(world) -> None:  # noqa: F811
    a, b, s, p, service, grant = world
    where = grants.account_dir(grant.home, grant.account)
    name, data = deletion(a.identity, grant.account)
    await service.accept(grant, a.identity.device_id, name, data)
    assert grant not in service.grants and grants.read_grants(grant.home) == []
    assert not where.exists()
    assert not service.admits(a.identity.device_id)
