"""The storage server's client store against a real `p2pbackup-server` process over TLS."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import blake3
import pytest

from p2pbackup.blobs import StoreSigner, open_store
from p2pbackup.blobs.server import ServerStore
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.errors import ConfigError, NameMismatch, StorageError

from ..servers import RunningServer, StorageAccount, storage_server
from .conformance import BlobStoreConformance

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # One process for the module; every test registers an account of its own.
    with storage_server(tmp_path_factory.mktemp("server"), "--open-registration") as s:
        yield s


class TestServerStore(BlobStoreConformance):
    @pytest.fixture
    def account(self) -> StorageAccount:
        return StorageAccount()

    @pytest.fixture
    def device_id(self, account: StorageAccount) -> str:
        return account.owner.device_id

    @pytest.fixture
    async def store(self, server: RunningServer, account: StorageAccount
                    ) -> AsyncIterator[ServerStore]:
        store = account.store(server)
        await store.put(*account.roster())     # registers the account
        yield store
        await store.close()


async def test_an_invitation_registers_one_account_once(tmp_path: Path) -> None:
    with storage_server(tmp_path) as server:
        token = server.invite()
        first, second = StorageAccount(), StorageAccount()
        store = first.store(server, invite=token)
        await store.put(*first.roster())
        await store.put("config", b"sealed config")
        assert await store.get("config") == b"sealed config"
        other = second.store(server, invite=token)       # the token is spent
        with pytest.raises(StorageError, match="invitation is not valid"):
            await other.put(*second.roster())
        with pytest.raises(StorageError, match="not registered on this server"):
            await other.put("config", b"x")
        await store.close()
        await other.close()


def test_plain_http_is_refused_except_to_a_loopback_address() -> None:
    signer = StoreSigner(DeviceIdentity.generate(), "00" * 8)
    with pytest.raises(ConfigError, match="plain http:// only to a loopback address"):
        open_store("http://backup.example.org/", signer=signer)
    assert isinstance(open_store("http://127.0.0.1:8080/", signer=signer), ServerStore)
    assert isinstance(open_store("http://[::1]:8080/", signer=signer), ServerStore)


def test_the_server_store_needs_a_signer_and_known_options() -> None:
    with pytest.raises(ConfigError, match="every request to it is signed by a device"):
        open_store("https://backup.example.org/")
    with pytest.raises(ConfigError, match="unknown option 'password'"):
        open_store("https://backup.example.org/", options={"password": "x"},
                   signer=StoreSigner(DeviceIdentity.generate(), "00" * 8))


async def test_a_certificate_nobody_vouched_for_is_refused_in_one_line(
        server: RunningServer, tmp_path: Path) -> None:
    account = StorageAccount()
    store = account.store(server, ca_file=None)
    with pytest.raises(StorageError, match="TLS certificate is not trusted"):
        await store.put(*account.roster())
    await store.close()
    store = account.store(server, ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="ca_file .* is not a readable PEM certificate"):
        await store.put(*account.roster())
    await store.close()


async def test_a_wrong_object_from_the_server_is_refused(server: RunningServer) -> None:
    account = StorageAccount()
    store = account.store(server)
    await store.put(*account.roster())
    data = b"snapshot bytes"
    name = "snapshots/" + blake3.blake3(data).hexdigest()
    await store.put(name, data)
    # The server's disk (or the server) swaps the object's bytes.
    held = server.data / "partners" / account.fingerprint / "store" / name
    held.write_bytes(b"something else")
    with pytest.raises(NameMismatch, match=f"store {server.location} returned a wrong object"):
        await store.get(name)
    await store.close()


async def test_the_server_keeps_objects_in_the_store_storage_names(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"    # any location open_store opens (s3://... too)
    with storage_server(tmp_path, "--open-registration", "--storage", str(elsewhere)) as server:
        account = StorageAccount()
        store = account.store(server)
        await store.put(*account.roster())
        name = "snapshots/" + blake3.blake3(b"snap").hexdigest()
        await store.put(name, b"snap")
        await store.put("heads/" + account.owner.device_id, b"head")   # its notes: in --data
        assert (elsewhere / account.fingerprint / name).read_bytes() == b"snap"
        assert [n async for n in store.list("snapshots/")] == [name]
        await store.close()
