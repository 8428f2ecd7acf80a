"""Removal records in a store: writing one after forget/prune, and what peers do with them.

The device that forgets or prunes records what it removed (signed). Peers take the record by
replication, stop fetching what it lists, and once it is older than their grace period delete
what they may: a member device deletes the listed snapshots (its own prune then drops the
data nothing uses any more, as it decides from the snapshots it holds); a storage partner,
which cannot tell what is used, deletes everything listed.

The grace period counts from when this device first held the record (`FirstSeen`, a note
kept beside the store, never in it), not from the time inside the record: the signer chooses
that one, and a record dated 1970 would otherwise delete at once.

A record counts if its signer was an owner when this device first held it: the note keeps the
signer's key, so removing that owner later does not cancel what it removed before (its
tombstones stay, its pending deletions happen), while a record first seen after its signer's
removal is refused.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import msgpack

from ..blobs.base import BlobStore
from ..crypto.identity import DeviceIdentity, device_id_for, verify_signature
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


async def held(store: BlobStore, key_of: Callable[[str], bytes | None],
               seen: "FirstSeen | None" = None, now_ns: int | None = None
               ) -> dict[str, Removal]:
    """The removal records in `store` that count, by name (others are logged, ignored): signed
    by a device `key_of` names as an owner now or, with `seen` (this device's notes), one that
    was an owner when this device first held the record. Records new to `seen` are noted, with
    their signer's key, as first held at `now_ns` (default: now)."""
    out: dict[str, Removal] = {}
    keys: dict[str, bytes] = {}
    async for name in store.list(PREFIX):
        noted = seen.signer_key(name) if seen is not None else None

        def key(device: str, noted: bytes | None = noted) -> bytes | None:
            if noted is not None and device_id_for(noted) == device:
                return noted
            return key_of(device)

        try:
            r = read_removal(await store.get(name), key, verify_signature, name)
        except (IntegrityError, NotFound) as exc:
            log.warning("%s ignored: %s", name, exc)
            continue
        out[name] = r
        keys[name] = key(r.device) or b""
    if seen is not None:
        seen.since(out, time.time_ns() if now_ns is None else now_ns, signers=keys)
    return out


def tombstones(records: dict[str, Removal]) -> set[str]:
    """Names not to fetch again from any peer."""
    return {n for r in records.values() for n in r.names}


class FirstSeen:
    """When this device first held each removal record, and the key of its signer then (an
    owner), kept in one local file:

        msgpack {v: 1, seen: {name: time_ns}, signers: {name: public key}}

    (`signers` came later: a note without one counts the record's signer as an owner only
    while the membership or roster lists it as one.) The file lives beside a store, not in it
    (nothing a peer sends can write it). Losing or damaging it only delays deletion: a record
    with no note counts as first seen now.
    """

    VERSION = 1

    def __init__(self, path: Path | None) -> None:
        self.path = path            # None: kept in memory only (tests, a store without a home)
        self._seen: dict[str, int] | None = None
        self._signers: dict[str, bytes] = {}

    def _load(self) -> tuple[dict[str, int], dict[str, bytes]]:
        if self.path is None:
            return {}, {}
        try:
            doc = msgpack.unpackb(self.path.read_bytes(), raw=False)
            seen, signers = doc["seen"], doc.get("signers", {})
            if doc.get("v") != self.VERSION or not isinstance(seen, dict) or \
                    not isinstance(signers, dict):
                raise ValueError("another version")
            return ({str(n): int(t) for n, t in seen.items()},
                    {str(n): k for n, k in signers.items() if isinstance(k, bytes)})
        except FileNotFoundError:
            return {}, {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError,
                msgpack.UnpackException) as exc:
            log.warning("%s is unreadable (%s): removals held here count their grace period "
                        "from now", self.path, exc)
            return {}, {}

    def _save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(msgpack.packb({"v": self.VERSION, "seen": self._seen,
                                       "signers": self._signers}, use_bin_type=True))
        os.replace(tmp, self.path)

    def _loaded(self) -> dict[str, int]:
        if self._seen is None:
            self._seen, self._signers = self._load()
        return self._seen

    def signer_key(self, name: str) -> bytes | None:
        """The key of the owner that signed record `name`, noted when this device first held
        it (None: no note)."""
        self._loaded()
        return self._signers.get(name)

    def since(self, names: Iterable[str], now_ns: int,
              signers: dict[str, bytes] | None = None) -> dict[str, int]:
        """The first time each of `names` was seen here; a new one is noted as `now_ns`, with
        its signer's key from `signers` (a note keeps the key it was first noted with).
        Notes of records no longer held are dropped."""
        old = self._loaded()
        names = set(names)
        seen = {n: t for n, t in old.items() if n in names}
        for n in names - seen.keys():
            seen[n] = now_ns
        keys = {n: k for n, k in self._signers.items() if n in names}
        for n, k in (signers or {}).items():
            if n in names and n not in keys and k:
                keys[n] = k
        if seen != old or keys != self._signers:
            self._seen, self._signers = seen, keys
            self._save()
        return dict(seen)


def due(records: dict[str, Removal], grace_seconds: float, *, seen: FirstSeen,
        now_ns: int | None = None) -> set[str]:
    """The names the records release for deletion: those of every record held here for its
    grace period since this device first held it (and since the time it states, if later)."""
    now = time.time_ns() if now_ns is None else now_ns
    first = seen.since(records, now)
    return {listed for name, r in records.items()
            if now - max(first[name], r.time_ns) >= grace_seconds * 1e9 for listed in r.names}


async def apply_due(store: BlobStore, records: dict[str, Removal], grace_seconds: float, *,
                    kinds: tuple[str, ...], seen: FirstSeen,
                    now_ns: int | None = None) -> list[str]:
    """Delete what the records release (`due`) among names starting with `kinds`."""
    gone = []
    for listed in sorted(due(records, grace_seconds, seen=seen, now_ns=now_ns)):
        if listed.startswith(kinds) and await store.has(listed):
            await store.delete(listed)
            gone.append(listed)
    return gone
