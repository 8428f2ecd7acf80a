"""Writes the version 1 golden files that do not exist yet; it never rewrites one.

Later versions of p2pbackup must still read every file here (tests/unit/format/test_golden.py).
"""

from __future__ import annotations

from pathlib import Path

import msgpack

from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.crypto.keys import AccountKeys
from p2pbackup.format.header import Kind
from p2pbackup.format.objects import seal_object
from p2pbackup.format.log import GENESIS, Segment, SegmentPart
from p2pbackup.format.pack import PackBuilder
from p2pbackup.format.records import (BLOCKDEV, CHARDEV, DIR, FIFO, FILE, SYMLINK, RepoConfig,
                                      Signed, Snapshot, SourceRoot, Tree, TreeEntry)

HERE_DIR = Path(__file__).parent
ACCOUNT_KEY = bytes(range(32))
DEVICE_SEED = bytes(range(32, 64))


def nonce(i: int) -> bytes:
    return bytes([i]) * 24


class _Golden:
    """Writes a file only if it is not there yet: golden files are never regenerated."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __truediv__(self, name: str) -> "_GoldenFile":
        return _GoldenFile(self.root / name)


class _GoldenFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write_bytes(self, data: bytes | bytearray | memoryview) -> None:
        if not self.path.exists():
            self.path.write_bytes(bytes(data))
            print(f"wrote {self.path.name}")


def main() -> None:
    HERE = _Golden(HERE_DIR)  # noqa: N806
    keys = AccountKeys(ACCOUNT_KEY)
    scope = keys.scope("docs", 0)
    dev = DeviceIdentity(DEVICE_SEED)
    chunk = b"hello golden world\n" * 10
    cid = scope.blob_id(chunk)
    tree = Tree((
        TreeEntry(FILE, b"hello.txt", 0o100644, 1000, 1000, 1_700_000_000_000_000_001,
                  1_700_000_000_000_000_002, 42, len(chunk), (cid,)),
        TreeEntry(SYMLINK, b"link", 0o120777, 0, 0, 1_700_000_000_000_000_003,
                  target=b"hello.txt"),
    ))
    tree_bytes = tree.encode()
    tid = scope.blob_id(tree_bytes)
    root = Tree((TreeEntry(DIR, b"sub", 0o40755, 0, 0, 1_700_000_000_000_000_004, subtree=tid),))
    root_bytes = root.encode()
    rid = scope.blob_id(root_bytes)

    (HERE / "chunk.obj").write_bytes(seal_object(Kind.CHUNK, chunk, scope.data_key, nonce=nonce(1)))
    (HERE / "tree.obj").write_bytes(seal_object(Kind.TREE, tree_bytes, scope.data_key,
                                                nonce=nonce(2)))
    pack = PackBuilder("docs", 0)
    for i, (kind, bid, plain) in enumerate([(Kind.CHUNK, cid, chunk), (Kind.TREE, tid, tree_bytes),
                                            (Kind.TREE, rid, root_bytes)]):
        pack.add(kind, bid, seal_object(kind, plain, scope.data_key, nonce=nonce(10 + i)),
                 len(plain))
    # The trailer's nonce is random; the golden pack is read, never compared byte for byte.
    _name, data, _ = pack.finish(keys.meta_key)
    (HERE / "pack.bin").write_bytes(data)

    snap = Snapshot(1_700_000_000_000_000_000, dev.device_id, "golden-host",
                    (SourceRoot("docs", "/home/user/docs", rid, 0, 1, 1, len(chunk)),), log_seq=7)
    body = snap.encode()
    signed = Signed(body, dev.device_id, dev.sign(body)).encode()
    (HERE / "snapshot.obj").write_bytes(seal_object(Kind.SNAPSHOT, signed, keys.meta_key,
                                                    nonce=nonce(3)))
    cfg = RepoConfig("golden-repo", 65536, 16 << 20, 1_700_000_000_000_000_000,
                     keys.fingerprint())
    (HERE / "config.obj").write_bytes(seal_object(Kind.REPO_CONFIG, cfg.encode(), keys.meta_key,
                                                  nonce=nonce(4)))
    # A v1 tree as a future writer might make it: an unknown entry type and unknown fields.
    future = msgpack.packb({"v": 1, "acl-scheme": 2, "e": [
        {"t": "f", "n": b"a.txt", "m": 0o100600, "u": 0, "g": 0, "mt": 5, "s": 0, "c": [],
         "xattrs": {"user.k": b"v"}},
        {"t": "w", "n": b"whiteout", "m": 0, "mt": 5},
    ]}, use_bin_type=True)
    (HERE / "future-tree.obj").write_bytes(seal_object(Kind.TREE, future, scope.data_key,
                                                       nonce=nonce(5)))
    newer = bytearray(seal_object(Kind.SNAPSHOT, b"\x00", keys.meta_key, nonce=nonce(6)))
    newer[4] = 2  # format version 2: not readable by v1
    (HERE / "newer-version.obj").write_bytes(bytes(newer))

    # A v1 segment whose change list holds an operation a future version might add.
    changes = msgpack.packb({"v": 1, "c": [
        {"op": "put", "p": b"sub/hello.txt", "t": 1_700_000_100_000_000_000,
         "e": tree.entries[0].to_map()},
        {"op": "del", "p": b"old-dir", "t": 1_700_000_100_000_000_001},
        {"op": "set-xattr", "p": b"sub/hello.txt", "t": 1_700_000_100_000_000_002,
         "name": "user.tag", "value": b"x"},
    ]}, use_bin_type=True)
    part = seal_object(Kind.SEGMENT_PART, changes, scope.data_key, nonce=nonce(7))
    seg = Segment(dev.device_id, 1, GENESIS, 1_700_000_100_000_000_000,
                  (SegmentPart("docs", 0, bytes(part)),))
    body = seg.encode()
    signed = Signed(body, dev.device_id, dev.sign(body)).encode()
    (HERE / "segment.obj").write_bytes(seal_object(Kind.SEGMENT, signed, keys.meta_key,
                                                   nonce=nonce(8)))


    # A v1 membership chain: the first device, then a second one (a member with one source)
    # and a partner, signed by the first; plus a member entry of a role a future version adds.
    from p2pbackup.format.membership import (MEMBER, OWNER, PARTNER, Member, Membership,
                                             record_hash, sign_membership)

    second, friend = DeviceIdentity(bytes(range(64, 96))), DeviceIdentity(bytes(range(96, 128)))
    recovery_pk = DeviceIdentity(keys.recovery_seed(0)).public_key
    first = Membership(1, b"", 0, (Member(dev.device_id, dev.public_key, "desk", OWNER,
                                          added_ns=1_700_000_000_000_000_000),),
                       recovery_key=recovery_pk, time_ns=1_700_000_000_000_000_000)
    s1 = sign_membership(first, dev.device_id, dev.sign)
    nxt = msgpack.unpackb(Membership(
        2, record_hash(s1), 0, first.members + (
            Member(second.device_id, second.public_key, "tablet", MEMBER, ("docs",), None, 5),
            Member(friend.device_id, friend.public_key, "nas", PARTNER, None, 50 << 30, 6)),
        recovery_key=recovery_pk, time_ns=1_700_000_000_000_000_001).encode(), raw=False)
    nxt["members"].append({"id": "0" * 32, "pk": b"\0" * 32, "role": "auditor"})
    nxt["future"] = "ignored"
    body2 = msgpack.packb(nxt, use_bin_type=True)
    s2 = Signed(body2, dev.device_id, dev.sign(body2)).encode()
    for i, signed_m in enumerate((s1, s2), 1):
        (HERE / f"membership-{i}.obj").write_bytes(
            seal_object(Kind.MEMBERSHIP, signed_m, keys.meta_key, nonce=nonce(8 + i)))

    # A v1 removal record (signed, not encrypted; envelope version 1: the body alone signed):
    # two data names and one it must ignore.
    from p2pbackup.format.cleartext import clear_object

    removal = msgpack.packb({"v": 1, "device": dev.device_id, "time": 1_700_000_000_000_000_000,
                             "names": ["config", "packs/" + "ab" * 32, "snapshots/" + "cd" * 32]},
                            use_bin_type=True)
    (HERE / "removal.obj").write_bytes(clear_object(
        Kind.REMOVAL, Signed(removal, dev.device_id, dev.sign(removal))))

    # Written by capture level 1 (Snapshot.capture): extended attributes on every kind, a
    # sparse file, a FIFO and two device nodes; a reader of level 0 skips the new kinds and
    # ignores the new fields.
    acl = bytes.fromhex("02000000010006000000ffff02000600d2040000040004000000ffff"
                        "100006000000ffff200004000000ffff")
    capture1 = Tree((
        TreeEntry(BLOCKDEV, b"blk", 0o60600, 0, 6, 1_700_000_000_000_000_010, rdev=(7, 200)),
        TreeEntry(FILE, b"disk.img", 0o100644, 1000, 1000, 1_700_000_000_000_000_011,
                  1_700_000_000_000_000_012, 43, 64 << 20, (cid,) * 2, sparse=True,
                  xattrs=((b"system.posix_acl_access", acl), (b"user.mime_type", b"x/raw"))),
        TreeEntry(DIR, b"etc", 0o40755, 0, 0, 1_700_000_000_000_000_013, subtree=tid,
                  xattrs=((b"system.posix_acl_default", acl),)),
        TreeEntry(FIFO, b"fifo", 0o10640, 1000, 1000, 1_700_000_000_000_000_014,
                  xattrs=((b"trusted.note", b"fifo"),)),
        TreeEntry(SYMLINK, b"link", 0o120777, 0, 0, 1_700_000_000_000_000_015,
                  target=b"disk.img", xattrs=((b"security.selinux", b"u:object_r:x\0"),)),
        TreeEntry(CHARDEV, b"null", 0o20666, 0, 0, 1_700_000_000_000_000_016, rdev=(1, 3)),
    ))
    (HERE / "tree-capture1.obj").write_bytes(seal_object(Kind.TREE, capture1.encode(),
                                                         scope.data_key, nonce=nonce(14)))
    snap1 = Snapshot(1_700_000_000_000_000_020, dev.device_id, "golden-host",
                     (SourceRoot("docs", "/home/user/docs", rid, 0, 1, 1, len(chunk)),),
                     log_seq=8, capture=1)
    body = snap1.encode()
    signed = Signed(body, dev.device_id, dev.sign(body)).encode()
    (HERE / "snapshot-capture1.obj").write_bytes(seal_object(Kind.SNAPSHOT, signed,
                                                             keys.meta_key, nonce=nonce(15)))

    # A roster (signed, not encrypted; envelope version 2 only, type roster): the owner and
    # the member of membership-2, one removed device, plus an entry of a role and a field a
    # future version adds (skipped).
    from p2pbackup.format.records import ROSTER_SIG

    roster = msgpack.packb({
        "v": 1, "seq": 1, "prev": b"", "time": 1_700_000_000_000_000_002,
        "members": [[dev.device_id, dev.public_key, "owner"],
                    [second.device_id, second.public_key, "member"],
                    ["0" * 32, b"\0" * 32, "auditor"]],
        "removed": ["f" * 32], "future": "ignored"}, use_bin_type=True)
    (HERE / "roster.obj").write_bytes(clear_object(
        Kind.ROSTER, Signed.make(ROSTER_SIG, roster, dev.device_id, dev.sign)))
    # Version 2 of that roster: the account's storage partner (`friend`) named apart in
    # `partners` (the broker relays between the account's devices and it); a reader from before
    # partners skips the field.
    from p2pbackup.format.roster import roster_hash

    roster2 = msgpack.packb({
        "v": 1, "seq": 2, "prev": roster_hash((HERE / "roster.obj").path.read_bytes()),
        "time": 1_700_000_000_000_000_003,
        "members": [[dev.device_id, dev.public_key, "owner"],
                    [second.device_id, second.public_key, "member"]],
        "partners": [[friend.device_id, friend.public_key]],
        "removed": ["f" * 32]}, use_bin_type=True)
    (HERE / "roster-partners.obj").write_bytes(clear_object(
        Kind.ROSTER, Signed.make(ROSTER_SIG, roster2, dev.device_id, dev.sign)))

    # Signed envelope version 2 (the record type is part of what is signed), and what came
    # with it: a removal version that pins what stays valid of the removed device and lists a
    # box key, the keyring signed by its epoch's recovery signer, and a pack of epoch 1 whose
    # trailer is sealed with that epoch's record key.
    from p2pbackup.crypto.keys import keyring_key_of
    from p2pbackup.format.membership import Kept, keyring_object
    from p2pbackup.format.objects import open_object
    from p2pbackup.format.records import SNAPSHOT_SIG

    root1 = bytes(range(128, 160))
    keys1 = keys.with_epoch(1, root1)
    body = snap.encode()
    (HERE / "snapshot-v2.obj").write_bytes(seal_object(
        Kind.SNAPSHOT, Signed.make(SNAPSHOT_SIG, body, dev.device_id, dev.sign).encode(),
        keys1.record_keys[1], nonce=nonce(20)))
    stored2 = (HERE_DIR / "membership-2.obj").read_bytes()
    s2_stored = bytes(open_object(stored2, keys.meta_key)[1])
    third = Membership(3, record_hash(s2_stored), 1, (
        Member(dev.device_id, dev.public_key, "desk", OWNER, added_ns=1_700_000_000_000_000_000,
               box_key=dev.box_public_key),
        Member(friend.device_id, friend.public_key, "nas", PARTNER, None, 50 << 30, 6)),
        removed=(second.device_id,),
        recovery_key=DeviceIdentity(keys1.recovery_seed(1)).public_key,
        time_ns=1_700_000_000_000_000_002,
        kept={second.device_id: Kept(frozenset({b"\x07" * 32}), 2, b"\x08" * 32)})
    (HERE / "membership-3.obj").write_bytes(seal_object(
        Kind.MEMBERSHIP, sign_membership(third, dev.device_id, dev.sign), keys.meta_key,
        nonce=nonce(21)))
    recovery1 = DeviceIdentity(keys1.recovery_seed(1))
    ring = seal_object(Kind.KEYRING, msgpack.packb(keys1.export(), use_bin_type=True),
                       keyring_key_of(root1), nonce=nonce(22))
    (HERE / "keyring-000001.obj").write_bytes(
        keyring_object(1, bytes(ring), recovery1.device_id, recovery1.sign))
    scope1 = keys1.scope("docs", 1)
    pack1 = PackBuilder("docs", 1)
    pack1.add(Kind.CHUNK, scope1.blob_id(chunk),
              seal_object(Kind.CHUNK, chunk, scope1.data_key, nonce=nonce(23)), len(chunk))
    (HERE / "pack-epoch1.bin").write_bytes(pack1.finish(keys1.record_keys[1])[1])

    # Tree version 2: small files stored together in one chunk (a bundle), each at its offset
    # in it, beside a file stored as its own chunk as before.
    bundle = b"first file\n" + b"second, longer file\n"
    bid = scope.blob_id(bundle)
    bundled = Tree((
        TreeEntry(FILE, b"a.txt", 0o100644, 1000, 1000, 1_700_000_000_000_000_030,
                  1_700_000_000_000_000_031, 50, 11, (bid,), offset=0),
        TreeEntry(FILE, b"b.txt", 0o100600, 1000, 1000, 1_700_000_000_000_000_032,
                  1_700_000_000_000_000_033, 51, 20, (bid,), offset=11),
        TreeEntry(FILE, b"hello.txt", 0o100644, 1000, 1000, 1_700_000_000_000_000_001,
                  1_700_000_000_000_000_002, 42, len(chunk), (cid,)),
    ))
    (HERE / "tree-bundle.obj").write_bytes(seal_object(Kind.TREE, bundled.encode(),
                                                       scope.data_key, nonce=nonce(24)))
    (HERE / "bundle.obj").write_bytes(seal_object(Kind.CHUNK, bundle, scope.data_key,
                                                  nonce=nonce(25)))


if __name__ == "__main__":
    main()
