"""The membership chain and the key rings in a repository's store.

membership/<seq>  each signed version, sealed with the account-wide (epoch 0) meta key so that
                  every member, whatever the epoch it joined in, can check the whole chain.
keyring/<epoch>   every epoch's root up to <epoch>, sealed with that epoch's record key: the
                  recovery code of the newest epoch opens all of the account's history.
"""

from __future__ import annotations

import msgpack

from ..blobs.base import BlobStore
from ..crypto.identity import device_id_for, verify_signature
from ..crypto.keys import AccountKeys
from ..errors import IntegrityError, NotFound
from ..format.header import Kind
from ..format.membership import Membership, check_chain
from ..format.objects import open_object, seal_object
from .repository import Repository

PREFIX = "membership/"


def _name(seq: int) -> str:
    return f"{PREFIX}{seq:012d}"


async def chain_in(store: BlobStore, meta_key: bytes) -> list[bytes]:
    """Every signed membership version in `store`, oldest first (not yet checked)."""
    names = sorted([n async for n in store.list(PREFIX)])
    out = []
    for name in names:
        raw = await store.get(name)
        _, body = open_object(raw, meta_key, expect=Kind.MEMBERSHIP, what=name)
        out.append(bytes(body))
    return out


async def load_chain(repo: Repository) -> list[bytes]:
    """Every signed membership version in the repository, oldest first (not yet checked)."""
    return await chain_in(repo.store, repo.keys.meta_key)


async def load(repo: Repository) -> tuple[Membership, list[bytes]] | None:
    """The newest membership version, checked from the first one, and the chain; None if none."""
    return await load_from(repo.store, repo.keys.meta_key)


async def load_from(store: BlobStore, meta_key: bytes) -> tuple[Membership, list[bytes]] | None:
    """`load` for a store without an opened repository."""
    chain = await chain_in(store, meta_key)
    if not chain:
        return None
    return check_chain(chain, verify_signature, device_id_for), chain


async def append(repo: Repository, signed: bytes) -> None:
    """Store one signed version (the caller checked that it follows the chain)."""
    m = Membership.decode(_body(signed))
    await repo.store.put(_name(m.seq), seal_object(Kind.MEMBERSHIP, signed, repo.keys.meta_key))


async def store_chain(repo: Repository, chain: list[bytes]) -> Membership:
    """Check a chain received from another device and store the versions this store lacks."""
    newest = check_chain(chain, verify_signature, device_id_for)
    have = {n async for n in repo.store.list(PREFIX)}
    for signed in chain:
        m = Membership.decode(_body(signed))
        if _name(m.seq) not in have:
            await repo.store.put(_name(m.seq),
                                 seal_object(Kind.MEMBERSHIP, signed, repo.keys.meta_key))
    return newest


def _body(signed: bytes) -> bytes:
    from ..format.records import Signed

    return Signed.decode(signed, "membership record").body


async def write_keyring(repo: Repository, keys: AccountKeys) -> None:
    """Store every root this device holds, sealed with the newest epoch's record key."""
    doc = msgpack.packb(keys.export(), use_bin_type=True)
    await repo.store.put(f"keyring/{keys.epoch:06d}",
                         seal_object(Kind.KEYRING, doc, keys.record_key))


async def keys_from_root(repo_store, root: bytes) -> AccountKeys:
    """The account keys a recovery code's root opens: every epoch up to the root's own."""
    candidate = AccountKeys(root)  # as if it were epoch 0's root, to derive its record key
    names = sorted([n async for n in repo_store.list("keyring/")], reverse=True)
    for name in names:
        try:
            raw = await repo_store.get(name)
            _, body = open_object(raw, candidate.record_keys[0], expect=Kind.KEYRING, what=name)
        except (IntegrityError, NotFound):
            continue
        try:
            return AccountKeys.from_export(msgpack.unpackb(bytes(body), strict_map_key=False))
        except (ValueError, msgpack.ExtraData, msgpack.FormatError) as exc:
            raise IntegrityError(f"{name} is damaged: {exc}") from None
    return candidate
