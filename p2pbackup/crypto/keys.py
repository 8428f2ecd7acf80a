"""The key hierarchy: a root per key epoch (epoch 0's is the account key), from which every
other secret is derived with HKDF.

record keys  one per epoch: seal what every member of that epoch may read (snapshots,
             segments, heads, pack trailers, device records, membership versions); epoch 0's
             is also the meta key of the repository config. Scoped members hold them.
scope keys   per source and epoch: a data key (encrypts that source's trees and chunks) and an
             id key (keys the BLAKE3 hash that names its blobs), so a device can be granted
             some sources and not others, and rotating the epoch shuts out a revoked device
             from data written afterwards.
keyring key  per epoch, from the root alone: seals the store's copy of the roots. Only devices
             holding the root (owners) and the holder of that epoch's recovery code derive it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import blake3

from ..errors import WrongKey
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
        return blob_id(self.id_key, plaintext)


def blob_id(id_key: bytes, plaintext: bytes | memoryview) -> bytes:
    """A blob's id: BLAKE3 of its plaintext keyed with its source's id key."""
    return blake3.blake3(plaintext, key=id_key).digest()


class MissingKey(WrongKey):
    """{}"""


def keyring_key_of(root: bytes) -> bytes:
    """The keyring key of the epoch whose root (or recovery code) is `root`."""
    return _derive(root, "keyring")


def recovery_seed_of(root: bytes) -> bytes:
    """The Ed25519 seed of the recovery signer of the epoch whose root is `root`."""
    return _derive(root, "recovery/signer")


def legacy_keyring_key_of(root: bytes) -> bytes:
    """What sealed keyrings before version 2: the epoch's record key, which scoped members
    hold too (read on recovery only, and only when its roots include `root`)."""
    return _derive(root, "meta/data")


@dataclass(slots=True)
class AccountKeys:
    """What this device holds of the account's keys, per key epoch.

    A full member holds the root of every epoch (epoch 0's root is the account key); a device
    granted only some sources holds derived keys instead: never a root, nor anything derived
    from one that opens another source (see the module docstring).
    """

    account_key: bytes | None
    roots: dict[int, bytes] = field(default_factory=dict)
    meta_key: bytes = b""
    meta_id_key: bytes = b""
    chunker_seed: int = 0
    granted: dict[int, dict[str, tuple[bytes, bytes]]] | None = None
    record_keys: dict[int, bytes] = field(default_factory=dict)
    _scopes: dict[tuple[str, int], ScopeKeys] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.account_key is not None:
            if len(self.account_key) != ACCOUNT_KEY_SIZE:
                raise ValueError("the account key must be 32 bytes")
            self.roots = {0: self.account_key, **self.roots}
        if not self.roots:
            return  # a scoped holder: built by from_export with its keys given
        for epoch, root in self.roots.items():
            if len(root) != ACCOUNT_KEY_SIZE:
                raise ValueError(f"the root key of epoch {epoch} must be 32 bytes")
            self.record_keys[epoch] = _derive(root, "meta/data")
        self.meta_key = self.record_keys[0]
        self.meta_id_key = _derive(self.roots[0], "meta/id")
        # A secret gear-table seed keeps chunk boundaries (and so file sizes) from leaking.
        self.chunker_seed = int.from_bytes(_derive(self.roots[0], "chunker/seed")[:4], "big")

    @property
    def epoch(self) -> int:
        """The newest key epoch this device holds: everything new is written in it."""
        return max(self.record_keys)

    @property
    def full(self) -> bool:
        """True when this device holds the roots (every source, can re-key the account)."""
        return bool(self.roots)

    @property
    def record_key(self) -> bytes:
        """The key that seals records (snapshots, segments, heads) written now."""
        return self.record_keys[self.epoch]

    def record_keys_newest_first(self) -> list[tuple[int, bytes]]:
        """(epoch, record key) of every epoch this device holds, newest first: the order to
        try them in on a record sealed in an epoch not known beforehand."""
        return [(e, self.record_keys[e]) for e in sorted(self.record_keys, reverse=True)]

    def keyring_key(self, epoch: int | None = None) -> bytes:
        """The key that seals the store's keyring of `epoch` (default: the newest)."""
        if not self.full:
            raise MissingKey("only a device holding every source's keys holds the keyring key")
        return keyring_key_of(self.roots[self.epoch if epoch is None else epoch])

    def scope(self, name: str, epoch: int = 0) -> ScopeKeys:
        """Keys for source `name` at key epoch `epoch`; MissingKey if this device lacks them."""
        got = self._scopes.get((name, epoch))
        if got is None:
            root = self.roots.get(epoch)
            if root is not None:
                base = f"scope/{len(name)}:{name}/epoch/{epoch}"
                got = ScopeKeys(name, epoch, _derive(root, base + "/data"),
                                _derive(root, base + "/id"))
            else:
                pair = (self.granted or {}).get(epoch, {}).get(name)
                if pair is None:
                    raise MissingKey(f"this device holds no key for source {name!r} at key "
                                     f"epoch {epoch}: it was not granted that source, or it "
                                     "was removed from the account")
                got = ScopeKeys(name, epoch, *pair)
            self._scopes[(name, epoch)] = got
        return got

    def sources_granted(self) -> list[str] | None:
        """The sources a scoped holder may read; None for a full member (all of them)."""
        if self.full:
            return None
        return sorted({n for g in (self.granted or {}).values() for n in g})

    def export(self, sources: list[str] | None = None, *,
               epochs: list[int] | None = None) -> dict:
        """The key material to hand to another device: all roots, or only `sources`' keys."""
        wanted = sorted(self.record_keys) if epochs is None else epochs
        if sources is None:
            if not self.full:
                raise MissingKey("this device holds only some sources; it cannot grant all")
            return {"v": 1, "roots": {e: self.roots[e] for e in wanted}}
        return {"v": 1, "index": self.meta_key, "meta_id": self.meta_id_key,
                "seed": self.chunker_seed,
                "epochs": {e: {"record": self.record_keys[e],
                               "scopes": {n: [self.scope(n, e).data_key, self.scope(n, e).id_key]
                                          for n in sources}} for e in wanted}}

    @classmethod
    def from_export(cls, doc: dict) -> "AccountKeys":
        """Rebuild from `export`'s output; ValueError if it is not one."""
        try:
            return cls._from_export(doc)
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            raise ValueError(f"not a key export ({exc})") from None

    @classmethod
    def _from_export(cls, doc: dict) -> "AccountKeys":
        if not isinstance(doc, dict) or not isinstance(doc.get("v"), int):
            raise ValueError("not a key export")
        roots = doc.get("roots")
        if roots is not None:
            roots = {int(e): bytes(k) for e, k in roots.items()}
            return cls(roots.pop(0), roots)
        keys = cls(None)
        keys.meta_key, keys.meta_id_key = bytes(doc["index"]), bytes(doc["meta_id"])
        keys.chunker_seed = int(doc["seed"])
        keys.granted = {}
        for e, g in doc["epochs"].items():
            keys.record_keys[int(e)] = bytes(g["record"])
            keys.granted[int(e)] = {str(n): (bytes(p[0]), bytes(p[1]))
                                    for n, p in g["scopes"].items()}
        return keys

    def with_epoch(self, epoch: int, root: bytes) -> "AccountKeys":
        """A copy that also holds `root` for `epoch` (after a re-key)."""
        if not self.full:
            raise MissingKey("only a device holding every source can re-key the account")
        roots = dict(self.roots)
        roots[epoch] = root
        return AccountKeys(roots.pop(0), roots)

    def recovery_seed(self, epoch: int | None = None) -> bytes:
        """The Ed25519 seed of the recovery signer of `epoch` (derived from its root)."""
        return recovery_seed_of(self.roots[self.epoch if epoch is None else epoch])

    def fingerprint(self) -> str:
        """A short public fingerprint of the account (safe to print and store)."""
        return hashlib.sha256(b"p2pbackup account fingerprint" + self.meta_id_key).hexdigest()[:16]
