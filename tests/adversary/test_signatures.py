"""A signature made for one kind of record must not verify as another: a hostile peer (or a
storage partner, which holds the sealed objects) re-files a genuine signed object under
another name or kind."""

from __future__ import annotations

import time
from pathlib import Path

import blake3
import pytest

from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.device import open_device
from p2pbackup.errors import IntegrityError
from p2pbackup.format.header import Kind
from p2pbackup.format.log import GENESIS, Segment
from p2pbackup.format.objects import open_object, seal_object
from p2pbackup.repo import replica
from p2pbackup.repo.logstore import LogStore

from .accounts import carry, keys_of, make_owner, pair


@pytest.fixture
async def account(tmp_path: Path):
    """Owner A with a snapshot and a two-segment log; B paired, holding A's config only."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_text("hello\n")
    a, b = tmp_path / "a", tmp_path / "b"
    await make_owner(a, [src])
    async with open_device(a, write=True) as dev:
        logs = LogStore(dev.repo)
        h1 = await logs.append(dev.identity, Segment(dev.identity.device_id, 1, GENESIS,
                                                     time.time_ns(), ()))
        await logs.append(dev.identity, Segment(dev.identity.device_id, 2, h1.segment,
                                                time.time_ns(), ()))
    await pair(a, b, "laptop")
    await carry(a, b, "membership/")
    await carry(a, b, "devices/")
    return a, b


async def test_a_head_replayed_as_the_log_anchor_is_refused(account):
    """Same sealed kind, same key, same body type: only the signature can tell a head (the
    newest segment) from an anchor (where prune folded the log: everything before is gone)."""
    a, b = account
    a_id = keys_of(a)[1].device_id
    async with open_device(a) as dev:
        head = bytes(await dev.repo.store.get(f"heads/{a_id}"))
    await carry(a, b, "segments/")
    async with open_device(b) as dev:
        with pytest.raises(IntegrityError, match="bad signature"):
            await replica.accept(dev.repo, f"segments/{a_id}/anchor", head)
        await dev.repo.store.put(f"segments/{a_id}/anchor", head)   # planted anyway
        links, problems = await LogStore(dev.repo).load_chain(a_id)
        assert [s.seq for _, s in links] == [1, 2]
        assert problems == [f"log anchor of device {a_id[:12]} has a bad signature: it was made "
                            "for a head record; ignored"]


async def test_a_device_record_signature_replayed_as_a_snapshot_is_refused(account):
    a, b = account
    keys, identity = keys_of(a)
    async with open_device(a) as dev:
        raw = bytes(await dev.repo.store.get(f"devices/{identity.device_id}"))
        body = dev.repo.open_record(raw, Kind.DEVICE, "device record")
    sealed = bytes(seal_object(Kind.SNAPSHOT, body, keys.record_key))
    async with open_device(b) as dev:
        with pytest.raises(IntegrityError, match="bad signature"):
            await replica.accept(dev.repo, f"snapshots/{blake3.blake3(sealed).hexdigest()}",
                                 sealed)


async def test_a_device_record_of_a_device_the_membership_never_listed_is_refused(account):
    """A member holds the record key: it can seal a self-signed record for any key pair."""
    from p2pbackup.crypto.identity import DeviceIdentity
    from p2pbackup.format.records import DEVICE_SIG, DeviceRecord, Signed

    a, b = account
    keys, _ = keys_of(b)
    stranger = DeviceIdentity.generate()
    rec = DeviceRecord(stranger.device_id, stranger.public_key, "stranger", time.time_ns())
    sealed = bytes(seal_object(Kind.DEVICE, Signed.make(
        DEVICE_SIG, rec.encode(), stranger.device_id, stranger.sign).encode(), keys.record_key))
    async with open_device(a) as dev:
        with pytest.raises(IntegrityError, match="not a member"):
            await replica.accept(dev.repo, f"devices/{stranger.device_id}", sealed)
        assert await replica.accept(dev.repo, f"devices/{keys_of(b)[1].device_id}", bytes(
            await LocalDirStore(b / "store").get(f"devices/{keys_of(b)[1].device_id}")))
