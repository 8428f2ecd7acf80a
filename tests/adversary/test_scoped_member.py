"""A member paired with some sources only (`pair --sources docs`) is an attacker against the
other sources: whatever it holds and whatever reaches its store, it must not be able to read
another source, nor any key that would open one (roots, the keyring, other scope keys), in
any key epoch and after a recovery."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest

from p2pbackup import account
from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.crypto.keys import AccountKeys, MissingKey
from p2pbackup.errors import P2PError
from p2pbackup.format.header import HEADER_SIZE, Kind, ObjectHeader
from p2pbackup.format.objects import open_object
from p2pbackup.format.pack import parse_trailer, trailer_length
from p2pbackup.device import open_device

from .accounts import carry, keys_of, make_owner, pair, remove, snapshot


def _key_material(obj: object) -> list[bytes]:
    """Every key in a key export (whatever its shape)."""
    if isinstance(obj, bytes):
        return [obj] if len(obj) == 32 else []
    if isinstance(obj, dict):
        return [k for v in obj.values() for k in _key_material(v)]
    if isinstance(obj, (list, tuple)):
        return [k for v in obj for k in _key_material(v)]
    return []


def held_keys(keys: AccountKeys) -> list[bytes]:
    return _key_material(keys.export(keys.sources_granted()))


def reachable(data: bytes, keys: list[bytes], depth: int = 0) -> list[bytes]:
    """Every plaintext `keys` reach in `data`: the object itself if one of them opens it, and
    whatever is nested in what opens or lies in clear (signed envelopes, grants, bodies)."""
    if depth > 6:
        return []
    out: list[bytes] = []
    if data[:4] == b"P2PB":
        for key in keys:
            try:
                body = bytes(open_object(data, key)[1])
            except P2PError:
                continue
            out += [body] + _nested(body, keys, depth)
            break
        out += _nested(data[HEADER_SIZE:], keys, depth)   # a clear envelope (removal, ...)
    else:
        out += _nested(data, keys, depth)
    return out


def _nested(data: bytes, keys: list[bytes], depth: int) -> list[bytes]:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        return []
    stack, out = [obj], []
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack += list(v.keys()) + list(v.values())
        elif isinstance(v, (list, tuple)):
            stack += list(v)
        elif isinstance(v, bytes):
            out += [v] + reachable(v, keys, depth + 1)
    return out


async def everything_reachable(home: Path, keys: list[bytes]) -> list[bytes]:
    """All the member can decrypt in a store: records, keyrings, membership, trailers."""
    store = LocalDirStore(home / "store")
    out: list[bytes] = []
    async for name in store.list(""):
        data = bytes(await store.get(name))
        if name.startswith("packs/"):
            end = len(data) - 4
            start = len(data) - trailer_length(data, name)
            out += reachable(data[start:end], keys)
        else:
            out += reachable(data, keys)
    return out


async def other_source_blobs(home: Path, owner: AccountKeys) -> list[tuple[int, bytes]]:
    """(kind, sealed bytes) of every blob of source `photos` in a store, read as the owner."""
    store = LocalDirStore(home / "store")
    blobs = []
    async for name in store.list("packs/"):
        data = bytes(await store.get(name))
        trailer = parse_trailer(data, len(data), owner.record_keys_newest_first(), name)
        if trailer.scope == "photos":
            blobs += [(b.kind, data[b.offset:b.offset + b.length]) for b in trailer.blobs]
    return blobs


def assert_nothing_of_photos(member: AccountKeys, owner: AccountKeys,
                             plaintexts: list[bytes], photos_blobs: list) -> None:
    secrets = {f"root of epoch {e}": r for e, r in owner.roots.items()}
    for e in owner.roots:
        s = owner.scope("photos", e)
        secrets[f"photos data key, epoch {e}"] = s.data_key
        secrets[f"photos id key, epoch {e}"] = s.id_key
    for what, secret in secrets.items():
        leaks = [p for p in plaintexts if secret in p]
        assert not leaks, f"the scoped member can read the {what}"
    assert not member.full
    for e in owner.roots:
        with pytest.raises(MissingKey):
            member.scope("photos", e)
        assert member.scope("docs", e).data_key == owner.scope("docs", e).data_key
    held = held_keys(member)
    assert photos_blobs
    for kind, sealed in photos_blobs:
        for key in held:
            with pytest.raises(P2PError):
                open_object(sealed, key, expect=kind)


@pytest.fixture
async def scoped(tmp_path: Path):
    """An owner with sources docs and photos, a snapshot, and a member granted docs only."""
    docs, photos = tmp_path / "docs", tmp_path / "photos"
    for d in (docs, photos):
        d.mkdir()
        (d / "a.bin").write_bytes(os.urandom(50_000))
        (d / "b.txt").write_text(f"{d.name} text\n" * 100)
    owner, member = tmp_path / "owner", tmp_path / "member"
    code = await make_owner(owner, [docs, photos])
    await snapshot(owner)
    await pair(owner, member, "tablet", sources=["docs"])
    await carry(owner, member, "")
    return owner, member, code


async def test_a_scoped_member_reads_no_other_source_nor_its_keys_after_a_recovery_at_epoch_0(
        scoped, tmp_path: Path):
    owner, member, code = scoped
    recovered = tmp_path / "recovered"
    await account.recover(recovered, str(owner / "store"), code, "replacement")
    # The keyring the recovery wrote, and everything else, replicates to every member.
    await carry(recovered, owner, "")
    await carry(owner, member, "")
    assert [n async for n in LocalDirStore(member / "store").list("keyring/")]
    member_keys, owner_keys = keys_of(member)[0], keys_of(owner)[0]
    assert member_keys.epoch == 0
    plain = await everything_reachable(member, held_keys(member_keys))
    assert_nothing_of_photos(member_keys, owner_keys, plain,
                             await other_source_blobs(member, owner_keys))


async def test_a_scoped_member_reads_no_other_source_nor_its_keys_in_epochs_0_and_1(
        scoped, tmp_path: Path):
    owner, member, _ = scoped
    await pair(owner, tmp_path / "old", "old-phone")
    await remove(owner, "old-phone")
    (tmp_path / "photos" / "c.bin").write_bytes(os.urandom(30_000))
    (tmp_path / "docs" / "c.bin").write_bytes(os.urandom(30_000))
    await snapshot(owner)
    await carry(owner, member, "")
    async with open_device(member, write=True):
        pass  # a writing command takes the grant of the new epoch
    member_keys, owner_keys = keys_of(member)[0], keys_of(owner)[0]
    assert member_keys.epoch == owner_keys.epoch == 1
    plain = await everything_reachable(member, held_keys(member_keys))
    assert_nothing_of_photos(member_keys, owner_keys, plain,
                             await other_source_blobs(member, owner_keys))


async def test_a_keyring_a_scoped_member_forges_is_refused_by_replication_and_recovery(
        scoped, tmp_path: Path):
    """It holds every epoch's record key (what sealed keyrings before), and its own signing
    key: neither lets it plant roots of its choosing for the owners or a recovery."""
    import msgpack as mp

    from p2pbackup.crypto.identity import DeviceIdentity
    from p2pbackup.errors import IntegrityError
    from p2pbackup.format.membership import keyring_object
    from p2pbackup.format.objects import seal_object
    from p2pbackup.repo import replica

    owner, member, _ = scoped
    await pair(owner, tmp_path / "old", "old-phone")
    code = await remove(owner, "old-phone")
    await carry(owner, member, "")
    async with open_device(member, write=True):
        pass
    keys, me = keys_of(member)
    mine = AccountKeys(os.urandom(32)).with_epoch(1, os.urandom(32))  # roots it would plant
    doc = mp.packb(mine.export(), use_bin_type=True)
    old_form = bytes(seal_object(Kind.KEYRING, doc, keys.record_keys[1]))
    new_form = keyring_object(1, bytes(seal_object(Kind.KEYRING, doc, keys.record_keys[1])),
                              me.device_id, me.sign)
    impostor = DeviceIdentity.generate()
    by_impostor = keyring_object(1, b"x" * 64, impostor.device_id, impostor.sign)
    for home in (owner, member):
        async with open_device(home) as dev:
            for forged in (old_form, new_form, by_impostor):
                with pytest.raises(IntegrityError):
                    await replica.accept(dev.repo, "keyring/000009", forged)
    # Planted in a store anyway, it does not mislead a recovery with the newest code.
    await LocalDirStore(owner / "store").put("keyring/000009", old_form)
    recovered = tmp_path / "recovered"
    await account.recover(recovered, str(owner / "store"), code, "replacement")
    assert keys_of(recovered)[0].roots == keys_of(owner)[0].roots


async def test_a_snapshot_a_scoped_member_signs_of_a_source_it_was_not_granted_is_refused(
        scoped):
    """It holds the record key and its signing key, so it can seal and sign a snapshot that
    names source photos (say, with an old or empty tree, to make it `latest`): the owner's
    device refuses it. A snapshot of docs, which it was granted, is taken."""
    import blake3

    from p2pbackup.errors import IntegrityError
    from p2pbackup.format.objects import seal_object
    from p2pbackup.format.records import Signed, Snapshot
    from p2pbackup.repo import replica

    owner, member, _ = scoped
    keys, me = keys_of(member)
    async with open_device(owner) as dev:
        (real,), _ = await dev.repo.list_snapshots()
    by_name = {r.name: r for r in real.snapshot.sources}

    def signed_snapshot(roots) -> tuple[str, bytes]:
        snap = Snapshot(real.snapshot.time_ns + 10**9, me.device_id, "tablet", roots)
        body = Signed.make("snapshot", snap.encode(), me.device_id, me.sign).encode()
        sealed = bytes(seal_object(Kind.SNAPSHOT, body, keys.record_key))
        return f"snapshots/{blake3.blake3(sealed).hexdigest()}", sealed

    async with open_device(owner) as dev:
        for roots in ((by_name["photos"],), (by_name["docs"], by_name["photos"])):
            name, data = signed_snapshot(roots)
            with pytest.raises(IntegrityError):
                await replica.accept(dev.repo, name, data)
        name, data = signed_snapshot((by_name["docs"],))
        assert await replica.accept(dev.repo, name, data)


@pytest.mark.parametrize("role", ["partner", "member"])
async def test_a_scoped_member_cannot_host_a_pairing_and_its_store_stays_readable(
        scoped, tmp_path: Path, role: str):
    """Only an owner signs the next membership version. A member granted some sources that
    hosted `pair --partner` (or `pair --sources docs`) signed one anyway, the joiner took it,
    and its own store then refused every record ("may not change the membership") for good:
    it is refused before a code is shown."""
    import secrets

    from p2pbackup import grants
    from p2pbackup.crypto.identity import DeviceIdentity
    from p2pbackup.errors import WrongKey

    owner, member, _ = scoped
    async with open_device(member, write=True) as dev:
        with pytest.raises(WrongKey, match="owner"):
            invite = account.invitation(dev, role, ("docs",) if role == "member" else None,
                                        None)
            joiner = DeviceIdentity.generate()
            await account.prepare_welcome(dev, invite, account.joiner_payload(
                joiner, "nas", False, secrets.token_bytes(grants.TAG_KEY_SIZE)))
        snaps, bad = await dev.repo.list_snapshots()
    assert snaps and not bad


async def test_a_scoped_members_snapshot_of_its_source_cannot_carry_another_sources_data(
        scoped, tmp_path: Path):
    """It may sign snapshots of docs, and it can read from every pack trailer (sealed with the
    record key it holds) the ids of photos' blobs and, from the snapshot records, photos' root
    tree. A docs snapshot whose root is photos' tree, or whose docs tree lists photos chunks,
    would make the owner's restore of "docs" decrypt photos (with the owner's photos key) into
    docs/: every blob a source's trees name must be of that source."""
    import time

    from p2pbackup.backup.restore import restore
    from p2pbackup.backup.verify import verify
    from p2pbackup.format.pack import parse_trailer
    from p2pbackup.format.records import FILE, Snapshot, SourceRoot, TreeEntry
    from p2pbackup.repo import replica

    from .hostile import raw_tree, store_blob

    owner, member, _ = scoped
    keys, me = keys_of(member)
    async with open_device(member, write=True) as dev:
        (real,), _ = await dev.repo.list_snapshots()
        photos = {r.name: r for r in real.snapshot.sources}["photos"]
        chunk = None
        async for name in dev.repo.store.list("packs/"):
            data = bytes(await dev.repo.store.get(name))
            trailer = parse_trailer(data, len(data), keys.record_keys_newest_first(), name)
            if trailer.scope == "photos":
                big = [b for b in trailer.blobs if b.kind == Kind.CHUNK]
                if big:
                    chunk = max(big, key=lambda b: b.raw_length)
        assert chunk is not None
        stolen = TreeEntry(FILE, b"stolen.bin", 0o100644, os.geteuid(), os.getegid(),
                           time.time_ns(), size=chunk.raw_length, chunks=(chunk.id,))
        docs_tree = await store_blob(dev.repo, "docs", Kind.TREE, raw_tree([stolen]))
    roots = {"borrowed-root": SourceRoot("docs", str(tmp_path / "docs"), photos.tree),
             "borrowed-chunk": SourceRoot("docs", str(tmp_path / "docs"), docs_tree)}
    await carry(member, owner, "packs/")
    async with open_device(owner, write=True) as dev:
        for i, (why, root) in enumerate(roots.items()):
            snap = Snapshot(real.snapshot.time_ns + (i + 1) * 10**9, me.device_id, "tablet",
                            (root,))
            from p2pbackup.format.objects import seal_object
            from p2pbackup.format.records import Signed
            import blake3

            body = Signed.make("snapshot", snap.encode(), me.device_id, me.sign).encode()
            sealed = bytes(seal_object(Kind.SNAPSHOT, body, keys.record_key))
            sid = blake3.blake3(sealed).hexdigest()
            assert await replica.accept(dev.repo, f"snapshots/{sid}", sealed)  # docs: granted
            stored = await dev.repo.load_snapshot(sid)
            target = tmp_path / f"out-{why}"
            summary = await restore(dev.repo, stored, str(target))
            assert summary.failed, why
            restored = [p for p in target.rglob("*") if p.is_file()]
            assert not restored, (why, restored)   # nothing of photos under docs/
        report = await verify(dev.repo)
        assert not report.ok and any("photos" in d.reason for d in report.damage)
