"""Removal records in a store: writing one after forget/prune, and what peers do with them.

The device that forgets or prunes records what it removed (signed). Peers take the record by
replication, stop fetching what it lists, and once it is older than their grace period delete
what they may: a member device deletes the listed snapshots (its own prune then drops the
data nothing uses any more, as it decides from the snapshots it holds); a storage partner,
which cannot tell what is used, deletes everything listed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..blobs.base import BlobStore
from ..crypto.identity import DeviceIdentity, verify_signature
from ..errors import IntegrityError, NotFound
from ..format.membership import OWNER, Membership
from ..format.removal import PREFIX, Removal, read_removal, removal_name, removal_object

log = logging.getLogger("p2pbackup.removals")


def owner_keys(membership: Membership | None) -> Callable[[str], bytes | None]:
    """Who may sign a removal: the account's owner devices."""
    owners = {m.device_id: m.public_key for m in (membership.members if membership else ())
              if m.role == OWNER}
    return owners.get


async def record(store: BlobStore, identity: DeviceIdentity, names: list[str]) -> str | None:
    """Store a signed record of `names` removed here (None when there is nothing to record)."""
    if not names:
        return None
    data = removal_object(Removal(identity.device_id, time.time_ns(), tuple(sorted(names))),
                          identity.sign)
    name = removal_name(data)
    await store.put(name, data)
    return name


async def held(store: BlobStore, key_of: Callable[[str], bytes | None]) -> list[Removal]:
    """The removal records in `store` that check out (others are logged and ignored)."""
    out = []
    async for name in store.list(PREFIX):
        try:
            out.append(read_removal(await store.get(name), key_of, verify_signature, name))
        except (IntegrityError, NotFound) as exc:
            log.warning("%s ignored: %s", name, exc)
    return out


def tombstones(records: list[Removal]) -> set[str]:
    """Names not to fetch again from any peer."""
    return {n for r in records for n in r.names}


async def apply_due(store: BlobStore, records: list[Removal], grace_seconds: float, *,
                    kinds: tuple[str, ...], now_ns: int | None = None) -> list[str]:
    """Delete what records older than the grace period list (names starting with `kinds`)."""
    now = time.time_ns() if now_ns is None else now_ns
    gone = []
    for r in records:
        if now - r.time_ns < grace_seconds * 1e9:
            continue
        for name in r.names:
            if name.startswith(kinds) and await store.has(name):
                await store.delete(name)
                gone.append(name)
    return gone
