"""Ed25519 device identities: the device id is derived from the public key."""

from __future__ import annotations

from dataclasses import dataclass

import blake3
from nacl.bindings import (crypto_sign_ed25519_pk_to_curve25519,
                           crypto_sign_ed25519_sk_to_curve25519)
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey, VerifyKey


def device_id_for(public_key: bytes) -> str:
    """Device ids are 128 bits of BLAKE3 over the public key, as 32 hex characters."""
    return blake3.blake3(b"p2pbackup device id\x00" + public_key).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """This device's signing key."""

    seed: bytes

    @classmethod
    def generate(cls) -> "DeviceIdentity":
        return cls(bytes(SigningKey.generate()))

    @property
    def public_key(self) -> bytes:
        return bytes(SigningKey(self.seed).verify_key)

    @property
    def device_id(self) -> str:
        return device_id_for(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte detached signature of `message`."""
        return SigningKey(self.seed).sign(message).signature

    def open_sealed(self, sealed: bytes) -> bytes | None:
        """Open what `seal_to(this device's public key, ...)` sealed; None if it was not for us."""
        sk = SigningKey(self.seed)
        secret = crypto_sign_ed25519_sk_to_curve25519(bytes(sk) + bytes(sk.verify_key))
        try:
            return SealedBox(PrivateKey(secret)).decrypt(sealed)
        except CryptoError:
            return None


def seal_to(public_key: bytes, data: bytes) -> bytes:
    """Encrypt `data` so only the device with Ed25519 key `public_key` can read it."""
    return SealedBox(PublicKey(crypto_sign_ed25519_pk_to_curve25519(public_key))).encrypt(data)


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when `signature` is `public_key`'s signature of `message`."""
    try:
        VerifyKey(public_key).verify(message, signature)
        return True
    except (BadSignatureError, ValueError, TypeError):
        return False
