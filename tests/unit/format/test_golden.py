"""Objects written by format version 1 must decode in every later version."""

from pathlib import Path

import pytest

from p2pbackup.crypto.identity import DeviceIdentity, verify_signature
from p2pbackup.crypto.keys import AccountKeys
from p2pbackup.errors import IntegrityError, UnsupportedFormat
from p2pbackup.format import Kind, open_object
from p2pbackup.format.pack import parse_trailer
from p2pbackup.format.records import FILE, SYMLINK, RepoConfig, Signed, Snapshot, Tree

V1 = Path(__file__).resolve().parents[2] / "data" / "v1"
KEYS = AccountKeys(bytes(range(32)))
SCOPE = KEYS.scope("docs", 0)
DEVICE = DeviceIdentity(bytes(range(32, 64)))
CHUNK = b"hello golden world\n" * 10


def test_v1_chunk():
    _, body = open_object((V1 / "chunk.obj").read_bytes(), SCOPE.data_key, expect=Kind.CHUNK)
    assert body == CHUNK


def test_v1_tree():
    _, body = open_object((V1 / "tree.obj").read_bytes(), SCOPE.data_key, expect=Kind.TREE)
    tree = Tree.decode(body)
    assert [(e.type, e.name) for e in tree.entries] == [(FILE, b"hello.txt"), (SYMLINK, b"link")]
    assert tree.entries[0].chunks == (SCOPE.blob_id(CHUNK),)
    assert tree.entries[0].mtime_ns == 1_700_000_000_000_000_001
    assert tree.entries[1].target == b"hello.txt"


def test_v1_pack():
    data = (V1 / "pack.bin").read_bytes()
    trailer = parse_trailer(data, len(data), KEYS.meta_key, "golden pack")
    assert trailer.scope == "docs" and [b.kind for b in trailer.blobs] == [1, 2, 2]
    first = trailer.blobs[0]
    _, body = open_object(data[first.offset:first.offset + first.length], SCOPE.data_key)
    assert body == CHUNK and SCOPE.blob_id(body) == first.id


def test_v1_snapshot_and_signature():
    _, body = open_object((V1 / "snapshot.obj").read_bytes(), KEYS.meta_key,
                          expect=Kind.SNAPSHOT)
    signed = Signed.decode(body, "snapshot")
    assert verify_signature(DEVICE.public_key, signed.body, signed.signature)
    snap = Snapshot.decode(signed.body)
    assert snap.device == DEVICE.device_id and snap.log_seq == 7
    assert snap.sources[0].path == "/home/user/docs"
    # Written before sources carried their folder's own metadata: restore keeps its old way.
    assert snap.sources[0].mode is None and snap.sources[0].dir_entry() is None


def test_v1_repo_config():
    _, body = open_object((V1 / "config.obj").read_bytes(), KEYS.meta_key)
    cfg = RepoConfig.decode(body)
    assert cfg.repo_id == "golden-repo" and cfg.chunk_avg == 65536


def test_v1_tree_from_a_future_writer_skips_what_it_does_not_know():
    _, body = open_object((V1 / "future-tree.obj").read_bytes(), SCOPE.data_key)
    tree = Tree.decode(body)
    assert [e.name for e in tree.entries] == [b"a.txt"] and tree.skipped == 1


def test_newer_format_version_is_refused_with_upgrade_hint():
    with pytest.raises(UnsupportedFormat) as exc:
        open_object((V1 / "newer-version.obj").read_bytes(), KEYS.meta_key, what="snapshot x")
    assert str(exc.value) == "Snapshot x was written by a newer p2pbackup (format v2); upgrade to read it."


def test_v1_segment_with_a_future_operation():
    from p2pbackup.format.log import GENESIS, PUT, ChangeList, Segment

    _, body = open_object((V1 / "segment.obj").read_bytes(), KEYS.meta_key, expect=Kind.SEGMENT)
    signed = Signed.decode(body, "segment")
    assert verify_signature(DEVICE.public_key, signed.body, signed.signature)
    seg = Segment.decode(signed.body)
    assert (seg.seq, seg.prev, seg.device) == (1, GENESIS, DEVICE.device_id)
    _, plain = open_object(seg.parts[0].sealed, SCOPE.data_key, expect=Kind.SEGMENT_PART)
    changes = ChangeList.decode(plain)
    assert [(c.op, c.path) for c in changes.changes] == [(PUT, b"sub/hello.txt"),
                                                        ("del", b"old-dir")]
    assert changes.skipped == 1 and changes.changes[0].entry.chunks == (SCOPE.blob_id(CHUNK),)


def test_v1_membership_chain():
    from p2pbackup.crypto.identity import device_id_for
    from p2pbackup.format.membership import MEMBER, PARTNER, check_chain

    chain = [bytes(open_object((V1 / f"membership-{i}.obj").read_bytes(), KEYS.meta_key,
                               expect=Kind.MEMBERSHIP)[1]) for i in (1, 2)]
    newest = check_chain(chain, verify_signature, device_id_for)
    assert newest.seq == 2 and [m.name for m in newest.members] == ["desk", "tablet", "nas"]
    assert newest.members[1].role == MEMBER and newest.members[1].scopes == ("docs",)
    assert newest.members[2].role == PARTNER and newest.members[2].quota == 50 << 30
    assert newest.recovery_key == DeviceIdentity(KEYS.recovery_seed(0)).public_key


def test_v1_removal_record():
    from p2pbackup.format.removal import read_removal

    dev = DeviceIdentity(bytes(range(32, 64)))
    r = read_removal((V1 / "removal.obj").read_bytes(), {dev.device_id: dev.public_key}.get,
                     verify_signature)
    assert r.time_ns == 1_700_000_000_000_000_000
    assert r.names == ("packs/" + "ab" * 32, "snapshots/" + "cd" * 32)


def test_capture1_tree_with_xattrs_holes_fifo_and_devices():
    from p2pbackup.format.records import BLOCKDEV, CHARDEV, DIR, FIFO

    _, body = open_object((V1 / "tree-capture1.obj").read_bytes(), SCOPE.data_key,
                          expect=Kind.TREE)
    tree = Tree.decode(body)
    e = {x.name: x for x in tree.entries}
    assert [(x.type, x.name) for x in tree.entries] == [
        (BLOCKDEV, b"blk"), (FILE, b"disk.img"), (DIR, b"etc"), (FIFO, b"fifo"),
        (SYMLINK, b"link"), (CHARDEV, b"null")] and tree.skipped == 0
    assert e[b"blk"].rdev == (7, 200) and e[b"null"].rdev == (1, 3)
    assert e[b"disk.img"].sparse and e[b"disk.img"].size == 64 << 20
    assert [k for k, _ in e[b"disk.img"].xattrs] == [b"system.posix_acl_access",
                                                     b"user.mime_type"]
    assert e[b"fifo"].xattrs == ((b"trusted.note", b"fifo"),)
    assert e[b"link"].target == b"disk.img" and e[b"link"].xattrs[0][0] == b"security.selinux"
    assert e[b"etc"].xattrs[0][0] == b"system.posix_acl_default"
    _, body = open_object((V1 / "snapshot-capture1.obj").read_bytes(), KEYS.meta_key,
                          expect=Kind.SNAPSHOT)
    assert Snapshot.decode(Signed.decode(body, "snapshot").body).capture == 1
    _, body = open_object((V1 / "snapshot.obj").read_bytes(), KEYS.meta_key)
    assert Snapshot.decode(Signed.decode(body, "snapshot").body).capture == 0  # before levels


# How a reader of capture level 0 (p2pbackup 0.1) decodes a tree: entries of other types are
# skipped, and of each entry only these fields are read (anything else is ignored).
V0_FIELDS = {"f": {"t": str, "n": bytes, "m": int, "u": int, "g": int, "mt": int, "ct": int,
                   "i": int, "s": int, "c": list, "nl": int, "sq": bool, "wm": int},
             "d": {"t": str, "n": bytes, "m": int, "u": int, "g": int, "mt": int, "sub": bytes},
             "l": {"t": str, "n": bytes, "m": int, "u": int, "g": int, "mt": int, "lt": bytes}}


def test_capture1_tree_reads_as_before_in_a_level_0_reader():
    """Downgrade safety: the new kinds are types a 0.1 reader skips, and the new fields are
    keys it never read, so what it does read of each entry means what it always meant."""
    import msgpack

    _, body = open_object((V1 / "tree-capture1.obj").read_bytes(), SCOPE.data_key)
    raw = msgpack.unpackb(body, raw=False)
    kept = [m for m in raw["e"] if m["t"] in V0_FIELDS]
    assert [m["n"] for m in kept] == [b"disk.img", b"etc", b"link"]  # blk, fifo, null skipped
    for m in kept:
        fields = V0_FIELDS[m["t"]]
        assert all(isinstance(m[k], typ) for k, typ in fields.items() if k in m)
        assert set(m) - set(fields) <= {"xa", "sp"}  # new, so never given a 0.1 meaning
    assert not {"xa", "sp", "rd"} & set().union(*V0_FIELDS.values())
    assert list(Tree.decode(body).entries[1].chunks) == kept[0]["c"] and len(kept[0]["c"]) == 2


def test_v1_roster():
    from p2pbackup.crypto.identity import device_id_for
    from p2pbackup.format.roster import check_signed

    data = (V1 / "roster.obj").read_bytes()
    second = DeviceIdentity(bytes(range(64, 96)))
    r = check_signed(data, {DEVICE.device_id: DEVICE.public_key}.get, verify_signature,
                     device_id_for)
    assert r.seq == 1 and r.prev == b"" and r.time_ns == 1_700_000_000_000_000_002
    assert [(e.device_id, e.role) for e in r.members] == [(DEVICE.device_id, "owner"),
                                                          (second.device_id, "member")]
    assert r.removed == ("f" * 32,) and r.owner_key(DEVICE.device_id) == DEVICE.public_key
    assert r.owner_key(second.device_id) is None


def test_v1_roster_naming_partners_follows_the_first_and_keeps_partners_apart():
    from p2pbackup.crypto.identity import device_id_for
    from p2pbackup.format.roster import check_next, check_signed, roster_hash

    first_data = (V1 / "roster.obj").read_bytes()
    first = check_signed(first_data, {DEVICE.device_id: DEVICE.public_key}.get,
                         verify_signature, device_id_for)
    second, friend = DeviceIdentity(bytes(range(64, 96))), DeviceIdentity(bytes(range(96, 128)))
    r = check_next(first, roster_hash(first_data), (V1 / "roster-partners.obj").read_bytes(),
                   verify_signature, device_id_for)
    assert r.seq == 2 and [e.device_id for e in r.members] == [DEVICE.device_id,
                                                               second.device_id]
    assert [(e.device_id, e.public_key, e.role) for e in r.partners] == \
        [(friend.device_id, friend.public_key, "partner")]
    assert r.owner_key(friend.device_id) is None   # a partner never signs the account's roster


# ---- signed envelope version 2, pins, box keys, signed keyrings, epoch-sealed trailers ------

KEYS1 = KEYS.with_epoch(1, bytes(range(128, 160)))


def test_v2_snapshot_signature_names_its_type():
    from p2pbackup.format.records import HEAD_SIG, SNAPSHOT_SIG

    _, body = open_object((V1 / "snapshot-v2.obj").read_bytes(), KEYS1.record_keys[1],
                          expect=Kind.SNAPSHOT)
    signed = Signed.decode(body, "snapshot")
    assert signed.version == 2 and signed.type == SNAPSHOT_SIG
    assert signed.verifies(SNAPSHOT_SIG, DEVICE.public_key, verify_signature)
    assert not signed.verifies(HEAD_SIG, DEVICE.public_key, verify_signature)
    assert Snapshot.decode(signed.body).log_seq == 7


def test_v2_membership_removal_with_a_pin_follows_the_v1_chain():
    from p2pbackup.crypto.identity import device_id_for
    from p2pbackup.format.membership import Signers, check_versions

    chain = [bytes(open_object((V1 / f"membership-{i}.obj").read_bytes(), KEYS.meta_key,
                               expect=Kind.MEMBERSHIP)[1]) for i in (1, 2, 3)]
    versions = check_versions(chain, verify_signature, device_id_for)
    third = versions[-1]
    assert third.epoch == 1 and len(third.removed) == 1
    removed = third.removed[0]
    assert third.kept[removed].seq == 2 and third.kept[removed].snapshots == {b"\x07" * 32}
    assert third.members[0].box_key == DEVICE.box_public_key
    signers = Signers(versions)
    assert signers.writer_key(removed, 0, "x", sources=["docs"],
                              kept=lambda k: b"\x07" * 32 in k.snapshots)
    with pytest.raises(IntegrityError, match="removed"):
        signers.writer_key(removed, 0, "x", sources=["docs"], kept=lambda k: False)


async def test_v2_signed_keyring_opens_with_the_recovery_code(tmp_path):
    from p2pbackup.blobs.local import LocalDirStore
    from p2pbackup.repo.membership import keys_from_root

    store = LocalDirStore(tmp_path / "store")
    await store.put("keyring/000001", (V1 / "keyring-000001.obj").read_bytes())
    keys = await keys_from_root(store, bytes(range(128, 160)))
    assert keys.roots == KEYS1.roots


def test_v2_pack_trailer_sealed_in_its_epoch():
    data = (V1 / "pack-epoch1.bin").read_bytes()
    with pytest.raises(IntegrityError):
        parse_trailer(data, len(data), KEYS.meta_key, "golden pack")
    trailer = parse_trailer(data, len(data), KEYS1.record_keys_newest_first(), "golden pack")
    assert (trailer.scope, trailer.epoch, len(trailer.blobs)) == ("docs", 1, 1)


# ---- tree version 2: small files stored together in one chunk -------------------------------

def test_tree_with_files_stored_in_one_bundle():
    from p2pbackup.format.records import TREE_VERSION

    _, body = open_object((V1 / "tree-bundle.obj").read_bytes(), SCOPE.data_key,
                          expect=Kind.TREE)
    _, bundle = open_object((V1 / "bundle.obj").read_bytes(), SCOPE.data_key, expect=Kind.CHUNK)
    tree = Tree.decode(body)
    a, b, hello = tree.entries
    assert a.chunks == b.chunks == (SCOPE.blob_id(bundle),) and hello.chunks == (SCOPE.blob_id(CHUNK),)
    assert bundle[a.offset:a.offset + a.size] == b"first file\n"
    assert bundle[b.offset:b.offset + b.size] == b"second, longer file\n"
    assert hello.offset is None and hello.size == len(CHUNK)
    assert Tree.decode(body).encode() == bytes(body)  # re-encoded as it was written
    import msgpack

    assert msgpack.unpackb(body)["v"] == TREE_VERSION == 2


def test_a_reader_of_tree_version_1_refuses_bundled_files_rather_than_misread_them():
    """Downgrade safety: a version-1 reader would take a bundle for the file's whole content;
    the tree's version makes it say 'written by a newer p2pbackup' instead."""
    from p2pbackup.format.records import _unpack

    _, body = open_object((V1 / "tree-bundle.obj").read_bytes(), SCOPE.data_key)
    with pytest.raises(UnsupportedFormat):
        _unpack(body, "tree", 1)  # what Tree.decode of version 1 called


def test_trees_without_bundled_files_are_still_written_as_version_1():
    """An unchanged folder keeps its tree id across the upgrade: same entries, same bytes."""
    for name in ("tree.obj", "tree-capture1.obj"):
        _, body = open_object((V1 / name).read_bytes(), SCOPE.data_key)
        assert Tree.decode(body).encode() == bytes(body)


def test_v1_trees_read_a_page_at_a_time():
    for name in ("tree.obj", "future-tree.obj", "tree-capture1.obj"):
        _, body = open_object((V1 / name).read_bytes(), SCOPE.data_key)
        whole = Tree.decode(body)
        total, page = Tree.page(body, 0, 1000)
        assert page == whole and total == len(whole.entries) + whole.skipped
