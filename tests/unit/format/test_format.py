import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from p2pbackup.errors import IntegrityError, UnsupportedFormat
from p2pbackup.format import HEADER_SIZE, Kind, ObjectHeader, open_object, seal_object
from p2pbackup.format.pack import PackBuilder, parse_trailer, trailer_length
from p2pbackup.format.records import (BLOCKDEV, CAPTURE_LEVEL, CHARDEV, DIR, FIFO, FILE,
                                      SYMLINK, Snapshot, SourceRoot, Tree, TreeEntry,
                                      _plain_file)

KEY = bytes(range(32))


def test_seal_open_round_trip_and_compression():
    text = b"compressible " * 1000
    sealed = seal_object(Kind.CHUNK, text, KEY)
    assert sealed[:4] == b"P2PB" and len(sealed) < len(text)
    header, body = open_object(sealed, KEY, expect=Kind.CHUNK)
    assert body == text and header.kind == Kind.CHUNK
    noise = os.urandom(5000)
    sealed = seal_object(Kind.CHUNK, noise, KEY)
    assert open_object(sealed, KEY)[1] == noise
    assert ObjectHeader.decode(sealed).flags == 0  # incompressible: stored raw


def test_header_is_authenticated():
    sealed = bytearray(seal_object(Kind.TREE, b"x" * 100, KEY))
    sealed[5] = Kind.CHUNK  # claim another kind
    with pytest.raises(IntegrityError, match="authentication"):
        open_object(bytes(sealed), KEY)


def test_wrong_kind_and_wrong_key():
    sealed = seal_object(Kind.TREE, b"abc", KEY)
    with pytest.raises(IntegrityError, match="expected a chunk"):
        open_object(sealed, KEY, expect=Kind.CHUNK)
    with pytest.raises(IntegrityError, match="authentication"):
        open_object(sealed, bytes(32))


def test_newer_version_is_named_not_crashed():
    sealed = bytearray(seal_object(Kind.SNAPSHOT, b"abc", KEY))
    sealed[4] = 2
    with pytest.raises(UnsupportedFormat, match=r"newer p2pbackup \(format v2\); upgrade"):
        open_object(bytes(sealed), KEY, what="snapshot 1234")


def test_every_object_kind_has_its_own_number():
    """Two branches once gave the roster and the signed keyring both kind 14: an IntEnum makes
    the second name an alias of the first, and a keyring would then open as a roster."""
    assert len({k.value for k in Kind}) == len(Kind.__members__)
    assert (Kind.REMOVAL, Kind.ROSTER, Kind.SIGNED_KEYRING) == (13, 14, 15)  # never renumbered


@settings(max_examples=100)
@given(st.binary(max_size=2000), st.integers(min_value=0))
def test_truncated_objects_raise_integrity_error_only(payload, cut):
    sealed = seal_object(Kind.CHUNK, payload, KEY)
    cut = cut % len(sealed)
    with pytest.raises(IntegrityError):
        open_object(sealed[:cut], KEY)


@settings(max_examples=100)
@given(st.binary(max_size=200))
def test_garbage_raises_integrity_error_only(data):
    with pytest.raises((IntegrityError, UnsupportedFormat)):
        open_object(data, KEY)


names = st.binary(min_size=1, max_size=40).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
xattrs = st.lists(st.tuples(st.binary(min_size=1, max_size=20), st.binary(max_size=50)),
                  max_size=3).map(lambda xs: tuple(sorted(xs)))
devices = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))


def entry(*args, **kwargs) -> TreeEntry:
    # (not TreeEntry itself: builds would draw every field of a named tuple, those it is not
    # given included)
    return TreeEntry(*args, **kwargs)


entries = st.one_of(
    st.builds(entry, st.just(FILE), names, st.integers(0, 0o177777),
              st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(-2**63, 2**63 - 1),
              st.integers(-2**63, 2**63 - 1),
              st.integers(0, 2**64 - 1), st.integers(0, 2**40),
              st.lists(st.binary(min_size=32, max_size=32), max_size=4).map(tuple),
              xattrs=xattrs, sparse=st.booleans()),
    st.builds(entry, st.just(FILE), names, st.integers(0, 0o177777),  # stored in a bundle
              st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(-2**63, 2**63 - 1),
              st.integers(-2**63, 2**63 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**14),
              st.binary(min_size=32, max_size=32).map(lambda c: (c,)),
              offset=st.integers(0, 2**40)),
    st.builds(entry, st.just(DIR), names, st.integers(0, 0o177777), st.integers(0, 2**32 - 1),
              st.integers(0, 2**32 - 1), st.integers(-2**63, 2**63 - 1),
              subtree=st.binary(min_size=32, max_size=32), xattrs=xattrs),
    st.builds(entry, st.just(SYMLINK), names, st.integers(0, 0o177777),
              st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(-2**63, 2**63 - 1),
              target=st.binary(min_size=1, max_size=100), xattrs=xattrs),
    st.builds(entry, st.just(FIFO), names, st.integers(0, 0o177777),
              st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(-2**63, 2**63 - 1),
              xattrs=xattrs),
    st.builds(entry, st.sampled_from([CHARDEV, BLOCKDEV]), names,
              st.integers(0, 0o177777), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
              st.integers(-2**63, 2**63 - 1), xattrs=xattrs, rdev=devices),
)


@given(st.lists(entries, max_size=10, unique_by=lambda e: e.name))
def test_tree_round_trip_is_exact_and_deterministic(es):
    tree = Tree(tuple(es))
    data = tree.encode()
    assert Tree.decode(data) == tree
    assert Tree(tuple(es)).encode() == data


plain_files = st.builds(  # the usual file entry: what from_map's fast path takes
    entry, st.just(FILE), names, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1), st.integers(-2**63, 2**63 - 1), st.integers(-2**63, 2**63 - 1),
    st.integers(0, 2**64 - 1), st.integers(0, 2**63 - 1),
    st.lists(st.binary(min_size=32, max_size=32), max_size=4).map(tuple))


@given(plain_files, st.one_of(st.none(), st.integers(0, 2**63 - 1)))
def test_a_usual_file_map_takes_the_fast_path_and_decodes_as_field_by_field(e, offset):
    if offset is not None:
        e = e._replace(chunks=e.chunks[:1] or (bytes(32),), offset=offset)
    m = e.to_map()
    fast = _plain_file(TreeEntry, m)
    assert fast == e and type(fast) is TreeEntry
    # a field this version does not know sends the map field by field
    assert _plain_file(TreeEntry, {**m, "zz": 1}) is None
    slow = TreeEntry.from_map({**m, "zz": 1}, "tree")
    assert slow == fast and TreeEntry.from_map(m, "tree") == fast


@pytest.mark.parametrize("key,bad", [
    ("n", "name"), ("m", 2**32), ("m", "644"), ("u", -1), ("g", 1.5), ("mt", 2**63),
    ("ct", -2**63 - 1), ("ct", b"1"), ("i", 2**64), ("s", -1), ("s", 2**63), ("c", "chunk"),
    ("c", [b"short"]), ("c", [bytes(32), 5]), ("o", -1), ("o", "0"), ("t", "d")])
@pytest.mark.parametrize("bundled", [False, True])
def test_a_usual_file_map_with_one_bad_field_is_refused(key, bad, bundled):
    e = TreeEntry(FILE, b"a", 0o100644, 1, 2, 3, 4, 5, 6, (bytes(32),),
                  offset=7 if bundled else None)
    m = e.to_map()
    if key == "o" and not bundled:
        return
    m[key] = bad
    with pytest.raises(IntegrityError, match="malformed"):
        TreeEntry.from_map(m, "tree")


def test_a_bundled_file_map_with_two_chunks_is_refused():
    m = TreeEntry(FILE, b"a", 0o100644, 0, 0, 1, 1, 1, 1, (bytes(32),), offset=0).to_map()
    m["c"] = [bytes(32), bytes(32)]
    with pytest.raises(IntegrityError, match="bad offset"):
        TreeEntry.from_map(m, "tree")


def test_tree_readers_skip_unknown_entry_kinds_and_fields():
    import msgpack

    data = msgpack.packb({"v": 1, "future": "ignored", "e": [
        {"t": "f", "n": b"a", "m": 0o100644, "u": 0, "g": 0, "mt": 1, "s": 0, "c": [],
         "new-field": [1, 2]},
        {"t": "x-device-node", "n": b"b", "m": 0, "mt": 1},
    ]}, use_bin_type=True)
    tree = Tree.decode(data)
    assert [e.name for e in tree.entries] == [b"a"] and tree.skipped == 1


def test_snapshot_round_trip():
    snap = Snapshot(123, "d" * 32, "host", (SourceRoot("docs", "/d", b"t" * 32, 0, 3, 1, 99),),
                    log_seq=4, parent="p", warnings=1, capture=CAPTURE_LEVEL)
    assert Snapshot.decode(snap.encode()) == snap
    assert snap.sources[0].dir_entry() is None  # no metadata of the source folder itself


def test_source_root_carries_the_source_folders_own_metadata():
    root = SourceRoot("docs", "/d", b"t" * 32, 0, 3, 1, 99, mode=0o40751, uid=12, gid=34,
                      mtime_ns=1_600_000_000_000_000_007)
    snap = Snapshot(123, "d" * 32, "host", (root,))
    assert Snapshot.decode(snap.encode()) == snap
    assert root.dir_entry() == TreeEntry(DIR, b"docs", 0o40751, 12, 34,
                                         1_600_000_000_000_000_007, subtree=b"t" * 32)
    # Metadata no folder can have (fchown/utime would fail on it) is treated as absent.
    for bad in ({"uid": -5}, {"mode": "0755"}, {"mtime": 1 << 70}):
        m = {**root.to_map(), **bad}
        assert SourceRoot.from_map(m, "snapshot").dir_entry() is None


def test_source_root_carries_the_source_folders_xattrs():
    acl = ((b"system.posix_acl_default", b"\x02\0\0\0"), (b"user.k", b"v"))
    root = SourceRoot("docs", "/d", b"t" * 32, mode=0o40751, uid=12, gid=34, mtime_ns=5,
                      xattrs=acl)
    decoded = Snapshot.decode(Snapshot(123, "d" * 32, "host", (root,)).encode()).sources[0]
    assert decoded == root and decoded.dir_entry().xattrs == acl
    m = {**root.to_map(), "xa": [["user.k", b"v"]]}  # unusable: left out like bad metadata
    assert SourceRoot.from_map(m, "snapshot").xattrs == ()


# Not one plain path component: each would let a tree write outside its directory.
HOSTILE_NAMES = [b"", b".", b"..", b"../../escape", b"/abs", b"a/b", b"x\0y", b"..\0"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize("kind", [FILE, DIR, SYMLINK])
def test_tree_entries_whose_name_is_not_one_plain_component_are_refused(name, kind):
    entry = TreeEntry(kind, name, 0o644, 0, 0, 1, subtree=b"s" * 32 if kind == DIR else None,
                      target=b"x" if kind == SYMLINK else None)
    data = Tree((TreeEntry(FILE, b"fine", 0o644, 0, 0, 1), entry)).encode()
    with pytest.raises(IntegrityError, match="not a plain name"):
        Tree.decode(data)


def test_a_tree_with_two_entries_of_one_name_is_refused():
    data = Tree((TreeEntry(DIR, b"x", 0o40755, 0, 0, 1, subtree=b"s" * 32),
                 TreeEntry(SYMLINK, b"x", 0o120777, 0, 0, 1, target=b"/elsewhere"))).encode()
    with pytest.raises(IntegrityError, match="twice"):
        Tree.decode(data)


@pytest.mark.parametrize("name", ["", ".", "..", "../up", "/abs", "a/b", "x\0y"])
def test_source_roots_whose_name_is_not_one_plain_component_are_refused(name):
    snap = Snapshot(1, "d" * 32, "h", (SourceRoot("ok", "/ok", b"t" * 32),
                                       SourceRoot(name, "/x", b"t" * 32)))
    with pytest.raises(IntegrityError, match="not a plain name"):
        Snapshot.decode(snap.encode())


def test_a_snapshot_with_two_sources_of_one_name_is_refused():
    snap = Snapshot(1, "d" * 32, "h", (SourceRoot("docs", "/a", b"t" * 32),
                                       SourceRoot("docs", "/b", b"u" * 32)))
    with pytest.raises(IntegrityError, match="twice"):
        Snapshot.decode(snap.encode())


def test_pack_round_trip_and_truncation():
    b = PackBuilder("docs", 0)
    blobs = [os.urandom(1000) for _ in range(5)]
    for i, blob in enumerate(blobs):
        b.add(Kind.CHUNK, bytes([i]) * 32, seal_object(Kind.CHUNK, blob, KEY), len(blob))
    name, data, trailer = b.finish(KEY)
    got = parse_trailer(data, len(data), KEY, "pack")
    assert got == trailer and len(got.blobs) == 5
    for ref, blob in zip(got.blobs, blobs):
        assert open_object(data[ref.offset:ref.offset + ref.length], KEY)[1] == blob
    for cut in (1, 10, 100, len(data) // 2):
        with pytest.raises(IntegrityError):
            parse_trailer(data[:-cut], len(data) - cut, KEY, "pack")
    assert trailer_length(data, "pack") < len(data)
    assert struct.unpack(">I", data[-4:])[0] + 4 + HEADER_SIZE < len(data)


@given(st.lists(entries, max_size=12, unique_by=lambda e: e.name), st.integers(0, 14),
       st.integers(1, 5))
def test_a_page_of_a_tree_is_the_slice_of_the_whole(es, offset, limit):
    tree = Tree(tuple(sorted(es, key=lambda e: e.name)))
    total, page = Tree.page(tree.encode(), offset, limit)
    assert total == len(es) and page.entries == tree.entries[offset:offset + limit]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_page_whose_names_are_not_plain_is_refused(name):
    data = Tree((TreeEntry(FILE, b"fine", 0o644, 0, 0, 1),
                 TreeEntry(FILE, name, 0o644, 0, 0, 1))).encode()
    assert [e.name for e in Tree.page(data, 0, 1)[1].entries] == [b"fine"]
    with pytest.raises(IntegrityError, match="not a plain name"):
        Tree.page(data, 1, 1)


@given(st.binary(max_size=200), st.integers(0, 3))
def test_a_page_of_garbage_raises_integrity_error_only(data, offset):
    try:
        Tree.page(data, offset, 2)
    except (IntegrityError, UnsupportedFormat):
        pass


def test_a_page_of_a_truncated_or_newer_tree_is_refused_in_words():
    data = Tree(tuple(TreeEntry(FILE, b"f%d" % i, 0o644, 0, 0, 1) for i in range(9))).encode()
    with pytest.raises(IntegrityError, match="does not decode"):
        Tree.page(data[:-5], 0, 20)
    import msgpack

    newer = msgpack.packb({"v": 99, "e": []})
    with pytest.raises(UnsupportedFormat):
        Tree.page(newer, 0, 20)
