"""A store that holds another account's ciphertext for a storage partner, within a quota.

The partner holds no key: it can check nothing but names and sizes, so the quota is the one
thing it enforces. Replacing a blob counts only the difference; deleting frees space.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from ..errors import StorageError
from ..sizes import format_size
from .base import BlobStore, Buffer


class QuotaExceeded(StorageError):
    """{}"""


class QuotaStore(BlobStore):
    """Wraps a store and refuses a put that would take it over `quota` bytes."""

    def __init__(self, inner: BlobStore, quota: int | None, *, owner: str = "this account"
                 ) -> None:
        self.inner, self.quota, self.owner = inner, quota, owner
        self.location = inner.location
        # Not blocking nor local_disk: the fast paths would write past the quota. No
        # conditional replace: it would too, and a partner (or the server) takes a device's
        # head from that device alone. No overwrite: what a partner holds never changes.
        self.capabilities = replace(inner.capabilities, blocking=False, local_disk=False,
                                    conditional_replace=False, overwrite=False)
        self._used: int | None = None

    async def used(self) -> int:
        """Bytes stored now (counted once, then kept up to date)."""
        if self._used is None:
            total = 0
            async for name in self.inner.list(""):
                total += await self.inner.size(name)
            self._used = total
        return self._used

    @property
    def used_so_far(self) -> int | None:
        """Bytes stored, if counted already (for status, which must not walk the store)."""
        return self._used

    def exceeded(self, what: str, new_used: int) -> QuotaExceeded | None:
        """The refusal, in words, of storing `what` (e.g. "packs") if that takes the store to
        `new_used` bytes, over the quota; None if it fits."""
        if self.quota is None or new_used <= self.quota:
            return None
        return QuotaExceeded(f"quota exceeded: storing {what} for {self.owner} would use "
                             f"{format_size(new_used)} of the {format_size(self.quota)} "
                             "granted; the owner can pair again with a larger --quota")

    async def put(self, name: str, data: Buffer) -> None:
        used = await self.used()
        old = await self.inner.size(name) if await self.inner.has(name) else 0
        new_used = used - old + len(data)
        if len(data) > old and (refused := self.exceeded(name.split("/")[0], new_used)):
            raise refused
        await self.inner.put(name, data)
        self._used = new_used

    async def get(self, name: str) -> bytes:
        return await self.inner.get(name)

    async def get_range(self, name: str, offset: int, length: int) -> bytes:
        return await self.inner.get_range(name, offset, length)

    async def get_spans(self, name: str, spans: Sequence[tuple[int, int]]) -> list[Buffer]:
        return await self.inner.get_spans(name, spans)

    def get_spans_held(self, name: str, spans: Sequence[tuple[int, int]]
                       ) -> list[Buffer] | None:
        return self.inner.get_spans_held(name, spans)

    async def expect_spans(self, name: str, spans: Sequence[tuple[int, int]]) -> None:
        await self.inner.expect_spans(name, spans)

    async def forget_expected(self) -> None:
        await self.inner.forget_expected()

    async def has(self, name: str) -> bool:
        return await self.inner.has(name)

    async def size(self, name: str) -> int:
        return await self.inner.size(name)

    def list(self, prefix: str = "") -> AsyncIterator[str]:
        return self.inner.list(prefix)

    async def delete(self, name: str) -> None:
        size = await self.inner.size(name) if await self.inner.has(name) else 0
        await self.inner.delete(name)
        if self._used is not None:
            self._used -= size

    async def sync(self) -> None:
        await self.inner.sync()

    async def close(self) -> None:
        await self.inner.close()
