"""Hand-built trees whose new fields (extended attributes, device numbers, offsets in a
bundle) are malformed are refused as damaged (IntegrityError, exit 13), never a crash deeper
in snapshot or restore, and never bytes from outside what the entry names."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest

from p2pbackup.backup.restore import restore
from p2pbackup.backup.verify import verify
from p2pbackup.errors import IntegrityError
from p2pbackup.format.header import Kind
from p2pbackup.format.log import ChangeList
from p2pbackup.format.records import FILE as FILE_TYPE, SourceRoot, Tree, TreeEntry
from p2pbackup.repo.repository import Repository
from tests.adversary.hostile import hostile_snapshot, store_blob

BASE = {"n": b"x", "m": 0o100644, "u": 0, "g": 0, "mt": 1}
FILE = {**BASE, "t": "f", "s": 0, "c": []}


def _tree(entry: dict) -> bytes:
    return msgpack.packb({"v": 1, "e": [entry]}, use_bin_type=True)


@pytest.mark.parametrize("xattrs", [
    {"user.a": b"v"},                 # a map, not a list of pairs
    [[b"user.a"]],                    # a pair without a value
    [["user.a", b"v"]],               # a name that is not bytes
    [[b"user.a", 5]],                 # a value that is not bytes
    b"user.a=v",
])
@pytest.mark.parametrize("kind", [FILE, {**BASE, "t": "d", "sub": b"s" * 32},
                                  {**BASE, "t": "l", "lt": b"t"}, {**BASE, "t": "p"}])
def test_tree_with_malformed_xattrs_is_refused_as_damaged(kind: dict, xattrs: object):
    with pytest.raises(IntegrityError, match="bad extended attributes"):
        Tree.decode(_tree({**kind, "xa": xattrs}))


@pytest.mark.parametrize("rdev", [None, [1], [1, 2, 3], [-1, 3], [1, 1 << 32], ["1", "3"],
                                  [1.0, 3]])
def test_device_node_with_an_impossible_number_is_refused_as_damaged(rdev: object):
    entry = {**BASE, "t": "c"}
    if rdev is not None:
        entry["rd"] = rdev
    with pytest.raises(IntegrityError):
        Tree.decode(_tree(entry))


def test_logged_entry_with_malformed_xattrs_is_refused_as_damaged():
    changes = msgpack.packb({"v": 1, "c": [{"op": "put", "p": b"x", "t": 1,
                                            "e": {**FILE, "xa": [[b"k", None]]}}]},
                            use_bin_type=True)
    with pytest.raises(IntegrityError, match="bad extended attributes"):
        ChangeList.decode(changes)


@pytest.mark.parametrize("field,value", [
    ("u", "root"), ("u", -5), ("u", 1 << 40), ("g", -1), ("g", b"0"),
    ("m", -1), ("m", 1 << 40), ("mt", 1 << 63), ("mt", "yesterday"),
    ("ct", 1 << 63), ("i", -3), ("nl", 0), ("nl", "2"), ("s", -1), ("s", 1 << 63),
    ("wm", 1 << 63),
])
@pytest.mark.parametrize("kind", [FILE, {**BASE, "t": "d", "sub": b"s" * 32},
                                  {**BASE, "t": "l", "lt": b"t"}, {**BASE, "t": "p"}])
def test_entry_with_numbers_no_file_system_holds_is_refused_as_damaged(kind: dict, field: str,
                                                                       value: object):
    """Owner, mode, times, sizes: a number restore would hand to fchown/utime/ftruncate that
    no file system holds (or no number at all) is damage, not an internal error later."""
    if field in ("ct", "i", "nl", "s", "wm") and kind is not FILE:
        return  # only files carry these
    with pytest.raises(IntegrityError, match="malformed"):
        Tree.decode(_tree({**kind, field: value}))


@pytest.mark.parametrize("offset,chunks", [
    (-1, [b"c" * 32]), ("0", [b"c" * 32]), (1 << 63, [b"c" * 32]), (1.0, [b"c" * 32]),
    (0, []), (0, [b"c" * 32, b"d" * 32]),  # a bundled file lies in exactly one chunk
])
def test_a_bundled_entry_with_a_malformed_offset_is_refused_as_damaged(offset: object,
                                                                         chunks: list):
    with pytest.raises(IntegrityError, match="bad offset"):
        Tree.decode(msgpack.packb({"v": 2, "e": [{**FILE, "s": 1, "c": chunks, "o": offset}]},
                                  use_bin_type=True))


async def test_a_bundled_file_reaching_past_its_bundle_is_not_restored(repo: Repository,
                                                                        tmp_path: Path):
    """An entry whose offset and size reach past the end of its bundle gets no bytes from
    beyond it (nor a short file): it is named as damaged, its neighbour is restored."""
    bundle = b"0123456789abcdef"
    bid = await store_blob(repo, "src", Kind.CHUNK, bundle)

    def entry(name: bytes, offset: int, size: int) -> TreeEntry:
        return TreeEntry(FILE_TYPE, name, 0o100644, os.geteuid(), os.getegid(), 1, size=size,
                         chunks=(bid,), offset=offset)

    tree = await store_blob(repo, "src", Kind.TREE, Tree((
        entry(b"good", 4, 6), entry(b"past-the-end", 10, 7),
        entry(b"far-away", 1 << 40, 1))).encode())
    stored = await hostile_snapshot(repo, [SourceRoot("src", "/src", tree)])
    out = tmp_path / "out"
    summary = await restore(repo, stored, str(out))
    assert (out / "src" / "good").read_bytes() == b"456789"
    assert sorted(os.listdir(out / "src")) == ["good"]
    assert sorted(line.split(": ")[0] for line in summary.failed) == \
        [str(out / "src" / "far-away"), str(out / "src" / "past-the-end")]
    assert all("beyond its bundle" in line for line in summary.failed)
    kept = await restore(repo, stored, str(tmp_path / "kept"), keep_damaged=True)
    assert (tmp_path / "kept" / "src" / "past-the-end").read_bytes() == bytes(7)
    assert len(kept.damaged) == 2 and kept.failed == []
    report = await verify(repo)  # without reading data: the index knows the bundle's length
    assert sorted(d.reason.split(" reaches past its bundle")[0] for d in report.damage) == \
        ["src/far-away", "src/past-the-end"]
