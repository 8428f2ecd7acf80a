"""Objects from a peer: a faithful copy is accepted whole; forged, altered or replayed ones
never reach the store."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import blake3
import pytest

from p2pbackup.backup.restore import restore
from p2pbackup.backup.verify import verify
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.errors import IntegrityError
from p2pbackup.format.header import Kind
from p2pbackup.format.log import GENESIS, Head, Segment
from p2pbackup.format.objects import seal_object
from p2pbackup.format.pack import PackBuilder
from p2pbackup.format.records import HEAD_SIG, SEGMENT_SIG, Signed
from p2pbackup.repo import replica
from p2pbackup.repo.logstore import LogStore
from p2pbackup.repo.repository import Repository

from .conftest import KEYS, A, B

async def copy_all(a: Repository, b: Repository) -> int:
    names = sorted([n async for n in a.store.list("")], key=replica.transfer_order)
    stored = 0
    for name in names:
        stored += await replica.accept(b, name, bytes(await a.store.get(name)))
    return stored


async def test_a_faithful_copy_is_accepted_and_verifies(pair, tmp_path: Path):
    a, b, src = pair
    assert await copy_all(a, b) > 5
    assert await copy_all(a, b) == 0  # a second pass stores nothing
    assert (await verify(b, read_data=True)).ok
    (latest,), _ = await b.list_snapshots()
    await restore(b, latest, str(tmp_path / "out"))
    assert (tmp_path / "out" / "src" / "f3").read_bytes() == (src / "f3").read_bytes()


async def test_a_pack_whose_blob_lies_about_its_id_is_refused(pair):
    a, b, _ = pair
    keys = KEYS.scope("src", 0)
    builder = PackBuilder("src", 0)
    plain = b"planted content" * 100
    builder.add(Kind.CHUNK, keys.blob_id(b"what the id claims"), seal_object(Kind.CHUNK, plain,
                                                                             keys.data_key),
                len(plain))
    name, data, _ = builder.finish(KEYS.meta_key)
    with pytest.raises(IntegrityError, match="does not match its id"):
        await replica.accept(b, f"packs/{name}", bytes(data))
    assert not await b.store.has(f"packs/{name}")


async def test_altered_or_misnamed_objects_are_refused(pair):
    a, b, _ = pair
    pack = [n async for n in a.store.list("packs/")][0]
    data = bytearray(await a.store.get(pack))
    data[100] ^= 1
    with pytest.raises(IntegrityError, match="does not match its name"):
        await replica.accept(b, pack, bytes(data))
    renamed = f"packs/{blake3.blake3(data).hexdigest()}"
    with pytest.raises(IntegrityError):
        await replica.accept(b, renamed, bytes(data))  # named right, but a blob fails
    assert not await b.store.has(renamed)
    snap = [n async for n in a.store.list("snapshots/")][0]
    raw = bytearray(await a.store.get(snap))
    raw[-1] ^= 1
    with pytest.raises(IntegrityError):
        await replica.accept(b, f"snapshots/{blake3.blake3(raw).hexdigest()}", bytes(raw))
    for bad_name in ("../../etc/passwd", "packs/../config", "snapshots/xyz", "heads/"):
        with pytest.raises(IntegrityError, match="not an object name"):
            await replica.accept(b, bad_name, b"x")


async def test_a_snapshot_signed_by_a_stranger_is_refused(pair):
    a, b, _ = pair
    await copy_all(a, b)
    stranger = DeviceIdentity.generate()
    (s,), _ = await a.list_snapshots()
    body = replace(s.snapshot, device=stranger.device_id).encode()
    sealed = b.seal_record(Kind.SNAPSHOT, Signed(body, stranger.device_id,
                                                 stranger.sign(body)).encode())
    with pytest.raises(IntegrityError, match="unknown"):
        await replica.accept(b, f"snapshots/{blake3.blake3(sealed).hexdigest()}", bytes(sealed))


async def test_a_head_that_goes_back_and_a_forked_segment_are_refused(pair):
    a, b, _ = pair
    old_head = bytes(await a.store.get(f"heads/{A.device_id}"))
    logs = LogStore(a)
    h2, _ = await logs.load_segment(A.device_id, 2)
    await logs.append(A, Segment(A.device_id, 3, h2, time.time_ns(), ()))
    await copy_all(a, b)
    with pytest.raises(IntegrityError, match="backwards"):
        await replica.accept(b, f"heads/{A.device_id}", old_head)
    fork = logs._seal_signed(A, Kind.SEGMENT, SEGMENT_SIG,
                             Segment(A.device_id, 4, bytes(32), time.time_ns(), ()).encode())
    with pytest.raises(IntegrityError, match="fork"):
        await replica.accept(b, f"segments/{A.device_id}/{4:012d}", bytes(fork))
    forged_head = logs._seal_signed(B, Kind.HEAD, HEAD_SIG,
                                    Head(A.device_id, 9, bytes(32), None,
                                         time.time_ns()).encode())
    with pytest.raises(IntegrityError):
        await replica.accept(b, f"heads/{A.device_id}", bytes(forged_head))


async def test_objects_never_change(pair):
    a, b, _ = pair
    await copy_all(a, b)
    name = f"segments/{A.device_id}/{1:012d}"
    other = LogStore(a)._seal_signed(A, Kind.SEGMENT, SEGMENT_SIG,
                                     Segment(A.device_id, 1, GENESIS, 5, ()).encode())
    with pytest.raises(IntegrityError, match="never change"):
        await replica.accept(b, name, bytes(other))


async def test_removal_records_only_from_an_owner_and_whole(pair):
    from p2pbackup.format.membership import MEMBER, OWNER, Member, Membership, sign_membership
    from p2pbackup.format.removal import Removal, removal_name, removal_object
    from p2pbackup.repo import membership as store_membership

    a, b, _ = pair
    now = time.time_ns()
    m = Membership(1, b"", 0, (Member(A.device_id, A.public_key, "a", OWNER, added_ns=now),
                               Member(B.device_id, B.public_key, "b", MEMBER, added_ns=now)),
                   time_ns=now)
    await store_membership.append(b, sign_membership(m, A.device_id, A.sign))

    def record(by: DeviceIdentity, names=("snapshots/" + "0" * 64,)) -> bytes:
        return removal_object(Removal(by.device_id, now, tuple(names)), by.sign)

    good = record(A)
    assert await replica.accept(b, removal_name(good), good)
    for bad, why in [(record(B), "not an owner"),                      # a member, not an owner
                     (record(DeviceIdentity.generate()), "not an owner"),
                     (good[:-1] + bytes([good[-1] ^ 1]), "bad signature|malformed"),
                     (good[:40], "not a whole removal record")]:
        with pytest.raises(IntegrityError, match=why):
            await replica.accept(b, removal_name(bad), bad)
    with pytest.raises(IntegrityError, match="does not match its name"):
        await replica.accept(b, removal_name(record(A, ["packs/" + "2" * 64])), good)
    # Names outside the data (config, keys, membership) are dropped from a record on reading.
    from p2pbackup.crypto.identity import verify_signature
    from p2pbackup.format.removal import read_removal

    odd = record(A, ["config", "membership/000000000001", "packs/" + "1" * 64])
    assert read_removal(odd, {A.device_id: A.public_key}.get, verify_signature).names == \
        ("packs/" + "1" * 64,)


async def test_a_damaged_membership_version_is_named_not_taken_for_the_end_of_the_chain(pair):
    """Versions after a removal are sealed in the new epoch: a device without its key reads
    the chain up to there. One this device holds the key for, yet does not open, is damage."""
    from p2pbackup.format.membership import OWNER, Member, Membership, record_hash, \
        sign_membership
    from p2pbackup.repo import membership as store_membership

    a, _, _ = pair
    m1 = Membership(1, b"", 0, (Member(A.device_id, A.public_key, "a", OWNER),))
    s1 = sign_membership(m1, A.device_id, A.sign)
    m2 = Membership(2, record_hash(s1), 0, m1.members + (Member(B.device_id, B.public_key,
                                                                 "b", OWNER),))
    await store_membership.store_chain(a, [s1, sign_membership(m2, A.device_id, A.sign)])
    assert (await store_membership.load(a))[0].seq == 2
    raw = bytearray(await a.store.get("membership/000000000002"))
    raw[-1] ^= 1
    await a.store.put("membership/000000000002", bytes(raw))
    a.membership_changed()
    with pytest.raises(IntegrityError, match="membership/000000000002 failed authentication"):
        await store_membership.load(a)


async def test_a_log_anchor_moves_forward_at_peers_as_prune_folds_more(pair):
    """prune rewrites segments/<device>/anchor each time it folds more of the log: a peer
    takes the newer anchor (before, "objects never change" refused it forever) and never an
    older one again."""
    a, b, _ = pair
    logs = LogStore(a)
    name = f"segments/{A.device_id}/anchor"
    h1, _ = await logs.load_segment(A.device_id, 1)
    h2, _ = await logs.load_segment(A.device_id, 2)
    await logs.write_anchor(A, Head(A.device_id, 1, h1, None, time.time_ns()))
    first = bytes(await a.store.get(name))
    await copy_all(a, b)
    await logs.write_anchor(A, Head(A.device_id, 2, h2, None, time.time_ns()))
    second = bytes(await a.store.get(name))
    assert await replica.accept(b, name, second)
    assert (await LogStore(b).read_anchor(A.device_id)).seq == 2
    assert not await replica.accept(b, name, second)   # the same again: nothing to do
    with pytest.raises(IntegrityError, match="back"):
        await replica.accept(b, name, first)            # an older fold never comes back
    assert (await LogStore(b).read_anchor(A.device_id)).seq == 2


async def test_a_damaged_head_here_is_replaced_by_a_newer_one_from_a_peer(pair):
    """A head held here that no longer reads (a flipped byte) must not block every later head
    of that device (the anchor beside it already tolerated this)."""
    a, b, _ = pair
    await copy_all(a, b)
    name = f"heads/{A.device_id}"
    path = Path(b.store.path_of(name))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    logs = LogStore(a)
    h2, _ = await logs.load_segment(A.device_id, 2)
    await logs.append(A, Segment(A.device_id, 3, h2, time.time_ns(), ()))
    await replica.accept(b, f"segments/{A.device_id}/{3:012d}",
                         bytes(await a.store.get(f"segments/{A.device_id}/{3:012d}")))
    assert await replica.accept(b, name, bytes(await a.store.get(name)))
    assert (await LogStore(b).read_head(A.device_id)).seq == 3
