"""The 12-byte header every object starts with; it is also the AEAD associated data.

    MAGIC b"P2PB" | version u8 | kind u8 | flags u8 | reserved u8 | body length u32 BE

The magic and version are checked before anything else is parsed, so an object written by a
newer p2pbackup is named as such instead of failing somewhere inside its body.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from ..errors import IntegrityError, UnsupportedFormat

MAGIC = b"P2PB"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
HEADER_SIZE = 12
_STRUCT = struct.Struct(">4sBBBBI")

FLAG_ZSTD = 0x01


@enum.unique   # two names on one number would make the second an alias: refused at import
class Kind(enum.IntEnum):
    """Object kinds. Numbers are never reused for another meaning."""

    CHUNK = 1
    TREE = 2
    PACK = 3
    PACK_TRAILER = 4
    SNAPSHOT = 5
    REPO_CONFIG = 6
    DEVICE = 7
    SEGMENT = 8
    HEAD = 9
    SEGMENT_PART = 10
    MEMBERSHIP = 11
    KEYRING = 12
    REMOVAL = 13
    ROSTER = 14
    SIGNED_KEYRING = 15   # a keyring in a clear envelope signed by its recovery signer


@dataclass(frozen=True, slots=True)
class ObjectHeader:
    """A parsed object header."""

    version: int
    kind: int
    flags: int
    length: int

    def encode(self) -> bytes:
        return _STRUCT.pack(MAGIC, self.version, self.kind, self.flags, 0, self.length)

    @classmethod
    def decode(cls, data: bytes | memoryview, what: str = "object") -> "ObjectHeader":
        """Parse and check a header; raise IntegrityError or UnsupportedFormat."""
        if len(data) < HEADER_SIZE:
            raise IntegrityError(f"{what} is truncated: {len(data)} bytes, not even a header")
        magic, version, kind, flags, _reserved, length = _STRUCT.unpack_from(data, 0)
        if magic != MAGIC:
            raise IntegrityError(f"{what} is not a p2pbackup object (bad magic {bytes(magic)!r})")
        if version not in SUPPORTED_VERSIONS:
            if version > max(SUPPORTED_VERSIONS):
                raise UnsupportedFormat(what.capitalize(), version)
            raise IntegrityError(f"{what} has format version {version}, which never existed")
        return cls(version, kind, flags, length)


def kind_name(kind: int) -> str:
    try:
        return Kind(kind).name.lower()
    except ValueError:
        return f"kind {kind}"
