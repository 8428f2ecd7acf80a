"""One BlobStore interface and its backends (local directory now; S3, server and peer later)."""

from .base import BlobStore
from .local import LocalDirStore

__all__ = ["BlobStore", "LocalDirStore", "is_peer_location", "open_store"]


def is_peer_location(location: str | None) -> bool:
    """True for `--from peer:...` (a member device's store, read over the network)."""
    return bool(location) and location.startswith("peer:")  # type: ignore[union-attr]


def open_store(location: str) -> BlobStore:
    """Open the store named by `location` (for now, a directory path)."""
    from ..errors import ConfigError

    if "://" in location or location.startswith("peer:"):
        raise ConfigError(f"store {location!r}: only directory stores are supported by this version")
    return LocalDirStore(location)
