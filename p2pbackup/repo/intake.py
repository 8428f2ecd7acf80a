"""Packs from peers, checked and written by worker processes.

A receiving daemon hashes every pack whole and decrypts, decompresses and hashes each of its
blobs before it stores it. On threads, that work fought the event loop (which receives the
next packs) for the GIL: a fifth of the loop's time went on futex waits and wake-ups. Here the
daemon joins a pack's parts into shared memory (a memfd, reused for the next pack) and a worker
process (`python -m p2pbackup.repo.intake`) maps it through /proc, checks it and writes it into
the store; the daemon only receives, reads the trailer and indexes.

Requests and replies are msgpack maps on the worker's stdin and stdout, each with "v"
(version); a worker that dies fails its requests with one StorageError line, and the next
request starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import signal
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgpack

from ..buffers import fill
from ..errors import DiskFull, IntegrityError, NameMismatch, P2PError, StorageError

VERSION = 1
FAILURES = 3
log = logging.getLogger("p2pbackup")
_MiB = 1 << 20
_ERRORS: dict[str, type[P2PError]] = {"IntegrityError": IntegrityError,
                                      "NameMismatch": NameMismatch,
                                      "StorageError": StorageError, "DiskFull": DiskFull}


class _WorkerDied(StorageError):
    """A worker ended with this request unanswered."""


class _Shared(mmap.mmap):
    """A memfd mapped shared: workers open it as /proc/<pid>/fd/<fd>."""

    fd: int
    capacity: int

    def drop(self) -> None:
        with contextlib.suppress(BufferError):   # a view still held: the GC unmaps it
            self.close()
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:   # a pack dropped before `take` (a session that ended)
        if getattr(self, "fd", -1) >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _shared(capacity: int) -> _Shared:
    fd = os.memfd_create("p2pbackup-pack", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, capacity)
        buf = _Shared(fd, capacity, flags=mmap.MAP_SHARED,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    buf.fd, buf.capacity = fd, capacity
    return buf


def available() -> bool:
    """Whether this system has what the workers need (memfd, /proc)."""
    return hasattr(os, "memfd_create") and os.path.isdir(f"/proc/{os.getpid()}/fd")


@dataclass
class _Worker:
    proc: asyncio.subprocess.Process
    pending: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None
    why: str = "ended"       # how it ended, once it has


class PackIntake:
    """Worker processes that check packs and write them into the store at `root`."""

    def __init__(self, root: str, *, workers: int = 2, keep: int = 3,
                 idle: float = 30.0) -> None:
        self.root = root
        self.workers = workers
        self.keep = keep                 # free buffers kept for the next packs
        self.idle = idle                 # seconds without packs before workers and buffers go
        self._idle_timer: asyncio.TimerHandle | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._free: list[_Shared] = []
        self._in_use: dict[int, _Shared] = {}   # id of the view `join` gave -> its buffer
        self._workers: list[_Worker] = []
        self._serial = 0
        self._closed = False
        self._starting = asyncio.Lock()
        self._failures = 0               # workers that died with work, in a row

    # ---- shared buffers -------------------------------------------------------------------

    def join(self, parts: Iterable[bytes | memoryview], total: int) -> memoryview:
        """The parts of a pack, one after the other, in a shared buffer (a view of `total`
        bytes; give it to `take`, which frees the buffer for the next pack)."""
        fits = [b for b in self._free if b.capacity >= total]
        if fits:
            buf = min(fits, key=lambda b: b.capacity)
            self._free.remove(buf)
        else:
            buf = _shared(max(-(-total // _MiB) * _MiB, _MiB))
        view = memoryview(buf)[:total]
        self._in_use[id(view)] = buf
        try:
            fill(view, parts)
        except ValueError:
            self.release(view)
            raise
        return view

    def owns(self, data: object) -> bool:
        """Whether `data` is a view `join` made (so a worker can read it)."""
        return isinstance(data, memoryview) and self._in_use.get(id(data)) is data.obj

    def release(self, data: object) -> None:
        """Free the buffer of a view `join` made for the next pack (once: a second call, or
        one with another view, does nothing)."""
        if not self.owns(data):
            return
        buf = self._in_use.pop(id(data))
        if self._closed or len(self._free) >= self.keep:
            buf.drop()
        else:
            self._free.append(buf)

    # ---- workers --------------------------------------------------------------------------

    async def take(self, name: str, data: memoryview, expect: str,
                   blobs: list[tuple[int, bytes, int, int, int]],
                   keys: tuple[bytes, bytes] | None, what: str) -> None:
        """Check the pack in `data` (from `join`) and store it as `name`, not yet fsynced: its
        BLAKE3 must be `expect` and each blob (kind, id, offset, length, raw length) decrypt to
        its raw length and hash to its id under `keys` (data key, id key; None: ciphertext
        kept unchecked). Raises IntegrityError or StorageError; the buffer is freed either
        way."""
        buf = data.obj
        assert self.owns(data) and isinstance(buf, _Shared)
        size = len(data)
        try:
            for _ in range(FAILURES):
                worker = await self._worker()
                self._serial += 1
                rid = self._serial
                req = {"v": VERSION, "id": rid, "root": self.root, "name": name,
                       "path": f"/proc/{os.getpid()}/fd/{buf.fd}", "size": size,
                       "hash": expect, "blobs": blobs, "keys": list(keys) if keys else None,
                       "what": what}
                done = asyncio.get_running_loop().create_future()
                worker.pending[rid] = done
                assert worker.proc.stdin is not None and worker.reader is not None
                worker.proc.stdin.write(msgpack.packb(req, use_bin_type=True))
                try:
                    await worker.proc.stdin.drain()
                except (ConnectionError, BrokenPipeError):
                    pass   # the reader fails `done` with the worker's exit
                await asyncio.wait([done, worker.reader], return_when=asyncio.FIRST_COMPLETED)
                if done.done():
                    try:
                        await done   # raises what the worker found in the pack
                        return
                    except _WorkerDied:
                        pass     # it died while it held the pack, or before it read it
                else:    # it had ended (not yet reaped) before the request was queued
                    worker.pending.pop(rid, None)
                    self._failed(worker.why)
                # The pack is not to blame for a worker's death (as far as we know): another
                # worker takes it, until workers failed FAILURES times in a row.
                if not self.usable:
                    break
            raise StorageError(self._lost(worker.why))
        finally:
            self.release(data)
            self._rearm()

    def _rearm(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if not self._closed:
            self._idle_timer = asyncio.get_running_loop().call_later(self.idle, self._retire)

    def _retire(self) -> None:
        """No pack for `idle` seconds: an idle daemon keeps neither workers nor buffers (the
        next pack starts them again, in a fraction of a second)."""
        self._idle_timer = None
        if self._in_use or any(w.pending for w in self._workers):
            self._rearm()
            return
        for buf in self._free:
            buf.drop()
        self._free = []
        for w in self._workers:
            if w.proc.stdin is not None:
                w.proc.stdin.close()      # it ends after its stdin does
            if w.reader is not None:
                self._retiring.add(w.reader)
                w.reader.add_done_callback(self._retiring.discard)
        self._workers = []

    async def _worker(self) -> _Worker:
        async with self._starting:   # two packs at once must not start four workers
            if self._closed:
                raise StorageError("the daemon is stopping: the pack was not stored")
            self._workers = [w for w in self._workers if w.proc.returncode is None
                             and (w.reader is None or not w.reader.done())]
            while len(self._workers) < self.workers:
                self._workers.append(await self._start())
        return min(self._workers, key=lambda w: len(w.pending))

    async def _start(self) -> _Worker:
        import p2pbackup

        env = dict(os.environ)
        top = os.path.dirname(os.path.dirname(os.path.abspath(p2pbackup.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (top, env.get("PYTHONPATH")) if p)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "p2pbackup.repo.intake", str(os.getpid()),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env)
        worker = _Worker(proc)
        worker.reader = asyncio.get_running_loop().create_task(self._replies(worker))
        return worker

    async def _replies(self, worker: _Worker) -> None:
        assert worker.proc.stdout is not None
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=1 << 20)
        why = "ended"
        try:
            while chunk := await worker.proc.stdout.read(65536):
                unpacker.feed(chunk)
                for reply in unpacker:
                    if not isinstance(reply, dict) or reply.get("v") != VERSION:
                        continue
                    done = worker.pending.pop(reply.get("id"), None)
                    if done is None or done.done():
                        continue
                    if reply.get("error"):
                        kind = _ERRORS.get(reply.get("kind"), StorageError)
                        done.set_exception(kind(str(reply["error"])[:500]))
                    else:
                        done.set_result(None)
                    self._failures = 0
            why = f"ended (exit status {await worker.proc.wait()})"
        except (ValueError, msgpack.ExtraData) as exc:   # its replies are garbage
            worker.proc.kill()
            why = f"answered nonsense ({exc})"
        finally:
            if worker.pending:
                self._failed(why)
            worker.why = why
            for done in worker.pending.values():
                if not done.done():
                    done.set_exception(_WorkerDied(self._lost(why)))
            worker.pending.clear()

    @staticmethod
    def _lost(why: str) -> str:
        return f"the process checking packs from peers {why}; the pack was not stored"

    def _failed(self, why: str) -> None:
        self._failures += 1
        if self._failures == FAILURES:
            log.warning("the processes checking packs from peers keep failing (the last %s); "
                        "packs are checked in the daemon's own process from now on", why)

    @property
    def usable(self) -> bool:
        """False once workers failed FAILURES times in a row (then packs are checked in this
        process, as without workers)."""
        return self._failures < FAILURES

    async def close(self) -> None:
        """Stop the workers (after what they are doing) and free the buffers."""
        self._closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for w in self._workers:
            if w.proc.stdin is not None:
                w.proc.stdin.close()
        for w in self._workers:
            try:
                await asyncio.wait_for(w.proc.wait(), 10)
            except asyncio.TimeoutError:
                w.proc.kill()
                await w.proc.wait()
            if w.reader is not None:
                await asyncio.gather(w.reader, return_exceptions=True)
        self._workers = []
        for buf in self._free + list(self._in_use.values()):
            buf.drop()
        self._free, self._in_use = [], {}


# ---- the worker process ---------------------------------------------------------------------

def _take(req: dict) -> None:
    from ..blobs.local import LocalDirStore
    from ..format.pack import check_pack_blobs, pack_name

    size, what = int(req["size"]), str(req["what"])
    fd = os.open(req["path"], os.O_RDWR)
    try:
        buf = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        view = memoryview(buf)
        if pack_name(view) != req["hash"]:
            raise NameMismatch(f"{what}: its content does not match its name")
        if req["keys"]:
            data_key, id_key = req["keys"]
            check_pack_blobs(view, (tuple(b) for b in req["blobs"]), data_key, id_key, what)
        LocalDirStore(req["root"]).put_sync(req["name"], view, durable=False)
        view.release()
    finally:
        with contextlib.suppress(BufferError):   # views held by a traceback: the GC unmaps
            buf.close()


def main(argv: list[str]) -> int:
    """Serve requests on stdin until it closes (the daemon stopped or died)."""
    parent = int(argv[1]) if len(argv) > 1 else os.getppid()
    with contextlib.suppress(Exception):   # die with the daemon, even on kill -9 (Linux)
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the daemon's to handle
    out = sys.stdout.buffer
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 << 20)
    while chunk := os.read(0, 1 << 20):   # not stdin.buffer: its read(n) waits for n bytes
        unpacker.feed(chunk)
        for req in unpacker:
            _serve(req, out)
    return 0


def _serve(req: object, out) -> None:
    if isinstance(req, dict) and req.get("v") == VERSION:
        reply: dict = {"v": VERSION, "id": req.get("id")}
        try:
            _take(req)
        except P2PError as exc:
            reply.update(error=str(exc), kind=type(exc).__name__)
        except Exception as exc:   # a bad request must not end the worker
            reply.update(error=f"checking {str(req.get('what'))[:80]} failed: {exc}",
                         kind="StorageError")
        out.write(msgpack.packb(reply, use_bin_type=True))
        out.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
