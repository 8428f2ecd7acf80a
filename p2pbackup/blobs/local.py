"""A BlobStore in a local directory (a USB disk, a NAS mount, this device's own store).

Writes go to a temporary file that is fsynced, renamed into place and whose directory is then
fsynced, so a crash leaves either the old state or the whole new blob. Packs are spread over
256 sub-directories by the first two hex digits of their name.

Large page-aligned buffers (packs: PackBuilder allocates them with mmap) are written with
O_DIRECT where the file system allows it: a pack is not read again soon, and copying it into
the page cache and writing that back cost more CPU than sealing it (measured: ~0.5 s per GB,
plus the loop device's writeback in the benchmark). Durability is unchanged: O_DIRECT only
skips the cache, the fsync (or the batch's syncfs) still makes the file and its metadata safe.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import io
import itertools
import os
import threading

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]
from collections import OrderedDict
from collections.abc import AsyncIterator

import blake3

from ..buffers import aligned_buffer, fill
from ..errors import DiskFull, NotFound, StorageError
from .base import BlobStore, Buffer, StoreCapabilities

_SHARDED = ("packs/",)
_TMP_SUFFIX = ".tmp"
# At the store's root: conditional replaces (heads) of all processes and hosts writing the
# store take turns by an flock on it (NFSv4 carries flock across clients).
_REPLACE_LOCK = "replace.lock"
_CACHED = "packs/"  # the names whose files threads keep open (_open_cached)
_OPEN_FILES = 16


_O_DIRECT = getattr(os, "O_DIRECT", 0) if fcntl is not None else 0
_DIRECT_ALIGN = 4096  # buffer address, file offset and length of O_DIRECT writes
_DIRECT_MIN = 1 << 20  # smaller blobs: the page cache copy costs next to nothing


def _direct_ok(view: memoryview) -> bool:
    """Whether `view` is large, writable and page-aligned (ctypes needs a writable buffer to
    tell its address; packs are, and read-only bytes just go through the page cache)."""
    if not _O_DIRECT or len(view) < _DIRECT_MIN or view.readonly or not view.c_contiguous:
        return False
    try:
        first = ctypes.c_char.from_buffer(view)
    except (TypeError, ValueError):
        return False
    address = ctypes.addressof(first)
    del first  # releases its hold on the buffer
    return address % _DIRECT_ALIGN == 0


def join_for_direct_write(parts: list[Buffer], total: int) -> bytes | memoryview:
    """`parts` joined into one buffer `put_sync` can write with O_DIRECT (a page-aligned
    anonymous mapping) when it is large enough to gain from it; else plain bytes.

    Used for packs from peers: their page-cache copy was 29% of a receiving daemon's CPU."""
    if not _O_DIRECT or total < _DIRECT_MIN:
        return b"".join(parts)
    view = memoryview(aligned_buffer(total))
    fill(view, parts)
    return view


def _write_all(fd: int, view: memoryview, direct: bool) -> None:
    """Write all of `view` at the file's offset; with `direct` (fd opened with O_DIRECT) the
    aligned head goes without the page cache and the tail through it."""
    pos, end = 0, len(view)
    if direct:
        head = end - end % _DIRECT_ALIGN
        try:
            while pos < head:
                n = os.write(fd, view[pos:head])
                pos += n
                if n % _DIRECT_ALIGN:
                    break  # a short write left the offset unaligned: the rest is buffered
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # the file system took the open but not the write: the rest goes buffered
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
    while pos < end:
        pos += os.write(fd, view[pos:])


def _load_libc() -> ctypes.CDLL | None:
    if os.name != "posix":
        return None
    try:  # the C library is already loaded: no search (find_library runs ldconfig)
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover
        from ctypes.util import find_library

        return ctypes.CDLL(find_library("c"), use_errno=True)


_libc = _load_libc()
_SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file out now, without waiting (Linux only)."""
    fn = getattr(_libc, "sync_file_range", None)
    if fn is not None:
        fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
        fn(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def _fsync_dir(directory: str) -> None:
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _check_name(name: str) -> None:
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid blob name {name!r}")


def _pread(fd: int, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` (from the end when negative)."""
    if offset < 0:
        offset = max(0, os.fstat(fd).st_size + offset)
    return os.pread(fd, length, offset)


class LocalDirStore(BlobStore):
    """Blobs as files under one directory."""

    # Not create_only: a damaged pack is healed by writing an intact copy over it.
    # conditional_replace: a tag is the BLAKE3 of the content, compared and replaced under
    # an flock (a directory two devices upload to: a NAS mount).
    # overwrite: every put is a complete temporary file renamed over the name (os.replace).
    capabilities = StoreCapabilities(create_only=False, ranged_reads=True, cheap_listing=True,
                                     blocking=True, local_disk=True,
                                     conditional_replace=fcntl is not None, overwrite=True)

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.location = self.root
        self._local = threading.local()
        # Bumped when a name is deleted or replaced: cached open files of other threads may
        # then be of the old file (a damaged pack healed by an intact copy of the same name).
        self._bumps = itertools.count(1)   # next() on it is atomic: no lost update
        self._replaced = 0

    def path_of(self, name: str) -> str:
        _check_name(name)
        for prefix in _SHARDED:
            if name.startswith(prefix):
                rest = name[len(prefix):]
                return os.path.join(self.root, prefix, rest[:2], rest)
        return os.path.join(self.root, *name.split("/"))

    def _error(self, exc: OSError, name: str) -> Exception:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiskFull(self.root)
        return StorageError(f"cannot access {name!r} in {self.root}: {exc.strerror or exc}")

    def put_sync(self, name: str, data: Buffer, *, durable: bool = True) -> None:
        """The blocking body of `put`, also used from worker threads.

        With durable=False the blob is still atomic (rename of a complete file) but its fsync
        is left to `sync_sync`; writeback starts at once, so that later sync is short.
        """
        path = self.path_of(name)
        directory = os.path.dirname(path)
        tmp = f"{path}.{os.getpid()}.{id(data):x}{_TMP_SUFFIX}"
        try:
            os.makedirs(directory, exist_ok=True)
            view = memoryview(data)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            direct = _direct_ok(view)
            try:
                fd = os.open(tmp, flags | _O_DIRECT if direct else flags, 0o600)
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
                direct = False  # no O_DIRECT on this file system (tmpfs, some FUSE)
                fd = os.open(tmp, flags, 0o600)
            try:
                _write_all(fd, view, direct)
                view.release()
                if durable:
                    os.fsync(fd)
                else:
                    _start_writeback(fd)
            finally:
                os.close(fd)
            # Threads keep packs open for range reads: a pack replaced in place (healed) must
            # be read anew. Only packs: heads are replaced at every seal, and a stat per put
            # and a flush of every thread's open packs each time would cost the hot path.
            replaced = name.startswith(_CACHED) and os.path.exists(path)
            os.replace(tmp, path)
            if replaced:
                self._replaced = next(self._bumps)
            if durable:
                _fsync_dir(directory)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise self._error(exc, name) from None

    async def put(self, name: str, data: Buffer) -> None:
        await asyncio.to_thread(self.put_sync, name, data)

    async def overwrite(self, name: str, data: Buffer) -> None:
        await self.put(name, data)

    def sync_sync(self) -> None:
        """syncfs() the file system holding the store: every earlier put becomes durable."""
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise self._error(exc, "(sync)") from None
        try:
            if _libc is not None and hasattr(_libc, "syncfs"):
                if _libc.syncfs(fd) != 0:
                    err = ctypes.get_errno()
                    raise self._error(OSError(err, os.strerror(err)), "(sync)")
            else:
                os.sync()
        finally:
            os.close(fd)

    async def sync(self) -> None:
        await asyncio.to_thread(self.sync_sync)

    def get_sync(self, name: str) -> bytes:
        try:
            with open(self.path_of(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"{name} is missing from the store at {self.root}") from None
        except OSError as exc:
            raise self._error(exc, name) from None

    async def get(self, name: str) -> bytes:
        return await asyncio.to_thread(self.get_sync, name)

    async def get_tagged(self, name: str) -> tuple[bytes, str]:
        data = await self.get(name)
        return data, blake3.blake3(data).hexdigest()

    def _replace_if_sync(self, name: str, data: Buffer, tag: str | None) -> bool:
        try:
            os.makedirs(self.root, exist_ok=True)
            fd = os.open(os.path.join(self.root, _REPLACE_LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise self._error(exc, _REPLACE_LOCK) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                held: str | None = blake3.blake3(self.get_sync(name)).hexdigest()
            except NotFound:
                held = None
            if held != tag:
                return False
            self.put_sync(name, data)
            return True
        finally:
            os.close(fd)   # (and the lock with it)

    async def replace_if(self, name: str, data: Buffer, tag: str | None) -> bool:
        return await asyncio.to_thread(self._replace_if_sync, name, data, tag)

    def _open_cached(self, name: str) -> int:
        # Restores read many small ranges of the same packs: keep a few files open per thread
        # (per thread, so no other thread can close an fd while it is being read).
        cache: OrderedDict[str, io.FileIO] | None = getattr(self._local, "files", None)
        if cache is not None and self._local.replaced != self._replaced:
            for f in cache.values():
                f.close()
            cache = None
        if cache is None:
            cache = self._local.files = OrderedDict()
            self._local.replaced = self._replaced
        f = cache.get(name)
        if f is not None:
            cache.move_to_end(name)
            return f.fileno()
        f = io.FileIO(self.path_of(name), "r")
        cache[name] = f
        if len(cache) > _OPEN_FILES:
            cache.popitem(last=False)[1].close()
        return f.fileno()

    def _forget_cached(self, name: str) -> None:
        cache = getattr(self._local, "files", None)
        if cache and name in cache:
            cache.pop(name).close()

    def get_range_sync(self, name: str, offset: int, length: int) -> bytes:
        try:
            if name.startswith(_CACHED):
                return _pread(self._open_cached(name), offset, length)
            with io.FileIO(self.path_of(name), "r") as f:  # kept open only for packs (put_sync)
                return _pread(f.fileno(), offset, length)
        except FileNotFoundError:
            raise NotFound(f"{name} is missing from the store at {self.root}") from None
        except OSError as exc:
            raise self._error(exc, name) from None

    async def get_range(self, name: str, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(self.get_range_sync, name, offset, length)

    async def has(self, name: str) -> bool:
        return os.path.exists(self.path_of(name))

    async def size(self, name: str) -> int:
        try:
            return os.stat(self.path_of(name)).st_size
        except FileNotFoundError:
            raise NotFound(f"{name} is missing from the store at {self.root}") from None

    def list_sync(self, prefix: str = "") -> list[str]:
        out: list[str] = []
        if prefix.startswith(("/", "./", "../")) or prefix in (".", ".."):
            return out   # names never start so (a peer's list prefix must not climb out)
        top = prefix.split("/", 1)[0] if "/" in prefix else ""
        start = os.path.join(self.root, top) if top else self.root
        for dirpath, dirnames, filenames in os.walk(start):
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            for fn in filenames:
                if fn.endswith(_TMP_SUFFIX) or fn in ("lock", _REPLACE_LOCK):
                    continue
                name = rel + fn
                for sharded in _SHARDED:  # packs/ab/abcd... is named packs/abcd...
                    if name.startswith(sharded) and name.count("/") == 2:
                        name = sharded + fn
                if name.startswith(prefix):
                    out.append(name)
        return out

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        for name in await asyncio.to_thread(self.list_sync, prefix):
            yield name

    async def delete(self, name: str) -> None:
        self._forget_cached(name)
        try:
            os.unlink(self.path_of(name))
            if name.startswith(_CACHED):
                self._replaced = next(self._bumps)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error(exc, name) from None

    def remove_temp_files(self) -> int:
        """Delete temporary files left by a writer that was killed; call under the writer lock."""
        removed = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for fn in files:
                if fn.endswith(_TMP_SUFFIX):
                    try:
                        os.unlink(os.path.join(dirpath, fn))
                        removed += 1
                    except OSError:
                        pass
        return removed
