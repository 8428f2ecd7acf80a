"""Sealing and opening objects: header + XChaCha20-Poly1305(zstd?(plaintext)), header as AAD."""

from __future__ import annotations

import threading

import zstandard

from ..crypto.aead import NONCE_SIZE, TAG_SIZE, AuthenticationFailed, decrypt, encrypt_into
from ..errors import IntegrityError
from .header import FLAG_ZSTD, FORMAT_VERSION, HEADER_SIZE, ObjectHeader, kind_name

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
    length = len(body) + NONCE_SIZE + TAG_SIZE
    header = ObjectHeader(FORMAT_VERSION, kind, flags, length).encode()
    out = bytearray(HEADER_SIZE + length)
    out[:HEADER_SIZE] = header
    encrypt_into(memoryview(out)[HEADER_SIZE:], key, body, header, nonce)
    return out


def open_object(data: bytes | bytearray | memoryview, key: bytes, *, expect: int | None = None,
                what: str = "object") -> tuple[ObjectHeader, bytes | bytearray]:
    """Check, decrypt and decompress one object; raise IntegrityError naming `what`."""
    header = ObjectHeader.decode(data, what)
    if expect is not None and header.kind != expect:
        raise IntegrityError(f"{what} is a {kind_name(header.kind)}, expected a {kind_name(expect)}")
    end = HEADER_SIZE + header.length
    if len(data) < end:
        raise IntegrityError(f"{what} is truncated: {len(data)} of {end} bytes")
    try:
        body = decrypt(key, memoryview(data)[HEADER_SIZE:end], bytes(data[:HEADER_SIZE]))
    except AuthenticationFailed:
        raise IntegrityError(f"{what} failed authentication: it was altered or damaged") from None
    if header.flags & FLAG_ZSTD:
        try:
            body = _decompressor().decompress(body)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"{what} does not decompress: {exc}") from None
    return header, body
