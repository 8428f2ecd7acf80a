"""Turning file-system events into log changes, and sealing them into segments.

The daemon's watcher hands each changed path to `SegmentSealer.capture` and seals on its
schedule; nothing here watches or schedules.

Each event path is looked at once more when it is handled (the event only says "look here"):
gone means `del`; a file is read (its chunks stored) and becomes a `put` with its new entry; a
directory that appears is walked, since inotify reports only the directory itself. Entries are
made by the same FileReader as snapshots', so they carry the same metadata (extended
attributes, sparseness, FIFOs and device nodes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import stat as statmod
import time
from dataclasses import dataclass, field

from .. import activity
from ..config import Source
from ..crypto.identity import DeviceIdentity
from ..format.log import DEL, PUT, Change, ChangeList, Head, Segment, SegmentPart
from ..format.records import DIR, TreeEntry
from ..repo.logstore import LogStore
from ..repo.repository import Repository
from . import sqlite_capture
from .files import FileReader
from .names import show_path
from .sink import BlobSink

log = logging.getLogger("p2pbackup.seal")


@dataclass(slots=True)
class _Counters:
    files: int = 0
    bytes: int = 0
    read: int = 0


@dataclass(slots=True)
class SealState:
    """Where the device's chain stands."""

    seq: int
    prev: bytes
    head: Head | None = None
    sealed_at: float = 0.0
    warnings: list[str] = field(default_factory=list)


class SegmentSealer:
    """Collects changes per source and seals them into signed, chained segments."""

    def __init__(self, repo: Repository, identity: DeviceIdentity, sources: tuple[Source, ...],
                 temp_dir: str, state: SealState) -> None:
        self.repo = repo
        self.identity = identity
        self.sources = sources
        self.temp_dir = temp_dir
        self.state = state
        self.logstore = LogStore(repo)
        self.pending: dict[str, list[Change]] = {}
        self.pending_bytes = 0
        self._roots = [(src, os.fsencode(os.path.realpath(src.path))) for src in sources]
        self.missing: set[str] = set()
        self.counters = _Counters()
        # One reading thread: captures run one at a time anyway, and each reading thread
        # keeps its own 8 MiB read window (the default executor could hold six).
        self._reads = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="capture")
        self._turn = asyncio.Lock()
        self._new_period()

    def _new_period(self) -> None:
        self.sink = BlobSink(self.repo)
        self.reader = FileReader(self.sink, self.repo.config.chunk_avg,
                                 self.repo.keys.chunker_seed, self.temp_dir, self.counters,
                                 self._warn, self._note)

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        self.state.warnings.append(message)
        del self.state.warnings[:-20]

    @staticmethod
    def _note(message: str) -> None:
        log.info("%s", message)  # read as well as it could be: not an error for `status`

    def source_of(self, path: bytes) -> tuple[Source, bytes] | None:
        """The source and relative path of `path`, seen through symlinked directories.

        inotify (via watchfiles) follows directory symlinks and may name a change by a path
        through the link; the log records the real path (a link leading out of every source
        is not followed at all), as snapshots do.
        """
        parent, name = os.path.split(path)
        real = os.path.join(os.path.realpath(parent), name) if name else os.path.realpath(path)
        for src, root in self._roots:
            if real == root:
                return src, b""
            if real.startswith(root + b"/"):
                return src, real[len(root) + 1:]
        return None

    async def capture(self, path: bytes, new: bool = True) -> None:
        """Record what is now at `path` (or that nothing is).

        `new`: the path appeared (created or moved in), so a directory there is walked; a
        directory that was only modified (an entry added or removed inside) is not, since its
        entries report their own events.
        """
        found = self.source_of(path)
        if found is None:
            return
        src, rel = found
        path = os.path.join(os.fsencode(src.path), rel) if rel else path
        db = sqlite_capture.database_of(path) if rel else None
        if db is not None:  # a database's -wal/-shm/-journal changed: the database did
            rel, path = rel[:len(rel) - (len(path) - len(db))], db
        if not rel:  # the source directory itself
            if not os.path.isdir(path) and src.name not in self.missing:
                self.missing.add(src.name)
                # Logged, not kept as a warning: status says it while it lasts.
                log.warning("source %s (%s) disappeared; its last state stays in the log, the "
                            "other sources are still watched", src.name, src.path)
            elif os.path.isdir(path):
                self.missing.discard(src.name)
            return
        keys = self.repo.keys.scope(src.name, self.repo.keys.epoch)
        now = time.time_ns()
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            self._add(src, Change(DEL, rel, now))
            return
        except OSError as exc:
            self._warn(f"cannot look at {show_path(path)}: {exc.strerror}")
            return
        name = os.path.basename(rel)
        if statmod.S_ISREG(st.st_mode):
            # The read spans awaits: hold the turn so a seal cannot swap the sink (and close
            # the one these chunks go to) or take `pending` in the middle of it.
            async with self._turn:
                entry = await asyncio.get_running_loop().run_in_executor(
                    self._reads, self.reader.read_file, path, name, st, keys)
                if entry is not None:
                    self.pending_bytes += entry.size
                    self._add(src, Change(PUT, rel, now, entry))
        elif statmod.S_ISDIR(st.st_mode):
            self._add(src, Change(PUT, rel, now, TreeEntry(
                DIR, name, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, subtree=b"",
                xattrs=self.reader.xattrs(path, path))))
            if new:
                await self._capture_tree(path)
        else:  # a symlink, FIFO or device node (a socket is skipped)
            entry = self.reader.other_entry(path, name, st)
            if entry is not None:
                self._add(src, Change(PUT, rel, now, entry))

    async def _capture_tree(self, path: bytes) -> None:
        try:
            with os.scandir(path) as it:
                names = sorted(e.path for e in it)
        except OSError:
            return
        for child in names:
            await self.capture(child)

    def _add(self, src: Source, change: Change) -> None:
        self.pending.setdefault(src.name, []).append(change)

    @property
    def change_count(self) -> int:
        return sum(len(v) for v in self.pending.values())

    @activity.tracked("seal")
    async def seal(self) -> Head | None:
        """Seal what is pending into the next segment; None if nothing is pending.

        What is pending and the sink its chunks went to are taken in one step; changes
        captured meanwhile belong to the next segment.
        """
        async with self._turn:
            if not self.pending:
                return None
            pending, self.pending, self.pending_bytes = self.pending, {}, 0
            sink = self.sink
            self._new_period()
        seq = self.state.seq + 1
        try:
            await asyncio.to_thread(sink.flush)  # chunks durable before a segment names them
            epoch = self.repo.keys.epoch
            parts = tuple(SegmentPart(scope, epoch, self.logstore.seal_changes(
                scope, epoch, ChangeList(tuple(ch)))) for scope, ch in sorted(pending.items()))
            write = asyncio.ensure_future(self._write(
                Segment(self.identity.device_id, seq, self.state.prev, time.time_ns(), parts)))
            try:
                head = await asyncio.shield(write)
            except asyncio.CancelledError:
                # Cancelled (the daemon stopping) while the segment is written: the write
                # ends first, so a segment that reached the store is known to be there.
                await asyncio.wait([write])
                raise
        except BaseException:
            if self.state.seq < seq:
                # Their chunks may not be stored: capture those paths again from the disk.
                # (Never once the segment is stored: sealing them again under its seq would
                # replace it, with later stamps, behind the head that names it.)
                for scope, changes in pending.items():
                    root = next(os.fsencode(s.path) for s in self.sources if s.name == scope)
                    for c in changes:
                        await self.capture(os.path.join(root, c.path), new=False)
            raise
        self.state.sealed_at = time.time()
        log.info("sealed segment %d: %d changes", head.seq,
                 sum(len(v) for v in pending.values()))
        return head

    async def _write(self, seg: Segment) -> Head:
        digest = await self.logstore.store_segment(self.identity, seg)
        # The segment is in the store: the chain goes on from it whatever becomes of the head
        # (LogStore.recover_tail does the same at the next start).
        self.state.seq, self.state.prev = seg.seq, digest
        self.state.head = await self.logstore.move_head(self.identity, seg.seq, digest)
        return self.state.head

    def refresh_known(self) -> None:
        """After a snapshot, a prune or a command changed the index: what is stored is what
        the index says now (blobs another sink stored are not stored again; blobs a prune
        deleted are)."""
        self.sink.known.refresh()

    def close(self) -> None:
        self.sink.close()
        self._reads.shutdown(wait=True)
