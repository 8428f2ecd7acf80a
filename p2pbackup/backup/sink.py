"""BlobSink: turns plaintext blobs into sealed blobs in packs, deduplicated, from many threads.

Sealing (hash, zstd, XChaCha) runs in the calling worker thread; these C extensions release
the GIL. Finished packs go to one uploader thread through a queue of two, so at most a few
packs are held in memory whatever the amount of data.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

from ..crypto.keys import ScopeKeys
from ..format.header import Kind
from ..format.objects import seal_object
from ..format.pack import PackBuilder
from ..format.records import PackTrailer
from ..repo.repository import Repository

_STOP = object()
UPLOADERS = 2
INDEX_BATCH = 8  # packs made durable and indexed together while the scan goes on


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
        self.known: set[bytes] = set(repo.index.blobs)
        self.stats = SinkStats()
        self._lock = threading.Lock()
        self._builders: dict[tuple[str, int, bool], PackBuilder] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._written: list[tuple[str, int, PackTrailer]] = []
        self._free: list[bytearray] = []
        self.stored_packs: set[str] = set()
        # Two uploaders, so one pack's fsync overlaps the next pack's write.
        self._uploaders = [threading.Thread(target=self._upload_loop, name=f"pack-uploader-{i}",
                                            daemon=True) for i in range(UPLOADERS)]
        for t in self._uploaders:
            t.start()

    def add(self, keys: ScopeKeys, kind: int, plaintext: bytes | memoryview) -> bytes:
        """Store a blob unless it is already stored; return its id."""
        blob_id = keys.blob_id(plaintext)
        with self._lock:
            if blob_id in self.known:
                return blob_id
            self.known.add(blob_id)  # reserve: another thread with the same blob skips it
        sealed = seal_object(kind, plaintext, keys.data_key, compress=True)
        full = None
        slot = (keys.scope, keys.epoch, kind == Kind.TREE)
        with self._lock:
            builder = self._builders.get(slot)
            if builder is None:
                if kind == Kind.TREE:
                    builder = PackBuilder(keys.scope, keys.epoch, 1 << 20)
                else:
                    builder = PackBuilder(keys.scope, keys.epoch, self.pack_size,
                                          self._free.pop() if self._free else None)
                self._builders[slot] = builder
            builder.add(kind, blob_id, sealed, len(plaintext))
            self.stats.blobs_added += 1
            self.stats.bytes_added += len(sealed)
            self.stats.raw_added += len(plaintext)
            if builder.size >= self.pack_size:
                full = self._builders.pop(slot)
        if full is not None:
            self._ship(full)
        return blob_id

    def _ship(self, builder: PackBuilder) -> None:
        self._raise_if_failed()
        name, data, trailer = builder.finish(self.repo.keys.meta_key)
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
                size = len(data)
                data.release()
                with self._lock:
                    self._written.append((name, size, trailer))
                    self.stats.packs_written += 1
                    if len(buffer) >= self.pack_size and len(self._free) < 2:
                        self._free.append(buffer)  # reused: fresh 16 MiB buffers cost page faults
                    batch = self._written if len(self._written) >= INDEX_BATCH else []
                    if batch:
                        self._written = []
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
        for b in builders:
            if len(b):
                self._ship(b)
        self.close()
        self._raise_if_failed()
        if self._written:
            self._commit(self._written)
            self._written = []

    def _commit(self, written: list[tuple[str, int, PackTrailer]]) -> None:
        """Make packs durable, then record them in the index."""
        self.repo.sync_store_blocking()
        self.repo.run_blocking(self.repo.index.add_packs([
            (name, t.scope, t.epoch, size,
             [(b.id, b.kind, b.offset, b.length, b.raw_length) for b in t.blobs])
            for name, size, t in written]))

    def close(self) -> None:
        """Stop the uploaders (after what is queued); safe to call twice."""
        for t in self._uploaders:
            if t.is_alive():
                self._queue.put(_STOP)
        for t in self._uploaders:
            t.join()
