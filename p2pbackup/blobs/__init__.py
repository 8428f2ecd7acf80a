"""One BlobStore interface and its backends; `open_store` is the one place that knows schemes."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

from .base import BlobStore, ObjectExists, StoreCapabilities, StoreSigner
from .local import LocalDirStore

__all__ = ["BlobStore", "LocalDirStore", "ObjectExists", "StoreCapabilities", "StoreSigner",
           "exit_process", "is_peer_location", "open_store"]

# scheme -> "module:function" taking (location, options) and returning a BlobStore. Imported on
# use: a command that reads a local store should not pay for an S3 client's import.
OPENERS: dict[str, str] = {
    "s3": ".s3:open_location",
    "https": ".server:open_server",   # the storage server (p2pbackup-server)
    "http": ".server:open_server",    # the same on a loopback address only (it refuses others)
    "webdav": ".webdav:open_webdav",
    "webdavs": ".webdav:open_webdav",
}


def is_peer_location(location: str | None) -> bool:
    """True for `--from peer:...` (a member device's store, read over the network)."""
    return bool(location) and location.startswith("peer:")  # type: ignore[union-attr]


def open_store(location: str, *, options: Mapping[str, Any] | None = None,
               signer: StoreSigner | None = None) -> BlobStore:
    """Open the store `location` names: a directory path, or `SCHEME://...` of a backend in
    OPENERS; `options` are the backend's settings (a `[[stores]]` table's other keys);
    `signer` is who a store that signs its requests (the storage server) signs them as."""
    from ..errors import ConfigError

    if is_peer_location(location):
        raise ConfigError(f"store {location}: a peer's store is read over a session with the "
                          "peer (--from on snapshots, verify, restore, recover), not opened here")
    scheme, sep, _ = location.partition("://")
    if not sep:
        return LocalDirStore(location)
    target = OPENERS.get(scheme.lower())
    if target is None:
        raise ConfigError(f"store {location}: the {scheme}:// scheme is not supported "
                          "by this version")
    module, _, function = target.partition(":")
    opener = getattr(importlib.import_module(module, __package__), function)
    store: BlobStore = opener(location, dict(options or {}))
    if store.capabilities.signed_requests:
        if signer is None:
            raise ConfigError(f"store {location}: every request to it is signed by a device of "
                              "the account; open it as a store of this device")
        store.sign_as(signer)
    return store


def exit_process(code: int) -> NoReturn:
    """Exit with `code`; after a remote store was used, without finalizing the interpreter.

    opendal's Rust runtime keeps threads that may touch Python objects while the interpreter is
    torn down (seen: SIGABRT or SIGBUS at exit in 1 of ~40 runs of a command that met an S3
    error, its output already right). Callers are done and have closed what they opened."""
    if "opendal" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)

