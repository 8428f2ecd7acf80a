"""Accounts built through the library for attacker tests: real homes, stores, SQLite and
membership records, joined without a network (the pairing messages are handed over directly)."""

from __future__ import annotations

import secrets
from pathlib import Path

from p2pbackup import account, grants
from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.config import load_config, load_keys
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.crypto.keys import AccountKeys
from p2pbackup.device import init_device, open_device
from p2pbackup.format.membership import MEMBER, OWNER


async def make_owner(home: Path, sources: list[Path]) -> str:
    """A new account on this home; returns its recovery code."""
    _, code = await init_device(home, [str(s) for s in sources])
    return code


async def snapshot(home: Path) -> str:
    """Take a snapshot of the home's sources; returns its id."""
    async with open_device(home, write=True) as dev:
        summary = await take_snapshot(dev.repo, dev.config.sources, temp_dir=dev.temp_dir)
    return summary.stored.id


async def pair(host: Path, joiner: Path, name: str, sources: list[str] | None = None) -> str:
    """Join `joiner` (a fresh home) to the account of `host`; returns the joiner's device id."""
    identity = DeviceIdentity.generate()
    async with open_device(host, write=True) as dev:
        invite = account.invitation(dev, MEMBER if sources else OWNER,
                                    tuple(sources) if sources else None, None)
        pending = await account.prepare_welcome(
            dev, invite, account.joiner_payload(identity, name, False,
                                                secrets.token_bytes(grants.TAG_KEY_SIZE)))
        await account.apply_welcome(joiner, identity, name, pending.welcome)
        await account.commit_join(dev, pending)
    return identity.device_id


async def remove(host: Path, which: str) -> str:
    """Remove a device from the account of `host`; returns the new recovery code."""
    async with open_device(host, write=True) as dev:
        return (await account.remove_device(dev, which)).recovery_code


async def carry(src: Path, dst: Path, prefix: str) -> list[str]:
    """Copy the objects under `prefix` that `dst`'s store lacks (what replication carries)."""
    a, b = LocalDirStore(src / "store"), LocalDirStore(dst / "store")
    copied = []
    async for name in a.list(prefix):
        if not await b.has(name):
            await b.put(name, await a.get(name))
            copied.append(name)
    return copied


def keys_of(home: Path) -> tuple[AccountKeys, DeviceIdentity]:
    """What a device's home holds (also a removed device: nothing stops it reading its disk)."""
    return load_keys(load_config(home))
