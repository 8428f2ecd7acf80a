"""XChaCha20-Poly1305 with a random 192-bit nonce (safe to pick at random, unlike 96-bit).

libsodium is called through PyNaCl's cffi binding with buffers, so plaintext and ciphertext
are not copied on the way in and out: PyNaCl's public functions take only `bytes` and copy
both, which cost about a tenth of a snapshot's CPU time on 1 GB.

Encryption with the thread's own nonces goes through OpenSSL instead (pyca/cryptography's
ChaCha20Poly1305), about 3x faster than PyNaCl's libsodium build (it uses AVX-512/AVX2 code):
XChaCha20-Poly1305 is ChaCha20-Poly1305 (IETF) under the subkey HChaCha20(key, nonce[:16])
with the nonce 0^4 || nonce[16:24], and a thread's nonces share their first 16 bytes, so the
subkey is derived once per thread and key. The output is byte for byte libsodium's.
"""

from __future__ import annotations

import os
import struct
import threading

from nacl import bindings
from nacl._sodium import ffi, lib

try:
    from cryptography.exceptions import InvalidTag as _InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305 as _IetfAead
except ImportError:  # pragma: no cover - cryptography is a dependency
    _IetfAead = None
    _InvalidTag = Exception

NONCE_SIZE = bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
TAG_SIZE = bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES
KEY_SIZE = bindings.crypto_aead_xchacha20poly1305_ietf_KEYBYTES

Buffer = bytes | bytearray | memoryview


class AuthenticationFailed(Exception):
    """The ciphertext, its header or the key do not match."""


_local = threading.local()


def _forget_nonce_state() -> None:
    # A forked child starts with a copy of its parent's nonce prefix and counter: the next
    # nonces of both would be the same. The child forgets them and draws a prefix of its own.
    global _local
    _local = threading.local()


os.register_at_fork(after_in_child=_forget_nonce_state)
_HAS_INTO = _IetfAead is not None and hasattr(_IetfAead, "encrypt_into")


_SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)
_M32 = 0xFFFFFFFF


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (the XChaCha20 subkey); pure Python, ~0.1 ms, so only derived once per prefix."""
    s = [*_SIGMA, *struct.unpack("<8I", key), *struct.unpack("<4I", nonce16)]

    def qr(a: int, b: int, c: int, d: int) -> None:
        s[a] = (s[a] + s[b]) & _M32
        x = s[d] ^ s[a]
        s[d] = ((x << 16) | (x >> 16)) & _M32
        s[c] = (s[c] + s[d]) & _M32
        x = s[b] ^ s[c]
        s[b] = ((x << 12) | (x >> 20)) & _M32
        s[a] = (s[a] + s[b]) & _M32
        x = s[d] ^ s[a]
        s[d] = ((x << 8) | (x >> 24)) & _M32
        s[c] = (s[c] + s[d]) & _M32
        x = s[b] ^ s[c]
        s[b] = ((x << 7) | (x >> 25)) & _M32

    for _ in range(10):
        qr(0, 4, 8, 12)
        qr(1, 5, 9, 13)
        qr(2, 6, 10, 14)
        qr(3, 7, 11, 15)
        qr(0, 5, 10, 15)
        qr(1, 6, 11, 12)
        qr(2, 7, 8, 13)
        qr(3, 4, 9, 14)
    return struct.pack("<8I", *s[0:4], *s[12:16])


def _next_nonce() -> bytes:
    # A random 16-byte prefix per thread and a counter: unique like a random nonce, without a
    # getrandom syscall for every blob.
    state = getattr(_local, "nonce", None)
    if state is None or state[1] >= 1 << 63:
        state = _local.nonce = [os.urandom(16), 0]
        _local.ciphers = {}  # subkeys depend on the prefix
    state[1] += 1
    return state[0] + state[1].to_bytes(8, "big")


def _ietf_cipher(key: bytes, prefix: bytes):
    """The ChaCha20-Poly1305 context of (key, this thread's nonce prefix), cached per thread."""
    ciphers = _local.ciphers
    c = ciphers.get(key)
    if c is None:
        if len(ciphers) >= 64:
            ciphers.clear()
        c = ciphers[key] = _IetfAead(hchacha20(key, prefix))
    return c


def encrypt_into(out: memoryview, key: bytes, plaintext: Buffer, aad: bytes,
                 nonce: bytes | None = None) -> None:
    """Write nonce || ciphertext || tag into `out` (exactly len(plaintext) + 40 bytes)."""
    if len(key) != KEY_SIZE:
        raise ValueError("bad key size")
    if len(out) != NONCE_SIZE + len(plaintext) + TAG_SIZE:
        raise ValueError("output buffer has the wrong size")
    if nonce is None:
        nonce = _next_nonce()
        if _IetfAead is not None:
            out[:NONCE_SIZE] = nonce
            cipher = _ietf_cipher(key, nonce[:16])
            if _HAS_INTO:
                cipher.encrypt_into(b"\0\0\0\0" + nonce[16:], plaintext, aad, out[NONCE_SIZE:])
            else:
                out[NONCE_SIZE:] = cipher.encrypt(b"\0\0\0\0" + nonce[16:], bytes(plaintext), aad)
            return
    out[:NONCE_SIZE] = nonce
    clen = ffi.new("unsigned long long *")
    res = lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
        ffi.from_buffer(out[NONCE_SIZE:]), clen, ffi.from_buffer(plaintext), len(plaintext),
        aad, len(aad), ffi.NULL, nonce, key)
    if res != 0:
        raise RuntimeError("encryption failed")


def encrypt_many_into(out: memoryview, key: bytes,
                      items: list[tuple[int, Buffer, bytes]]) -> None:
    """encrypt_into (fresh nonces) for many plaintexts: for each (offset, plaintext, aad), write
    nonce || ciphertext || tag at out[offset:offset + len(plaintext) + 40].

    The same bytes as one encrypt_into per item, without its per-call lookups: the batch path
    of a snapshot seals tens of thousands of small blobs while holding the GIL for this part.
    """
    if len(key) != KEY_SIZE:
        raise ValueError("bad key size")
    if not _HAS_INTO:
        for offset, plaintext, aad in items:
            end = offset + NONCE_SIZE + len(plaintext) + TAG_SIZE
            encrypt_into(out[offset:end], key, plaintext, aad)
        return
    state = getattr(_local, "nonce", None)
    if state is None or state[1] + len(items) >= 1 << 63:
        state = _local.nonce = [os.urandom(16), 0]
        _local.ciphers = {}  # subkeys depend on the prefix
    counter = state[1]
    state[1] += len(items)  # reserved before any is used: a nonce is never handed out twice
    prefix = state[0]
    seal = _ietf_cipher(key, prefix).encrypt_into
    for offset, plaintext, aad in items:
        counter += 1
        tail = counter.to_bytes(8, "big")
        start = offset + NONCE_SIZE
        end = start + len(plaintext) + TAG_SIZE
        if end > len(out):
            raise ValueError("output buffer too short")
        out[offset:start] = prefix + tail
        seal(b"\0\0\0\0" + tail, plaintext, aad, out[start:end])


def encrypt(key: bytes, plaintext: Buffer, aad: bytes, nonce: bytes | None = None) -> bytearray:
    """Return nonce || ciphertext || tag; `nonce` is only fixed by golden-file tests."""
    out = bytearray(NONCE_SIZE + len(plaintext) + TAG_SIZE)
    encrypt_into(memoryview(out), key, plaintext, aad, nonce)
    return out


def _opening_cipher(key: bytes, prefix: bytes):
    """The ChaCha20-Poly1305 context for opening what a writer sealed under `prefix` (its
    thread's nonce prefix: a pack holds a few of them), cached per thread."""
    ciphers = getattr(_local, "openers", None)
    if ciphers is None:
        ciphers = _local.openers = {}
    c = ciphers.get((key, prefix))
    if c is None:
        if len(ciphers) >= 256:
            ciphers.clear()
        c = ciphers[(key, prefix)] = _IetfAead(hchacha20(key, prefix))
    return c


def decrypt(key: bytes, data: Buffer, aad: bytes) -> bytes | bytearray:
    """Open nonce || ciphertext || tag, raising AuthenticationFailed on any mismatch.

    Through OpenSSL like sealing (3x libsodium's speed here, and the result is not zeroed
    first): opening is most of the CPU of a restore, a verify and a peer's pack intake.
    """
    if len(data) < NONCE_SIZE + TAG_SIZE or len(key) != KEY_SIZE:
        raise AuthenticationFailed("too short")
    view = memoryview(data)
    nonce = bytes(view[:NONCE_SIZE])
    if _IetfAead is not None:
        try:
            return _opening_cipher(key, nonce[:16]).decrypt(
                b"\0\0\0\0" + nonce[16:], view[NONCE_SIZE:], aad)
        except _InvalidTag:
            raise AuthenticationFailed("authentication failed") from None
    out = bytearray(len(data) - NONCE_SIZE - TAG_SIZE)
    mlen = ffi.new("unsigned long long *")
    res = lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
        ffi.from_buffer(out), mlen, ffi.NULL, ffi.from_buffer(view[NONCE_SIZE:]),
        len(view) - NONCE_SIZE, aad, len(aad), nonce, key)
    if res != 0:
        raise AuthenticationFailed("authentication failed")
    return out
