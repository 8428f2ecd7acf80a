"""BlobSink: turns plaintext blobs into sealed blobs in packs, deduplicated, from many threads.

Sealing (hash, zstd, XChaCha) runs in the calling worker thread, for many blobs per call
(`add_many`): hashes first, one lock round to drop known blobs and reserve the new ones'
places in the pack, one zstd call for all of them, then each is encrypted straight into
its place in the pack buffer (no sealed copy). Finished packs go to the uploader threads
through a queue of two, so at most a few packs are held in memory whatever the amount of data.
"""

from __future__ import annotations

import mmap
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from ..crypto.keys import ScopeKeys
from ..format.header import Kind
from ..format.objects import OVERHEAD, compress_many, seal_many_into
from ..format.pack import PackBuilder
from ..format.records import PackTrailer
from ..repo.repository import Repository

_STOP = object()
UPLOADERS = 2
INDEX_BATCH = 8  # packs made durable and indexed together while the scan goes on
# ... or fewer when they hold this many blobs: indexing a batch holds a few hundred bytes per
# blob for a moment (100k small files' blobs in 5 packs took 60 MiB at once).
INDEX_BATCH_BLOBS = 131_072


class KnownBlobs:
    """The blobs stored or being stored: the index's blob map (on disk) and the blobs this
    sink reserved that are not indexed yet (packs being filled, written, made durable). Those
    leave memory once their packs are indexed, so memory follows the packs in flight, not the
    repository's size.

    `x in known`, `known.add(x)`, `known.update(xs)`: the snapshot builder's interface (a set's).
    """

    def __init__(self, repo: Repository) -> None:
        self._repo = repo   # (its index is replaced when the daemon takes the store back)
        self._pending: set[bytes] = set()

    def __contains__(self, blob_id: object) -> bool:
        return blob_id in self._pending or blob_id in self._repo.index.blobs

    def add(self, blob_id: bytes) -> None:
        self._pending.add(blob_id)

    def update(self, blob_ids: Iterable[bytes]) -> None:
        self._pending.update(blob_ids)

    def indexed(self, blob_ids: Iterable[bytes]) -> None:
        """These were committed to the index: look them up there from now on."""
        self._repo.index.blobs.refresh()   # before they leave the pending set
        self._pending.difference_update(blob_ids)

    def refresh(self) -> None:
        """See what other sinks or commands stored, and no longer what a prune removed
        (the index says; blobs in flight here stay reserved)."""
        self._repo.index.blobs.refresh()

    @property
    def pending(self) -> int:
        return len(self._pending)


@dataclass(slots=True)
class SinkStats:
    """What the sink stored during one run."""

    blobs_added: int = 0
    bytes_added: int = 0  # sealed bytes written into packs
    raw_added: int = 0  # plaintext bytes of new blobs
    packs_written: int = 0


class BlobSink:
    """Thread-safe writer of blobs into packs of one repository."""

    def __init__(self, repo: Repository, pack_size: int | None = None) -> None:
        self.repo = repo
        self.pack_size = pack_size or repo.config.pack_size
        self.known = KnownBlobs(repo)
        self.stats = SinkStats()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # a builder's writers reached 0
        self._builders: dict[tuple[str, int, bool], PackBuilder] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._written: list[tuple[str, int, PackTrailer]] = []
        self._written_blobs = 0
        self._free: list[bytearray | mmap.mmap] = []
        self.stored_packs: set[str] = set()
        # Two uploaders, so one pack's fsync overlaps the next pack's write.
        self._uploaders = [threading.Thread(target=self._upload_loop, name=f"pack-uploader-{i}",
                                            daemon=True) for i in range(UPLOADERS)]
        for t in self._uploaders:
            t.start()

    def add(self, keys: ScopeKeys, kind: int, plaintext: bytes | memoryview) -> bytes:
        """Store a blob unless it is already stored; return its id."""
        return self.add_many(keys, kind, [plaintext])[0]

    def _new_builder(self, slot: tuple[str, int, bool]) -> PackBuilder:
        if slot[2]:
            builder = PackBuilder(slot[0], slot[1], 1 << 20)
        else:
            builder = PackBuilder(slot[0], slot[1], self.pack_size,
                                  self._free.pop() if self._free else None)
        self._builders[slot] = builder
        return builder

    def add_many(self, keys: ScopeKeys, kind: int, blobs: list[bytes | bytearray | memoryview],
                 probe: bool = False) -> list[bytes]:
        """Store each blob unless it is already stored; return their ids, in order.

        The blobs (views of a read buffer, typically) are only read during the call. `probe`:
        they are consecutive chunks of one file, see compress_many.
        """
        blob_id = keys.blob_id
        ids = [blob_id(b) for b in blobs]
        new: list[int] = []
        known = self.known
        with self._lock:
            for i, bid in enumerate(ids):
                if bid not in known:
                    known.add(bid)  # reserve: another thread with the same blob skips it
                    new.append(i)
        if not new:
            return ids
        plains = [blobs[i] for i in new]
        bodies, flags = compress_many(plains, probe=probe)
        slot = (keys.scope, keys.epoch, kind == Kind.TREE)
        places: list[tuple[PackBuilder, int, int]] = []
        touched: list[PackBuilder] = []
        with self._lock:
            self._raise_if_failed()
            builder = self._builders.get(slot)
            stats = self.stats
            for j, i in enumerate(new):
                size = OVERHEAD + len(bodies[j])
                raw = len(plains[j])
                if builder is None:
                    builder = self._new_builder(slot)
                offset = builder.reserve(kind, ids[i], size, raw)
                if offset is None:  # full while others write into it: close it, take a new one
                    builder.closed = True
                    del self._builders[slot]
                    builder = self._new_builder(slot)
                    offset = builder.reserve(kind, ids[i], size, raw)
                    assert offset is not None
                if not touched or touched[-1] is not builder:
                    builder.writers += 1
                    touched.append(builder)
                places.append((builder, offset, size))
                stats.blobs_added += 1
                stats.bytes_added += size
                stats.raw_added += raw
                if builder.size >= self.pack_size:
                    builder.closed = True
                    del self._builders[slot]
                    builder = None
        try:
            key = keys.data_key
            items: list[tuple[int, object, int]] = []
            current = places[0][0]
            for (builder, offset, _size), body, flag in zip(places, bodies, flags):
                if builder is not current:  # one call per pack buffer
                    with memoryview(current.buffer_now) as whole:
                        seal_many_into(whole, kind, items, key)
                    current, items = builder, []
                items.append((offset, body, flag))
            with memoryview(current.buffer_now) as whole:
                seal_many_into(whole, kind, items, key)
        except BaseException as exc:
            self._error = exc  # half-written blobs: no pack of this run may be shipped
            raise
        finally:
            done: list[PackBuilder] = []
            with self._lock:
                for b in touched:
                    b.writers -= 1
                    if b.writers == 0:
                        if b.closed:
                            done.append(b)
                        self._idle.notify_all()
        for b in done:
            self._ship(b)
        return ids

    def _ship(self, builder: PackBuilder) -> None:
        self._raise_if_failed()
        name, data, trailer = builder.finish(self.repo.keys.record_key)
        self._queue.put((name, data, trailer, builder.buffer))
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _upload_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # drain so producers never block on a dead uploader
            name, data, trailer, buffer = item
            try:
                with self._lock:
                    self.stored_packs.add(name)  # before it exists: prune must not take it
                self.repo.put_blocking(f"packs/{name}", data, durable=False)
                # (before it is durable and indexed: a copy elsewhere of a pack lost here
                # in a crash is unnamed and harmless, and waiting would serialise the upload)
                self.repo.note_objects_written(f"packs/{name}")
                size = len(data)
                data.release()
                with self._lock:
                    self._written.append((name, size, trailer))
                    self._written_blobs += len(trailer.blobs)
                    self.stats.packs_written += 1
                    if len(buffer) >= self.pack_size and len(self._free) < 2:
                        self._free.append(buffer)  # reused: fresh 16 MiB buffers cost page faults
                    batch = self._written if len(self._written) >= INDEX_BATCH or \
                        self._written_blobs >= INDEX_BATCH_BLOBS else []
                    if batch:
                        self._written, self._written_blobs = [], 0
                if batch:
                    self._commit(batch)
            except BaseException as exc:  # re-raised in the producing threads
                self._error = exc

    def flush(self) -> None:
        """Write every partly filled pack, make all packs durable, then record them in the index.

        Packs are fsynced in batches (every INDEX_BATCH packs, by an uploader, and here for the
        rest) rather than one by one: the index (and so the next snapshot's deduplication)
        only ever names packs that are safely on disk.
        """
        with self._lock:
            slots = sorted(self._builders, key=lambda s: s[2])
            builders = [self._builders.pop(s) for s in slots]
            while any(b.writers for b in builders):  # (taken out of _builders: not closed,
                self._idle.wait()                    # so their last writer leaves them to us)
        for b in builders:
            if len(b):
                self._ship(b)
        self.close()
        self._raise_if_failed()
        if self._written:
            self._commit(self._written)
            self._written, self._written_blobs = [], 0

    def _commit(self, written: list[tuple[str, int, PackTrailer]]) -> None:
        """Make packs durable, then record them in the index."""
        self.repo.sync_store_blocking()
        self.repo.run_blocking(self.repo.index.add_packs([
            (name, t.scope, t.epoch, size,
             ((b.id, b.kind, b.offset, b.length, b.raw_length) for b in t.blobs))
            for name, size, t in written]))
        with self._lock:
            self.known.indexed(b.id for _, _, t in written for b in t.blobs)

    def close(self) -> None:
        """Stop the uploaders (after what is queued); safe to call twice."""
        # One stop per live uploader, then again for any still alive: a daemon was seen (once,
        # in CI) joining an uploader idle on an empty queue, its stop gone, and so never
        # stopping. Extra stops queue behind every pack already shipped and are never read.
        while any(t.is_alive() for t in self._uploaders):
            for t in self._uploaders:
                if t.is_alive():
                    try:
                        self._queue.put(_STOP, timeout=0.5)
                    except queue.Full:
                        pass   # uploaders are busy with packs: they will get to it
            for t in self._uploaders:
                t.join(timeout=0.5)
