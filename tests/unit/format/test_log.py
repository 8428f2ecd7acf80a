"""Segments, change lists, heads and the hash chain (pure, bytes only)."""

import msgpack
import pytest
from hypothesis import given, strategies as st

from p2pbackup.errors import IntegrityError
from p2pbackup.format.log import (DEL, GENESIS, PUT, Change, ChangeList, Head, Segment,
                                  SegmentPart, check_chain, check_head_update, head_time_after,
                                  segment_hash)
from p2pbackup.format.records import FILE, TreeEntry

ENTRY = TreeEntry(FILE, b"a.txt", 0o100644, 0, 0, 5, 6, 7, 3, (b"c" * 32,))


def test_change_list_round_trip():
    cl = ChangeList((Change(PUT, b"docs/a.txt", 10, ENTRY), Change(DEL, b"old", 11)))
    assert ChangeList.decode(cl.encode()) == cl


def test_unknown_operations_are_skipped():
    data = msgpack.packb({"v": 1, "c": [
        {"op": "del", "p": b"x", "t": 1},
        {"op": "chattr", "p": b"y", "t": 2, "xattr": {"k": b"v"}},
        {"op": "put", "p": b"z", "t": 3, "e": {"t": "whiteout", "n": b"z", "m": 0, "mt": 0}},
    ]}, use_bin_type=True)
    cl = ChangeList.decode(data)
    assert [c.path for c in cl.changes] == [b"x"] and cl.skipped == 2


@pytest.mark.parametrize("path", [b"", b"/abs", b"a/../b", b"..", b"../../escape", b".",
                                  b"a/./b", b"a//b", b"a/", b"x\0y", b"a/x\0y/b"])
def test_paths_cannot_escape_the_source(path):
    data = msgpack.packb({"v": 1, "c": [{"op": "del", "p": path, "t": 1}]}, use_bin_type=True)
    with pytest.raises(IntegrityError):
        ChangeList.decode(data)


def test_entry_names_inside_changes_are_checked_too():
    bad = {"t": "f", "n": b"../x", "m": 0o644, "mt": 1, "s": 0, "c": []}
    data = msgpack.packb({"v": 1, "c": [{"op": "put", "p": b"x", "t": 1, "e": bad}]},
                         use_bin_type=True)
    with pytest.raises(IntegrityError, match="not a plain name"):
        ChangeList.decode(data)


def _chain(n: int, device: str = "d" * 32) -> list[tuple[bytes, Segment]]:
    out, prev = [], GENESIS
    for seq in range(1, n + 1):
        seg = Segment(device, seq, prev, 1000 - seq, (SegmentPart("docs", 0, b"x"),))
        h = segment_hash(seg.encode())
        out.append((h, seg))
        prev = h
    return out


def test_chain_checks_each_link_and_ignores_time():
    chain = _chain(5)  # times go backwards on purpose: seq orders, time is metadata
    assert check_chain(chain, "d" * 32) == []
    assert "segment 3 is missing" in check_chain(chain[:2] + chain[3:], "d" * 32)[0]
    forged = Segment("d" * 32, 3, b"f" * 32, 0, ())
    bad = chain[:2] + [(segment_hash(forged.encode()), forged)] + chain[3:]
    assert any("does not follow" in p for p in check_chain(bad, "d" * 32))


def test_head_never_goes_backwards_or_forks():
    h5 = Head("d" * 32, 5, b"a" * 32, None, 1)
    assert check_head_update(None, h5) is None
    assert check_head_update(h5, Head("d" * 32, 6, b"b" * 32, "s", 0)) is None
    assert "backwards" in check_head_update(h5, Head("d" * 32, 4, b"b" * 32, None, 9))
    assert "forks" in check_head_update(h5, Head("d" * 32, 5, b"b" * 32, None, 9))
    assert "not newer" in check_head_update(h5, Head("d" * 32, 5, b"a" * 32, "s", 1))
    assert check_head_update(h5, Head("d" * 32, 5, b"a" * 32, "s", 2)) is None
    # A snapshot's head is written after the current one even when the clock went back.
    assert head_time_after(h5, 0) == 2 and head_time_after(h5, 7) == 7
    assert head_time_after(None, 7) == 7
    assert Head.decode(h5.encode()) == h5


@given(st.binary(max_size=300))
def test_garbage_segments_raise_integrity_error_only(data):
    from p2pbackup.errors import UnsupportedFormat

    with pytest.raises((IntegrityError, UnsupportedFormat)):
        Segment.decode(data)
