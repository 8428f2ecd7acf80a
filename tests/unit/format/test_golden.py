"""Objects written by format version 1 must decode in every later version."""

from pathlib import Path

import pytest

from p2pbackup.crypto.identity import DeviceIdentity, verify_signature
from p2pbackup.crypto.keys import AccountKeys
from p2pbackup.errors import UnsupportedFormat
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
