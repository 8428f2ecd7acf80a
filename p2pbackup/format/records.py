"""Typed records and their msgpack encoding.

Each record is a msgpack map with short string keys and a "v" version. Readers ignore keys they
do not know and skip tree entries of types they do not know (downgrade-safe); writers never
reuse a key for another meaning. Encoding is deterministic, so an unchanged directory encodes to
the same bytes and keeps its tree id.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

from ..errors import IntegrityError, UnsupportedFormat

RECORD_VERSION = 1
# Trees are written at version 2 when they hold a file stored with others in one chunk
# (TreeEntry.offset): a version-1 reader would take that whole chunk for the file. Trees
# without one are written at version 1, byte for byte as before (unchanged folders keep ids).
TREE_VERSION = 2

FILE, DIR, SYMLINK = "f", "d", "l"
FIFO, CHARDEV, BLOCKDEV = "p", "c", "b"  # the letters `ls -l` shows
SPECIAL_TYPES = frozenset({FIFO, CHARDEV, BLOCKDEV})
ENTRY_TYPES = frozenset({FILE, DIR, SYMLINK}) | SPECIAL_TYPES
# What a snapshot's entries record beyond stat (Snapshot.capture): 1 = extended attributes,
# sparseness, FIFOs and device nodes. A snapshot of a lower level left them out, so the next
# one reads them for files it would otherwise take over unread from it.
CAPTURE_LEVEL = 1


_B63 = 1 << 63  # added to a signed 64-bit time, it fits in 64 bits unsigned

def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes, what: str, newest: int = RECORD_VERSION) -> dict:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
            TypeError) as exc:
        raise IntegrityError(f"{what} does not decode: {exc}") from None
    if not isinstance(obj, dict):
        raise IntegrityError(f"{what} does not decode: not a map")
    version = obj.get("v", 0)
    if not isinstance(version, int) or version < 1:
        raise IntegrityError(f"{what} has no valid record version")
    if version > newest:
        raise UnsupportedFormat(what.capitalize(), version)
    return obj


_NOT_NAMES = frozenset({b"", b".", b".."})


def is_plain_name(name: bytes) -> bool:
    """Whether `name` is one path component: not empty, `.` or `..`, no `/` and no NUL.

    Restore joins names below its target: anything else could write outside it.
    """
    return name not in _NOT_NAMES and b"/" not in name and b"\0" not in name


def check_names(names: list[bytes], what: str, kind: str = "entry") -> None:
    """Every name plain and none twice, else IntegrityError (damage, or a hostile writer)."""
    # Every tree a restore or verify reads comes here: the usual case is checked with a few
    # C-level scans of all names at once (measured on a 5000-entry tree: decode 4% slower;
    # a call of is_plain_name per name made it 13% slower).
    joined = b"".join(names)
    if b"/" not in joined and b"\0" not in joined and _NOT_NAMES.isdisjoint(names) \
            and len(set(names)) == len(names):
        return
    seen: set[bytes] = set()
    for name in names:
        if not is_plain_name(name):
            raise IntegrityError(f"{what} is malformed: {kind} name {_shown(name)} is not a "
                                 "plain name")
        if name in seen:
            raise IntegrityError(f"{what} is malformed: {kind} name {_shown(name)} is there "
                                 "twice")
        seen.add(name)


def _fs_name(name: str, what: str) -> bytes:
    try:
        return os.fsencode(name)
    except UnicodeError:
        raise IntegrityError(f"{what} is malformed: source name {name!r} is not a file "
                             "name") from None


def _shown(name: bytes | str) -> str:
    return repr(name if isinstance(name, str) else
                name.decode("utf-8", "backslashreplace"))


def _need(obj: dict, key: str, typ: type | tuple[type, ...], what: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, typ):
        raise IntegrityError(f"{what} is malformed: field {key!r} is missing or has the wrong type")
    return value


class TreeEntry(NamedTuple):
    """One directory entry. `name` and `target` are raw file-system bytes.

    A named tuple, not a frozen dataclass: one is made for every entry of every tree a
    snapshot, restore or verify reads (a million for a million files), and a named tuple is
    made in 0.29 us, a frozen dataclass of these 19 fields in 1.86 us (its __init__ sets each
    field through object.__setattr__). Copies with changes: `entry._replace(...)`.
    """

    type: str
    name: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int = 0
    inode: int = 0
    size: int = 0
    chunks: tuple[bytes, ...] = ()
    subtree: bytes | None = None
    target: bytes | None = None
    nlink: int = 1
    sqlite: bool = False
    wal_mtime_ns: int = 0
    xattrs: tuple[tuple[bytes, bytes], ...] = ()  # (name, value), sorted by name
    sparse: bool = False  # a file with holes: restore leaves its zero runs unallocated
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node
    # A small file stored with its neighbours in one chunk (a bundle): its bytes are `size`
    # bytes from this offset of its only chunk. None: the file is its chunks, whole.
    offset: int | None = None

    def to_map(self) -> dict:
        m: dict[str, Any] = {"t": self.type, "n": self.name, "m": self.mode, "u": self.uid,
                             "g": self.gid, "mt": self.mtime_ns}
        if self.type == FILE:
            m.update(ct=self.ctime_ns, i=self.inode, s=self.size, c=list(self.chunks))
            if self.nlink > 1:
                m["nl"] = self.nlink
            if self.sqlite:
                m["sq"] = True
                m["wm"] = self.wal_mtime_ns
            if self.sparse:
                m["sp"] = True
            if self.offset is not None:
                m["o"] = self.offset
        elif self.type == DIR:
            m["sub"] = self.subtree
        elif self.type == SYMLINK:
            m["lt"] = self.target
        elif self.type in (CHARDEV, BLOCKDEV):
            m["rd"] = list(self.rdev)
        if self.xattrs:
            m["xa"] = [list(x) for x in self.xattrs]
        return m

    @classmethod
    def from_map(cls, m: dict, what: str) -> "TreeEntry":
        # Called for every entry of every tree a snapshot, restore, verify or prune reads: the
        # usual file entry takes the fast path (below); anything else, and any entry that
        # fails a test there, is checked here, where _need names the field at fault.
        entry = _plain_file(cls, m)
        if entry is not None:
            return entry
        # The usual case is checked with a few type() tests and built positionally (2x faster
        # than _need per field and keyword arguments).
        g = m.get
        t, name, mode, mtime, uid, gid = g("t"), g("n"), g("m"), g("mt"), g("u", 0), g("g", 0)
        if type(name) is not bytes or type(mode) is not int or type(mtime) is not int:
            name, mode = _need(m, "n", bytes, what), _need(m, "m", int, what)
            mtime = _need(m, "mt", int, what)
        # Restore hands these to fchown/fchmod/utime: a number no file system holds (or no
        # number) is damage here, not an internal error there. Shifts check type and range
        # at once (a str, bytes or float raises TypeError): this runs for every entry read.
        try:
            ok = (uid | gid | mode) >> 32 == 0 and (mtime + _B63) >> 64 == 0
        except TypeError:
            ok = False
        if not ok:
            raise IntegrityError(f"{what} is malformed: impossible owner, mode or time in "
                                 f"{name!r}")
        if t == FILE:
            chunks, size = g("c"), g("s")
            if type(chunks) is not list or type(size) is not int:
                chunks, size = _need(m, "c", list, what), _need(m, "s", int, what)
            for c in chunks:
                if type(c) is not bytes or len(c) != 32:
                    raise IntegrityError(f"{what} is malformed: bad chunk id in {name!r}")
            ct, ino, nl, wm = g("ct", 0), g("i", 0), g("nl", 1), g("wm", 0)
            try:
                ok = (ino >> 64 | size >> 63 | nl >> 32 | (ct + _B63 | wm + _B63) >> 64) == 0 \
                    and nl > 0
            except TypeError:
                ok = False
            if not ok:
                raise IntegrityError(f"{what} is malformed: impossible size, inode, link count "
                                     f"or time in {name!r}")
            xa, offset = g("xa"), g("o")
            if offset is not None and (type(offset) is not int or not 0 <= offset < 1 << 63
                                       or len(chunks) != 1):
                raise IntegrityError(f"{what} is malformed: bad offset in {name!r}")
            return cls(t, name, mode, uid, gid, mtime, ct, ino, size,
                       tuple(chunks), None, None, nl, bool(g("sq", False)), wm,
                       () if xa is None else _xattrs(xa, name, what), bool(g("sp", False)),
                       (0, 0), offset)
        xa = g("xa")
        xattrs = () if xa is None else _xattrs(xa, name, what)
        if t == DIR:
            return cls(t, name, mode, uid, gid, mtime,
                       subtree=_need(m, "sub", bytes, what), xattrs=xattrs)
        if t == SYMLINK:
            return cls(t, name, mode, uid, gid, mtime,
                       target=_need(m, "lt", bytes, what), xattrs=xattrs)
        rdev = (0, 0)
        if t != FIFO:
            rd = _need(m, "rd", list, what)
            if len(rd) != 2 or not all(type(x) is int and 0 <= x < 1 << 32 for x in rd):
                raise IntegrityError(f"{what} is malformed: bad device number in {name!r}")
            rdev = (rd[0], rd[1])
        return cls(t, name, mode, uid, gid, mtime, xattrs=xattrs, rdev=rdev)


_NO_RDEV = (0, 0)
_new_tuple = tuple.__new__


def _plain_file(cls: type[TreeEntry], m: dict) -> TreeEntry | None:
    """The entry of the usual file map, checked as from_map checks it, or None for from_map to
    check it field by field (another shape, or a test fails).

    The usual file map has exactly the keys TreeEntry.to_map always writes for a file, and
    "o" for a file in a bundle: a map of 10 (11) keys that holds all of them (and "o") holds
    nothing else, so every other field has its default.

    A third of from_map's former cost per entry: indexing instead of 16 dict.get calls, one
    range test for all numbers, and the tuple built without NamedTuple's __new__ (measured on
    a tree of 1,000 bundled files: 1.0 us per entry instead of 1.6).
    """
    n = len(m)
    if n != 10 and n != 11:
        return None
    try:
        t, name, mode, uid, gid, mtime = m["t"], m["n"], m["m"], m["u"], m["g"], m["mt"]
        ct, ino, size, chunks = m["ct"], m["i"], m["s"], m["c"]
        offset = m["o"] if n == 11 else None
    except KeyError:
        return None
    if t != FILE or type(name) is not bytes or type(chunks) is not list:
        return None
    try:  # the ranges from_map checks; a str, bytes or float raises TypeError
        if ((uid | gid | mode) >> 32 | (mtime + _B63 | ct + _B63) >> 64 | ino >> 64
                | size >> 63):
            return None
    except TypeError:
        return None
    for c in chunks:
        if type(c) is not bytes or len(c) != 32:
            return None
    if offset is not None and (type(offset) is not int or not 0 <= offset < 1 << 63
                               or len(chunks) != 1):
        return None
    return _new_tuple(cls, (FILE, name, mode, uid, gid, mtime, ct, ino, size, tuple(chunks),
                            None, None, 1, False, 0, (), False, _NO_RDEV, offset))


def _xattrs(raw: object, name: bytes, what: str) -> tuple[tuple[bytes, bytes], ...]:
    if type(raw) is not list or not all(type(x) is list and len(x) == 2 and type(x[0]) is bytes
                                        and type(x[1]) is bytes for x in raw):
        raise IntegrityError(f"{what} is malformed: bad extended attributes in {name!r}")
    return tuple((k, v) for k, v in raw)


@dataclass(frozen=True, slots=True)
class Tree:
    """One directory's entries, sorted by name."""

    entries: tuple[TreeEntry, ...]
    skipped: int = 0  # entries of unknown types met while decoding

    def encode(self) -> bytes:
        maps = [e.to_map() for e in self.entries]
        version = TREE_VERSION if any("o" in m for m in maps) else RECORD_VERSION
        return _pack({"v": version, "e": maps})

    @classmethod
    def decode(cls, data: bytes, what: str = "tree") -> "Tree":
        obj = _unpack(data, what, TREE_VERSION)
        entries, skipped = _entries(_need(obj, "e", list, what), what)
        return cls(entries, skipped)

    @classmethod
    def page(cls, data: bytes, offset: int, limit: int, what: str = "tree"
             ) -> tuple[int, "Tree"]:
        """Entries `offset` to `offset + limit` of the encoded tree `data`, and how many it
        holds (entries of kinds this version skips count), decoding only those: a folder of
        100,000 files takes ~0.9 s to decode whole, ~20 ms a page. The names of the page are
        checked; names twice in the whole folder are found only by `decode` (restore's)."""
        try:
            unpacker = msgpack.Unpacker(raw=False, strict_map_key=False,
                                        max_buffer_size=max(len(data), 1))
            unpacker.feed(data)
            version = None
            for _ in range(unpacker.read_map_header()):
                key = unpacker.unpack()
                if key == "v":
                    version = unpacker.unpack()
                    if not isinstance(version, int) or version < 1:
                        raise IntegrityError(f"{what} has no valid record version")
                    if version > TREE_VERSION:
                        raise UnsupportedFormat(what.capitalize(), version)
                elif key != "e":
                    unpacker.skip()   # a field of a newer writer
                elif version is None:   # not as written here (v first): read it whole
                    whole = cls.decode(data, what)
                    return (len(whole.entries) + whole.skipped,
                            cls(whole.entries[offset:offset + limit]))
                else:
                    total = unpacker.read_array_header()
                    for _ in range(min(offset, total)):
                        unpacker.skip()
                    raw = [unpacker.unpack() for _ in range(max(0, min(limit, total - offset)))]
                    break
            else:
                raise IntegrityError(f"{what} has no valid record version" if version is None
                                     else f"{what} is malformed: no entries")
        except (msgpack.UnpackException, ValueError, TypeError) as exc:  # (and OutOfData)
            raise IntegrityError(f"{what} does not decode: {exc}") from None
        entries, skipped = _entries(raw, what)
        return total, cls(entries, skipped)


def _entries(raw: list, what: str) -> tuple[tuple["TreeEntry", ...], int]:
    """A tree's entry maps decoded and checked, and how many were of unknown kinds."""
    entries, skipped = [], 0
    for m in raw:
        if type(m) is dict:  # the usual file entry, without from_map's tests before it
            entry = _plain_file(TreeEntry, m)
            if entry is not None:
                entries.append(entry)
                continue
        if not isinstance(m, dict):
            raise IntegrityError(f"{what} is malformed: an entry is not a map")
        if m.get("t") not in ENTRY_TYPES:
            skipped += 1  # written by a newer version: skip, do not fail
            continue
        entries.append(TreeEntry.from_map(m, what))
    check_names([e.name for e in entries], what)
    return tuple(entries), skipped


@dataclass(frozen=True, slots=True)
class SourceRoot:
    """One backed-up source inside a snapshot.

    `mode`, `uid`, `gid`, `mtime_ns` and `xattrs` are the source folder's own metadata (None
    and () in snapshots written before they were recorded: restore then leaves the folder as it
    makes it).
    """

    name: str
    path: str
    tree: bytes
    epoch: int = 0
    files: int = 0
    dirs: int = 0
    size: int = 0
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    xattrs: tuple[tuple[bytes, bytes], ...] = ()

    def to_map(self) -> dict:
        m = {"name": self.name, "path": self.path, "tree": self.tree, "epoch": self.epoch,
             "files": self.files, "dirs": self.dirs, "size": self.size}
        if self.mode is not None:
            m.update(mode=self.mode, uid=self.uid, gid=self.gid, mtime=self.mtime_ns)
        if self.xattrs:
            m["xa"] = [list(x) for x in self.xattrs]
        return m

    @classmethod
    def from_map(cls, m: dict, what: str) -> "SourceRoot":
        meta = [m.get(k) for k in ("mode", "uid", "gid", "mtime")]
        if not all(type(v) is int for v in meta) or not all(0 <= v < 1 << 32 for v in meta[:3]) \
                or not -1 << 63 <= meta[3] < 1 << 63:
            meta = [None] * 4  # absent (an older writer) or unusable: the folder as made
        try:
            xattrs = _xattrs(m.get("xa", []), b"", what)
        except IntegrityError:
            xattrs = ()  # unusable, as the rest of the folder's metadata above
        return cls(_need(m, "name", str, what), _need(m, "path", str, what),
                   _need(m, "tree", bytes, what), m.get("epoch", 0), m.get("files", 0),
                   m.get("dirs", 0), m.get("size", 0), *meta, xattrs)

    def dir_entry(self) -> TreeEntry | None:
        """The source folder as a directory entry, if the snapshot recorded its metadata."""
        if self.mode is None:
            return None
        return TreeEntry(DIR, os.fsencode(self.name), self.mode, self.uid or 0, self.gid or 0,
                         self.mtime_ns or 0, subtree=self.tree, xattrs=self.xattrs)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A roll-up of the device's sources at one moment, signed by the device that took it."""

    time_ns: int
    device: str
    hostname: str
    sources: tuple[SourceRoot, ...]
    log_seq: int = 0
    parent: str | None = None
    warnings: int = 0  # files that could not be read
    capture: int = 0  # the CAPTURE_LEVEL of the writer; 0 before levels existed

    def encode(self) -> bytes:
        return _pack({"v": RECORD_VERSION, "time": self.time_ns, "device": self.device,
                      "host": self.hostname, "sources": [s.to_map() for s in self.sources],
                      "seq": self.log_seq, "parent": self.parent, "warnings": self.warnings,
                      "cap": self.capture})

    @classmethod
    def decode(cls, data: bytes, what: str = "snapshot") -> "Snapshot":
        obj = _unpack(data, what)
        sources = tuple(SourceRoot.from_map(m, what) for m in _need(obj, "sources", list, what)
                        if isinstance(m, dict))
        # Restore writes each source to <target>/<name>: a name must be one folder name.
        check_names([_fs_name(s.name, what) for s in sources], what, "source")
        capture = obj.get("cap", 0)
        return cls(_need(obj, "time", int, what), _need(obj, "device", str, what),
                   obj.get("host", ""), sources, obj.get("seq", 0), obj.get("parent"),
                   obj.get("warnings", 0), capture if isinstance(capture, int) else 0)

    @property
    def size(self) -> int:
        return sum(s.size for s in self.sources)


# What a signature is for. From envelope version 2 on, the signed message starts with the
# record's type, so a signature made for one type never verifies as another (a head is not a
# log anchor, though both are the same body sealed as the same kind under the same key).
SNAPSHOT_SIG, SEGMENT_SIG, HEAD_SIG, ANCHOR_SIG = "snapshot", "segment", "head", "anchor"
DEVICE_SIG, MEMBERSHIP_SIG, REMOVAL_SIG, KEYRING_SIG = "device", "membership", "removal", \
    "keyring"
SESSION_SIG, ROSTER_SIG = "session", "roster"
SIGNED_TYPES = frozenset({SNAPSHOT_SIG, SEGMENT_SIG, HEAD_SIG, ANCHOR_SIG, DEVICE_SIG,
                          MEMBERSHIP_SIG, REMOVAL_SIG, KEYRING_SIG, SESSION_SIG, ROSTER_SIG})
SIGNED_VERSION = 2

# Envelope version 1 signed the body alone. Stores hold such records, so readers still accept
# them for the types below: each of their decoders needs fields that no other type's body has
# (tests/unit/format/test_signed.py checks it), so a version-1 signature cannot be carried to
# another of these types. Not for anchors (a head's body is an anchor's body: the log store
# accepts an old anchor only where the log really was folded), keyrings nor rosters (both
# signed from version 2 on only: no released version wrote them otherwise).
LEGACY_SIGNED = frozenset({SNAPSHOT_SIG, SEGMENT_SIG, HEAD_SIG, DEVICE_SIG, MEMBERSHIP_SIG,
                           REMOVAL_SIG, SESSION_SIG})


def signed_message(sig_type: str, body: bytes) -> bytes:
    """The bytes a version-2 signature covers: `p2pbackup|<type>|v2|` and the body."""
    return b"p2pbackup|%s|v%d|%s" % (sig_type.encode(), SIGNED_VERSION, body)


@dataclass(frozen=True, slots=True)
class Signed:
    """A record's encoding and its device signature."""

    body: bytes
    device: str
    signature: bytes
    type: str = ""                 # what the body is (envelope version 2 on)
    version: int = 1               # 1: the body alone was signed (records written before 2)

    @classmethod
    def make(cls, sig_type: str, body: bytes, device: str,
             sign: Callable[[bytes], bytes]) -> "Signed":
        """Sign `body` as a record of `sig_type` (one of SIGNED_TYPES)."""
        if sig_type not in SIGNED_TYPES:
            raise ValueError(f"unknown signed record type {sig_type!r}")
        return cls(body, device, sign(signed_message(sig_type, body)), sig_type, SIGNED_VERSION)

    def encode(self) -> bytes:
        if self.version < 2:
            return _pack({"v": 1, "body": self.body, "dev": self.device, "sig": self.signature})
        return _pack({"v": self.version, "t": self.type, "body": self.body, "dev": self.device,
                      "sig": self.signature})

    @classmethod
    def decode(cls, data: bytes, what: str) -> "Signed":
        obj = _unpack(data, what, SIGNED_VERSION)
        version = obj["v"]
        sig_type = _need(obj, "t", str, what) if version >= 2 else ""
        return cls(_need(obj, "body", bytes, what), _need(obj, "dev", str, what),
                   _need(obj, "sig", bytes, what), sig_type, version)

    def verifies(self, sig_type: str, public_key: bytes,
                 verify: Callable[[bytes, bytes, bytes], bool], *,
                 legacy: bool | None = None) -> bool:
        """True if this is `public_key`'s signature of the body as a record of `sig_type`.

        A version-1 envelope (no type) counts only where `legacy` allows it (by default: for
        the types in LEGACY_SIGNED).
        """
        if self.version >= 2:
            return self.type == sig_type and \
                verify(public_key, signed_message(sig_type, self.body), self.signature)
        if not (sig_type in LEGACY_SIGNED if legacy is None else legacy):
            return False
        return verify(public_key, self.body, self.signature)


@dataclass(frozen=True, slots=True)
class BlobRef:
    """Where a blob sits inside its pack."""

    kind: int
    id: bytes
    offset: int
    length: int
    raw_length: int


@dataclass(frozen=True, slots=True)
class PackTrailer:
    """The list of blobs at the end of a pack, so the index can be rebuilt from packs alone."""

    scope: str
    epoch: int
    blobs: tuple[BlobRef, ...]

    def encode(self) -> bytes:
        return _pack({"v": RECORD_VERSION, "scope": self.scope, "epoch": self.epoch,
                      "b": [[b.kind, b.id, b.offset, b.length, b.raw_length] for b in self.blobs]})

    @classmethod
    def decode(cls, data: bytes, what: str = "pack trailer") -> "PackTrailer":
        obj = _unpack(data, what)
        blobs = []
        for row in _need(obj, "b", list, what):
            if (not isinstance(row, list) or len(row) < 5 or not isinstance(row[1], bytes)
                    or not all(isinstance(x, int) for x in (row[0], row[2], row[3], row[4]))):
                raise IntegrityError(f"{what} is malformed: bad blob row")
            blobs.append(BlobRef(row[0], row[1], row[2], row[3], row[4]))
        return cls(_need(obj, "scope", str, what), obj.get("epoch", 0), tuple(blobs))


@dataclass(frozen=True, slots=True)
class RepoConfig:
    """The store's identity and the parameters every writer must share."""

    repo_id: str
    chunk_avg: int
    pack_size: int
    created_ns: int
    account_fingerprint: str
    extra: dict = field(default_factory=dict)

    def encode(self) -> bytes:
        return _pack({"v": RECORD_VERSION, "id": self.repo_id, "chunk_avg": self.chunk_avg,
                      "pack_size": self.pack_size, "created": self.created_ns,
                      "account": self.account_fingerprint})

    @classmethod
    def decode(cls, data: bytes, what: str = "repository config") -> "RepoConfig":
        obj = _unpack(data, what)
        return cls(_need(obj, "id", str, what), _need(obj, "chunk_avg", int, what),
                   _need(obj, "pack_size", int, what), obj.get("created", 0),
                   obj.get("account", ""))


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A device's public identity as stored in the repository."""

    device_id: str
    public_key: bytes
    name: str
    created_ns: int

    def encode(self) -> bytes:
        return _pack({"v": RECORD_VERSION, "id": self.device_id, "pk": self.public_key,
                      "name": self.name, "created": self.created_ns})

    @classmethod
    def decode(cls, data: bytes, what: str = "device record") -> "DeviceRecord":
        obj = _unpack(data, what)
        return cls(_need(obj, "id", str, what), _need(obj, "pk", bytes, what),
                   obj.get("name", ""), obj.get("created", 0))
