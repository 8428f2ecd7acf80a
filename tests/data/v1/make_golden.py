"""Writes the version 1 golden files. Run once, when format v1 was made; never rewrite them.

Later versions of p2pbackup must still read every file here (tests/unit/format/test_golden.py).
"""

from __future__ import annotations

from pathlib import Path

import msgpack

from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.crypto.keys import AccountKeys
from p2pbackup.format.header import Kind
from p2pbackup.format.objects import seal_object
from p2pbackup.format.pack import PackBuilder
from p2pbackup.format.records import (FILE, DIR, SYMLINK, RepoConfig, Signed, Snapshot,
                                      SourceRoot, Tree, TreeEntry)

HERE = Path(__file__).parent
ACCOUNT_KEY = bytes(range(32))
DEVICE_SEED = bytes(range(32, 64))


def nonce(i: int) -> bytes:
    return bytes([i]) * 24


def main() -> None:
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


if __name__ == "__main__":
    main()
