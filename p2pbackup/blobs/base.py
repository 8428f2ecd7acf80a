"""The BlobStore interface: named immutable byte strings, nothing about snapshots or packs.

Names are `/`-separated, e.g. `config`, `packs/<hex>`, `snapshots/<hex>`. Every backend passes
tests/blobs/conformance.py unchanged. What a backend can do beyond the common calls is declared
in its `capabilities`, never guessed by callers from its class.
"""

from __future__ import annotations

import abc
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..buffers import views_of
from ..crypto.identity import DeviceIdentity
from ..errors import ConfigError, DiskFull, StorageError
from ..ids import object_kind

Buffer = bytes | bytearray | memoryview

# The kinds of name (p2pbackup/ids.py) a put may replace: a device's head moves forward at every
# seal, a folded log's anchor at every prune (repo/logstore.py write_anchor; repo/replica.py
# takes both anew). Every other object never changes.
MUTABLE_KINDS = frozenset({"head", "anchor"})


@dataclass(frozen=True, slots=True)
class StoreCapabilities:
    """What a backend does beyond the common calls (see the field comments)."""

    create_only: bool = False     # put refuses to replace an existing name (server-enforced,
                                  # or emulated atomically); False: callers check `has` first
    ranged_reads: bool = True     # get_range costs only the range
    cheap_listing: bool = True    # list() is as cheap as a local directory walk; False: a
                                  # listing is paid per request (callers list rarely)
    blocking: bool = False        # put_sync/get_sync/sync_sync do real work on the caller's
                                  # thread (local disk); False: the defaults are not usable and
                                  # callers run the async calls on the event loop
    local_disk: bool = False      # objects are files under `root` on this machine (worker
                                  # processes may write them directly: repo/intake.py)
    append_only: bool = False     # delete() removes only what an owner's signed removal record
                                  # released after the holder's grace period, and refuses any
                                  # other delete (the storage server, like a storage partner)
    signed_requests: bool = False  # every request is signed by a device of the account:
                                   # open_store hands it the StoreSigner (sign_as)
    partner_rules: bool = False   # takes from each device only what a storage partner
                                  # takes (repo/partner_store.py role_refusal): what another
                                  # device must write is left to it (the storage server)
    conditional_replace: bool = False  # get_tagged/replace_if: a mutable name is replaced
                                       # only if it still holds the version read (compare-
                                       # and-swap), so two devices writing one store cannot
                                       # put an older head over a newer one
    overwrite: bool = False       # overwrite() puts other bytes under any name in one
                                  # atomic step (the old bytes or the new, never none), to
                                  # heal a damaged copy: never delete-then-put
    planned_reads: bool = False   # expect_spans() keeps what it reads until the spans
                                  # announced are read (a restore's plan); False: a no-op


@dataclass(frozen=True, slots=True)
class StoreSigner:
    """Who a store that signs its requests signs them as: a device's identity (or the
    recovery signer) and the account it acts for. Not a `[[stores]]` option: the device
    passes it to open_store."""

    identity: DeviceIdentity
    account: str                  # the account fingerprint


class ObjectExists(StorageError):
    """{}"""

    # A create-only store refused to replace an object with other bytes. Same exit code as
    # any storage refusal: to a user it means the store holds something else under that name.


class StoreFull(DiskFull):
    """The store {} is full ({}): free space there or raise its quota, then run the command again (nothing already stored was lost)."""

    # A remote store's "no space" (HTTP 507, a quota, an object over the server's limit): the
    # same exit code as a full local disk, with the store and the server's words.


def seconds_option(location: str, options: Mapping[str, Any], key: str,
                   default: float) -> float:
    """A store option that is a number of seconds (a `[[stores]]` number, or the string
    `store add -o KEY=VALUE` gives): ConfigError unless it is a finite number above 0."""
    value = options.get(key, default)
    try:
        seconds = -1.0 if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not 0 < seconds < math.inf:
        raise ConfigError(f"store {location}: {key} must be a number of seconds, not "
                          f"{value!r}")
    return seconds


def is_mutable_name(name: str) -> bool:
    """Whether a put of `name` replaces (heads, log anchors); every other object never changes."""
    found = object_kind(name)
    return found is not None and found[0] in MUTABLE_KINDS


class BlobStore(abc.ABC):
    """Save, load, stat, list and remove named blobs; `put` is atomic and durable."""

    location: str
    capabilities: StoreCapabilities = StoreCapabilities()   # per class, or per instance
    root: str  # the directory holding the objects; only with capabilities.local_disk

    @abc.abstractmethod
    async def put(self, name: str, data: Buffer) -> None:
        """Store `data` under `name`, atomically: readers see all of it or none.

        With capabilities.create_only, a name that is not is_mutable_name and already holds
        other bytes is refused with ObjectExists (the same bytes again is not an error)."""

    @abc.abstractmethod
    async def get(self, name: str) -> bytes:
        """Return the whole blob; raise NotFound if there is none."""

    @abc.abstractmethod
    async def get_range(self, name: str, offset: int, length: int) -> bytes:
        """Return `length` bytes from `offset`; a negative offset counts from the end."""

    async def get_spans(self, name: str, spans: Sequence[tuple[int, int]]) -> list[Buffer]:
        """The (offset >= 0, length) `spans` of `name`, in order and close together (a run
        of a pack's blobs), each cut short at the end of the blob; a store may return views
        of a buffer it keeps (read-only; let go of them soon). The default: one `get_range`
        of what covers them, and views of it. NotFound if there is no blob."""
        start, end = spans[0][0], max(o + n for o, n in spans)
        return views_of(await self.get_range(name, start, end - start), start, spans)

    def get_spans_held(self, name: str, spans: Sequence[tuple[int, int]]
                       ) -> list[Buffer] | None:
        """`get_spans`, from any thread and without waiting, if the store holds what they
        need already (read before, and kept); else None, and the caller awaits `get_spans`.
        The default: None."""
        return None

    async def expect_spans(self, name: str, spans: Sequence[tuple[int, int]]) -> None:
        """The (offset, length) `spans` of `name` will be read with get_spans, each once per
        time announced (with capabilities.planned_reads, a store that reads more than asked
        and keeps it keeps what holds them until then). The default: nothing."""

    async def forget_expected(self) -> None:
        """The reads announced with expect_spans and not done will not be (a restore ended).
        The default: nothing."""

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

    # The blocking fast path: real only with capabilities.blocking. Callers on a worker
    # thread test the capability and otherwise run the async call on the event loop.

    def put_sync(self, name: str, data: Buffer, *, durable: bool = True) -> None:
        """`put` on the caller's thread; durable=False leaves durability to `sync_sync`."""
        raise NotImplementedError(f"{type(self).__name__} has no blocking put")

    def get_sync(self, name: str) -> bytes:
        """`get` on the caller's thread."""
        raise NotImplementedError(f"{type(self).__name__} has no blocking get")

    def get_range_sync(self, name: str, offset: int, length: int) -> bytes:
        """`get_range` on the caller's thread."""
        raise NotImplementedError(f"{type(self).__name__} has no blocking get_range")

    def sync_sync(self) -> None:
        """`sync` on the caller's thread."""
        raise NotImplementedError(f"{type(self).__name__} has no blocking sync")

    def sign_as(self, signer: StoreSigner) -> None:
        """Sign every request as `signer` (only with capabilities.signed_requests)."""
        raise NotImplementedError(f"{type(self).__name__} does not sign its requests")

    async def get_tagged(self, name: str) -> tuple[bytes, str]:
        """A mutable blob and the tag of this version of it, for `replace_if` (only with
        capabilities.conditional_replace); NotFound if there is none."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional replace")

    async def replace_if(self, name: str, data: Buffer, tag: str | None) -> bool:
        """Put mutable `name` only if it still holds the version `tag` (None: only if it is
        missing); False, and nothing written, if another writer changed it meanwhile."""
        raise NotImplementedError(f"{type(self).__name__} has no conditional replace")

    async def overwrite(self, name: str, data: Buffer) -> None:
        """Put `data` under `name` in place of whatever is there (only with
        capabilities.overwrite): atomically, so a reader (or a failure half-way) finds the old
        bytes or the new, never no object. For replacing a damaged copy of an object whose
        name never changes, which `put` refuses on a create-only store."""
        raise NotImplementedError(f"{type(self).__name__} cannot overwrite in one step")

    def read_path(self) -> str | None:
        """Which path reads take, for a store read over a session with a peer ("direct
        lane" or "data channel"); None for every other store."""
        return None

    async def remove_stale_temporaries(self, before: float) -> int:
        """Delete what puts interrupted left under temporary names, last written before
        `before` (Unix time: older than any put still running); the number removed. The
        default: a store whose interrupted puts leave nothing behind (or that cleans up
        locally, remove_temp_files)."""
        return 0

    def remove_temp_files(self) -> int:
        """Delete what a killed writer left half-written (call under the writer lock); the
        number removed. The default: a store whose puts leave nothing behind."""
        return 0
