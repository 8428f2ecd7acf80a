"""Hand-built trees whose new fields (extended attributes, device numbers) are malformed are
refused as damaged (IntegrityError, exit 13), never a crash deeper in snapshot or restore."""

from __future__ import annotations

import msgpack
import pytest

from p2pbackup.errors import IntegrityError
from p2pbackup.format.log import ChangeList
from p2pbackup.format.records import Tree

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
