"""A repository: a BlobStore holding packs, snapshots and device records, plus its index."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from .. import ids
from ..blobs.base import BlobStore, Buffer
from ..buffers import views_of
from ..chunking.chunker import DEFAULT_AVG
from ..crypto.identity import DeviceIdentity, device_id_for, verify_signature
from ..crypto.keys import AccountKeys, MissingKey, ScopeKeys
from ..errors import (BlobDamaged, DiskFull, IntegrityError, NotFound, P2PError, StorageError,
                      UnsupportedFormat, WrongKey)
from ..format.header import HEADER_SIZE, Kind, ObjectHeader
from ..format.membership import Kept, SignerRefused, Signers
from ..format.objects import open_object, open_with_any, seal_object
from ..format.pack import (PackTrailer, check_pack_header, object_candidates, pack_name,
                           parse_trailer, trailer_length)
from ..format.records import (DEVICE_SIG, SNAPSHOT_SIG, BlobRef, DeviceRecord, RepoConfig,
                              Signed, Snapshot, Tree)
from . import membership as store_membership
from .index import (INDEX_FILE_SUFFIXES, BlobLocation, BlobTuple, IndexCorrupt, IndexOutdated,
                    PackDamage, PackIndex)
from .snapshots import SourceLike, StoredSnapshot, choose_latest, source_asked

log = logging.getLogger("p2pbackup.repo")
T = TypeVar("T")

PACK_SIZE = 16 * 1024 * 1024
CONFIG_NAME = "config"
# Indexing a remote store: bytes read from a pack's end in the hope that its trailer fits
# (one request per pack; a 16 MiB pack of small files' blobs has a trailer of ~40 KiB),
# trailers read at once (each is a round trip, a few KiB of work), packs per index commit.
TRAILER_TAIL = 64 * 1024
TRAILER_READS = 8
INDEX_BATCH = 256


@dataclass(slots=True)
class UnreadableSnapshot:
    """A snapshot object that could not be read, with the reason in one line."""

    id: str
    reason: str
    refused: bool = False   # it reads, but its signer may not have written it (SignerRefused)


@dataclass(slots=True)
class PackExam:
    """A stored pack read whole and checked: which of its blobs still authenticate.

    Blobs are sealed one by one, so a changed byte damages one blob, not the pack: `blobs`
    are those that can still be used (all of them, unread, when the pack matches its name
    and its blobs were not asked to be read), `bad` those that cannot, with why."""

    name: str
    size: int
    intact: bool                 # its bytes match its name
    scope: str | None = None     # None: no readable trailer, and scanning found no blob
    epoch: int = 0
    blobs: list[BlobRef] = field(default_factory=list)
    bad: dict[bytes, str] = field(default_factory=dict)
    bad_refs: dict[bytes, BlobRef] = field(default_factory=dict)   # where the `bad` ones lie
    unreadable: int = 0          # records found by scanning that do not authenticate
    problem: str | None = None   # what else is wrong (its trailer, its header)
    scanned: bool = False        # its blobs were found by scanning for object headers

    @property
    def damage(self) -> PackDamage | None:
        """What to record of it in the index (None if nothing is wrong)."""
        if self.intact and self.problem is None and not self.bad:
            return None
        parts = [] if self.intact else ["its content does not match its name"]
        if self.problem:
            parts.append(self.problem)
        if self.bad:
            total = len(self.blobs) + len(self.bad)
            parts.append(f"{len(self.bad)} of {total} blobs do not authenticate "
                         f"({'; '.join(sorted(set(self.bad.values())))})")
        if self.scanned:
            parts.append(f"{len(self.blobs)} blobs found by scanning it"
                         + (f", {self.unreadable} unreadable" if self.unreadable else ""))
        return PackDamage("; ".join(parts), {
            bid: BlobLocation(self.name, ref.offset, ref.length, ref.raw_length, ref.kind)
            for bid, ref in self.bad_refs.items()})


class Repository:
    """Packs, index, snapshots and devices on one store, for one account."""

    def __init__(self, store: BlobStore, keys: AccountKeys, config: RepoConfig,
                 index: PackIndex, identity: DeviceIdentity | None) -> None:
        self.store = store
        self._keys = keys
        self._signers: Signers | None | bool = False   # False: not read yet
        self.config = config
        self.index = index
        self.identity = identity
        self.loop = asyncio.get_running_loop()
        self._devices: dict[str, bytes] = {}
        self.missing_packs: list[str] = []
        # Called (from any thread) with a pack's name when a blob read from it does not
        # authenticate: the daemon checks that pack and fetches an intact copy from a peer.
        self.damage_seen: Callable[[str], None] | None = None
        # Called on the loop when a writer stored objects while it goes on (a snapshot's or
        # a seal's packs as they land), with their names: the configured stores take them
        # meanwhile, not after.
        self.objects_written: Callable[[Sequence[str]], None] | None = None

    @property
    def damaged_packs(self) -> dict[str, str]:
        """Stored packs whose bytes do not match their name, with what is wrong (the index
        keeps this; peers are never offered them)."""
        return {name: d.reason for name, d in self.index.damaged.items()}

    # ---- creating and opening -------------------------------------------------------------

    @classmethod
    async def create(cls, store: BlobStore, keys: AccountKeys, identity: DeviceIdentity,
                     cache_dir: str, device_name: str) -> "Repository":
        """Write a new repository config and this device's record into an empty store."""
        if await store.has(CONFIG_NAME):
            raise StorageError(f"the store at {store.location} already holds a repository")
        cfg = RepoConfig(uuid.uuid4().hex, DEFAULT_AVG, PACK_SIZE, time.time_ns(),
                         keys.fingerprint())
        await store.put(CONFIG_NAME, seal_object(Kind.REPO_CONFIG, cfg.encode(), keys.meta_key))
        return await cls._open_registered(store, keys, identity, cache_dir, device_name)

    @classmethod
    async def create_replica(cls, store: BlobStore, keys: AccountKeys, identity: DeviceIdentity,
                             cache_dir: str, device_name: str, config_raw: bytes) -> "Repository":
        """Start a store that holds the same repository as another device's (same config)."""
        if await store.has(CONFIG_NAME):
            raise StorageError(f"the store at {store.location} already holds a repository")
        await store.put(CONFIG_NAME, config_raw)
        return await cls._open_registered(store, keys, identity, cache_dir, device_name)

    @classmethod
    async def _open_registered(cls, store: BlobStore, keys: AccountKeys,
                               identity: DeviceIdentity, cache_dir: str,
                               device_name: str) -> "Repository":
        repo = await cls.open(store, keys, identity, cache_dir)
        try:
            await repo.register_device(identity, device_name)
        except BaseException:
            await repo.close()  # the index's worker thread would keep the process alive
            raise
        return repo

    async def config_object(self) -> bytes:
        """The sealed repository config, as stored (to start a replica elsewhere)."""
        return await self.store.get(CONFIG_NAME)

    @classmethod
    async def open(cls, store: BlobStore, keys: AccountKeys, identity: DeviceIdentity | None,
                   cache_dir: str, *, read_only: bool = False) -> "Repository":
        """Open an existing repository; the index is rebuilt if missing or damaged.

        `read_only`: this process writes nothing to the store, so when the disk holding the
        index is full it keeps the index in memory instead (it is a cache) and still reads."""
        try:
            raw = await store.get(CONFIG_NAME)
        except NotFound:
            raise StorageError(f"there is no p2pbackup repository at {store.location}") from None
        try:  # a config that is not whole is damage; only one that does not open is a key
            header = ObjectHeader.decode(raw, "it")
            if header.kind != Kind.REPO_CONFIG:
                raise IntegrityError("it is not a repository config")
            if len(raw) < HEADER_SIZE + header.length:
                raise IntegrityError(f"it is truncated: {len(raw)} of "
                                     f"{HEADER_SIZE + header.length} bytes")
        except IntegrityError as exc:
            raise IntegrityError(f"the repository config at {store.location} is damaged ({exc}); "
                                 "the store of each paired device holds a copy of it") from None
        try:
            _, body = open_object(raw, keys.meta_key, expect=Kind.REPO_CONFIG,
                                  what="the repository config")
        except UnsupportedFormat:
            raise
        except IntegrityError:
            raise WrongKey(f"the account key does not open the repository at {store.location}: "
                           "it belongs to another account, or this home's key is wrong") from None
        config = RepoConfig.decode(body)
        index_path = store_index_path(cache_dir, config.repo_id, store.location)
        index = await _open_index(index_path, read_only=read_only)
        repo = cls(store, keys, config, index, identity)
        try:
            try:
                await repo.sync_index()
            except DiskFull:
                if not read_only or repo.index.in_memory:
                    raise
                await repo.index.close()
                repo.index = await _index_in_memory(index_path)
                repo.missing_packs = []
                await repo.sync_index()
        except BaseException:
            await repo.close()  # the index's worker thread would keep the process alive
            raise
        return repo

    async def close(self) -> None:
        await self.index.close()

    @property
    def keys(self) -> AccountKeys:
        return self._keys

    @keys.setter
    def keys(self, keys: AccountKeys) -> None:
        self._keys = keys   # a new epoch's key may open membership versions it could not
        self.membership_changed()

    # ---- the membership, as the signer check reads it -----------------------------------

    def membership_changed(self) -> None:
        """Forget the membership read so far (a version was stored, or the keys changed)."""
        self._signers = False

    async def signers(self) -> Signers | None:
        """The checked membership history; None for a store from before membership records."""
        if self._signers is False:
            versions = await store_membership.load_versions(self.store, self.keys)
            self._signers = Signers(versions) if versions is not None else None
        return self._signers  # type: ignore[return-value]

    # ---- the index ------------------------------------------------------------------------

    async def sync_index(self, progress: Callable[[str], None] | None = None) -> tuple[int, int]:
        """Add packs the index lacks, drop packs the store lacks; return (added, dropped).

        A pack the index lacks whose bytes do not match its name is indexed too, with the
        blobs that still authenticate, and listed as damaged."""
        stored = {name.split("/", 1)[1] async for name in self.store.list("packs/")}
        added = dropped = 0
        for name in sorted(set(self.index.packs) - stored):
            log.warning("pack %s is missing from the store; dropped from the index", name[:12])
            self.missing_packs.append(name)
            await self.index.remove_pack(name)
            dropped += 1
        await self.index.forget_damage([n for n in self.index.damaged if n not in stored])
        new = sorted(stored - set(self.index.packs))
        caps = self.store.capabilities
        if new and caps.ranged_reads and not caps.local_disk:
            indexed, new = await self._index_trailers(new, progress)
            added += indexed
        later = []
        for name in new:
            try:
                exam = await asyncio.to_thread(self.examine_pack_blocking, name, scan=False)
            except NotFound:
                continue
            if exam.scope is None and exam.problem:
                later.append(name)   # scanned once the other packs say which keys to try
                continue
            added += await self._index_examined(exam)
            if progress:
                progress(name)
        for name in later:
            try:
                exam = await asyncio.to_thread(self.examine_pack_blocking, name)
            except NotFound:
                continue
            added += await self._index_examined(exam)
            if progress:
                progress(name)
        return added, dropped

    async def _index_trailers(self, names: list[str],
                              progress: Callable[[str], None] | None
                              ) -> tuple[int, list[str]]:
        """Index packs of a remote store (an S3 bucket, a WebDAV folder, a peer) from their
        trailers alone, TRAILER_READS at a time: reading each whole to check it against its
        name downloaded the whole repository before a restore could start (a first `restore
        --from s3://` of 1 GiB read it twice). The trailer authenticates (sealed with the
        account's record key) and every blob authenticates when read, so a store that
        changed a pack's body is caught then, by `verify --read-data` or the restore.
        Returns how many were indexed, and the packs whose trailer could not be read: those
        are examined whole (scanned for their blobs) as before."""
        keys = self.keys.record_keys_newest_first()
        queue = list(reversed(names))
        read: list[tuple[str, str, int, int, list[BlobTuple]]] = []
        whole: list[str] = []

        async def reader() -> None:
            while queue:
                name = queue.pop()
                try:
                    size, trailer = await read_trailer(self.store, name, keys)
                except NotFound:
                    continue   # deleted since the listing
                except IntegrityError:
                    whole.append(name)
                    continue
                read.append((name, trailer.scope, trailer.epoch, size,
                             [(b.id, b.kind, b.offset, b.length, b.raw_length)
                              for b in trailer.blobs]))

        workers = [asyncio.ensure_future(reader())
                   for _ in range(min(TRAILER_READS, len(names)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
        # In name order, as the whole-pack path adds them. Who wrote them is unknown here:
        # treated as arrived (see _index_examined).
        read.sort(key=lambda r: r[0])
        for start in range(0, len(read), INDEX_BATCH):
            batch = read[start:start + INDEX_BATCH]
            await self.index.add_packs(batch, arrived=True)
            for name, *_ in batch:
                if progress:
                    progress(name)
        return len(read), sorted(whole)

    async def _index_examined(self, exam: PackExam) -> int:
        damage = exam.damage
        if damage is not None:
            log.warning("pack %s is damaged: %s; %d blobs of it still authenticate and are "
                        "indexed", exam.name[:12], damage.reason, len(exam.blobs))
        if exam.scope is None:
            assert damage is not None
            await self.index.mark_damaged(exam.name, damage)
            return 0
        # Who wrote it is unknown here (a peer's daemon, our own killed run): treated as
        # arrived, so a prune in a shared repository waits before deleting it.
        await self.index.add_pack(exam.name, exam.scope, exam.epoch, exam.size,
                                  [(b.id, b.kind, b.offset, b.length, b.raw_length)
                                   for b in exam.blobs], arrived=True, damage=damage)
        return 1

    async def rebuild_index(self) -> tuple[int, int]:
        """Throw the index away and recreate it from the packs' trailers."""
        await self.index.close()
        _remove_index_files(self.index.path)
        return await self.reopen_index()

    async def reopen_index(self) -> tuple[int, int]:
        """Open the index again (another process may have changed it, or the packs) and
        sync it; return (added, dropped)."""
        await self.index.close()
        self.index = await _open_index(self.index.path)
        self.missing_packs = []
        return await self.sync_index()

    async def recheck_pack(self, name: str) -> PackDamage | None:
        """Read pack `name` and, if its bytes no longer match its name, list it as damaged
        (its blobs that do not authenticate leave the index); None if it is intact (or gone).
        For a pack the index holds, found suspect while in use."""
        expected = await self.index.pack_blobs(name)
        try:
            exam = await asyncio.to_thread(self.examine_pack_blocking, name, expected=expected)
        except NotFound:
            return None
        damage = exam.damage
        if damage is not None:
            await self.index.mark_damaged(name, damage)
        return damage

    async def recheck_damaged(self) -> list[str]:
        """Read every pack listed as damaged again; one that now matches its name was never
        damaged in the store (a read cut short, another object from a proxy): it is indexed
        whole and no longer listed. The names cleared; real damage stays listed."""
        cleared = []
        for name in sorted(self.index.damaged):
            expected = await self.index.pack_blobs(name) if name in self.index.packs else None
            try:
                exam = await asyncio.to_thread(self.examine_pack_blocking, name,
                                               expected=expected, scan=False)
            except NotFound:
                continue   # (sync_index forgets it)
            except StorageError as exc:   # the store still fails: the note stays for now
                log.warning("pack %s listed as damaged could not be read again: %s",
                            name[:12], exc)
                continue
            if exam.damage is None and exam.scope is not None:
                await self._index_examined(exam)
                log.warning("pack %s listed as damaged reads whole now (the damage was a "
                            "faulty read); no longer listed", name[:12])
                cleared.append(name)
        return cleared

    def examine_pack_blocking(self, name: str, data: bytes | memoryview | None = None, *,
                              read_blobs: bool = False,
                              expected: list[tuple[bytes, BlobLocation]] | None = None,
                              scan: bool = True) -> PackExam:
        """Read pack `name` (or take its `data`) and check it blob by blob (from a thread).

        A pack that matches its name is exactly what was written: its blobs are decrypted
        only with `read_blobs`. Its blobs are those its trailer lists; when the trailer cannot
        be read, those the index places in it (`expected`), or else (`scan`) the objects found
        by scanning it for object headers, each decrypted with the keys of the sources the
        index knows and named by its content. NotFound if the store lacks it."""
        what = f"pack {name[:12]}"
        if data is None:
            data = self.read_blocking(f"packs/{name}")
        view = memoryview(data)
        exam = PackExam(name, len(view), pack_name(view) == name)
        refs: list[BlobRef] | None = None
        try:
            check_pack_header(view, what)
            trailer = parse_trailer(view, len(view), self.keys.record_keys_newest_first(), what)
            refs, exam.scope, exam.epoch = list(trailer.blobs), trailer.scope, trailer.epoch
        except IntegrityError as exc:
            exam.problem = str(exc).removeprefix(what + " ")
        if refs is None and expected and name in self.index.packs:
            exam.scope, exam.epoch, _ = self.index.packs[name]
            refs = [BlobRef(loc.kind, bid, loc.offset, loc.length, loc.raw_length)
                    for bid, loc in expected]
        if refs is None:
            if scan:
                self._scan_pack(exam, view)
            return exam
        if exam.intact and not read_blobs:
            exam.blobs = refs
            return exam
        try:
            keys = self.keys.scope(exam.scope, exam.epoch)  # type: ignore[arg-type]
        except MissingKey:
            exam.blobs = refs   # a source this device was not granted: kept as ciphertext
            return exam
        for ref in refs:
            why = _blob_problem(keys, ref, view, what)
            if why is None:
                exam.blobs.append(ref)
            else:
                exam.bad[ref.id] = why
                exam.bad_refs[ref.id] = ref
        return exam

    def _scan_pack(self, exam: PackExam, view: memoryview) -> None:
        """Find the blobs of a pack whose trailer is lost: every object header whose object
        decrypts with the keys of a source the index knows (a pack holds one source's)."""
        exam.scanned = True
        scopes = sorted({(s, e) for s, e, _ in self.index.packs.values()})
        keyring: list[ScopeKeys] = []
        for scope, epoch in scopes:
            try:
                keyring.append(self.keys.scope(scope, epoch))
            except MissingKey:
                continue
        data = bytes(view)
        cursor = bad_until = HEADER_SIZE
        for offset, length, kind in object_candidates(data, HEADER_SIZE, len(data)):
            if offset < cursor or kind not in (Kind.CHUNK, Kind.TREE):
                continue
            for keys in keyring if offset + length <= len(data) else ():
                try:
                    _, plain = open_object(view[offset:offset + length], keys.data_key)
                except IntegrityError:
                    continue
                exam.scope, exam.epoch = keys.scope, keys.epoch
                keyring = [keys]
                exam.blobs.append(BlobRef(kind, keys.blob_id(plain), offset, length,
                                          len(plain)))
                cursor = offset + length
                break
            else:
                if offset >= bad_until:
                    exam.unreadable += 1
                    bad_until = offset + length

    # ---- blobs ----------------------------------------------------------------------------

    def run_blocking(self, coro: Awaitable[T]) -> T:
        """Run a coroutine on the repository's loop from a worker thread and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()  # type: ignore[arg-type]

    def read_spans_blocking(self, name: str, spans: Sequence[tuple[int, int]]) -> list[Buffer]:
        """The (offset, length) `spans` of a stored blob, close together, from a worker thread
        (BlobStore.get_spans: views, not copies, where the store keeps the bytes)."""
        if self.store.capabilities.blocking:
            start, end = spans[0][0], max(o + n for o, n in spans)
            return views_of(self.store.get_range_sync(name, start, end - start), start, spans)
        held = self.store.get_spans_held(name, spans)
        if held is not None:   # (no hand-over to the loop and back)
            return held
        return self.run_blocking(self.store.get_spans(name, spans))

    def expect_spans_blocking(self, spans: dict[str, list[tuple[int, int]]]) -> None:
        """Announce reads of the (offset, length) spans of stored blobs, by name, coming from
        worker threads (BlobStore.expect_spans)."""
        async def announce() -> None:
            for name, of_name in spans.items():
                await self.store.expect_spans(name, of_name)
        self.run_blocking(announce())

    def forget_expected_blocking(self) -> None:
        """The reads announced and not done will not be (BlobStore.forget_expected)."""
        self.run_blocking(self.store.forget_expected())

    def read_blocking(self, name: str) -> bytes:
        """Read a whole stored blob from a worker thread."""
        if self.store.capabilities.blocking:
            return self.store.get_sync(name)
        return self.run_blocking(self.store.get(name))

    def put_blocking(self, name: str, data: Buffer, *, durable: bool = True) -> None:
        """Store a blob from a worker thread; durable=False defers durability to sync_store."""
        if self.store.capabilities.blocking:
            self.store.put_sync(name, data, durable=durable)
        else:
            self.run_blocking(self.store.put(name, data))

    def note_objects_written(self, *names: str) -> None:
        """Say (from any thread) that objects were stored: `objects_written(names)` runs
        soon."""
        hook = self.objects_written
        if hook is not None:
            with contextlib.suppress(RuntimeError):   # the loop closed: nobody to tell
                self.loop.call_soon_threadsafe(hook, names)

    def sync_store_blocking(self) -> None:
        """Make every blob written so far durable (after puts with durable=False)."""
        if self.store.capabilities.blocking:
            self.store.sync_sync()
        else:
            self.run_blocking(self.store.sync())

    def scope_keys_of(self, loc: BlobLocation) -> ScopeKeys:
        scope, epoch, _ = self.index.packs[loc.pack]
        return self.keys.scope(scope, epoch)

    def locate(self, blob_id: bytes) -> BlobLocation:
        """Where blob `blob_id` is stored: also a blob known as damaged (reading it fails as
        it should, and its place in a file is known)."""
        loc = self.index.blobs.get(blob_id) or self.index.bad_blobs.get(blob_id)
        if loc is None:
            raise IntegrityError(f"blob {blob_id.hex()[:12]} is missing: no pack holds it")
        return loc

    def check_scope(self, blob_id: bytes, loc: BlobLocation, scope: str) -> None:
        """A source's trees may name only that source's blobs: a snapshot signed by a member
        granted `docs` must not make an owner's restore of docs decrypt another source."""
        held = self.index.packs[loc.pack][0]
        if held != scope:
            raise IntegrityError(f"blob {blob_id.hex()[:12]} belongs to source {held!r}, not "
                                 f"{scope!r}: a snapshot of one source may not name another's "
                                 "data")

    def decode_blob(self, blob_id: bytes, loc: BlobLocation, sealed: bytes | memoryview,
                    scope: str | None = None) -> bytes:
        """Decrypt a sealed blob and check that its content matches its id (and, given
        `scope`, that it is that source's)."""
        if scope is not None:
            self.check_scope(blob_id, loc, scope)
        what = f"blob {blob_id.hex()[:12]} in pack {loc.pack[:12]}"
        keys = self.scope_keys_of(loc)
        try:
            return open_blob(keys, blob_id, loc.kind, sealed, what, loc.raw_length)
        except IntegrityError as exc:
            if self.damage_seen is not None:
                self.damage_seen(loc.pack)
            raise BlobDamaged(str(exc), loc.pack, blob_id) from None

    def read_blob_blocking(self, blob_id: bytes, scope: str | None = None) -> bytes:
        """Read, decrypt and authenticate one blob (from a worker thread); given `scope`, it
        must be that source's."""
        loc = self.locate(blob_id)
        if scope is not None:
            self.check_scope(blob_id, loc, scope)
        try:
            sealed, = self.read_spans_blocking(f"packs/{loc.pack}", [(loc.offset, loc.length)])
        except NotFound:
            raise IntegrityError(f"pack {loc.pack[:12]} is missing from the store") from None
        return self.decode_blob(blob_id, loc, sealed)

    def load_tree_blocking(self, tree_id: bytes, scope: str | None = None) -> Tree:
        return self.decode_tree(tree_id, self.read_blob_blocking(tree_id, scope))

    @staticmethod
    def decode_tree(tree_id: bytes, plain: bytes) -> Tree:
        """The tree `tree_id` from its opened (authenticated) blob."""
        return Tree.decode(plain, f"tree {tree_id.hex()[:12]}")

    async def load_tree(self, tree_id: bytes) -> Tree:
        return await asyncio.to_thread(self.load_tree_blocking, tree_id)

    # ---- records sealed per key epoch ------------------------------------------------------

    def seal_record(self, kind: int, body: bytes) -> bytearray:
        """Seal a record with the newest epoch's record key (a removed device cannot open it)."""
        return seal_object(kind, body, self.keys.record_key)

    def open_record(self, raw: bytes | bytearray | memoryview, kind: int, what: str) -> bytes:
        """Open a record sealed in any epoch this device holds a key for."""
        return self.open_record_in(raw, kind, what)[1]

    def open_record_in(self, raw: bytes | bytearray | memoryview, kind: int, what: str
                       ) -> tuple[int, bytes]:
        """(key epoch it was sealed in, body) of a record sealed in any epoch held here."""
        return open_with_any(raw, self.keys.record_keys_newest_first(), expect=kind, what=what)

    def open_signed(self, raw: bytes | bytearray | memoryview, kind: int, sig_type: str,
                    what: str, device: str | None = None) -> tuple[Signed, int]:
        """The signed envelope of a record of `sig_type` and the key epoch it was sealed in
        (the signature is checked by `check_signer`); `device` is who its name says signed it."""
        epoch, body = self.open_record_in(raw, kind, what)
        signed = Signed.decode(body, what)
        if signed.type and signed.type != sig_type:
            raise IntegrityError(f"{what} has a bad signature: it was made for a "
                                 f"{signed.type[:20]} record")
        if device is not None and signed.device != device:
            raise IntegrityError(f"{what} was signed by {signed.device[:12]}, not {device[:12]}")
        return signed, epoch

    async def check_signer(self, signed: Signed, epoch: int, sig_type: str, what: str, *,
                           sources: list[str] | tuple[str, ...] = (),
                           kept: Callable[[Kept], bool] | None = None,
                           legacy: bool | None = None) -> None:
        """Refuse a record whose signer was not a member allowed to write it in the key epoch
        it was sealed in (a removed device: unless its removal pinned the record, `kept`), or
        whose signature is not that member's for a record of `sig_type`."""
        signers = await self.signers()
        if signers is None:   # a store from before membership records: its device records
            key = await self.device_key(signed.device)
        else:
            key = signers.writer_key(signed.device, epoch, what, sources=sources, kept=kept)
        if not signed.verifies(sig_type, key, verify_signature, legacy=legacy):
            raise IntegrityError(f"{what} has a bad signature")

    # ---- devices --------------------------------------------------------------------------

    async def register_device(self, identity: DeviceIdentity, name: str) -> None:
        """Store this device's public record, self-signed, sealed in the newest epoch."""
        rec = DeviceRecord(identity.device_id, identity.public_key, name, time.time_ns())
        signed = Signed.make(DEVICE_SIG, rec.encode(), identity.device_id, identity.sign)
        await self.store.put(f"devices/{identity.device_id}",
                             self.seal_record(Kind.DEVICE, signed.encode()))
        self._devices[identity.device_id] = identity.public_key

    def check_device_record(self, raw: bytes | bytearray | memoryview, device_id: str,
                            what: str) -> DeviceRecord:
        """A device record, checked against its id and its own signature."""
        signed = Signed.decode(self.open_record(raw, Kind.DEVICE, what), what)
        rec = DeviceRecord.decode(signed.body, what)
        if rec.device_id != device_id or signed.device != device_id \
                or device_id_for(rec.public_key) != device_id \
                or not signed.verifies(DEVICE_SIG, rec.public_key, verify_signature):
            raise IntegrityError(f"{what} is forged or damaged")
        return rec

    async def device_key(self, device_id: str) -> bytes:
        """The public key a device record gives a device (stores without a membership)."""
        if device_id in self._devices:
            return self._devices[device_id]
        if not ids.is_device(device_id):  # a signer named inside a peer's object
            raise IntegrityError(f"a record names signer {ids.shown(device_id)}, not a device id")
        what = f"device record {device_id[:12]}"
        try:
            raw = await self.store.get(f"devices/{device_id}")
        except NotFound:
            raise IntegrityError(f"device {device_id[:12]} is unknown to this repository") from None
        rec = self.check_device_record(raw, device_id, what)
        self._devices[device_id] = rec.public_key
        return rec.public_key

    # ---- snapshots ------------------------------------------------------------------------

    async def save_snapshot(self, snapshot: Snapshot) -> StoredSnapshot:
        """Sign, seal and store a snapshot; return it with its id."""
        if self.identity is None:
            raise P2PError("this device has no identity to sign snapshots with")
        import blake3

        signed = Signed.make(SNAPSHOT_SIG, snapshot.encode(), self.identity.device_id,
                             self.identity.sign)
        sealed = self.seal_record(Kind.SNAPSHOT, signed.encode())
        sid = blake3.blake3(sealed).hexdigest()
        await self.store.put(f"snapshots/{sid}", sealed)
        return StoredSnapshot(sid, snapshot)

    async def check_snapshot(self, raw: bytes | bytearray | memoryview, sid: str,
                             what: str) -> Snapshot:
        """Authenticate a snapshot object stored as `snapshots/<sid>`, and its signer."""
        import blake3

        ObjectHeader.decode(raw, what)  # a newer format is named as such, not as damage
        if blake3.blake3(raw).hexdigest() != sid:
            raise IntegrityError(f"{what} was altered: its content does not match its name")
        signed, epoch = self.open_signed(raw, Kind.SNAPSHOT, SNAPSHOT_SIG, what)
        snap = Snapshot.decode(signed.body, what)
        if snap.device != signed.device:
            raise IntegrityError(f"{what} names device {snap.device[:12]} but was signed by "
                                 f"{signed.device[:12]}")
        pinned = bytes.fromhex(sid)
        await self.check_signer(signed, epoch, SNAPSHOT_SIG, what,
                                sources=[s.name for s in snap.sources],
                                kept=lambda k: pinned in k.snapshots)
        return snap

    async def load_snapshot(self, sid: str) -> StoredSnapshot:
        """Read, authenticate and check the signature of one snapshot."""
        what = f"snapshot {sid[:8]}"
        try:
            raw = await self.store.get(f"snapshots/{sid}")
        except NotFound:
            raise NotFound(f"no snapshot {sid[:8]} in {self.store.location}") from None
        return StoredSnapshot(sid, await self.check_snapshot(raw, sid, what))

    async def list_snapshots(self) -> tuple[list[StoredSnapshot], list[UnreadableSnapshot]]:
        """All snapshots, oldest first, and those that could not be read (with why)."""
        good: list[StoredSnapshot] = []
        bad: list[UnreadableSnapshot] = []
        async for name in self.store.list("snapshots/"):
            sid = name.split("/", 1)[1]
            try:
                good.append(await self.load_snapshot(sid))
            except P2PError as exc:
                bad.append(UnreadableSnapshot(sid, str(exc), isinstance(exc, SignerRefused)))
        good.sort(key=lambda s: (s.snapshot.time_ns, s.id))
        return good, bad

    async def find_snapshot(self, ref: str, *, sources: Sequence[SourceLike] = (),
                            path: str | None = None, before_ns: int | None = None,
                            note: Callable[[str], None] | None = None) -> StoredSnapshot:
        """A snapshot named by `latest`, a full id, or a unique id prefix.

        `latest` is the newest snapshot that holds what is asked for (see
        snapshots.choose_latest): this device's configured `sources`, or the source that
        `path` (restore's --path) starts with; with `before_ns`, as if only the snapshots taken
        at or before then existed. `note` is told which snapshot that is, and why.
        """
        if ref == "latest":
            snaps, _ = await self.list_snapshots()
            if not snaps:
                raise NotFound(f"there are no snapshots in {self.store.location} yet")
            source = source_asked(snaps, path)
            if before_ns is not None:
                snaps = [s for s in snaps if s.snapshot.time_ns <= before_ns]
                if not snaps:
                    raise NotFound("there is no snapshot at or before that time")
            chosen = choose_latest(snaps, device=self.identity.device_id if self.identity
                                   else None, sources=sources, source=source)
            if note is not None:
                note(f"latest: snapshot {chosen.stored.short_id}, {chosen.why}")
            return chosen.stored
        names = [n.split("/", 1)[1] async for n in self.store.list("snapshots/")]
        matches = [n for n in names if n.startswith(ref.lower())]
        if not ref or not matches:
            raise NotFound(f"no snapshot matches {ref!r}; `p2pbackup snapshots` lists them")
        if len(matches) > 1:
            raise NotFound(f"{ref!r} matches {len(matches)} snapshots; give more of the id")
        return await self.load_snapshot(matches[0])


def open_blob(keys: ScopeKeys, blob_id: bytes, kind: int, sealed: bytes | memoryview,
              what: str, raw_length: int) -> bytes:
    """Decrypt a sealed blob (to at most its `raw_length`, which it must have) and check that
    its content matches its id (IntegrityError)."""
    _, plain = open_object(sealed, keys.data_key, expect=kind, what=what,
                           raw_length=raw_length)
    if keys.blob_id(plain) != blob_id:
        raise IntegrityError(f"{what} has content that does not match its id")
    return plain


def _blob_problem(keys: ScopeKeys, ref: BlobRef, pack: memoryview, what: str) -> str | None:
    """Why blob `ref` of a pack does not authenticate, or None if it does."""
    if ref.offset + ref.length > len(pack):
        return "the pack is truncated"
    label = f"blob {ref.id.hex()[:12]} in {what}"
    try:
        open_blob(keys, ref.id, ref.kind, pack[ref.offset:ref.offset + ref.length], label,
                  ref.raw_length)
    except IntegrityError as exc:
        return str(exc).removeprefix(label + " ")
    return None


async def read_trailer(store: BlobStore, name: str, keys: Sequence[tuple[int, bytes]]
                       ) -> tuple[int, PackTrailer]:
    """The size and the trailer of pack `name` in `store`, in ranged reads of its end (one,
    unless the trailer is longer than TRAILER_TAIL). IntegrityError if there is no trailer
    these keys open; NotFound if the store lacks the pack."""
    what = f"pack {name[:12]} of {store.location}"
    size = await store.size(f"packs/{name}")
    # (from the end: a store that reads ahead in windows reads a suffix alone)
    tail = await store.get_range(f"packs/{name}", -min(size, TRAILER_TAIL),
                                 min(size, TRAILER_TAIL))
    need = trailer_length(tail, what)
    if len(tail) < need <= size:
        tail = await store.get_range(f"packs/{name}", -need, need)
    return size, parse_trailer(tail, size, keys, what)


def store_index_path(cache_dir: str, repo_id: str, location: str) -> str:
    """Where the index of repository `repo_id` in the store at `location` is cached. Replicas
    of one repository share its id, so the cache is per store as well."""
    where = hashlib.blake2b(location.encode(), digest_size=6).hexdigest()
    return os.path.join(cache_dir, repo_id, f"index-{where}.sqlite")


def _remove_index_files(path: str) -> None:
    for suffix in INDEX_FILE_SUFFIXES:
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass


async def _open_index(path: str, *, read_only: bool = False) -> PackIndex:
    index = PackIndex(path)
    try:
        try:
            await index.open()
        except IndexOutdated as exc:
            log.info("the index %s was made by another version (%s); rebuilding it from the "
                     "packs", path, exc)
            index = await _fresh_index(path)
        except IndexCorrupt as exc:
            log.warning("the index %s is damaged (%s); rebuilding it from the packs", path, exc)
            index = await _fresh_index(path)
    except DiskFull:
        if not read_only:
            raise
        index = await _index_in_memory(path)
    return index


async def _index_in_memory(path: str) -> PackIndex:
    log.warning("the disk holding %s is full: the index is kept in memory for this command "
                "(free some space to keep it on disk)", os.path.dirname(path))
    index = PackIndex(path, in_memory=True)
    await index.open()
    return index


async def _fresh_index(path: str) -> PackIndex:
    _remove_index_files(path)
    shutil.rmtree(os.path.join(os.path.dirname(path), "tmp"), ignore_errors=True)
    index = PackIndex(path)
    await index.open()
    return index
