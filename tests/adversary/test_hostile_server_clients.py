"""Hostile clients of the storage server: each attack is refused with its status, and the
client (or a hand-made request) gets one clear line.

One real `p2pbackup-server` process over TLS serves the module; each test registers an account
of its own. The grace-period case runs the server in-process with an injected clock.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import blake3
import pytest
import yarl
from aiohttp.test_utils import TestServer

from p2pbackup.blobs.base import ObjectExists, StoreFull
from p2pbackup.blobs.server import ServerStore
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.errors import NotFound, P2PError, PeerNotPaired, StorageError
from p2pbackup.format.removal import Removal, removal_name, removal_object
from p2pbackup.protocol import store_requests as req
from p2pbackup.server.storage import StorageServer

from ..servers import RunningServer, StorageAccount, storage_server

pytestmark = pytest.mark.timeout(120)
QUOTA = 64 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with storage_server(tmp_path_factory.mktemp("server"), "--open-registration",
                        "--quota", str(QUOTA)) as s:
        yield s


@pytest.fixture
async def account(server: RunningServer) -> AsyncIterator[StorageAccount]:
    account = StorageAccount(members=[DeviceIdentity.generate()])
    store = account.store(server)
    await store.put(*account.roster())
    await store.close()
    yield account


def one_line(exc: pytest.ExceptionInfo[P2PError], server: RunningServer) -> str:
    line = str(exc.value)
    assert "\n" not in line and line.startswith(f"store {server.location}: "), line
    return line


async def raw(server: RunningServer, method: str, path: str, *, body: bytes = b"",
              headers: dict[str, str] | None = None) -> tuple[int, str]:
    """A hand-made request (path from `v1/`): its status and the server's line."""
    ctx = ssl.create_default_context(cafile=server.ca_file)
    url = yarl.URL(server.location + path, encoded=True)    # sent as written: `..` included
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        async with s.request(method, url, data=body or None,
                             headers=headers or {}) as resp:
            return resp.status, (await resp.text()).strip()


def signed(device: DeviceIdentity, method: str, path: str, body: bytes = b"",
           now: float | None = None) -> dict[str, str]:
    return req.sign(device.device_id, device.sign, method, path, "", body,
                    time.time() if now is None else now)


async def test_an_unsigned_request_is_refused(server: RunningServer,
                                              account: StorageAccount) -> None:
    status, line = await raw(server, "GET", f"v1/{account.fingerprint}/config")
    assert status == 401 and line.startswith("an unsigned request")


async def test_a_request_signed_by_a_device_not_in_the_roster_is_refused(
        server: RunningServer, account: StorageAccount) -> None:
    stranger = account.store(server, DeviceIdentity.generate())
    with pytest.raises(PeerNotPaired) as exc:
        await stranger.get("config")
    assert "is not a device of account" in one_line(exc, server)
    await stranger.close()


async def test_a_member_device_registering_its_account_is_refused(
        server: RunningServer) -> None:
    # Only an owner registers an account (it brings the roster its partners follow), even on
    # a server open to anyone: a member sending the owner-signed roster is refused in words.
    fresh = StorageAccount(members=[DeviceIdentity.generate()])
    member = fresh.store(server, fresh.members[0])
    with pytest.raises(StorageError) as exc:
        await member.put(*fresh.roster())
    assert "only an owner device registers an account" in one_line(exc, server)
    owner = fresh.store(server)
    with pytest.raises(NotFound, match="not registered on this server"):
        await owner.get("config")
    await member.close()
    await owner.close()


async def test_a_signature_by_another_key_than_the_device_it_names_is_refused(
        server: RunningServer, account: StorageAccount) -> None:
    path = f"v1/{account.fingerprint}/config"
    headers = signed(DeviceIdentity.generate(), "GET", path)
    headers[req.DEVICE] = account.owner.device_id      # claims to be the owner
    status, line = await raw(server, "GET", path, headers=headers)
    assert (status, line) == (401, "the request's signature does not verify")


async def test_a_removed_device_is_refused(server: RunningServer,
                                           account: StorageAccount) -> None:
    member = account.members[0]
    store = account.store(server, member)
    await store.put("devices/" + member.device_id, b"its record")   # still listed: fine
    owner = account.store(server)
    account.members.clear()
    await owner.put(*account.roster(removed=(member.device_id,)))
    with pytest.raises(PeerNotPaired) as exc:
        await store.get("devices/" + member.device_id)
    assert f"device {member.device_id[:12]} is not a device of account" in one_line(exc, server)
    await store.close()
    await owner.close()


async def test_a_replayed_request_is_refused(server: RunningServer,
                                             account: StorageAccount) -> None:
    path = f"v1/{account.fingerprint}/devices/{account.owner.device_id}"
    headers = signed(account.owner, "PUT", path, b"record")
    assert (await raw(server, "PUT", path, body=b"record", headers=headers))[0] == 201
    status, line = await raw(server, "PUT", path, body=b"record", headers=headers)
    assert (status, line) == (401, "a replayed request (its nonce was used already)")


async def test_a_request_with_a_stale_timestamp_is_refused(server: RunningServer,
                                                           account: StorageAccount) -> None:
    late = ServerStore(server.location, identity=account.owner, account=account.fingerprint,
                       ca_file=server.ca_file, now=lambda: time.time() - 3600)
    with pytest.raises(StorageError) as exc:
        await late.get("config")
    assert "more than 300 s apart (check this device's clock)" in one_line(exc, server)
    await late.close()


async def test_an_object_overwritten_with_other_bytes_is_refused(
        server: RunningServer, account: StorageAccount) -> None:
    store = account.store(server)
    name = "devices/" + account.owner.device_id
    await store.put(name, b"first")
    await store.put(name, b"first")             # an upload retried: fine
    with pytest.raises(ObjectExists) as exc:
        await store.put(name, b"other")
    assert "differs from the copy already here (objects never change)" in one_line(exc, server)
    assert await store.get(name) == b"first"
    await store.close()


async def test_a_head_going_back_is_refused(server: RunningServer,
                                            account: StorageAccount) -> None:
    store = account.store(server)
    head = "heads/" + account.owner.device_id
    await store.put(head, b"head 1")
    await store.put(head, b"head 2")
    with pytest.raises(ObjectExists) as exc:
        await store.put(head, b"head 1")
    assert "goes back to a version held here before" in one_line(exc, server)
    assert await store.get(head) == b"head 2"
    await store.close()


async def test_a_head_of_another_device_is_refused(server: RunningServer,
                                                   account: StorageAccount) -> None:
    store = account.store(server, account.members[0])
    with pytest.raises(StorageError) as exc:
        await store.put("heads/" + account.owner.device_id, b"not mine")
    assert "writes heads under its id" in one_line(exc, server)
    await store.close()


async def test_a_delete_without_a_removal_record_is_refused(
        server: RunningServer, account: StorageAccount) -> None:
    store = account.store(server)
    name = "snapshots/" + blake3.blake3(b"snap").hexdigest()
    await store.put(name, b"snap")
    with pytest.raises(StorageError) as exc:
        await store.delete(name)
    assert "nothing is deleted here but what an owner's removal record lists" in \
        one_line(exc, server)
    assert await store.get(name) == b"snap"
    await store.close()


async def test_a_delete_with_a_fresh_removal_record_is_refused_until_the_grace_period(
        server: RunningServer, account: StorageAccount) -> None:
    store = account.store(server)
    name = "snapshots/" + blake3.blake3(b"snap").hexdigest()
    await store.put(name, b"snap")
    record = removal_object(Removal(account.owner.device_id, time.time_ns(), (name,)),
                            account.owner.sign)
    await store.put(removal_name(record), record)
    with pytest.raises(StorageError) as exc:
        await store.delete(name)
    assert "is kept for the grace period" in one_line(exc, server)
    assert await store.has(name)
    await store.close()


async def test_a_removal_record_signed_by_a_member_is_refused(
        server: RunningServer, account: StorageAccount) -> None:
    member = account.members[0]
    store = account.store(server, member)
    name = "snapshots/" + blake3.blake3(b"snap").hexdigest()
    record = removal_object(Removal(member.device_id, 0, (name,)), member.sign)
    with pytest.raises(P2PError) as exc:
        await store.put(removal_name(record), record)
    one_line(exc, server)
    await store.close()


@pytest.mark.parametrize("name", ["packs/../../../../etc/passwd", "..%2f..%2fgrants",
                                  "config/../../x", "heads/" + "ab" * 16 + "/../../x"])
async def test_a_name_that_is_a_path_traversal_is_refused(
        server: RunningServer, account: StorageAccount, name: str) -> None:
    path = f"v1/{account.fingerprint}/{name}"
    status, line = await raw(server, "PUT", path, body=b"x",
                             headers=signed(account.owner, "PUT", path, b"x"))
    assert status == 422 and line.endswith("is not an object name"), (status, line)
    assert not (server.data.parent / "x").exists() and not (server.data / "x").exists()
    assert not any(p.name == "grants" for p in server.data.rglob("*"))


async def test_an_object_over_the_quota_is_refused_as_the_server_being_full(
        server: RunningServer, account: StorageAccount) -> None:
    store = account.store(server)
    data = bytes(QUOTA + 1)
    with pytest.raises(StoreFull) as exc:
        await store.put("packs/" + blake3.blake3(data).hexdigest(), data)
    line = str(exc.value)
    assert "\n" not in line and line.startswith(f"The store {server.location} is full (account ")
    assert "of its 64.0 KiB on this server;" in line and exc.value.exit_code == 12
    await store.close()


async def test_what_a_removal_record_released_is_deleted_after_the_grace_period(
        tmp_path: Path) -> None:
    clock = [time.time()]
    server = StorageServer(tmp_path / "data", open_registration=True, removal_grace=3600,
                           now=lambda: clock[0])
    async with TestServer(server.app(), host="127.0.0.1") as http:
        account = StorageAccount()
        store = ServerStore(str(http.make_url("/")), identity=account.owner,
                            account=account.fingerprint, now=lambda: clock[0])
        await store.put(*account.roster())
        name = "snapshots/" + blake3.blake3(b"snap").hexdigest()
        other = "snapshots/" + blake3.blake3(b"other").hexdigest()
        await store.put(name, b"snap")
        await store.put(other, b"other")
        record = removal_object(Removal(account.owner.device_id, time.time_ns(),
                                        (name, other)), account.owner.sign)
        await store.put(removal_name(record), record)
        clock[0] += 1800
        with pytest.raises(StorageError, match="kept for the grace period"):
            await store.delete(name)
        assert await server.apply_removals() == 0
        clock[0] += 1801
        await store.delete(name)                       # the device asked
        assert await server.apply_removals() == 1      # the server's own round: `other`
        assert not await store.has(name) and not await store.has(other)
        await store.close()


async def test_the_recovery_signer_reads_but_writes_nothing_but_the_next_roster(
        server: RunningServer) -> None:
    account = StorageAccount(recovery=DeviceIdentity.generate())
    owner = account.store(server)
    await owner.put(*account.roster())
    await owner.put("config", b"sealed config")
    recovering = account.store(server, account.recovery)
    assert await recovering.get("config") == b"sealed config"
    with pytest.raises(PeerNotPaired) as exc:
        await recovering.put("devices/" + account.recovery.device_id, b"a record")
    assert "is not a device of account" in one_line(exc, server)
    await owner.close()
    await recovering.close()


async def test_a_strangers_upload_is_refused_before_its_body_is_read(
        server: RunningServer, account: StorageAccount) -> None:
    """Headers announcing 400 MiB, and no body: the answer comes without it (a stranger's
    upload costs the server no memory)."""
    name = "packs/" + "ab" * 32
    path = f"v1/{account.fingerprint}/{name}"
    headers = signed(DeviceIdentity.generate(), "PUT", path, b"")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    ctx = ssl.create_default_context(cafile=server.ca_file)
    host, port = server.location.removeprefix("https://").strip("/").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
    writer.write(f"PUT /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {400 << 20}\r\n"
                 f"{head}\r\n".encode())
    await writer.drain()
    status = await asyncio.wait_for(reader.readline(), 60)
    assert status.split()[1] == b"403"
    writer.close()
