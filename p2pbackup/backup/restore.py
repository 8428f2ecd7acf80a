"""Restoring a snapshot into a directory.

Files are written under a temporary name in their final directory and renamed once complete
(contents, mode, owner and mtime set), so a file at its final name is always whole. A re-run
after an interruption therefore skips files whose size and mtime already match. Every chunk is
decrypted, authenticated and checked against its id before it is written.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import os
import signal
import stat as statmod
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..errors import DiskFull, IntegrityError, NotFound, P2PError, RestoreConflict, StorageError
from ..format.records import DIR, FILE, SYMLINK, SourceRoot, Tree, TreeEntry
from .names import show_path as _show
from .pointintime import Overlay
from ..repo.repository import Repository, StoredSnapshot

TMP_MARK = b".p2pb-restore-"
READ_BATCH = 4 * 1024 * 1024  # neighbouring chunks read with one pread
WRITE_BATCH = 1024 * 1024  # decoded chunks written with one writev
BATCH_FILES = 64
BATCH_BYTES = 4 * 1024 * 1024
# Restores at least this big write files from forked worker processes (local stores only).
# Threads of one process spend a third of their CPU handing the GIL to each other between the
# many short syscalls and C calls per small file (measured on 20k files, 2 cores: 10.4 CPU-s
# with 2 threads, 6.4 with 1); processes share no GIL.
PROCESS_MIN_BYTES = 32 * 1024 * 1024
_PR_SET_PDEATHSIG = 1


@dataclass(slots=True)
class RestoreProgress:
    """Counters the CLI polls; approximate."""

    files: int = 0
    bytes: int = 0
    expected_bytes: int = 0
    current: str = ""
    started: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class RestoreSummary:
    """What one restore did."""

    files_restored: int = 0
    files_skipped: int = 0
    dirs: int = 0
    links: int = 0
    bytes: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)



def _mkdir_new(path: bytes) -> bool:
    os.mkdir(path, 0o700)  # inside a directory this restore made: nothing can be there
    return True


def _write_all(fd: int, parts: list[bytes | bytearray]) -> int:
    total = sum(len(p) for p in parts)
    done = os.writev(fd, parts)
    if done < total:  # short write: finish the rest the slow way
        rest = memoryview(b"".join(parts))[done:]
        while rest:
            rest = rest[os.write(fd, rest):]
    return total


def _tmp_name(path: bytes) -> bytes:
    d, n = os.path.split(path)
    return os.path.join(d, TMP_MARK + n)


def _complete(entry: TreeEntry, st: os.stat_result) -> bool:
    return statmod.S_ISREG(st.st_mode) and st.st_size == entry.size \
        and st.st_mtime_ns == entry.mtime_ns


_forked: Restorer | None = None  # the restorer whose files a forked worker writes


def _worker_start(parent: int) -> None:
    # A worker must not outlive a restore that is killed (kill -9 included): it would go on
    # writing into the target. The signal comes when the forking thread ends.
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _worker_job(jobs: list[tuple[TreeEntry, bytes, bool]]) -> tuple[int, int]:
    assert _forked is not None
    return _forked._write_files(jobs)


@dataclass(frozen=True, slots=True)
class _Selection:
    root: SourceRoot
    parts: tuple[bytes, ...]  # path components below the source root; () = everything


class Restorer:
    """Restores selected parts of one snapshot (blocking; run it in a thread)."""

    def __init__(self, repo: Repository, selections: list[_Selection], target: bytes, *,
                 overwrite: bool, workers: int | None = None,
                 progress: RestoreProgress | None = None,
                 warn: Callable[[str], None] | None = None,
                 overlays: dict[str, Overlay] | None = None,
                 processes: bool | None = None) -> None:
        self.repo = repo
        self.overlays = overlays or {}
        self.selections = selections
        self.target = target
        self.overwrite = overwrite
        self.workers = workers or max(2, os.cpu_count() or 2)
        self.progress = progress or RestoreProgress()
        self.summary = RestoreSummary()
        self._warn_cb = warn
        self._lock = threading.Lock()
        self._as_root = os.geteuid() == 0
        self._ids = (os.geteuid(), os.getegid())
        self._umask = os.umask(0o022)
        os.umask(self._umask)
        self._slots = threading.BoundedSemaphore(self.workers * 4)
        self._links: dict[tuple[str, int], tuple[bytes, cf.Future]] = {}
        self._pool: cf.Executor | None = None
        self._processes = processes

    def warn(self, message: str) -> None:
        with self._lock:
            self.summary.warnings.append(message)
        if self._warn_cb:
            self._warn_cb(message)

    # ---- selecting -----------------------------------------------------------------------

    def _tree(self, scope: str, dest: bytes, tree_id: bytes | None) -> Tree:
        """The directory tree to restore at `dest`: the snapshot's, with the replayed log on top."""
        base = self.repo.load_tree_blocking(tree_id) if tree_id else None  # b"": made by the log
        overlay = self.overlays.get(scope)
        if overlay is None:
            return base or Tree(())
        rel = os.path.relpath(dest, os.path.join(self.target, os.fsencode(scope)))
        return overlay.tree(b"" if rel == b"." else rel, base)

    def _descend(self, sel: _Selection) -> tuple[TreeEntry | None, Tree | None, bytes]:
        """Resolve a selection to (entry or None for the whole root, tree if a dir, dest)."""
        dest = os.path.join(self.target, os.fsencode(sel.root.name))
        scope = sel.root.name
        tree: Tree | None = self._tree(scope, dest, sel.root.tree)
        entry: TreeEntry | None = None
        for i, part in enumerate(sel.parts):
            if tree is None:
                raise NotFound("path not in snapshot")
            entry = next((e for e in tree.entries if e.name == part), None)
            if entry is None:
                shown = "/".join([sel.root.name] + [_show(p) for p in sel.parts[:i + 1]])
                raise NotFound(f"{shown} is not in this snapshot")
            dest = os.path.join(dest, part)
            tree = self._tree(scope, dest, entry.subtree) if entry.type == DIR else None
        return entry, tree, dest

    # ---- conflicts -----------------------------------------------------------------------

    def _conflicts_in(self, scope: str, entry: TreeEntry | None, tree: Tree | None, dest: bytes,
                      out: list[str]) -> None:
        try:
            st = os.lstat(dest)
        except FileNotFoundError:
            return  # nothing below can exist either
        is_dir = entry is None or entry.type == DIR
        if is_dir:
            if not statmod.S_ISDIR(st.st_mode):
                out.append(_show(dest))
                return
            assert tree is not None
            for e in tree.entries:
                path = os.path.join(dest, e.name)
                sub = self._tree(scope, path, e.subtree) if e.type == DIR else None
                self._conflicts_in(scope, e, sub, path, out)
        elif entry.type == FILE and _complete(entry, st):
            return
        elif entry.type == SYMLINK and statmod.S_ISLNK(st.st_mode) \
                and os.readlink(dest) == entry.target:
            return
        else:
            out.append(_show(dest))

    # ---- writing -------------------------------------------------------------------------

    def _write_file(self, entry: TreeEntry, dest: bytes, fresh: bool) -> int:
        """Write one file under a temporary name, set its metadata, rename it into place.

        `fresh`: its directory was made by this restore, so nothing else can be in the way and
        the owner is already ours. Syscalls are kept few: reads of neighbouring chunks and
        writes of decoded ones are coalesced.
        """
        tmp = _tmp_name(dest)
        mode = statmod.S_IMODE(entry.mode)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode & 0o777)
        written = 0
        try:
            pending: list[bytes | bytearray] = []
            pending_bytes = 0
            for data in self._chunks(entry.chunks):
                pending.append(data)
                pending_bytes += len(data)
                if pending_bytes >= WRITE_BATCH:
                    written += _write_all(fd, pending)
                    pending, pending_bytes = [], 0
            if pending:
                written += _write_all(fd, pending)
            if written != entry.size:
                raise P2PError(f"{_show(dest)}: the snapshot's chunks hold {written} bytes, "
                               f"its entry says {entry.size}")
            if self._as_root and not (fresh and (entry.uid, entry.gid) == self._ids):
                os.fchown(fd, entry.uid, entry.gid)
            if not fresh or mode != (mode & 0o777 & ~self._umask):
                os.fchmod(fd, mode)
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        os.close(fd)
        os.rename(tmp, dest)
        return written

    def _chunks(self, ids: tuple[bytes, ...]) -> Iterator[bytes | bytearray]:
        """Decoded, authenticated chunks; neighbours in the same pack are read in one go."""
        repo = self.repo
        i = 0
        while i < len(ids):
            first = repo.locate(ids[i])
            j, end = i + 1, first.offset + first.length
            while j < len(ids) and end - first.offset < READ_BATCH:
                loc = repo.locate(ids[j])
                if loc.pack != first.pack or loc.offset != end:
                    break
                end += loc.length
                j += 1
            try:
                data = repo.read_range_blocking(f"packs/{first.pack}", first.offset,
                                                end - first.offset)
            except NotFound:
                raise IntegrityError(f"pack {first.pack[:12]} is missing from the store") from None
            view = memoryview(data)
            for cid in ids[i:j]:
                loc = repo.locate(cid)
                rel = loc.offset - first.offset
                yield repo.decode_blob(cid, loc, view[rel:rel + loc.length])
            i = j

    def _write_files(self, jobs: list[tuple[TreeEntry, bytes, bool]]) -> tuple[int, int]:
        """Write a batch of files (in a worker thread or forked process); (files, bytes)."""
        total = 0
        for entry, dest, fresh in jobs:
            total += self._write_file(entry, dest, fresh)
        return len(jobs), total

    def _batch_done(self, fut: cf.Future) -> None:
        self._slots.release()
        if not fut.cancelled() and fut.exception() is None:
            files, n = fut.result()
            with self._lock:
                self.summary.files_restored += files
                self.summary.bytes += n
            self.progress.files += files
            self.progress.bytes += n

    def _submit(self, jobs: list[tuple[TreeEntry, bytes, bool]]) -> cf.Future:
        self._slots.acquire()
        assert self._pool is not None
        self.progress.current = _show(jobs[0][1])
        # A forked worker finds the restorer it inherited (a bound method would be pickled).
        work = self._write_files if isinstance(self._pool, cf.ThreadPoolExecutor) else _worker_job
        fut = self._pool.submit(work, jobs)
        fut.add_done_callback(self._batch_done)
        return fut

    def _want_processes(self) -> bool:
        if self._processes is not None:
            return self._processes
        # Only a local store can be read from a forked child (a peer or S3 store runs on the
        # parent's event loop).
        return self.workers > 1 and self.progress.expected_bytes >= PROCESS_MIN_BYTES \
            and getattr(self.repo.store, "get_range_sync", None) is not None

    def _start_pool(self) -> cf.Executor:
        global _forked
        import multiprocessing

        if not self._want_processes():
            return cf.ThreadPoolExecutor(self.workers, thread_name_prefix="restore")
        if _forked is not None:
            raise RuntimeError("one process-parallel restore at a time")
        _forked = self  # the workers are forked at the first submit and inherit it
        return cf.ProcessPoolExecutor(self.workers, multiprocessing.get_context("fork"),
                                      initializer=_worker_start, initargs=(os.getpid(),))

    def _prepare_dir(self, dest: bytes) -> bool:
        """Make sure `dest` is a writable directory; True if this restore created it."""
        try:
            os.mkdir(dest, 0o700)
            return True
        except FileExistsError:
            st = os.lstat(dest)
            if not statmod.S_ISDIR(st.st_mode):
                if not self.overwrite:
                    raise RestoreConflict(f"{_show(dest)} exists and is not a directory")
                os.unlink(dest)
                os.mkdir(dest, 0o700)
            else:
                os.chmod(dest, statmod.S_IMODE(st.st_mode) | 0o700)
            return False

    def _restore_dir(self, tree: Tree, dest: bytes, scope: str, fresh: bool,
                     pending: list[cf.Future], dir_meta: list[tuple[bytes, TreeEntry]]) -> None:
        batch: list[tuple[TreeEntry, bytes, bool]] = []
        batch_bytes = 0
        for e in tree.entries:
            path = os.path.join(dest, e.name)
            if e.type == DIR:
                made = self._prepare_dir(path) if not fresh else _mkdir_new(path)
                self.summary.dirs += 1
                self._restore_dir(self._tree(scope, path, e.subtree), path, scope, made,
                                  pending, dir_meta)
                dir_meta.append((path, e))
            elif e.type == SYMLINK:
                self._restore_symlink(e, path, fresh)
            elif e.type == FILE:
                if not fresh and self._skip_existing(e, path):
                    continue
                if e.nlink > 1:
                    key = (scope, e.inode)
                    first = self._links.get(key)
                    if first is not None:
                        self._link(first, e, path)
                        continue
                    fut = self._submit([(e, path, fresh)])
                    self._links[key] = (path, fut)
                    pending.append(fut)
                    continue
                batch.append((e, path, fresh))
                batch_bytes += e.size
                if len(batch) >= BATCH_FILES or batch_bytes >= BATCH_BYTES:
                    pending.append(self._submit(batch))
                    batch, batch_bytes = [], 0
        if batch:
            pending.append(self._submit(batch))

    def _skip_existing(self, e: TreeEntry, path: bytes) -> bool:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if _complete(e, st):
            with self._lock:
                self.summary.files_skipped += 1
            self.progress.files += 1
            self.progress.bytes += e.size
            return True
        if statmod.S_ISDIR(st.st_mode):
            raise RestoreConflict(f"{_show(path)} is a directory; the snapshot has a file there")
        return False  # --overwrite: the rename replaces it

    def _link(self, first: tuple[bytes, cf.Future], e: TreeEntry, path: bytes) -> None:
        src, fut = first
        fut.result()
        tmp = _tmp_name(path)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.link(src, tmp)
        os.rename(tmp, path)
        self.summary.links += 1

    def _restore_symlink(self, e: TreeEntry, path: bytes, fresh: bool = False) -> None:
        assert e.target is not None
        if not fresh:
            try:
                if os.readlink(path) == e.target:
                    return
            except OSError:
                pass
        tmp = _tmp_name(path)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(e.target, tmp)
        if self._as_root:
            os.lchown(tmp, e.uid, e.gid)
        os.utime(tmp, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
        os.rename(tmp, path)

    def _apply_dir_meta(self, path: bytes, e: TreeEntry) -> None:
        if self._as_root:
            os.lchown(path, e.uid, e.gid)
        os.chmod(path, statmod.S_IMODE(e.mode))
        os.utime(path, ns=(e.mtime_ns, e.mtime_ns))

    def _run_jobs(self, resolved: list[tuple[_Selection, TreeEntry | None, Tree | None, bytes]]
                  ) -> None:
        pending: list[cf.Future] = []
        dir_meta: list[tuple[bytes, TreeEntry]] = []
        os.makedirs(self.target, exist_ok=True)
        for sel, entry, tree, dest in resolved:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            if entry is None or entry.type == DIR:
                made = self._prepare_dir(dest)
                assert tree is not None
                self._restore_dir(tree, dest, sel.root.name, made, pending, dir_meta)
                if entry is not None:
                    dir_meta.append((dest, entry))
            elif entry.type == SYMLINK:
                self._restore_symlink(entry, dest)
            elif not self._skip_existing(entry, dest):
                pending.append(self._submit([(entry, dest, False)]))
        for fut in pending:
            fut.result()
        for path, e in dir_meta:  # children before parents: dir_meta is post-order
            self._apply_dir_meta(path, e)

    def run(self) -> RestoreSummary:
        started = time.monotonic()
        resolved = [(sel, *self._descend(sel)) for sel in self.selections]
        conflicts: list[str] = []
        if not self.overwrite:
            for sel, entry, tree, dest in resolved:
                self._conflicts_in(sel.root.name, entry, tree, dest, conflicts)
        if conflicts:
            more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
            raise RestoreConflict(f"{conflicts[0]} already exists and differs from the "
                                  f"snapshot{more}; pass --overwrite to replace")
        global _forked
        self._pool = self._start_pool()
        try:
            self._run_jobs(resolved)
        except OSError as exc:
            self._pool.shutdown(wait=True, cancel_futures=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(_show(self.target)) from None
            raise StorageError(f"restore failed: {exc}") from None
        except cf.BrokenExecutor:
            self._pool.shutdown(wait=True, cancel_futures=True)
            raise P2PError("restore failed: a worker process ended unexpectedly; run the same "
                           "restore again to finish it (complete files are kept)") from None
        except BaseException:
            self._pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            if _forked is self:
                _forked = None
        self._pool.shutdown(wait=True)
        self.summary.seconds = time.monotonic() - started
        return self.summary


def select(stored: StoredSnapshot, sub: str | None) -> list[_Selection]:
    """Turn --path SUB into selections; SUB may start with the source name."""
    roots = stored.snapshot.sources
    if not sub:
        return [_Selection(r, ()) for r in roots]
    parts = tuple(os.fsencode(p) for p in sub.strip("/").split("/") if p not in ("", "."))
    if any(p == b".." for p in parts):
        raise NotFound(f"--path {sub!r} may not contain '..'")
    by_name = {r.name: r for r in roots}
    if parts and os.fsdecode(parts[0]) in by_name:
        return [_Selection(by_name[os.fsdecode(parts[0])], parts[1:])]
    if len(roots) == 1:
        return [_Selection(roots[0], parts)]
    names = ", ".join(sorted(by_name))
    raise NotFound(f"--path {sub!r} must start with a source name ({names})")


async def restore(repo: Repository, stored: StoredSnapshot, target: str, *,
                  sub: str | None = None, overwrite: bool = False,
                  progress: RestoreProgress | None = None,
                  warn: Callable[[str], None] | None = None,
                  workers: int | None = None,
                  overlays: dict[str, Overlay] | None = None,
                  processes: bool | None = None) -> RestoreSummary:
    """Restore `stored` (or the part named by `sub`) into `target`/<source name>/...

    `overlays` (from pointintime.plan_at) lays replayed log changes over the snapshot.
    `processes` forces files to be written from forked worker processes (True) or threads
    (False); by default big restores from a local store use processes.
    """
    import asyncio

    selections = select(stored, sub)
    progress = progress or RestoreProgress()
    progress.expected_bytes = sum(s.root.size for s in selections)
    restorer = Restorer(repo, selections, os.fsencode(os.path.abspath(target)),
                        overwrite=overwrite, workers=workers, progress=progress, warn=warn,
                        overlays=overlays, processes=processes)
    return await asyncio.to_thread(restorer.run)
