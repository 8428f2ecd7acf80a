"""The membership chain and the key rings in a repository's store.

membership/<seq>  each signed version, sealed with the record key of the epoch in force when it
                  was signed (the epoch of the version before it): a device removed by version
                  n still reads version n (which says so) and nothing after it, and a member
                  takes its grant from version n before it needs the new key for n + 1.
keyring/<epoch>   every root up to <epoch>, sealed with that epoch's keyring key (derived from
                  its root: only owners and the holder of its recovery code have it), in an
                  envelope signed by the epoch's recovery signer so every member can check who
                  wrote it. The recovery code of the newest epoch opens all of the history.
"""

from __future__ import annotations

import logging
from typing import Protocol

import msgpack

from ..blobs.base import BlobStore
from ..crypto.identity import DeviceIdentity, device_id_for, verify_signature
from ..crypto.keys import (AccountKeys, MissingKey, keyring_key_of, legacy_keyring_key_of,
                           recovery_seed_of)
from ..errors import IntegrityError, NotFound
from ..format.header import Kind, ObjectHeader
from ..format.membership import (Membership, Signers, check_chain, check_versions,
                                 keyring_envelope, keyring_object, read_keyring)
from ..format.objects import open_object, open_with_any, seal_object
from ..format.records import KEYRING_SIG, Signed

log = logging.getLogger("p2pbackup.membership")
PREFIX = "membership/"
KEYRING_PREFIX = "keyring/"


class RepoLike(Protocol):
    """What this module needs of a repository (repository.py builds on this module)."""

    store: BlobStore
    keys: AccountKeys

    def membership_changed(self) -> None: ...

    async def signers(self) -> Signers | None: ...


def _name(seq: int) -> str:
    return f"{PREFIX}{seq:012d}"


def open_version(raw: bytes | bytearray | memoryview, keys: AccountKeys, what: str
                 ) -> bytes | None:
    """The signed version inside a stored one, or None if no key this device holds opens it
    (sealed in an epoch after this device's removal, or one whose grant it has not taken)."""
    try:
        return open_with_any(raw, keys.record_keys_newest_first(), expect=Kind.MEMBERSHIP,
                             what=what)[1]
    except IntegrityError:
        return None


async def chain_in(store: BlobStore, keys: AccountKeys) -> list[bytes]:
    """The signed membership versions in `store` this device can open, oldest first (not yet
    checked): the chain up to the first version sealed in an epoch it holds no key of. One
    that does not open although this device holds the key it should be sealed with (the
    previous version's epoch) is damaged: IntegrityError."""
    names = sorted([n async for n in store.list(PREFIX)])
    out: list[bytes] = []
    sealed_in = 0   # the first version is sealed in its own epoch: 0 in every account
    for name in names:
        raw = await store.get(name)
        signed = open_version(raw, keys, name)
        if signed is None:
            if sealed_in in keys.record_keys:   # it should open: say why it does not
                open_object(raw, keys.record_keys[sealed_in], expect=Kind.MEMBERSHIP, what=name)
            break
        out.append(signed)
        sealed_in = Membership.decode(_body(signed), name).epoch
    return out


async def load_chain(repo: RepoLike) -> list[bytes]:
    """The signed membership versions this device can open in the repository, oldest first."""
    return await chain_in(repo.store, repo.keys)


async def load(repo: RepoLike) -> tuple[Membership, list[bytes]] | None:
    """The newest membership version, checked from the first one, and the chain; None if none."""
    return await load_from(repo.store, repo.keys)


async def load_from(store: BlobStore, keys: AccountKeys
                    ) -> tuple[Membership, list[bytes]] | None:
    """`load` for a store without an opened repository."""
    chain = await chain_in(store, keys)
    if not chain:
        return None
    return check_chain(chain, verify_signature, device_id_for), chain


async def load_versions(store: BlobStore, keys: AccountKeys) -> list[Membership] | None:
    """Every version this device can open, checked; None for a store that holds none at all
    (one made before membership records)."""
    chain = await chain_in(store, keys)
    if chain:
        return check_versions(chain, verify_signature, device_id_for)
    async for _ in store.list(PREFIX):
        raise IntegrityError(f"the store at {store.location} holds membership records, but "
                             "none that this device's keys open")
    return None


def seal_version(keys: AccountKeys, signed: bytes, after: Membership | None) -> bytearray:
    """Seal a signed version in the epoch in force when it was signed (`after`'s, or its own
    for the first version)."""
    version = Membership.decode(_body(signed))
    epoch = after.epoch if after is not None else version.epoch
    if epoch not in keys.record_keys:
        raise MissingKey(f"this device holds no key of key epoch {epoch}: it cannot store "
                         f"membership version {version.seq}")
    return seal_object(Kind.MEMBERSHIP, signed, keys.record_keys[epoch])


async def append(repo: RepoLike, signed: bytes, after: Membership | None = None) -> None:
    """Store one signed version, which follows `after` (the caller checked that it does)."""
    m = Membership.decode(_body(signed))
    await repo.store.put(_name(m.seq), seal_version(repo.keys, signed, after))
    repo.membership_changed()


async def store_chain(repo: RepoLike, chain: list[bytes]) -> Membership:
    """Check a chain received from another device and store the versions this store lacks."""
    versions = check_versions(chain, verify_signature, device_id_for)
    have = {n async for n in repo.store.list(PREFIX)}
    for i, signed in enumerate(chain):
        if _name(versions[i].seq) not in have:
            await repo.store.put(_name(versions[i].seq),
                                 seal_version(repo.keys, signed, versions[i - 1] if i else None))
    repo.membership_changed()
    return versions[-1]


def _body(signed: bytes) -> bytes:
    return Signed.decode(signed, "membership record").body


# ---- keyrings --------------------------------------------------------------------------------

async def write_keyring(repo: RepoLike, keys: AccountKeys) -> None:
    """Store every root this device holds, for the holder of the newest recovery code."""
    doc = msgpack.packb(keys.export(), use_bin_type=True)
    sealed = bytes(seal_object(Kind.KEYRING, doc, keys.keyring_key()))
    signer = DeviceIdentity(keys.recovery_seed())
    await repo.store.put(f"{KEYRING_PREFIX}{keys.epoch:06d}",
                         keyring_object(keys.epoch, sealed, signer.device_id, signer.sign))


def _open_keyring(raw: bytes, root: bytes, what: str) -> tuple[int, dict] | None:
    """(epoch, key export) of a keyring the recovery code `root` opens; None if it does not."""
    header = ObjectHeader.decode(raw, what)
    if header.kind == Kind.KEYRING:   # written before keyrings were signed
        try:
            body = open_object(raw, legacy_keyring_key_of(root), expect=Kind.KEYRING,
                               what=what)[1]
        except IntegrityError:
            return None
        epoch = -1
    else:
        epoch, sealed, signed = read_keyring(raw, what)
        signer = DeviceIdentity(recovery_seed_of(root))
        if signed.device != signer.device_id:
            return None                  # another epoch's
        if not signed.verifies(KEYRING_SIG, signer.public_key, verify_signature):
            raise IntegrityError(f"{what} has a bad signature")
        body = open_object(sealed, keyring_key_of(root), expect=Kind.KEYRING, what=what)[1]
    try:
        return epoch, msgpack.unpackb(bytes(body), strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise IntegrityError(f"{what} is damaged: {exc}") from None


async def keys_from_root(repo_store: BlobStore, root: bytes) -> AccountKeys:
    """The account keys a recovery code's root opens: every epoch up to the root's own.

    A keyring counts only if it holds `root` itself as its newest epoch's root: whoever wrote
    it knew that root (a scoped member, which holds record keys, could seal an old-form
    keyring, but not one holding a root it never had)."""
    names = sorted([n async for n in repo_store.list(KEYRING_PREFIX)], reverse=True)
    for name in names:
        try:
            got = _open_keyring(bytes(await repo_store.get(name)), root, name)
        except (IntegrityError, NotFound) as exc:
            log.warning("%s skipped: %s", name, exc)
            continue
        if got is None:
            continue
        try:
            keys = AccountKeys.from_export(got[1])
        except ValueError as exc:
            raise IntegrityError(f"{name} is damaged: {exc}") from None
        if not keys.full or keys.roots.get(keys.epoch) != root:
            log.warning("%s skipped: it does not hold this recovery code's key", name)
            continue
        return keys
    return AccountKeys(root)


async def check_keyring(repo: RepoLike, data: bytes, epoch: int, what: str) -> None:
    """Refuse a keyring (from a peer) that the recovery signer of its epoch did not sign, or
    one of the old form this device cannot check against the roots it holds."""
    signed = keyring_envelope(data, epoch, what)
    if signed is None:
        # The old form is sealed with the epoch's record key: only a device that holds the
        # roots can tell a genuine one; others do not take it (nor pass it on).
        if not repo.keys.full or epoch not in repo.keys.roots:
            raise IntegrityError(f"{what} is a keyring of the old form, which only a device "
                                 "holding every key can check; not taken")
        try:
            body = open_object(data, repo.keys.record_keys[epoch], expect=Kind.KEYRING,
                               what=what)[1]
            held = AccountKeys.from_export(msgpack.unpackb(bytes(body), strict_map_key=False))
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            raise IntegrityError(f"{what} is damaged") from None
        if any(repo.keys.roots.get(e) != r for e, r in held.roots.items()):
            raise IntegrityError(f"{what} holds keys that are not this account's")
        return
    signers = await repo.signers()
    signer = signers.recovery_key(epoch) if signers is not None else None
    if signer is None:
        raise IntegrityError(f"{what}: no membership version of key epoch {epoch} is known "
                             "here yet")
    if signed.device != device_id_for(signer) or \
            not signed.verifies(KEYRING_SIG, signer, verify_signature):
        raise IntegrityError(f"{what} is not signed by the recovery signer of key epoch "
                             f"{epoch}")
