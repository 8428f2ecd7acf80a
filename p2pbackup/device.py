"""This device: its home (config, keys) and its repository, opened for reading or writing."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from .blobs import StoreSigner, is_peer_location, open_store
from .blobs.base import BlobStore
from .config import Config, init_home, load_config, load_keys
from .crypto import recovery
from .crypto.identity import DeviceIdentity
from .crypto.keys import AccountKeys
from .errors import ConfigError, DiskFull, StorageError
from .repo.lock import WriterLock
from .repo.repository import Repository


@dataclass(slots=True)
class Device:
    """An opened home: config, keys and a repository."""

    config: Config
    keys: AccountKeys
    identity: DeviceIdentity
    repo: Repository
    lock: WriterLock | None = None  # held while opened for writing

    @property
    def temp_dir(self) -> str:
        return str(self.config.cache_dir / "tmp")

    async def lend_store(self) -> None:
        """Let another process write the store for a while: close the index (it may rebuild
        it) and release the writer lock. `take_store` takes both back."""
        assert self.lock is not None, "lending a store opened for reading"
        await self.repo.index.close()
        self.lock.release()

    async def take_store(self) -> None:
        """Take the writer lock back and catch the index up with what the other process did;
        RepositoryLocked while it still holds the lock."""
        assert self.lock is not None
        self.lock.acquire()
        try:
            await self.repo.reopen_index()
        except BaseException:
            self.lock.release()
            raise


async def init_device(home: Path, sources: list[str]) -> tuple[Config, str]:
    """Create a home and its local store; return the config and the recovery code.

    If it fails part-way (a full disk), what it made is removed again: a half-made home would
    make the next `init` refuse ("already set up") and hold keys nobody has the code of.
    """
    existed = set(os.listdir(home)) if home.is_dir() else None
    try:
        return await _init_device(home, sources)
    except BaseException as exc:
        if existed is None:
            shutil.rmtree(home, ignore_errors=True)
        else:
            for name in set(os.listdir(home)) - existed:
                path = home / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(home) from None
            raise StorageError(f"cannot set up {home}: {exc.strerror or exc}") from None
        raise


async def _init_device(home: Path, sources: list[str]) -> tuple[Config, str]:
    config, account_key = init_home(home, sources)
    keys, identity = load_keys(config)
    store = open_store(str(config.store))
    repo = await Repository.create(store, keys, identity, str(config.cache_dir),
                                   config.device_name)
    try:
        from .account import membership_of  # account builds on this module

        await membership_of(Device(config, keys, identity, repo))
    finally:
        await repo.close()
    assert account_key is not None
    return config, recovery.encode(account_key)


@contextlib.asynccontextmanager
async def open_device(home: Path | None = None, *, write: bool = False,
                      store: str | None = None) -> AsyncIterator[Device]:
    """Open this device's repository (or the one at `store`); `write` takes the writer lock."""
    config = load_config(home)
    keys, identity = load_keys(config)
    if store and write:
        raise ConfigError(f"{store}: a store named with --from is read here, never written")
    own = open_store(str(config.store))   # this device's store: a directory (local_disk)
    blob_store = await open_other_store(config, keys, identity, store) if store else own
    lock = None
    if write:
        lock = WriterLock(os.path.join(own.root, "lock"), own.root)
        lock.acquire()
    try:
        if write:
            own.remove_temp_files()
        repo = await Repository.open(blob_store, keys, identity, str(config.cache_dir),
                                     read_only=not write)
        try:
            dev = Device(config, keys, identity, repo, lock)
            if write and store is None:
                from .account import take_grants  # account builds on this module

                await take_grants(dev)  # a newer key epoch granted to us, after a removal
            yield dev
        finally:
            await repo.close()
    finally:
        await blob_store.close()
        if lock is not None:
            lock.release()


async def open_other_store(config: Config, keys: AccountKeys, identity: DeviceIdentity,
                           location: str) -> BlobStore:
    """The store `location` names: `peer:DEVICE`, or any location `open_store` opens, with the
    options of the `[[stores]]` table of that location if there is one (a store that signs its
    requests, the storage server, signs them as this device of this account)."""
    if is_peer_location(location):
        return await open_peer_store(config, keys, identity, location)
    configured = next((s for s in config.stores if s.location == location), None)
    return open_store(location, options=configured.options if configured else None,
                      signer=StoreSigner(identity, keys.fingerprint()))


async def open_peer_store(config: Config, keys: AccountKeys, identity: DeviceIdentity,
                          location: str) -> BlobStore:
    """The store of the member device `location` names (`peer:NAME[@HOST:PORT]`)."""
    from .account import find_device  # account builds on this module
    from .crypto.tags import member_tag_keys
    from .format.membership import PARTNER
    from .peer_fetch import PeerLocation, open_peer
    from .repo import membership as store_membership

    where = PeerLocation.parse(location)
    got = await store_membership.load_from(open_store(str(config.store)), keys)
    if got is None:
        raise ConfigError("this device has no membership record, so it has no peers")
    member = find_device(got[0], where.which)
    if member.device_id == identity.device_id:
        raise ConfigError(f"{location} names this device itself; drop --from to use its store")
    label = f"peer {member.name or member.device_id[:12]}"
    tag_keys = [member.tag_key] if member.role == PARTNER else member_tag_keys(keys.record_keys)
    return await open_peer(where, member.device_id, identity=identity, membership=got[0],
                           tag_keys=tag_keys, peers=config.peers, label=label,
                           broker=config.broker.url, account=keys.fingerprint(),
                           control_socket=config.control_socket)
