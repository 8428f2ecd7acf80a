"""Removal records in a store: writing one after forget/prune, and what peers do with them.

The device that forgets or prunes records what it removed (signed). Peers take the record by
replication, stop fetching what it lists, and once it is older than their grace period delete
what they may: a member device deletes the listed snapshots (its own prune then drops the
data nothing uses any more, as it decides from the snapshots it holds); a storage partner,
which cannot tell what is used, deletes everything listed.

The grace period counts from when this device first held the record (`FirstSeen`, a note
kept beside the store, never in it), not from the time inside the record: the signer chooses
that one, and a record dated 1970 would otherwise delete at once.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import msgpack

from ..blobs.base import BlobStore
from ..crypto.identity import DeviceIdentity, verify_signature
from ..errors import IntegrityError, NotFound
from ..format.membership import OWNER, Membership
from ..format.removal import PREFIX, Removal, read_removal, removal_name, removal_object

log = logging.getLogger("p2pbackup.removals")
FIRST_SEEN = "removals-first-seen"   # the FirstSeen file's name, beside a store


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


async def held(store: BlobStore, key_of: Callable[[str], bytes | None]) -> dict[str, Removal]:
    """The removal records in `store` that check out, by name (others are logged, ignored)."""
    out = {}
    async for name in store.list(PREFIX):
        try:
            out[name] = read_removal(await store.get(name), key_of, verify_signature, name)
        except (IntegrityError, NotFound) as exc:
            log.warning("%s ignored: %s", name, exc)
    return out


def tombstones(records: dict[str, Removal]) -> set[str]:
    """Names not to fetch again from any peer."""
    return {n for r in records.values() for n in r.names}


class FirstSeen:
    """When this device first held each removal record, kept in one local file.

    The file lives beside a store, not in it (nothing a peer sends can write it). Losing or
    damaging it only delays deletion: a record with no note counts as first seen now.
    """

    VERSION = 1

    def __init__(self, path: Path | None) -> None:
        self.path = path            # None: kept in memory only (tests, a store without a home)
        self._seen: dict[str, int] | None = None

    def _load(self) -> dict[str, int]:
        if self.path is None:
            return {}
        try:
            doc = msgpack.unpackb(self.path.read_bytes(), raw=False)
            seen = doc["seen"]
            if doc.get("v") != self.VERSION or not isinstance(seen, dict):
                raise ValueError("another version")
            return {str(n): int(t) for n, t in seen.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            log.warning("%s is unreadable (%s): removals held here count their grace period "
                        "from now", self.path, exc)
            return {}

    def _save(self, seen: dict[str, int]) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(msgpack.packb({"v": self.VERSION, "seen": seen}, use_bin_type=True))
        os.replace(tmp, self.path)

    def since(self, names: Iterable[str], now_ns: int) -> dict[str, int]:
        """The first time each of `names` was seen here; a new one is noted as `now_ns`.
        Notes of records no longer held are dropped."""
        if self._seen is None:
            self._seen = self._load()
        names = set(names)
        seen = {n: t for n, t in self._seen.items() if n in names}
        for n in names - seen.keys():
            seen[n] = now_ns
        if seen != self._seen:
            self._save(seen)
            self._seen = seen
        return dict(seen)


async def apply_due(store: BlobStore, records: dict[str, Removal], grace_seconds: float, *,
                    kinds: tuple[str, ...], seen: FirstSeen,
                    now_ns: int | None = None) -> list[str]:
    """Delete what records list (names starting with `kinds`) once the grace period has
    passed since this device first held the record (and since the time it states, if later)."""
    now = time.time_ns() if now_ns is None else now_ns
    first = seen.since(records, now)
    gone = []
    for name, r in records.items():
        if now - max(first[name], r.time_ns) < grace_seconds * 1e9:
            continue
        for listed in r.names:
            if listed.startswith(kinds) and await store.has(listed):
                await store.delete(listed)
                gone.append(listed)
    return gone
