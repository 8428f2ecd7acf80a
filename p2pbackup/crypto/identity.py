"""Device identities: an Ed25519 signing key (the device id is derived from its public key)
and, derived from the same seed, a separate X25519 key that key grants are sealed to."""

from __future__ import annotations

from dataclasses import dataclass

import blake3
from nacl.bindings import (crypto_sign_ed25519_pk_to_curve25519,
                           crypto_sign_ed25519_sk_to_curve25519)
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey, VerifyKey

from .kdf import hkdf_sha256


def device_id_for(public_key: bytes) -> str:
    """Device ids are 128 bits of BLAKE3 over the public key, as 32 hex characters."""
    return blake3.blake3(b"p2pbackup device id\x00" + public_key).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """This device's signing key (and the box key derived from its seed)."""

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

    def _box_secret(self) -> PrivateKey:
        # Its own key, not the signing key converted: one key, one use.
        return PrivateKey(hkdf_sha256(self.seed, salt=b"p2pbackup device box",
                                      info=b"x25519 sealed-box key v1"))

    @property
    def box_public_key(self) -> bytes:
        """The X25519 public key others seal to this device with (listed in the membership)."""
        return bytes(self._box_secret().public_key)

    def open_sealed(self, sealed: bytes) -> bytes | None:
        """Open what `seal_to` sealed to this device; None if it was not for us.

        Grants sealed before devices published a box key were sealed to the signing key
        converted to X25519: those still open.
        """
        sk = SigningKey(self.seed)
        converted = PrivateKey(crypto_sign_ed25519_sk_to_curve25519(bytes(sk) +
                                                                    bytes(sk.verify_key)))
        for secret in (self._box_secret(), converted):
            try:
                return SealedBox(secret).decrypt(sealed)
            except CryptoError:
                continue
        return None


def seal_to(public_key: bytes, data: bytes, box_key: bytes | None = None) -> bytes:
    """Encrypt `data` so only the device with Ed25519 key `public_key` can read it: to its box
    key when the membership lists one, else (a device of an older version) to its signing key
    converted to X25519."""
    if box_key is not None:
        return SealedBox(PublicKey(box_key)).encrypt(data)
    return SealedBox(PublicKey(crypto_sign_ed25519_pk_to_curve25519(public_key))).encrypt(data)


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when `signature` is `public_key`'s signature of `message`."""
    try:
        VerifyKey(public_key).verify(message, signature)
        return True
    except (BadSignatureError, ValueError, TypeError):
        return False
