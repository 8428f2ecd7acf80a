"""XChaCha20-Poly1305 with a random 192-bit nonce (safe to pick at random, unlike 96-bit)."""

from __future__ import annotations

import os

from nacl import bindings
from nacl.exceptions import CryptoError

NONCE_SIZE = bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
TAG_SIZE = bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES
KEY_SIZE = bindings.crypto_aead_xchacha20poly1305_ietf_KEYBYTES


class AuthenticationFailed(Exception):
    """The ciphertext, its header or the key do not match."""


def encrypt(key: bytes, plaintext: bytes, aad: bytes, nonce: bytes | None = None) -> bytes:
    """Return nonce || ciphertext || tag; `nonce` is only fixed by golden-file tests."""
    if nonce is None:
        nonce = os.urandom(NONCE_SIZE)
    return nonce + bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)


def decrypt(key: bytes, data: bytes | memoryview, aad: bytes) -> bytes:
    """Open nonce || ciphertext || tag, raising AuthenticationFailed on any mismatch."""
    if len(data) < NONCE_SIZE + TAG_SIZE:
        raise AuthenticationFailed("too short")
    nonce = bytes(data[:NONCE_SIZE])
    try:
        return bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            bytes(data[NONCE_SIZE:]), aad, nonce, key
        )
    except CryptoError as exc:
        raise AuthenticationFailed(str(exc)) from None
