"""The BlobStore interface: named immutable byte strings, nothing about snapshots or packs.

Names are `/`-separated, e.g. `config`, `packs/<hex>`, `snapshots/<hex>`. Every backend passes
tests/blobs/conformance.py unchanged.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

Buffer = bytes | bytearray | memoryview


class BlobStore(abc.ABC):
    """Save, load, stat, list and remove named blobs; `put` is atomic and durable."""

    location: str

    @abc.abstractmethod
    async def put(self, name: str, data: Buffer) -> None:
        """Store `data` under `name`, atomically: readers see all of it or none."""

    @abc.abstractmethod
    async def get(self, name: str) -> bytes:
        """Return the whole blob; raise NotFound if there is none."""

    @abc.abstractmethod
    async def get_range(self, name: str, offset: int, length: int) -> bytes:
        """Return `length` bytes from `offset`; a negative offset counts from the end."""

    @abc.abstractmethod
    async def has(self, name: str) -> bool:
        """True when `name` exists."""

    @abc.abstractmethod
    async def size(self, name: str) -> int:
        """The blob's size in bytes; raise NotFound if there is none."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> AsyncIterator[str]:
        """Yield the names that start with `prefix` (no order promised)."""

    @abc.abstractmethod
    async def delete(self, name: str) -> None:
        """Remove `name`; removing a missing blob is not an error."""

    async def sync(self) -> None:
        """Make everything put so far durable; the default has nothing to do."""

    async def close(self) -> None:
        """Release connections; the default has none."""
