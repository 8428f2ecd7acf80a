"""Objects arriving from a peer: checked before they touch the store, then stored.

A peer is authenticated, but it may be buggy, compromised or replaying: nothing is stored
unless its name matches its content (content-addressed names), its signature matches the
device it claims (signed records), it follows what is already here (log chains, heads that
never go backwards, membership versions), and every blob a pack holds decrypts to its id.
"""

from __future__ import annotations

import asyncio
import logging
import re

import blake3

from .. import ids
from ..crypto.keys import MissingKey
from ..errors import IntegrityError, NameMismatch, NotFound
from ..format.log import check_head_update, segment_hash
from ..format.pack import check_pack_blobs, check_pack_header, pack_name, parse_trailer
from ..format.records import PackTrailer
from ..crypto.identity import verify_signature
from ..format.removal import read_removal
from . import membership as store_membership
from . import roster
from .intake import PackIntake
from .logstore import LogStore, segment_name
from .removals import owner_keys
from .repository import Repository

log = logging.getLogger("p2pbackup.repo")

# Objects a peer sends first: later ones are checked against them.
ORDER = {kind: i for i, (kind, _) in enumerate(ids.OBJECT_NAMES)}


def kind_of(name: str) -> tuple[str, re.Match[str]]:
    """Which kind of object a store name holds; IntegrityError for a name we never write."""
    got = ids.object_kind(name)
    if got is None:
        raise IntegrityError(f"a peer offered {ids.shown(name, 80)}, which is not an object name")
    return got


def transfer_order(name: str) -> tuple[int, str]:
    """Sort key that sends what others are checked against first (devices before snapshots)."""
    try:
        return ORDER[kind_of(name)[0]], name
    except IntegrityError:
        return len(ORDER), name


async def accept(repo: Repository, name: str, data: bytes | memoryview, *,
                 durable: bool = True, intake: PackIntake | None = None) -> bool:
    """Check an object from a peer and store it; False if we already had it, else True.

    `durable=False` lets a pack's fsync wait for the caller's next `store.sync()` (a crash
    before it loses only packs the peer will offer again; the index drops what is missing).
    A pack `intake` joined is checked and written by its worker processes."""
    kind, m = kind_of(name)
    what = f"{name[:60]} from a peer"
    heals = False
    if kind not in ("head", "anchor") and await repo.store.has(name):
        # A pack here whose bytes no longer match its name is replaced by a copy that does.
        heals = kind == "pack" and m.group(1) in repo.index.damaged
        if not heals and (kind == "pack" or await repo.store.get(name) == data):
            return False
        if not heals:
            raise IntegrityError(f"{what} differs from the copy already here (objects never "
                                 "change)")
    if kind == "config":
        if data != await repo.config_object():
            raise IntegrityError(f"{what} belongs to another repository")
        return False
    if kind == "membership":
        chain = await store_membership.load_chain(repo)
        body = store_membership.open_version(data, repo.keys, what)
        if body is None:
            raise IntegrityError(f"{what} is sealed with a key this device does not hold (yet)")
        await store_membership.store_chain(repo, chain + [body])
        return True
    if kind == "roster":
        got = await store_membership.load(repo)
        await roster.check_incoming(repo.store, name, bytes(data), got[0] if got else None)
    elif kind == "device":
        device = name.split("/")[1]
        signers = await repo.signers()
        if signers is not None and not signers.ever_listed(device):
            raise IntegrityError(f"{what}: device {device[:12]} is not a member of the account")
        repo.check_device_record(data, device, what)
    elif kind == "keyring":
        await store_membership.check_keyring(repo, bytes(data), int(name.split("/")[1]), what)
    elif kind == "pack":
        # (a damaged pack is replaced from this process: its store then knows to reopen it)
        if intake is not None and intake.usable and intake.owns(data) and not durable \
                and repo.store.capabilities.local_disk and not heals:
            trailer = await _take_in_worker(repo, intake, name, m.group(1), data, what)
        else:
            trailer = await _check_and_put(repo, name, m.group(1), data, durable, what)
        # Added whole and without damage: a damaged copy's listing ends here.
        await repo.index.add_pack(m.group(1), trailer.scope, trailer.epoch, len(data),
                                  [(b.id, b.kind, b.offset, b.length, b.raw_length)
                                   for b in trailer.blobs], arrived=True)
        if heals:
            log.info("pack %s healed: an intact copy from a peer replaced the damaged one",
                     m.group(1)[:12])
        return True
    elif kind == "snapshot":
        await repo.check_snapshot(data, m.group(1), what)
    elif kind == "segment":
        device, seq = m.group(1), int(m.group(2))
        seg = await LogStore(repo).check_segment(data, device, seq, what)
        try:
            before = await repo.store.get(segment_name(device, seq - 1)) if seq > 1 else None
        except NotFound:
            before = None
        if before is not None and seg.prev != segment_hash(before):
            raise IntegrityError(f"{what} does not follow segment {seq - 1} (a fork)")
    elif kind == "removal":
        if blake3.blake3(data).hexdigest() != m.group(1):
            raise NameMismatch(f"{what}: its content does not match its name")
        got = await store_membership.load(repo)
        read_removal(data, owner_keys(got[0] if got else None), verify_signature, what)
    elif kind == "anchor":  # rewritten each time prune folds more: it only moves forward
        logs = LogStore(repo)
        new = await logs.check_anchor(data, m.group(1), what)
        try:
            current = await logs.read_anchor(m.group(1))
        except IntegrityError:
            current = None  # a damaged copy here: the peer's replaces it
        if current is not None:
            if current == new:
                return False
            if new.seq <= current.seq:
                raise IntegrityError(f"{what} goes back to segment {new.seq}; the log here is "
                                     f"folded up to segment {current.seq}")
    elif kind == "head":
        device = m.group(1)
        logs = LogStore(repo)
        new = await logs.check_head(data, device, what)
        try:
            current = await logs.read_head(device) if await repo.store.has(name) else None
        except IntegrityError:
            current = None  # a damaged copy here: the peer's (checked above) replaces it
        if current is not None and current == new:
            return False   # the head held here, offered again: nothing to do
        why = check_head_update(current, new)
        if why:
            raise IntegrityError(f"{what}: {why}")
    await repo.store.put(name, data)
    return True


async def _take_in_worker(repo: Repository, intake: PackIntake, name: str, digest: str,
                          data: memoryview, what: str) -> PackTrailer:
    """The pack checked and written by a pack worker (the trailer is read here)."""
    try:
        trailer, keys = _pack_trailer(repo, data, what)
    except IntegrityError:
        if pack_name(data) != digest:   # the worker checks it; say it first, as below
            raise NameMismatch(f"{what}: its content does not match its name") from None
        raise
    await intake.take(name, data, digest,
                      [(b.kind, b.id, b.offset, b.length, b.raw_length)
                       for b in trailer.blobs],
                      (keys.data_key, keys.id_key) if keys else None, what)
    return trailer


async def _check_and_put(repo: Repository, name: str, digest: str, data: bytes | memoryview,
                         durable: bool, what: str) -> PackTrailer:
    """The pack checked on a thread, then stored (not fsynced when not `durable`)."""
    def check_and_write() -> tuple[PackTrailer, bool]:
        if pack_name(data) != digest:
            raise NameMismatch(f"{what}: its content does not match its name")
        trailer = _check_pack(repo, data, what)
        if durable or not repo.store.capabilities.blocking:
            return trailer, False
        repo.store.put_sync(name, data, durable=False)  # the caller syncs in batches
        return trailer, True

    trailer, written = await asyncio.to_thread(check_and_write)
    if not written:
        await repo.store.put(name, data)
    return trailer


def _pack_trailer(repo: Repository, data: bytes | memoryview, what: str):
    """The pack's checked header and decrypted trailer, and the keys of its source (None for
    a source this device was not granted: its blobs are kept as ciphertext, like a partner)."""
    check_pack_header(data, what)
    trailer = parse_trailer(data, len(data), repo.keys.record_keys_newest_first(), what)
    try:
        return trailer, repo.keys.scope(trailer.scope, trailer.epoch)
    except MissingKey:
        return trailer, None


def _check_pack(repo: Repository, data: bytes, what: str):
    """Every blob of the pack decrypts and hashes to its id (when we hold its source's key)."""
    trailer, keys = _pack_trailer(repo, data, what)
    if keys is not None:
        check_pack_blobs(data, ((b.kind, b.id, b.offset, b.length, b.raw_length)
                                for b in trailer.blobs),
                         keys.data_key, keys.id_key, what)
    return trailer


async def offered_names(repo: Repository) -> set[str]:
    """The objects of this store another copy may take (a peer, a configured store). A
    damaged pack is not one: a peer would refuse it anyway, and leaving it out makes a peer
    that holds it send its intact copy."""
    return {n async for n in repo.store.list("") if is_object_name(n) and not is_damaged(repo, n)}


def is_damaged(repo: Repository, name: str) -> bool:
    """True for a pack of this store whose bytes no longer match its name."""
    return name.startswith("packs/") and name[6:] in repo.index.damaged


def is_object_name(name: str) -> bool:
    """True for the names `accept` knows (what a peer may offer or ask for)."""
    try:
        kind_of(name)
        return True
    except IntegrityError:
        return False

