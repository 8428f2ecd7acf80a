"""Sealing and opening objects: header + XChaCha20-Poly1305(zstd?(plaintext)), header as AAD."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import zstandard

from ..crypto.aead import (NONCE_SIZE, TAG_SIZE, AuthenticationFailed, decrypt, encrypt_into,
                           encrypt_many_into)
from ..errors import IntegrityError
from .header import _STRUCT as _HEADER, FLAG_ZSTD, FORMAT_VERSION, HEADER_SIZE, MAGIC, \
    Kind, ObjectHeader, kind_name

OVERHEAD = HEADER_SIZE + NONCE_SIZE + TAG_SIZE
ZSTD_LEVEL = 1
_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    # zstandard contexts are not safe to share between threads.
    c = getattr(_local, "c", None)
    if c is None:
        c = _local.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def seal_object(kind: int, plaintext: bytes | bytearray | memoryview, key: bytes, *,
                compress: bool = True, nonce: bytes | None = None) -> bytearray:
    """Return a sealed object; compression is kept only when it saves at least 3%."""
    body = plaintext
    flags = 0
    if compress and len(plaintext) > 64:
        packed = _compressor().compress(plaintext)
        if len(packed) < len(plaintext) * 0.97:
            body, flags = packed, FLAG_ZSTD
    out = bytearray(OVERHEAD + len(body))
    seal_into(memoryview(out), kind, body, flags, key, nonce)
    return out


Body = bytes | bytearray | memoryview


PROBES = 3


def _saves(packed: Body, plain: Body) -> bool:
    return len(packed) < len(plain) * 0.97


def compress_many(plains: list[Body], compress: bool = True,
                  probe: bool = False) -> tuple[list[Body], list[int]]:
    """The bodies and flags of objects for `plains`, as seal_object would choose them.

    Many inputs are compressed in one call (zstandard's multi_compress_to_buffer, one release
    of the GIL instead of one per blob); a body is kept compressed only when that saves at
    least 3%, else it is the plaintext itself. With `probe` (consecutive pieces of one file),
    the first, middle and last are tried first, and if none of them compresses nor do the
    others (media, archives: zstd would only be spent to keep the raw bytes anyway). The
    bodies may be views of one result buffer: use them before the next call.
    """
    bodies: list[Body] = list(plains)
    flags = [0] * len(plains)
    if not compress:
        return bodies, flags
    todo = [i for i, p in enumerate(plains) if len(p) > 64]
    if not todo:
        return bodies, flags
    c = _compressor()
    if probe and len(todo) > 2 * PROBES:
        picks = [todo[0], todo[len(todo) // 2], todo[-1]]
        probed = c.multi_compress_to_buffer([plains[i] for i in picks], threads=1)
        if not any(_saves(probed[j], plains[i]) for j, i in enumerate(picks)):
            return bodies, flags
    if len(todo) == 1:
        packed_all = [c.compress(plains[todo[0]])]
    else:
        packed_all = c.multi_compress_to_buffer([plains[i] for i in todo], threads=1)
    for j, i in enumerate(todo):
        packed = packed_all[j]
        if _saves(packed, plains[i]):
            bodies[i], flags[i] = packed, FLAG_ZSTD
    return bodies, flags


def seal_into(out: memoryview, kind: int, body: Body, flags: int, key: bytes,
              nonce: bytes | None = None) -> None:
    """Write the object header | XChaCha20-Poly1305(body) into `out` (len(body) + OVERHEAD)."""
    length = len(body) + NONCE_SIZE + TAG_SIZE
    header = ObjectHeader(FORMAT_VERSION, kind, flags, length).encode()
    out[:HEADER_SIZE] = header
    encrypt_into(out[HEADER_SIZE:], key, body, header, nonce)


def seal_many_into(out: memoryview, kind: int, items: list[tuple[int, Body, int]],
                   key: bytes) -> None:
    """seal_into for many objects of one kind in one buffer: for each (offset, body, flags),
    the object (len(body) + OVERHEAD bytes) is written at out[offset:]."""
    pack_header = _HEADER.pack
    extra = NONCE_SIZE + TAG_SIZE
    plan: list[tuple[int, Body, bytes]] = []
    for offset, body, flags in items:
        header = pack_header(MAGIC, FORMAT_VERSION, kind, flags, 0, len(body) + extra)
        out[offset:offset + HEADER_SIZE] = header
        plan.append((offset + HEADER_SIZE, body, header))
    encrypt_many_into(out, key, plan)


MiB = 1024 * 1024
# The most an opened (decompressed) object of each kind may hold: a few KB of zstd can expand
# to GiB. A blob is held to the raw length its pack trailer (or the index) records, and to
# its kind's cap, since a trailer is written by whoever holds the keys; records carry no
# length of their own, so their kind's cap is all there is. Far above anything we write.
MAX_PLAIN = 1024 * MiB
MAX_PLAIN_OF = {
    Kind.CHUNK: 16 * MiB,            # FastCDC cuts at 4x the average: 256 KiB by default
    Kind.TREE: MAX_PLAIN,            # one directory: a 1 TB file alone lists 16M chunk ids
    Kind.PACK_TRAILER: 64 * MiB,     # ~60 bytes a blob; a 16 MiB pack holds < 330k blobs
    Kind.SNAPSHOT: 16 * MiB,
    Kind.REPO_CONFIG: 1 * MiB,
    Kind.DEVICE: 1 * MiB,
    Kind.SEGMENT: 256 * MiB,         # ~200 bytes a change, however many files changed
    Kind.HEAD: 64 * 1024,
    Kind.SEGMENT_PART: 256 * MiB,
    Kind.MEMBERSHIP: 16 * MiB,
    Kind.KEYRING: 16 * MiB,
}


def open_object(data: bytes | bytearray | memoryview, key: bytes, *, expect: int | None = None,
                what: str = "object", raw_length: int | None = None
                ) -> tuple[ObjectHeader, bytes | bytearray]:
    """Check, decrypt and decompress one object; raise IntegrityError naming `what`.

    `raw_length` (a blob's, from its pack trailer or the index) is the exact size the content
    must have; whatever the kind, it may not exceed the kind's cap (`MAX_PLAIN_OF`). Neither
    is ever exceeded while decompressing, not even for a moment."""
    header = ObjectHeader.decode(data, what)
    if expect is not None and header.kind != expect:
        raise IntegrityError(f"{what} is a {kind_name(header.kind)}, expected a {kind_name(expect)}")
    cap = MAX_PLAIN_OF.get(header.kind, MAX_PLAIN)
    if raw_length is not None and not 0 <= raw_length <= cap:
        raise IntegrityError(f"{what} records a raw length of {raw_length} bytes, more than a "
                             f"{kind_name(header.kind)} may hold ({cap})")
    end = HEADER_SIZE + header.length
    if len(data) < end:
        raise IntegrityError(f"{what} is truncated: {len(data)} of {end} bytes")
    try:
        body = decrypt(key, memoryview(data)[HEADER_SIZE:end], bytes(data[:HEADER_SIZE]))
    except AuthenticationFailed:
        raise IntegrityError(f"{what} failed authentication: it was altered or damaged") from None
    if header.flags & FLAG_ZSTD:
        limit = (cap, f"the {cap} bytes a {kind_name(header.kind)} may hold") \
            if raw_length is None else (raw_length, f"the raw length of {raw_length} recorded")
        body = _decompress(body, *limit, what)
    if raw_length is not None and len(body) != raw_length:
        raise IntegrityError(f"{what} holds {len(body)} bytes, not the raw length of "
                             f"{raw_length} recorded for it")
    return header, body


def _decompress(body: bytes | bytearray, limit: int, limit_is: str, what: str) -> bytes:
    """zstd `body`, refused before anything is allocated if it would exceed `limit` bytes."""
    try:
        # zstandard allocates the size the frame header declares, whatever max_output_size
        # says: that size is checked first. We always write it (one-shot compression does).
        declared = zstandard.frame_content_size(body)
        if declared < 0:
            raise IntegrityError(f"{what} does not record its size in its zstd frame")
        if declared > limit:
            raise IntegrityError(f"{what} would decompress to {declared} bytes, more than "
                                 f"{limit_is}")
        return _decompressor().decompress(body, max_output_size=limit, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"{what} does not decompress: {exc}") from None


NOT_HELD = "or sealed with a key this device does not hold: was it removed from the account?"


def open_with_any(data: bytes | bytearray | memoryview, keys: Sequence[tuple[int, bytes]], *,
                  expect: int, what: str, not_held: str = NOT_HELD) -> tuple[int, bytes]:
    """Open an object sealed with one of `keys` ((epoch, key) pairs, most likely first);
    return (the epoch of the key that opened it, the body). When none does, the error names
    the object, and adds `not_held`: it may be sealed with a key this device lacks."""
    for epoch, key in keys[:-1]:
        try:
            return epoch, bytes(open_object(data, key, expect=expect, what=what)[1])
        except IntegrityError:
            continue
    epoch, key = keys[-1]
    try:
        return epoch, bytes(open_object(data, key, expect=expect, what=what)[1])
    except IntegrityError as exc:
        if "failed authentication" not in str(exc):
            raise
        raise IntegrityError(f"{exc} ({not_held})") from None
