"""Restoring a snapshot into a directory.

Files are written under a temporary name in their final directory and renamed once complete
(contents, mode, owner and mtime set), so a file at its final name is always whole. A re-run
after an interruption therefore skips files whose size and mtime already match. Every chunk is
decrypted, authenticated and checked against its id before it is written.

Nothing below the target is reached by a path: each directory is opened from its parent's
handle without following symlinks, and each entry is made relative to its directory's handle
(mkdirat, openat with O_EXCL|O_NOFOLLOW, renameat, linkat, symlinkat, and metadata set on the
opened directory). A symlink in the target, there before the restore or planted during it, is
therefore replaced (--overwrite) or refused, never written through. The target itself and the
directories above it are the user's choice and may be symlinks.

Damage is per entry: a file whose data cannot be read or authenticated, or a folder whose
listing cannot, is named and left out, and everything else is restored. With `keep_damaged`
such a file is kept with its unreadable byte ranges zeroed, and the ranges are named.

FIFOs, device nodes, extended attributes and the holes of sparse files are made by fsmeta.
A device node that cannot be made (no root) is a warning; an extended attribute the target
cannot keep is a note (the file is there, whole).
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import hashlib
import os
import signal
import stat as statmod
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..errors import DiskFull, IntegrityError, NotFound, P2PError, RestoreConflict, StorageError
from ..format.records import (DIR, FIFO, FILE, SPECIAL_TYPES, SYMLINK, SourceRoot, Tree,
                              TreeEntry, check_names)
from . import fsmeta
from .names import show_path as _show
from .pointintime import Overlay
from ..repo.repository import Repository, StoredSnapshot

TMP_MARK = b".p2pb-restore-"
NAME_MAX = 255
READ_BATCH = 4 * 1024 * 1024  # neighbouring chunks read with one pread
WRITE_BATCH = 1024 * 1024  # decoded chunks written with one writev
BATCH_FILES = 64
PLAN_BATCH = 4096  # chunk reads announced to the store at once (_plan)
# Folder listings the plan reads, kept for the restore's walk (the first ones, up to this many
# bytes): it read each again, a request through the event loop each (816 of a 1 GiB tree).
PLANNED_TREE_BYTES = 16 * 1024 * 1024
BATCH_BYTES = 4 * 1024 * 1024
# Restores at least this big write files from forked worker processes (local stores only).
# Threads of one process spend a third of their CPU handing the GIL to each other between the
# many short syscalls and C calls per small file (measured on 20k files, 2 cores: 10.4 CPU-s
# with 2 threads, 6.4 with 1); processes share no GIL.
PROCESS_MIN_BYTES = 32 * 1024 * 1024
_PR_SET_PDEATHSIG = 1
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_EXCL: a temporary name found in place (left by a killed restore, or planted as a link to
# a file elsewhere) is removed and made anew, never opened and written through.
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_ZEROS = memoryview(bytes(WRITE_BATCH))

Parts = tuple[bytes, ...]  # a path below the target: the source's name, then entry names


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
    warnings: list[str] = field(default_factory=list)  # what could not be made (exit 3)
    notes: list[str] = field(default_factory=list)  # restored, less some metadata
    # One line per file or folder not restored because its data is damaged or missing...
    failed: list[str] = field(default_factory=list)
    # ... and per file restored (keep_damaged) with the byte ranges it could not read zeroed.
    damaged: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _BatchResult:
    """What writing one batch of files did (returned from a worker thread or process)."""

    files: int = 0
    bytes: int = 0
    failed: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _write_all(fd: int, parts: list[bytes | bytearray | memoryview]) -> int:
    total = sum(len(p) for p in parts)
    done = os.writev(fd, parts)
    if done < total:  # short write: finish the rest the slow way
        rest = memoryview(b"".join(parts))[done:]
        while rest:
            rest = rest[os.write(fd, rest):]
    return total


def _tmp_name(name: bytes) -> bytes:
    tmp = TMP_MARK + name
    if len(tmp) <= NAME_MAX:
        return tmp
    # A name near the limit: a stand-in of fixed length (unique as the names of a folder are).
    return TMP_MARK + hashlib.blake2b(name, digest_size=16).hexdigest().encode()


def _new_file(dir_fd: int, name: bytes, perm: int) -> int:
    try:
        return os.open(name, _NEW_FILE, perm, dir_fd=dir_fd)
    except FileExistsError:
        os.unlink(name, dir_fd=dir_fd)
        return os.open(name, _NEW_FILE, perm, dir_fd=dir_fd)


def _unlink_quietly(dir_fd: int, name: bytes) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _xattrs_not_set(shown: str, failed: list[str]) -> list[str]:
    """The note for an entry whose extended attributes (some of them) could not be set."""
    return [f"{shown}: extended attributes not restored: {', '.join(failed)}"] if failed else []


def _complete(entry: TreeEntry, st: os.stat_result) -> bool:
    return statmod.S_ISREG(st.st_mode) and st.st_size == entry.size \
        and st.st_mtime_ns == entry.mtime_ns


def _zeros(n: int) -> Iterator[memoryview]:
    while n > 0:
        piece = _ZEROS[:n]
        n -= len(piece)
        yield piece


def _note_damage(damage: list[list], start: int, length: int, why: str) -> None:
    if damage and damage[-1][1] == start:
        damage[-1][1] += length  # neighbouring ranges are named as one
    else:
        damage.append([start, start + length, why])


class _DirChain:
    """Open handles on the directories from the restore target down to one directory.

    Each is opened from its parent's handle without following a symlink. Consecutive calls
    share their common prefix, so visiting directories in tree order opens each one once.
    """

    def __init__(self, restorer: Restorer) -> None:
        self.restorer = restorer
        self.parts: Parts = ()
        self.fds: list[int] = []

    def open(self, parts: Parts) -> int:
        keep = 0
        while keep < min(len(parts), len(self.parts)) and parts[keep] == self.parts[keep]:
            keep += 1
        for fd in self.fds[keep:]:
            os.close(fd)
        del self.fds[keep:]
        self.parts = parts[:keep]
        for i in range(keep, len(parts)):
            self.fds.append(self.restorer._open_dir(self.fd, parts[:i + 1]))
            self.parts = parts[:i + 1]
        return self.fd

    @property
    def fd(self) -> int:
        return self.fds[-1] if self.fds else self.restorer._root_fd

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds, self.parts = [], ()


_forked: Restorer | None = None  # the restorer whose files a forked worker writes


def _worker_start(parent: int) -> None:
    # A worker must not outlive a restore that is killed (kill -9 included): it would go on
    # writing into the target. The signal comes when the forking thread ends.
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _worker_job(dir_parts: Parts, jobs: list[tuple[TreeEntry, bool]]) -> _BatchResult:
    assert _forked is not None
    return _forked._write_files(dir_parts, jobs)


class _InFlight:
    """The batches of files submitted and not yet seen done. Done ones leave from the front
    as new ones come (their errors are raised then): a restore of a million files kept all
    16k batches' futures (28 MiB traced; they outlived their work by the whole restore)."""

    def __init__(self) -> None:
        self._futures: deque[cf.Future] = deque()

    def append(self, fut: cf.Future) -> None:
        futures = self._futures
        futures.append(fut)
        while futures and futures[0].done():
            futures.popleft().result()

    def wait(self) -> None:
        """Wait for every batch; raise the first error."""
        while self._futures:
            self._futures.popleft().result()


@dataclass(frozen=True, slots=True)
class _Selection:
    root: SourceRoot
    parts: tuple[bytes, ...]  # path components below the source root; () = everything


@dataclass(frozen=True, slots=True)
class _Resolved:
    """A selection found in the snapshot."""

    scope: str
    entry: TreeEntry | None  # None: a source's folder whose metadata the snapshot lacks
    tree: Tree | None  # its listing, if a folder
    parts: Parts
    above: tuple[tuple[Parts, TreeEntry], ...]  # the folders above it, deepest first


class Restorer:
    """Restores selected parts of one snapshot (blocking; run it in a thread)."""

    @classmethod
    def reader(cls, repo: Repository, overlays: dict[str, Overlay] | None = None) -> Restorer:
        """One that only reads: to list a snapshot's folders and stream its files with the
        same lookups, overlays and checks as a restore (the web console)."""
        return cls(repo, [], b"/", overwrite=False, overlays=overlays, processes=False)

    def __init__(self, repo: Repository, selections: list[_Selection], target: bytes, *,
                 overwrite: bool, workers: int | None = None,
                 progress: RestoreProgress | None = None,
                 warn: Callable[[str], None] | None = None,
                 overlays: dict[str, Overlay] | None = None,
                 processes: bool | None = None, keep_damaged: bool = False,
                 note: Callable[[str], None] | None = None) -> None:
        self.repo = repo
        self.overlays = overlays or {}
        self.selections = selections
        self.target = target
        self.overwrite = overwrite
        self.keep_damaged = keep_damaged
        self.workers = workers or max(2, os.cpu_count() or 2)
        self.progress = progress or RestoreProgress()
        self.summary = RestoreSummary()
        self._warn_cb = warn
        self._note_cb = note or warn
        self._lock = threading.Lock()
        self._as_root = os.geteuid() == 0
        self._ids = (os.geteuid(), os.getegid())
        self._umask = fsmeta.current_umask()
        self._slots = threading.BoundedSemaphore(self.workers * 4)
        self._links: dict[tuple[str, int], tuple[Parts, cf.Future]] = {}
        self._pool: cf.Executor | None = None
        # (scope, tree id) -> a listing the plan read, until the walk takes it
        self._planned_trees: dict[tuple[str, bytes], bytes] = {}
        self._planned_tree_bytes = 0
        self._processes = processes
        self._root_fd = -1
        self._local = threading.local()  # each writer's _DirChain
        self._chains: list[_DirChain] = []  # every one made in this process, closed at the end

    def warn(self, message: str) -> None:
        """Something of the snapshot could not be made: the restore is partial."""
        with self._lock:
            self.summary.warnings.append(message)
        if self._warn_cb:
            self._warn_cb(message)

    def note(self, message: str) -> None:
        """Restored, but without some metadata the target cannot keep (not partial)."""
        with self._lock:
            self.summary.notes.append(message)
        if self._note_cb:
            self._note_cb(message)

    def _report(self, failed: list[str], damaged: list[str]) -> None:
        with self._lock:
            self.summary.failed.extend(failed)
            self.summary.damaged.extend(damaged)
        if self._warn_cb:
            for line in failed + damaged:
                self._warn_cb(line)

    def _shown(self, parts: Parts) -> str:
        return _show(os.path.join(self.target, *parts))

    # ---- directory handles ---------------------------------------------------------------

    def _open_target(self) -> int:
        """A handle on --to, made if missing (it and its parents may be symlinks)."""
        try:
            os.makedirs(self.target, exist_ok=True)
            return os.open(self.target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileExistsError, NotADirectoryError):
            blocker = self.target
            while not os.path.lexists(blocker) and os.path.dirname(blocker) != blocker:
                blocker = os.path.dirname(blocker)
            raise RestoreConflict(f"cannot restore into {_show(self.target)}: "
                                  f"{_show(blocker)} is not a directory") from None
        except OSError as exc:
            raise StorageError(f"cannot restore into {_show(self.target)}: "
                               f"{exc.strerror}") from None

    def _open_dir(self, parent_fd: int, parts: Parts) -> int:
        """A handle on the directory `parts` in `parent_fd`; never through a symlink."""
        try:
            return os.open(parts[-1], _OPEN_DIR, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
        raise RestoreConflict(f"{self._shown(parts)} is no longer a directory (a symlink or "
                              "file was put there during the restore); not followed")

    def _chain(self) -> _DirChain:
        chain = getattr(self._local, "chain", None)
        if chain is None:
            chain = self._local.chain = _DirChain(self)
            self._chains.append(chain)
        return chain

    # ---- selecting -----------------------------------------------------------------------

    def _tree(self, scope: str, parts: Parts, tree_id: bytes | None) -> Tree:
        """The directory tree to restore at `parts`: the snapshot's, with the replayed log on top."""
        data = self._planned_trees.pop((scope, tree_id), None) if tree_id else None
        if data is not None:
            base: Tree | None = self.repo.decode_tree(tree_id, data)
        else:
            base = self.repo.load_tree_blocking(tree_id, scope) if tree_id else None  # b"": log
        overlay = self.overlays.get(scope)
        if overlay is None:
            return base or Tree(())
        tree = overlay.tree(b"/".join(parts[1:]), base)
        # Stored trees are checked as they are decoded; this one was put together here.
        check_names([e.name for e in tree.entries], f"the log's view of {self._shown(parts)}")
        return tree

    def _descend(self, sel: _Selection, *, report: bool = True, shallow: bool = False
                 ) -> _Resolved | None:
        """Find a selection in the snapshot; None if a listing on the way is damaged (named;
        without `report`, that is an IntegrityError naming it). `shallow`: a folder found
        is not listed (its `tree` is None)."""
        scope = sel.root.name
        parts: Parts = (os.fsencode(scope),)
        entry = sel.root.dir_entry()
        above: list[tuple[Parts, TreeEntry]] = []
        folder: bytes | None = sel.root.tree   # the tree id at `parts`; None: not a folder
        try:
            for i, part in enumerate(sel.parts):
                if folder is None:
                    raise NotFound(f"{'/'.join([scope] + [_show(p) for p in sel.parts[:i]])} "
                                   "is not a folder in this snapshot")
                tree = self._tree(scope, parts, folder)
                if entry is not None:
                    above.append((parts, entry))
                entry = next((e for e in tree.entries if e.name == part), None)
                if entry is None:
                    shown = "/".join([scope] + [_show(p) for p in sel.parts[:i + 1]])
                    raise NotFound(f"{shown} is not in this snapshot")
                parts += (part,)
                folder = entry.subtree if entry.type == DIR else None
            listing = self._tree(scope, parts, folder) \
                if folder is not None and not shallow else None
        except IntegrityError as exc:
            if not report:
                raise IntegrityError(f"{self._shown(parts)}/: {exc}") from None
            self._report([f"{self._shown(parts)}/: not restored: {exc}"], [])
            return None
        return _Resolved(scope, entry, listing, parts, tuple(reversed(above)))

    def _one(self, stored: StoredSnapshot, sub: str | None) -> _Selection:
        sels = select(stored, sub)
        if len(sels) != 1:
            raise NotFound("give a source name to look into: "
                           + ", ".join(s.root.name for s in sels))
        return sels[0]

    def find(self, stored: StoredSnapshot, sub: str | None) -> _Resolved:
        """What `sub` (source name/sub/path, as restore's --path) names in `stored`: its entry
        and, for a folder, its listing (NotFound; IntegrityError if a listing is damaged)."""
        found = self._descend(self._one(stored, sub), report=False)
        assert found is not None
        return found

    def folder(self, stored: StoredSnapshot, sub: str | None) -> tuple[_Resolved, bytes]:
        """The folder `sub` names, not listed: where it is, and its tree id (b"": a folder
        only the replayed log holds). NotFound if `sub` is not a folder."""
        sel = self._one(stored, sub)
        found = self._descend(sel, report=False, shallow=True)
        assert found is not None
        folder = sel.root.tree if not sel.parts else \
            found.entry.subtree if found.entry is not None and found.entry.type == DIR else None
        if folder is None:
            raise NotFound(f"{sub} is not a folder in this snapshot")
        return found, folder

    def _replayed(self, scope: str, parts: Parts, folder: bytes | None) -> bool:
        """Whether the replayed log changes the folder (it is then put together whole)."""
        overlay = self.overlays.get(scope)
        return not folder or overlay is not None and (b"/".join(parts[1:]) in overlay.children
                                                      or overlay.is_wiped(b"/".join(parts[1:])))

    def page(self, stored: StoredSnapshot, sub: str | None, offset: int, limit: int
             ) -> tuple[_Resolved, int, Tree]:
        """Entries `offset` to `offset + limit` of the folder `sub` names, and how many it
        holds: only those are decoded (Tree.page), unless the replayed log changes the
        folder (then it is put together whole). NotFound if `sub` is not a folder."""
        found, folder = self.folder(stored, sub)
        if self._replayed(found.scope, found.parts, folder):
            whole = self._tree(found.scope, found.parts, folder)
            return found, len(whole.entries), Tree(whole.entries[offset:offset + limit])
        try:
            total, tree = Tree.page(self.repo.read_blob_blocking(folder, found.scope),
                                    offset, limit, f"tree {folder.hex()[:12]}")
        except IntegrityError as exc:
            raise IntegrityError(f"{self._shown(found.parts)}/: {exc}") from None
        return found, total, tree

    def entries(self, scope: str, parts: Parts, folder: bytes | None, batch: int = 1000,
                keep: bool = False) -> Iterator[TreeEntry]:
        """The entries of the folder whose tree is `folder` at `parts`, decoded `batch` at a
        time (Tree.page), so a folder of any size is walked in the memory of its stored
        bytes, its names and one batch; whole if the replayed log changes it. With `keep`,
        the stored listing is kept for the restore's walk (_tree), room permitting.
        Blocking."""
        if self._replayed(scope, parts, folder):
            yield from self._tree(scope, parts, folder).entries
            return
        assert folder is not None
        data = self.repo.read_blob_blocking(folder, scope)
        if keep and self._planned_tree_bytes + len(data) <= PLANNED_TREE_BYTES:
            self._planned_trees[scope, folder] = data
            self._planned_tree_bytes += len(data)
        what = f"tree {folder.hex()[:12]}"
        seen: set[bytes] = set()   # a name twice across batches is damage, as in one
        offset, total = 0, 1
        while offset < total:
            try:
                total, tree = Tree.page(data, offset, batch, what)
                names = [e.name for e in tree.entries]
                if not seen.isdisjoint(names):
                    twice = next(n for n in names if n in seen)
                    raise IntegrityError(f"{what} is malformed: entry name {_show(twice)!r} "
                                         "is there twice")
            except IntegrityError as exc:
                raise IntegrityError(f"{self._shown(parts)}/: {exc}") from None
            seen.update(names)
            yield from tree.entries
            offset += batch

    def content(self, scope: str, entry: TreeEntry) -> Iterator[bytes | bytearray | memoryview]:
        """The bytes of a file of source `scope`, read, authenticated and decoded piece by
        piece as restore writes them (blocking: iterate in a thread)."""
        assert entry.type == FILE
        return self._content(scope, entry, {})

    def listing(self, scope: str, parts: Parts, entry: TreeEntry) -> Tree:
        """The folder `entry` at `parts` (source name first), with the replayed log on top."""
        return self._tree(scope, parts, entry.subtree)

    # ---- conflicts -----------------------------------------------------------------------

    def _conflicts(self, res: _Resolved, out: list[str]) -> None:
        fd = os.dup(self._root_fd)
        try:
            for i in range(1, len(res.parts)):  # the folders above the selection
                try:
                    st = os.stat(res.parts[i - 1], dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    return  # nothing below can exist either
                if not statmod.S_ISDIR(st.st_mode):
                    out.append(self._shown(res.parts[:i]))
                    return
                child = self._open_dir(fd, res.parts[:i])
                os.close(fd)
                fd = child
            self._conflicts_in(res.scope, res.entry, res.tree, fd, res.parts, out)
        finally:
            os.close(fd)

    def _conflicts_in(self, scope: str, entry: TreeEntry | None, tree: Tree | None,
                      dir_fd: int, parts: Parts, out: list[str]) -> None:
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return  # nothing below can exist either
        if entry is None or entry.type == DIR:
            if not statmod.S_ISDIR(st.st_mode):
                out.append(self._shown(parts))
                return
            assert tree is not None
            fd = self._open_dir(dir_fd, parts)
            try:
                for e in tree.entries:
                    sub = None
                    if e.type == DIR:
                        try:
                            sub = self._tree(scope, parts + (e.name,), e.subtree)
                        except IntegrityError:
                            continue  # damaged: the restore itself names it
                    self._conflicts_in(scope, e, sub, fd, parts + (e.name,), out)
            finally:
                os.close(fd)
        elif entry.type == FILE and _complete(entry, st):
            return
        elif entry.type == SYMLINK and statmod.S_ISLNK(st.st_mode) \
                and os.readlink(name, dir_fd=dir_fd) == entry.target:
            return
        elif entry.type in SPECIAL_TYPES and fsmeta.special_matches(st, entry):
            return
        else:
            out.append(self._shown(parts))

    # ---- writing files (in worker threads or forked processes) ---------------------------

    def _write_file(self, dir_fd: int, scope: str, entry: TreeEntry, fresh: bool,
                    bundles: dict[bytes, bytes | bytearray]
                    ) -> tuple[int, list[list] | None, list[str]]:
        """Write one file under a temporary name, set its metadata, rename it into place.

        Returns the bytes written, if it was kept damaged its zeroed ranges, and the extended
        attributes that could not be set. `fresh`: its directory was made by this restore, so
        nothing else can be in the way and the owner is already ours. Syscalls are kept few:
        reads of neighbouring chunks and writes of decoded ones are coalesced. `bundles` keeps
        the last bundle read, for the neighbours that share it.
        """
        tmp = _tmp_name(entry.name)
        mode = statmod.S_IMODE(entry.mode)
        fd = _new_file(dir_fd, tmp, mode & 0o777)
        damage = None
        xattrs_failed: list[str] = []
        write = fsmeta.write_sparse if entry.sparse else self._write_stream
        try:
            try:
                written = write(fd, self._content(scope, entry, bundles))
            except IntegrityError:
                if not self.keep_damaged:
                    raise
                os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, 0)
                damage = []
                written = write(fd, self._salvaged(scope, entry, damage))
            if written != entry.size:
                raise IntegrityError(f"the snapshot's chunks hold {written} bytes, its entry "
                                     f"says {entry.size}")
            if self._as_root and not (fresh and (entry.uid, entry.gid) == self._ids):
                os.fchown(fd, entry.uid, entry.gid)
            if entry.xattrs:  # after the owner: chown drops security.capability
                xattrs_failed = fsmeta.apply_xattrs(fd, entry)
            if not fresh or mode != (mode & 0o777 & ~self._umask):
                os.fchmod(fd, mode)
            os.utime(fd, ns=(entry.mtime_ns, entry.mtime_ns))
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
            raise
        os.close(fd)
        os.rename(tmp, entry.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return written, damage, xattrs_failed

    @staticmethod
    def _write_stream(fd: int, chunks: Iterator[bytes | bytearray | memoryview]) -> int:
        written = 0
        pending: list[bytes | bytearray | memoryview] = []
        pending_bytes = 0
        for data in chunks:
            pending.append(data)
            pending_bytes += len(data)
            if pending_bytes >= WRITE_BATCH:
                written += _write_all(fd, pending)
                pending, pending_bytes = [], 0
        if pending:
            written += _write_all(fd, pending)
        return written

    def _content(self, scope: str, entry: TreeEntry, bundles: dict[bytes, bytes | bytearray]
                 ) -> Iterator[bytes | bytearray | memoryview]:
        """A file's bytes: its chunks, or its part of the bundle it shares with neighbours."""
        if entry.offset is None:
            return self._chunks(scope, entry.chunks)
        return iter((self._part(scope, entry, bundles),))

    def _part(self, scope: str, entry: TreeEntry, bundles: dict[bytes, bytes | bytearray]
              ) -> memoryview:
        """A bundled file's bytes (TreeEntry.offset); the bundle is read once for all of them."""
        assert entry.offset is not None
        cid = entry.chunks[0]
        data = bundles.get(cid)
        if data is None:
            data = self.repo.read_blob_blocking(cid, scope)
            bundles.clear()  # a folder's files are restored in the order they were bundled
            bundles[cid] = data
        end = entry.offset + entry.size
        if end > len(data):
            raise IntegrityError(f"its bytes end at {end}, beyond its bundle "
                                 f"{cid.hex()[:12]} ({len(data)} bytes)")
        return memoryview(data)[entry.offset:end]

    def _chunks(self, scope: str, ids: tuple[bytes, ...]) -> Iterator[bytes | bytearray]:
        """Decoded, authenticated chunks of source `scope`; neighbours in the same pack are
        read in one go."""
        repo = self.repo
        i = 0
        later = None   # the located chunk that ended the last run
        while i < len(ids):
            first = later or repo.locate(ids[i])
            run, later = [(ids[i], first)], None
            j, end = i + 1, first.offset + first.length
            while j < len(ids) and end - first.offset < READ_BATCH:
                loc = repo.locate(ids[j])
                if loc.pack != first.pack or loc.offset != end:
                    later = loc
                    break
                run.append((ids[j], loc))
                end += loc.length
                j += 1
            try:
                sealed = repo.read_spans_blocking(f"packs/{first.pack}",
                                                  [(loc.offset, loc.length) for _, loc in run])
            except NotFound:
                raise IntegrityError(f"pack {first.pack[:12]} is missing from the store") from None
            for (cid, loc), blob in zip(run, sealed):
                yield repo.decode_blob(cid, loc, blob, scope)
            i = j

    def _salvaged(self, scope: str, entry: TreeEntry, damage: list[list]
                  ) -> Iterator[bytes | bytearray | memoryview]:
        """The file's chunks one by one, zeros in place of each that cannot be read.

        Each zeroed range is noted in `damage` as [start, end, why]. A chunk no pack holds has
        no known length: one run of such chunks fills what the others leave of the file's
        size; more runs than one cannot be placed (IntegrityError).
        """
        if entry.offset is not None:  # a bundled file is read whole or not at all
            try:
                yield self._part(scope, entry, {})
                return
            except IntegrityError as exc:
                _note_damage(damage, 0, entry.size, str(exc))
                yield from _zeros(entry.size)
                return
        repo = self.repo
        locs = []
        missing = ""
        for cid in entry.chunks:
            try:
                locs.append(repo.locate(cid))
            except IntegrityError as exc:
                locs.append(None)
                missing = missing or str(exc)
        runs = sum(1 for i, loc in enumerate(locs)
                   if loc is None and (i == 0 or locs[i - 1] is not None))
        unplaced = entry.size - sum(loc.raw_length for loc in locs if loc is not None)
        if runs > 1 or unplaced < 0:
            raise IntegrityError(f"{missing}; and its other missing chunks cannot be placed")
        offset = 0
        for i, (cid, loc) in enumerate(zip(entry.chunks, locs)):
            if loc is None:
                if i and locs[i - 1] is None:
                    continue  # the run was zeroed at its first chunk
                length, why = unplaced, missing
            else:
                try:
                    data = repo.read_blob_blocking(cid, scope)
                except IntegrityError as exc:
                    length, why = loc.raw_length, str(exc)
                else:
                    offset += len(data)
                    yield data
                    continue
            _note_damage(damage, offset, length, why)
            offset += length
            yield from _zeros(length)

    def _write_files(self, dir_parts: Parts, jobs: list[tuple[TreeEntry, bool]]) -> _BatchResult:
        """Write a batch of files of one directory (in a worker thread or forked process)."""
        dir_fd = self._chain().open(dir_parts)
        result = _BatchResult()
        scope = os.fsdecode(dir_parts[0])  # a directory's parts start with its source
        bundles: dict[bytes, bytes | bytearray] = {}
        for entry, fresh in jobs:
            try:
                n, damage, xattrs_failed = self._write_file(dir_fd, scope, entry, fresh,
                                                            bundles)
            except IntegrityError as exc:
                result.failed.append(f"{self._shown(dir_parts + (entry.name,))}: not "
                                     f"restored: {exc}")
                continue
            result.files += 1
            result.bytes += n
            result.notes += _xattrs_not_set(self._shown(dir_parts + (entry.name,)),
                                            xattrs_failed)
            if damage:
                ranges = ", ".join(f"{start}-{end - 1}" for start, end, _ in damage)
                result.damaged.append(f"{self._shown(dir_parts + (entry.name,))}: restored "
                                      f"with bytes {ranges} zeroed: {damage[0][2]}")
        return result

    def _batch_done(self, fut: cf.Future) -> None:
        self._slots.release()
        if not fut.cancelled() and fut.exception() is None:
            result: _BatchResult = fut.result()
            with self._lock:
                self.summary.files_restored += result.files
                self.summary.bytes += result.bytes
            self.progress.files += result.files + len(result.failed)
            self.progress.bytes += result.bytes
            self._report(result.failed, result.damaged)
            for message in result.notes:
                self.note(message)

    def _submit(self, dir_parts: Parts, jobs: list[tuple[TreeEntry, bool]]) -> cf.Future:
        self._slots.acquire()
        assert self._pool is not None
        self.progress.current = self._shown(dir_parts + (jobs[0][0].name,))
        # A forked worker finds the restorer it inherited (a bound method would be pickled).
        work = self._write_files if isinstance(self._pool, cf.ThreadPoolExecutor) else _worker_job
        fut = self._pool.submit(work, dir_parts, jobs)
        fut.add_done_callback(self._batch_done)
        return fut

    def _want_processes(self) -> bool:
        if self._processes is not None:
            return self._processes
        # Only a store with a blocking fast path can be read from a forked child (a peer or
        # S3 store runs on the parent's event loop, which the child does not have).
        return self.workers > 1 and self.progress.expected_bytes >= PROCESS_MIN_BYTES \
            and self.repo.store.capabilities.blocking

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

    # ---- making entries (in the walking thread) ------------------------------------------

    def _prepare_dir(self, parent_fd: int, parts: Parts) -> tuple[int, bool]:
        """A handle on the writable directory `parts` in `parent_fd`; True if made here."""
        name = parts[-1]
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
            return self._open_dir(parent_fd, parts), True
        except FileExistsError:
            pass
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        if not statmod.S_ISDIR(st.st_mode):
            if not self.overwrite:
                raise RestoreConflict(f"{self._shown(parts)} exists and is not a directory; "
                                      "pass --overwrite to replace it")
            os.unlink(name, dir_fd=parent_fd)  # a symlink is replaced, never followed
            os.mkdir(name, 0o700, dir_fd=parent_fd)
            return self._open_dir(parent_fd, parts), True
        fd = self._open_dir(parent_fd, parts)
        st = os.fstat(fd)
        if st.st_mode & 0o700 != 0o700:
            os.fchmod(fd, statmod.S_IMODE(st.st_mode) | 0o700)
        return fd, False

    def _open_above(self, parts: Parts) -> int:
        """A handle on the folder `parts` (made, as the folders above it, if missing)."""
        fd = os.dup(self._root_fd)
        for i in range(1, len(parts) + 1):
            try:
                child, _ = self._prepare_dir(fd, parts[:i])
            finally:
                os.close(fd)
            fd = child
        return fd

    def _restore_folder(self, scope: str, entry: TreeEntry | None, tree: Tree | None,
                        parent_fd: int, parts: Parts, pending: _InFlight,
                        dir_meta: list[tuple[Parts, TreeEntry]]) -> None:
        if tree is None:
            assert entry is not None
            try:
                tree = self._tree(scope, parts, entry.subtree)
            except IntegrityError as exc:
                self._report([f"{self._shown(parts)}/: not restored: {exc}"], [])
                return
        fd, made = self._prepare_dir(parent_fd, parts)
        try:
            self._restore_dir(scope, tree, fd, parts, made, pending, dir_meta)
        finally:
            os.close(fd)
        if entry is not None:
            dir_meta.append((parts, entry))

    def _restore_entry(self, scope: str, e: TreeEntry, dir_fd: int, parts: Parts, fresh: bool,
                       pending: _InFlight, dir_meta: list[tuple[Parts, TreeEntry]]
                       ) -> None:
        """Make entry `e` as parts[-1] in the directory `dir_fd` (files go to the writers)."""
        if e.type == DIR:
            self.summary.dirs += 1
            self._restore_folder(scope, e, None, dir_fd, parts, pending, dir_meta)
        elif e.type == SYMLINK:
            self._restore_symlink(dir_fd, e, parts, fresh)
        elif e.type in SPECIAL_TYPES:
            self._restore_special(dir_fd, e, parts, fresh)

    def _restore_dir(self, scope: str, tree: Tree, fd: int, parts: Parts, fresh: bool,
                     pending: _InFlight, dir_meta: list[tuple[Parts, TreeEntry]]) -> None:
        batch: list[tuple[TreeEntry, bool]] = []
        batch_bytes = 0
        for e in tree.entries:
            if e.type != FILE:
                self._restore_entry(scope, e, fd, parts + (e.name,), fresh, pending, dir_meta)
                continue
            if not fresh and self._skip_existing(fd, e, parts + (e.name,)):
                continue
            if e.nlink > 1:
                key = (scope, e.inode)
                first = self._links.get(key)
                if first is not None:
                    self._link(first, e, fd, parts + (e.name,))
                    continue
                fut = self._submit(parts, [(e, fresh)])
                self._links[key] = (parts + (e.name,), fut)
                pending.append(fut)
                continue
            batch.append((e, fresh))
            batch_bytes += e.size
            if len(batch) >= BATCH_FILES or batch_bytes >= BATCH_BYTES:
                pending.append(self._submit(parts, batch))
                batch, batch_bytes = [], 0
        if batch:
            pending.append(self._submit(parts, batch))

    def _skip_existing(self, dir_fd: int, e: TreeEntry, parts: Parts) -> bool:
        try:
            st = os.stat(e.name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if _complete(e, st):
            with self._lock:
                self.summary.files_skipped += 1
            self.progress.files += 1
            self.progress.bytes += e.size
            return True
        if statmod.S_ISDIR(st.st_mode):
            raise RestoreConflict(f"{self._shown(parts)} is a directory; the snapshot has a "
                                  "file there")
        return False  # --overwrite: the rename replaces it (a symlink too, never followed)

    def _link(self, first: tuple[Parts, cf.Future], e: TreeEntry, dir_fd: int,
              parts: Parts) -> None:
        src, fut = first
        if fut.result().failed:
            self._report([f"{self._shown(parts)}: not restored: it is a hard link of "
                          f"{self._shown(src)}, which could not be restored"], [])
            return
        src_fd = self._chain().open(src[:-1])
        tmp = _tmp_name(e.name)
        _unlink_quietly(dir_fd, tmp)
        os.link(src[-1], tmp, src_dir_fd=src_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        os.rename(tmp, e.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        self.summary.links += 1

    def _restore_symlink(self, dir_fd: int, e: TreeEntry, parts: Parts,
                         fresh: bool = False) -> None:
        assert e.target is not None
        if not fresh:
            try:
                if os.readlink(e.name, dir_fd=dir_fd) == e.target:
                    return
            except OSError:
                pass
        tmp = _tmp_name(e.name)
        _unlink_quietly(dir_fd, tmp)
        os.symlink(e.target, tmp, dir_fd=dir_fd)
        if self._as_root:
            os.chown(tmp, e.uid, e.gid, dir_fd=dir_fd, follow_symlinks=False)
        if e.xattrs:
            fd = os.open(tmp, os.O_PATH | os.O_NOFOLLOW, dir_fd=dir_fd)  # the link itself
            try:
                failed = fsmeta.apply_xattrs(fsmeta.proc_path(fd), e)
            finally:
                os.close(fd)
            for message in _xattrs_not_set(self._shown(parts), failed):
                self.note(message)
        os.utime(tmp, ns=(e.mtime_ns, e.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
        try:
            os.rename(tmp, e.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except IsADirectoryError:
            _unlink_quietly(dir_fd, tmp)
            raise RestoreConflict(f"{self._shown(parts)} is a directory; the snapshot has a "
                                  "symlink there") from None

    def _restore_special(self, dir_fd: int, e: TreeEntry, parts: Parts,
                         fresh: bool = False) -> None:
        """Make a FIFO or device node under a temporary name and rename it into place."""
        if not fresh:
            try:
                st = os.stat(e.name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if fsmeta.special_matches(st, e):
                    with self._lock:
                        self.summary.files_skipped += 1
                    self.progress.files += 1
                    return
                if statmod.S_ISDIR(st.st_mode):
                    raise RestoreConflict(f"{self._shown(parts)} is a directory; the snapshot "
                                          "has a special file there")
        tmp = _tmp_name(e.name)
        _unlink_quietly(dir_fd, tmp)
        try:
            failed = fsmeta.make_special(dir_fd, tmp, e, owner=self._as_root)
        except OSError as exc:
            _unlink_quietly(dir_fd, tmp)
            kind = "FIFO" if e.type == FIFO else f"device node {e.rdev[0]},{e.rdev[1]}"
            why = ("making one needs root (CAP_MKNOD)" if exc.errno == errno.EPERM
                   and e.type != FIFO else exc.strerror)
            self.warn(f"{self._shown(parts)}: {kind} not restored: {why}")
            return
        os.rename(tmp, e.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        for message in _xattrs_not_set(self._shown(parts), failed):
            self.note(message)
        with self._lock:
            self.summary.files_restored += 1
        self.progress.files += 1

    def _apply_dir_meta(self, parts: Parts, e: TreeEntry) -> None:
        fd = self._chain().open(parts)
        if self._as_root:
            os.fchown(fd, e.uid, e.gid)
        if e.xattrs:
            for message in _xattrs_not_set(self._shown(parts), fsmeta.apply_xattrs(fd, e)):
                self.note(message)
        os.fchmod(fd, statmod.S_IMODE(e.mode))
        os.utime(fd, ns=(e.mtime_ns, e.mtime_ns))

    def _plan(self, resolved: list[_Resolved]) -> None:
        """Tell the store every chunk the restore will read, before it reads any: a store
        that reads packs in windows keeps each until the last chunk read from it (files are
        written in tree order, and their chunks come from all over the packs)."""
        spans: dict[str, list[tuple[int, int]]] = {}
        count = 0
        links: set[tuple[str, int]] = set()
        for res in resolved:
            for scope, e in self._reads(res, links):
                ids = (e.subtree,) if e.type == DIR else \
                    e.chunks[:1] if e.offset is not None else e.chunks
                for cid in ids:
                    try:
                        loc = self.repo.locate(cid)
                    except IntegrityError:
                        continue   # the restore names it
                    spans.setdefault(f"packs/{loc.pack}", []).append((loc.offset, loc.length))
                    count += 1
                if count >= PLAN_BATCH:
                    self.repo.expect_spans_blocking(spans)
                    spans, count = {}, 0
        if spans:
            self.repo.expect_spans_blocking(spans)

    def _reads(self, res: _Resolved, links: set[tuple[str, int]]
               ) -> Iterator[tuple[str, TreeEntry]]:
        """The entries of a selection whose blobs the restore reads: files, and folders
        below the selection whose stored listing it reads (each after its listing was read
        here: the restore reads it once more, unless it was kept for it, entries(keep)). A
        file bundled with the one before it (its bundle is read once) and a hard link after
        the first are left out; so are folders whose listing is damaged."""
        stack: list[tuple[Parts, Iterator[TreeEntry], TreeEntry | None]] = []
        if res.entry is not None and res.entry.type == FILE:
            stack.append((res.parts[:-1], iter((res.entry,)), None))
        elif res.entry is None or res.entry.type == DIR:
            listing = res.tree.entries if res.tree is not None else ()
            stack.append((res.parts, iter(listing), None))
        bundle = None
        while stack:
            parts, entries, folder = stack[-1]
            try:
                e = next(entries, None)
            except IntegrityError:
                e, folder = None, None
            if e is None:
                stack.pop()
                if folder is not None and folder.subtree \
                        and not self._replayed(res.scope, parts, folder.subtree) \
                        and (res.scope, folder.subtree) not in self._planned_trees:
                    yield res.scope, folder   # (the walk reads it again)
                continue
            if e.type == DIR:
                stack.append((parts + (e.name,),
                              self.entries(res.scope, parts + (e.name,), e.subtree,
                                           keep=True), e))
                continue
            if e.type != FILE:
                continue
            if e.nlink > 1:
                if (res.scope, e.inode) in links:
                    continue
                links.add((res.scope, e.inode))
            if e.offset is not None:
                if e.chunks[:1] == bundle:
                    continue
                bundle = e.chunks[:1]
            yield res.scope, e

    def _run_jobs(self, resolved: list[_Resolved]) -> None:
        pending = _InFlight()
        dir_meta: list[tuple[Parts, TreeEntry]] = []
        for res in resolved:
            fd = self._open_above(res.parts[:-1])
            try:
                entry = res.entry
                if entry is None or entry.type == DIR:
                    self._restore_folder(res.scope, entry, res.tree, fd, res.parts, pending,
                                         dir_meta)
                elif entry.type != FILE:
                    self._restore_entry(res.scope, entry, fd, res.parts, False, pending,
                                        dir_meta)
                elif not self._skip_existing(fd, entry, res.parts):
                    pending.append(self._submit(res.parts[:-1], [(entry, False)]))
            finally:
                os.close(fd)
            dir_meta.extend(res.above)  # deepest first: children before parents
        pending.wait()
        for parts, e in dir_meta:  # children before parents: dir_meta is post-order
            self._apply_dir_meta(parts, e)

    def run(self) -> RestoreSummary:
        started = time.monotonic()
        self._root_fd = self._open_target()
        try:
            self._run()
        finally:
            for chain in self._chains:
                chain.close()
            os.close(self._root_fd)
        self.summary.seconds = time.monotonic() - started
        return self.summary

    def _run(self) -> None:
        global _forked
        try:
            resolved = [r for r in map(self._descend, self.selections) if r is not None]
            conflicts: list[str] = []
            if not self.overwrite:
                for res in resolved:
                    self._conflicts(res, conflicts)
        except OSError as exc:
            raise StorageError(f"restore failed: {exc}") from None
        if conflicts:
            more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
            raise RestoreConflict(f"{conflicts[0]} already exists and differs from the "
                                  f"snapshot{more}; pass --overwrite to replace")
        planned = self.repo.store.capabilities.planned_reads
        if planned:
            self._plan(resolved)
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
            if planned:   # what a failed restore did not read, or a file skipped
                self.repo.forget_expected_blocking()
        self._pool.shutdown(wait=True)


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
                  processes: bool | None = None,
                  keep_damaged: bool = False,
                  note: Callable[[str], None] | None = None) -> RestoreSummary:
    """Restore `stored` (or the part named by `sub`) into `target`/<source name>/...

    `overlays` (from pointintime.plan_at) lays replayed log changes over the snapshot.
    `processes` forces files to be written from forked worker processes (True) or threads
    (False); by default big restores from a local store use processes. Files or folders that
    cannot be restored for damage are named through `warn` and listed in the summary's
    `failed`; `keep_damaged` keeps such files with their unreadable ranges zeroed (`damaged`).
    `warn` also hears of what could not be made (device nodes without root: `warnings`),
    `note` of extended attributes the target could not keep (by default `warn` hears them).
    """
    import asyncio

    selections = select(stored, sub)
    progress = progress or RestoreProgress()
    progress.expected_bytes = sum(s.root.size for s in selections)
    restorer = Restorer(repo, selections, os.fsencode(os.path.abspath(target)),
                        overwrite=overwrite, workers=workers, progress=progress, warn=warn,
                        overlays=overlays, processes=processes, keep_damaged=keep_damaged,
                        note=note)
    return await asyncio.to_thread(restorer.run)
