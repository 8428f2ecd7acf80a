"""`p2pbackup account delete`: the account's data removed from every place this device can
reach, this device's home last.

The places, in the order they are dealt with:

1. Stores the owner holds the credentials of (a directory, S3, WebDAV: their backend deletes
   name by name): every object of the account is deleted, `config` FIRST. Without its config
   a store no longer opens as an account (`snapshots --from` says there is no repository), so
   a deletion cut short leaves ciphertext nobody can mistake for a whole (or a damaged)
   account, never snapshots whose packs are gone; running the command again lists the store
   anew and deletes the rest.
2. Stores that delete only by removal records (`capabilities.append_only`: the storage
   server) get an account-deletion record (format/removal.py, `account` set) signed by this
   owner device: the keeper checks it as it checks any removal record, against the roster's
   owners, and forgets the whole account at once (repo/partner_store.py).
3. Storage partners get the same record over a session with their daemon (found on the LAN,
   as `--from peer:NAME` finds them), and forget the account the same way. The account's
   other devices (owners, members) are listed by name but not reached: each keeps its own
   home, and holds the keys (run `account delete` there too, or `devices remove` it first).
4. This device's home (keys, config, store, cache), only once every store and partner is
   done: one that could not be reached or refused leaves the home, so that the command can be
   run again (or the store given up with `store remove`, the partner with `devices remove`).

A keeper that took the record but still lists objects of the account (an older p2pbackup,
which reads the record as one that removes nothing) is a failure too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .blobs import open_store
from .blobs.base import BlobStore
from .config import Config
from .device import Device, open_other_store, open_peer_store
from .errors import NotFound, P2PError, StorageError, WrongKey
from .format.membership import OWNER, PARTNER, Member
from .format.removal import Removal, removal_name, removal_object
from .ids import OBJECT_NAMES, object_kind
from .repo import membership as store_membership
from .repo.removals import FIRST_SEEN
from .sizes import format_size

STORE, PEER, HOME = "store", "peer", "home"
# In the home, until it goes: the partners that forgot the account at a run that could not
# finish (a store failed), so that the next run does not ask them again (they would refuse
# a device of an account they no longer know).
PARTNERS_DONE = "account-deletion-partners-done"


@dataclass(frozen=True, slots=True)
class Place:
    """One place that holds some of the account, and what deleting the account does there."""

    kind: str                 # STORE, PEER or HOME
    where: str                # a location, a device's name, a path
    objects: int | None       # None: not known (a peer; a store that could not be listed)
    size: int | None
    action: str               # one line: what `account delete` does there
    error: str | None = None  # why it could not be listed (the deletion will fail there too)

    def to_json(self) -> dict:
        return {"kind": self.kind, "where": self.where, "objects": self.objects,
                "bytes": self.size, "action": self.action, "error": self.error}

    def line(self) -> str:
        held = ("" if self.objects is None else
                f"{self.objects} objects ({format_size(self.size or 0)}): ")
        if self.error:
            return f"{self.kind} {self.where}: cannot be listed: {self.error}"
        return f"{self.kind} {self.where}: {held}{self.action}"


def check_owner(dev: Device, got: tuple | None) -> None:
    """WrongKey unless this device is an owner of the account (`got`: its membership)."""
    role = OWNER if got is None and dev.keys.full else None
    if got is not None:
        me = got[0].member(dev.identity.device_id)
        role = me.role if me is not None else None
    if role != OWNER or not dev.keys.full:
        raise WrongKey(f"only an owner device of the account can delete it (this device is "
                       f"{'a ' + role if role else 'not listed'}); run `p2pbackup account "
                       "delete` on an owner device")


async def _names(store: BlobStore) -> list[str]:
    """The account's objects `store` holds: names p2pbackup writes only (a folder or bucket
    prefix shared with other files keeps those); a store that does not hold the account at
    all (the server: not registered) holds none."""
    try:
        return [n async for n in store.list("") if object_kind(n) is not None]
    except NotFound:
        return []


async def _held(store: BlobStore) -> tuple[list[str], int]:
    """The names `store` holds and their bytes together (a request per object on a remote
    store: for the dry run and the question only)."""
    names = await _names(store)
    total = 0
    for n in names:
        try:
            total += await store.size(n)
        except NotFound:   # deleted meanwhile (a removal applied)
            pass
    return names, total


def _deletion_order(name: str) -> tuple[int, str]:
    return (0 if name == "config" else 1, name)


def _action(store: BlobStore) -> str:
    if store.capabilities.append_only:
        return ("sent this owner's signed account deletion: it deletes the account at once")
    return "deleted object by object (its config first)"


async def survey(dev: Device) -> tuple[str, list[Place]]:
    """The account's fingerprint and every place `account delete` deals with, listed now."""
    got = await store_membership.load(dev.repo)
    check_owner(dev, got)
    places: list[Place] = []
    for s in dev.config.stores:
        try:
            store = await open_other_store(dev.config, dev.keys, dev.identity, s.location)
        except P2PError as exc:
            places.append(Place(STORE, s.location, None, None, "", str(exc)))
            continue
        try:
            names, size = await _held(store)
            places.append(Place(STORE, s.location, len(names), size, _action(store)))
        except P2PError as exc:
            places.append(Place(STORE, s.location, None, None, _action(store), str(exc)))
        finally:
            await store.close()
    for m in _others(dev, got):
        places.append(Place(PEER, _peer_label(m), None, None,
                            "sent this owner's signed account deletion: it forgets the "
                            "account's grant and data" if m.role == PARTNER else
                            "not reached by this version; keeps its own home: run `p2pbackup "
                            "account delete` there too"))
    own = open_store(str(dev.config.store))
    try:
        names = await _names(own)
    finally:
        await own.close()
    places.append(Place(HOME, str(dev.config.home), len(names), _home_bytes(dev.config),
                        "deleted last: keys, config, store, cache (what else is there stays)"))
    return dev.keys.fingerprint(), places


# What p2pbackup makes in a home and in its store: `account delete` removes these and leaves
# anything else there (a home or store path that also holds other files, a home that keeps
# other accounts' data as their storage partner: partners/), so a misconfigured path never
# takes a user's files with it.
_HOME_ENTRIES = frozenset({"config.toml", "config.toml.tmp", "keys", "cache", "cache-recover",
                           "daemon.sock", FIRST_SEEN, PARTNERS_DONE})
_STORE_ENTRIES = frozenset({rx.pattern.split("/")[0] for _, rx in OBJECT_NAMES}
                           | {"lock", "quarantine"})


def _ours_in_store(name: str) -> bool:
    return name in _STORE_ENTRIES or name.endswith(".tmp")


def _home_bytes(config: Config) -> int:
    total = 0
    for top, ours in ((config.store, _ours_in_store), (config.home, _HOME_ENTRIES.__contains__)):
        for entry in _entries(top):
            if not ours(entry.name):
                continue
            walk = os.walk(entry.path) if entry.is_dir(follow_symlinks=False) else \
                [(os.path.dirname(entry.path), [], [entry.name])]
            for root, _, files in walk:
                for f in files:
                    try:
                        total += os.lstat(os.path.join(root, f)).st_size
                    except OSError:
                        pass
    return total


def _entries(directory: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _clear(directory: Path, ours: Callable[[str], bool]) -> list[str]:
    """Delete what `ours` names in `directory`, then the directory if nothing is left in it;
    the names of what is left."""
    kept = []
    for entry in _entries(directory):
        if not ours(entry.name):
            kept.append(entry.name)
        elif entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)
    if not kept:
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(directory)
    return kept


async def delete_stores(dev: Device, say: Callable[[str], None]) -> list[str]:
    """Steps 1 to 3 (the module's docstring), one line each through `say`; the locations
    that failed (their error said)."""
    failed: list[str] = []
    stores = []
    for s in dev.config.stores:
        try:
            stores.append(await open_other_store(dev.config, dev.keys, dev.identity,
                                                 s.location))
        except P2PError as exc:
            say(f"store {s.location}: FAILED: {exc}")
            failed.append(s.location)
    try:
        # Owner-held stores before the server: steps in the order the docstring gives.
        for store in sorted(stores, key=lambda st: st.capabilities.append_only):
            try:
                say(await _delete_from(store, dev))
            except P2PError as exc:
                say(f"store {store.location}: FAILED: {exc}")
                failed.append(store.location)
    finally:
        for store in stores:
            await store.close()
    done = _partners_done(dev.config)
    for m in _others(dev, await store_membership.load(dev.repo)):
        if m.role != PARTNER:
            say(f"peer {_peer_label(m)}: not reached by this version")
            continue
        if m.device_id in done:   # it no longer knows the account: it would refuse us now
            say(f"peer {_peer_label(m)}: it deleted the account's grant and data at an "
                "earlier run")
            continue
        try:
            say(f"peer {_peer_label(m)}: " + await _delete_at_partner(dev, m))
            with open(dev.config.home / PARTNERS_DONE, "a", encoding="ascii") as f:
                f.write(m.device_id + "\n")
        except P2PError as exc:
            say(f"peer {_peer_label(m)}: FAILED: {exc}")
            failed.append(f"partner {m.name or m.device_id[:12]}")
    return failed


def _partners_done(config: Config) -> set[str]:
    try:
        return set((config.home / PARTNERS_DONE).read_text(encoding="ascii").split())
    except FileNotFoundError:
        return set()


def account_deletion(dev: Device) -> tuple[str, bytes]:
    """The signed record (name, object) that has keepers of the account forget all of it."""
    data = removal_object(Removal(dev.identity.device_id, time.time_ns(), (),
                                  dev.keys.fingerprint()), dev.identity.sign)
    return removal_name(data), data


async def _delete_from(store: BlobStore, dev: Device) -> str:
    names = await _names(store)
    if store.capabilities.append_only:
        if names:     # else not (any more) held there: nothing to ask
            await store.put(*account_deletion(dev))
            left = await _names(store)
            if left:
                raise StorageError(f"store {store.location}: it still holds {len(left)} "
                                   "objects of the account after its deletion (an older "
                                   "p2pbackup-server? upgrade it)")
        return f"store {store.location}: it deleted the account ({len(names)} objects)"
    for name in sorted(names, key=_deletion_order):
        await store.delete(name)
    await store.sync()
    return f"store {store.location}: deleted {len(names)} objects"


def _others(dev: Device, got: tuple | None) -> list[Member]:
    """The account's devices and partners but this one."""
    return [m for m in (got[0].members if got is not None else ())
            if m.device_id != dev.identity.device_id]


def _peer_label(m: Member) -> str:
    return f"{m.name} ({m.role}, {m.device_id[:12]})"


async def _delete_at_partner(dev: Device, m: Member) -> str:
    peer = await open_peer_store(dev.config, dev.keys, dev.identity, f"peer:{m.device_id}")
    try:
        await peer.put(*account_deletion(dev))
        left = [n async for n in peer.list("")]
    finally:
        await peer.close()
    if left:
        raise StorageError(f"partner {m.name} still holds {len(left)} objects of the account "
                           "after its deletion (an older p2pbackup there? upgrade it)")
    return "it deleted the account's grant and data"


def wipe_home(config: Config) -> str:
    """Step 4: what p2pbackup made in the home and its store deleted; the line to print."""
    try:
        in_store = _clear(config.store, _ours_in_store)
        kept = _clear(config.home, _HOME_ENTRIES.__contains__)
    except OSError as exc:
        raise StorageError(f"cannot delete {exc.filename or config.home}: "
                           f"{exc.strerror or exc}") from None
    line = f"home {config.home}: deleted (keys, config, store, cache)"
    left = [f"{config.store}/{n}" for n in sorted(in_store)] + \
        [str(config.home / n) for n in sorted(kept) if config.home / n != config.store]
    return line + (f"; left there, not p2pbackup's: {', '.join(left)}" if left else "")
