"""Account deletion at the storage server (`DELETE /v1/<account>`, sent by `p2pbackup account
delete`): only an owner of the roster in force deletes an account, and a deletion request
works once, for the account it names."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.errors import NotFound, PeerNotPaired, StorageError

from ..servers import RunningServer, StorageAccount, storage_server
from .test_hostile_server_clients import raw, signed

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with storage_server(tmp_path_factory.mktemp("server"), "--open-registration") as s:
        yield s


async def registered(server: RunningServer, account: StorageAccount) -> StorageAccount:
    """`account` registered on `server` (its newest roster), holding one object."""
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


async def test_an_account_deletion_signed_by_a_member_is_refused(server: RunningServer) -> None:
    member = DeviceIdentity.generate()
    account = await registered(server, StorageAccount(members=[member]))
    store = account.store(server, member)
    with pytest.raises(StorageError) as exc:
        await store.delete_account()
    await store.close()
    assert f"device {member.device_id[:12]} is not an owner of account " \
           f"{account.fingerprint}" in str(exc.value)
    assert await names_held(server, account)    # the roster: the account is still there


async def test_an_account_deletion_signed_by_a_removed_device_is_refused(
        server: RunningServer) -> None:
    gone = DeviceIdentity.generate()
    account = await registered(server, StorageAccount(members=[gone]))
    account.members.remove(gone)
    store = account.store(server)
    await store.put(*account.roster(removed=(gone.device_id,)))
    await store.close()
    store = account.store(server, gone)
    with pytest.raises(PeerNotPaired) as exc:
        await store.delete_account()
    await store.close()
    assert "is not a device of account" in str(exc.value)
    assert await names_held(server, account)


async def test_an_account_deletion_replayed_to_another_account_is_refused(
        server: RunningServer) -> None:
    # The one owner device of two accounts (the strongest case: its key is valid in both).
    a = await registered(server, StorageAccount())
    b = await registered(server, StorageAccount(owner=a.owner))
    headers = signed(a.owner, "DELETE", f"v1/{a.fingerprint}")
    status, line = await raw(server, "DELETE", f"v1/{b.fingerprint}", headers=headers)
    assert (status, line) == (401, "the request's signature does not verify")
    assert await names_held(server, b)
    # ... and the request is good for the account it names.
    status, _ = await raw(server, "DELETE", f"v1/{a.fingerprint}", headers=headers)
    assert status == 204
    with pytest.raises(NotFound, match="is not registered on this server"):
        await names_held(server, a)


async def test_a_replayed_account_deletion_is_refused(server: RunningServer) -> None:
    account = await registered(server, StorageAccount())
    headers = signed(account.owner, "DELETE", f"v1/{account.fingerprint}")
    status, _ = await raw(server, "DELETE", f"v1/{account.fingerprint}", headers=headers)
    assert status == 204
    # The owner registers the account again; a recording of the deletion does not delete it.
    again = StorageAccount(owner=account.owner, fingerprint=account.fingerprint)
    await registered(server, again)
    status, line = await raw(server, "DELETE", f"v1/{account.fingerprint}", headers=headers)
    assert status == 401 and "replayed" in line, line
    assert await names_held(server, again)
