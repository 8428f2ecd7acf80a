"""One BlobStore interface and its backends (local directory now; S3, server and peer later)."""

from .base import BlobStore
from .local import LocalDirStore

__all__ = ["BlobStore", "LocalDirStore", "open_store"]


def open_store(location: str) -> BlobStore:
    """Open the store named by `location` (for now, a directory path)."""
    from ..errors import ConfigError

    if "://" in location or location.startswith("peer:"):
        raise ConfigError(f"store {location!r}: only directory stores are supported by this version")
    return LocalDirStore(location)
