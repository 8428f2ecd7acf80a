"""The key hierarchy: one account key, from which every other secret is derived with HKDF.

meta keys   encrypt account-level records (repo config, snapshots, pack trailers, devices)
scope keys  per source and key epoch: a data key (encrypts that source's trees and chunks)
            and an id key (keys the BLAKE3 hash that names its blobs), so a device can be
            granted some sources and not others, and rotating the epoch shuts out a
            revoked device from data written afterwards.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import blake3

from .kdf import hkdf_sha256

ACCOUNT_KEY_SIZE = 32
_SALT = b"p2pbackup key hierarchy v1"


def _derive(account_key: bytes, label: str) -> bytes:
    return hkdf_sha256(account_key, salt=_SALT, info=label.encode("utf-8"))


@dataclass(frozen=True, slots=True)
class ScopeKeys:
    """The data key and id key of one source at one key epoch."""

    scope: str
    epoch: int
    data_key: bytes
    id_key: bytes

    def blob_id(self, plaintext: bytes | memoryview) -> bytes:
        """Keyed BLAKE3 of a blob's plaintext: reveals nothing to someone without the key."""
        return blake3.blake3(plaintext, key=self.id_key).digest()


@dataclass(slots=True)
class AccountKeys:
    """Everything derived from the account key; scope keys are cached on first use."""

    account_key: bytes
    meta_key: bytes = b""
    meta_id_key: bytes = b""
    chunker_seed: int = 0
    _scopes: dict[tuple[str, int], ScopeKeys] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.account_key) != ACCOUNT_KEY_SIZE:
            raise ValueError("the account key must be 32 bytes")
        self.meta_key = _derive(self.account_key, "meta/data")
        self.meta_id_key = _derive(self.account_key, "meta/id")
        # A secret gear-table seed keeps chunk boundaries (and so file sizes) from leaking.
        self.chunker_seed = int.from_bytes(_derive(self.account_key, "chunker/seed")[:4], "big")

    def scope(self, name: str, epoch: int = 0) -> ScopeKeys:
        """Keys for source `name` at key epoch `epoch`."""
        got = self._scopes.get((name, epoch))
        if got is None:
            base = f"scope/{len(name)}:{name}/epoch/{epoch}"
            got = ScopeKeys(name, epoch, _derive(self.account_key, base + "/data"),
                            _derive(self.account_key, base + "/id"))
            self._scopes[(name, epoch)] = got
        return got

    def fingerprint(self) -> str:
        """A short public fingerprint of the account key (safe to print and store)."""
        return hashlib.sha256(b"p2pbackup account fingerprint" + self.account_key).hexdigest()[:16]
