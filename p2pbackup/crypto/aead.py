"""XChaCha20-Poly1305 with a random 192-bit nonce (safe to pick at random, unlike 96-bit).

libsodium is called through PyNaCl's cffi binding with buffers, so plaintext and ciphertext
are not copied on the way in and out: PyNaCl's public functions take only `bytes` and copy
both, which cost about a tenth of a snapshot's CPU time on 1 GB.
"""

from __future__ import annotations

import os
import threading

from nacl import bindings
from nacl._sodium import ffi, lib

NONCE_SIZE = bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
TAG_SIZE = bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES
KEY_SIZE = bindings.crypto_aead_xchacha20poly1305_ietf_KEYBYTES

Buffer = bytes | bytearray | memoryview


class AuthenticationFailed(Exception):
    """The ciphertext, its header or the key do not match."""


_local = threading.local()


def _next_nonce() -> bytes:
    # A random 16-byte prefix per thread and a counter: unique like a random nonce, without a
    # getrandom syscall for every blob.
    state = getattr(_local, "nonce", None)
    if state is None or state[1] >= 1 << 63:
        state = _local.nonce = [os.urandom(16), 0]
    state[1] += 1
    return state[0] + state[1].to_bytes(8, "big")


def encrypt_into(out: memoryview, key: bytes, plaintext: Buffer, aad: bytes,
                 nonce: bytes | None = None) -> None:
    """Write nonce || ciphertext || tag into `out` (exactly len(plaintext) + 40 bytes)."""
    if len(key) != KEY_SIZE:
        raise ValueError("bad key size")
    if len(out) != NONCE_SIZE + len(plaintext) + TAG_SIZE:
        raise ValueError("output buffer has the wrong size")
    if nonce is None:
        nonce = _next_nonce()
    out[:NONCE_SIZE] = nonce
    clen = ffi.new("unsigned long long *")
    res = lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
        ffi.from_buffer(out[NONCE_SIZE:]), clen, ffi.from_buffer(plaintext), len(plaintext),
        aad, len(aad), ffi.NULL, nonce, key)
    if res != 0:
        raise RuntimeError("encryption failed")


def encrypt(key: bytes, plaintext: Buffer, aad: bytes, nonce: bytes | None = None) -> bytearray:
    """Return nonce || ciphertext || tag; `nonce` is only fixed by golden-file tests."""
    out = bytearray(NONCE_SIZE + len(plaintext) + TAG_SIZE)
    encrypt_into(memoryview(out), key, plaintext, aad, nonce)
    return out


def decrypt(key: bytes, data: Buffer, aad: bytes) -> bytearray:
    """Open nonce || ciphertext || tag, raising AuthenticationFailed on any mismatch."""
    if len(data) < NONCE_SIZE + TAG_SIZE or len(key) != KEY_SIZE:
        raise AuthenticationFailed("too short")
    view = memoryview(data)
    out = bytearray(len(data) - NONCE_SIZE - TAG_SIZE)
    mlen = ffi.new("unsigned long long *")
    res = lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
        ffi.from_buffer(out), mlen, ffi.NULL, ffi.from_buffer(view[NONCE_SIZE:]),
        len(view) - NONCE_SIZE, aad, len(aad), bytes(view[:NONCE_SIZE]), key)
    if res != 0:
        raise AuthenticationFailed("authentication failed")
    return out
