"""Uploading this device's store to a configured store (`[[stores]]` in config.toml).

Every object of the local store that the remote lacks is put there: immutable objects once
(never replaced), the mutable ones (heads, log anchors) only by newer ones. Objects go in
the order a peer sends them (packs before the snapshots and segments naming them) with a
barrier between kinds, and heads last: a reader of the store never sees a head whose
objects are missing. What was uploaded is noted per store in SQLite, so a restarted daemon
diffs the local listing (cheap) against it instead of listing the remote (paid per request);
the remote is listed only at first contact. Failures are retried with exponential backoff
and jitter; a token bucket caps the bandwidth. Time, sleeping and randomness are injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import blake3

from .. import activity, ids
from ..blobs.base import BlobStore, ObjectExists
from ..config import StoreSettings
from ..errors import ConfigError, IntegrityError, NotFound, P2PError, StorageError, StoreFailed
from ..format.log import check_head_update
from ..format.membership import OWNER
from ..format.pack import pack_name
from ..format.roster import PREFIX as ROSTER_PREFIX
from ..format.roster import roster_name
from . import membership as store_membership
from . import roster
from .index import noted_damage
from .logstore import LogStore
from .partner_store import role_refusal
from .replica import ORDER, offered_names
from .repository import Repository, store_index_path

log = logging.getLogger("p2pbackup.upload")
T = TypeVar("T")

MUTABLE = ("head", "anchor")        # replaced in place; every other name never changes
LAST = len(ORDER)                   # heads go after everything else

# Seconds before the next try after `n` failures in a row: BACKOFF_BASE * 2**(n-1), at most
# BACKOFF_MAX, times a random factor in [0.5, 1) so devices that failed together spread out.
BACKOFF_BASE = 1.0
BACKOFF_MAX = 300.0
# Leftovers of interrupted puts (a WebDAV store's temporary files) older than a day are
# removed, by a walk of the whole store once a day at most: no put runs that long (512 MiB,
# the largest object, at 100 KiB/s takes 1.5 h), and a walk costs one request per folder.
STALE_TEMPORARY_AGE = 86400.0
STALE_SWEEP_INTERVAL = 86400.0
# Seconds between two counts of what is behind while a backoff is waited out: a count lists
# the local store (a second at a million objects), and objects may arrive many a second.
COUNT_INTERVAL = 10.0
# Conditional replaces of one head in one pass before giving up until the next pass: each
# failed try means another device put a version in between, which is rare.
REPLACE_TRIES = 5


def upload_phase(name: str) -> int | None:
    """The phase `name` is uploaded in (lower first), or None for a name that is no object."""
    got = ids.object_kind(name)
    if got is None:
        return None
    return LAST if got[0] == "head" else ORDER[got[0]]


def backoff_delay(failures: int, rand: Callable[[], float] = random.random, *,
                  base: float = BACKOFF_BASE, ceiling: float = BACKOFF_MAX) -> float:
    """Seconds to wait after `failures` (1 or more) failed tries in a row."""
    return min(ceiling, base * 2 ** min(failures - 1, 32)) * (0.5 + rand() / 2)


class TokenBucket:
    """At most `rate` bytes per second on average, in bursts of up to one second's worth.

    A put is one call with the whole object, so a large one takes its bytes on credit: the
    next caller waits until the bucket is back at zero."""

    def __init__(self, rate: float, *, now: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        self.rate = float(rate)
        self.capacity = float(rate)
        self.tokens = self.capacity
        self._now, self._sleep = now, sleep
        self._stamp = now()
        self._turn = asyncio.Lock()

    def _refill(self) -> None:
        t = self._now()
        self.tokens = min(self.capacity, self.tokens + (t - self._stamp) * self.rate)
        self._stamp = t

    async def take(self, n: int) -> None:
        """Wait until `n` bytes may go."""
        async with self._turn:
            self._refill()
            if self.tokens < 0:
                await self._sleep(-self.tokens / self.rate)
                self._refill()
            self.tokens -= n


class UploadProgress:
    """What each store was sent, in SQLite in the daemon's cache dir (survives kill -9)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.db = sqlite3.connect(os.fspath(path), isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript("""
                CREATE TABLE IF NOT EXISTS stores (location TEXT PRIMARY KEY,
                    listed INTEGER NOT NULL DEFAULT 0, last_upload REAL);
                CREATE TABLE IF NOT EXISTS uploaded (location TEXT NOT NULL, name TEXT NOT NULL,
                    PRIMARY KEY (location, name)) WITHOUT ROWID;
                CREATE TABLE IF NOT EXISTS mutable (location TEXT NOT NULL, name TEXT NOT NULL,
                    digest BLOB NOT NULL, PRIMARY KEY (location, name)) WITHOUT ROWID;
            """)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open the upload progress at {path}: {exc}") from None

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One transaction; a failure (the disk holding the cache is full) is StorageError,
        which the uploader retries like a store's."""
        try:
            self.db.execute("BEGIN")
            yield self.db
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
            raise StorageError(f"cannot note the upload progress in {self.path}: {exc}") \
                from None

    def keep_only(self, locations: Iterable[str]) -> None:
        """Forget the stores no longer configured (one added again starts anew)."""
        keep = set(locations)
        for (loc,) in self.db.execute("SELECT location FROM stores").fetchall():
            if loc not in keep:
                with self._writing() as db:
                    for table in ("stores", "uploaded", "mutable"):
                        db.execute(f"DELETE FROM {table} WHERE location = ?", (loc,))

    def listed(self, location: str) -> bool:
        row = self.db.execute("SELECT listed FROM stores WHERE location = ?",
                              (location,)).fetchone()
        return bool(row and row[0])

    def last_upload(self, location: str) -> float | None:
        row = self.db.execute("SELECT last_upload FROM stores WHERE location = ?",
                              (location,)).fetchone()
        return row[0] if row else None

    def uploaded(self, location: str) -> set[str]:
        return {n for (n,) in self.db.execute("SELECT name FROM uploaded WHERE location = ?",
                                              (location,))}

    def digests(self, location: str) -> dict[str, bytes]:
        return dict(self.db.execute("SELECT name, digest FROM mutable WHERE location = ?",
                                    (location,)))

    def note_listing(self, location: str, names: Iterable[str]) -> None:
        """The remote's immutable objects, as its one listing at first contact showed them."""
        with self._writing() as db:
            db.executemany("INSERT OR IGNORE INTO uploaded VALUES (?, ?)",
                           ((location, n) for n in names))
            db.execute("INSERT INTO stores (location, listed) VALUES (?, 1) ON CONFLICT "
                       "(location) DO UPDATE SET listed = 1", (location,))

    def note(self, location: str, name: str, *, digest: bytes | None = None,
             at: float | None = None) -> None:
        """`name` is on the store (`digest`: these bytes of a mutable object; `at`: put now)."""
        with self._writing() as db:
            if digest is None:
                db.execute("INSERT OR IGNORE INTO uploaded VALUES (?, ?)", (location, name))
            else:
                db.execute("INSERT OR REPLACE INTO mutable VALUES (?, ?, ?)",
                           (location, name, digest))
            if at is not None:
                db.execute("INSERT INTO stores (location, last_upload) VALUES (?, ?) ON "
                           "CONFLICT (location) DO UPDATE SET last_upload = excluded."
                           "last_upload", (location, at))


NEWER, OLDER, DAMAGED = "newer", "older", "damaged"


async def compare_mutable(repo: Repository, kind: str, name: str, ours: bytes,
                          theirs: bytes) -> str:
    """Our copy of a mutable object (`kind`: head or anchor) against the store's: NEWER or
    OLDER, or DAMAGED when the store's does not authenticate (ours does)."""
    logs = LogStore(repo)
    device = name.split("/")[1]
    check = logs.check_head if kind == "head" else logs.check_anchor
    mine = await check(ours, device, f"{name[:60]} here")
    try:
        held = await check(theirs, device, f"{name[:60]} in the store")
    except IntegrityError:
        return DAMAGED
    if kind == "anchor":
        return NEWER if mine.seq > held.seq else OLDER
    return NEWER if check_head_update(held, mine) is None else OLDER


@dataclass(slots=True)
class StoreStatus:
    """What `status` shows of one store."""

    location: str
    reachable: bool | None = None      # None: not tried yet
    objects_behind: int = 0
    bytes_behind: int = 0
    last_upload: float | None = None   # time.time() of the last put
    last_error: str | None = None      # one line
    uploaded: int = 0                  # objects put since the daemon started
    uploaded_bytes: int = 0            # their bytes

    def as_dict(self) -> dict[str, object]:
        return {"location": self.location, "reachable": self.reachable,
                "objects_behind": self.objects_behind, "bytes_behind": self.bytes_behind,
                "last_upload": self.last_upload, "last_error": self.last_error,
                "uploaded": self.uploaded, "uploaded_bytes": self.uploaded_bytes}


def error_line(exc: BaseException) -> str:
    """One line for a failed upload."""
    if isinstance(exc, P2PError):
        text = str(exc)
    elif isinstance(exc, OSError):
        text = exc.strerror or str(exc) or type(exc).__name__
    elif isinstance(exc, TimeoutError):
        text = "timed out"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:300]


FAILURES = (P2PError, OSError, TimeoutError)   # what a store's backend may raise: retried


def store_error(location: str, exc: BaseException, then: str = "") -> P2PError:
    """The error a command ends with when uploading to `location` failed with `exc`: one
    line that names the store (and `then`: what was kept), with `exc`'s exit code (a full
    store 12, a refused device 23; StorageError's for an OSError or a timeout)."""
    line = " ".join(str(exc).split()) if isinstance(exc, P2PError) else error_line(exc)
    if f"store {location}" not in line:   # ("The store …", "WebDAV store …" name it too)
        line = f"store {location}: {line}"
    if then:
        line = f"{line.rstrip('.')}; {then}"
    if not isinstance(exc, P2PError):
        return StorageError(line)
    return exc if line == str(exc) else StoreFailed(line, exc.exit_code)


async def upload_alongside(repo: Repository, uploaders: list["StoreUploader"],
                           work: Awaitable[T]) -> T:
    """`work` (a snapshot) while `uploaders` put each pack it stores as it lands, then one
    last pass each (what `work` wrote last: the snapshot, heads); `work`'s result. A store
    that fails meanwhile is retried, after its backoff, until that last pass, whose outcome
    is in the uploader's `status`. If `work` fails, the uploads stop at once."""
    tasks = [asyncio.ensure_future(u.run()) for u in uploaders]
    before = repo.objects_written

    def written(names: Sequence[str] = ()) -> None:
        for u in uploaders:
            u.notify(names)

    repo.objects_written = written
    try:
        result = await work
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        repo.objects_written = before
    for u in uploaders:
        u.finish()
    await asyncio.gather(*tasks)
    return result


class StoreUploader:
    """Keeps one configured store up to date with `repo`'s store; `run` until cancelled,
    `notify` when new objects may be there."""

    def __init__(self, repo: Repository, settings: StoreSettings, progress: UploadProgress,
                 open_remote: Callable[[], BlobStore | Awaitable[BlobStore]], *,
                 now: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                 rand: Callable[[], float] = random.random,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.repo = repo
        self.settings = settings
        self.location = settings.location
        self.progress = progress
        self._open_remote = open_remote
        self._now, self._sleep, self._rand = now, sleep, rand
        self.on_error = on_error
        self.bucket = TokenBucket(settings.bandwidth, now=monotonic, sleep=sleep) \
            if settings.bandwidth else None
        self.status = StoreStatus(self.location,
                                  last_upload=progress.last_upload(self.location))
        self.failures = 0
        self.failure: BaseException | None = None   # what the last pass failed with
        self._remote: BlobStore | None = None
        self._done: set[str] | None = None       # immutable names on the store
        self._digests: dict[str, bytes] = {}     # mutable name -> digest of what is there
        self._rotten_said: set[str] = set()
        self._swept = -STALE_SWEEP_INTERVAL      # when leftovers were last removed (now())
        self._healed: set[str] = set()           # packs damaged there, dealt with
        self._wake = asyncio.Event()
        self._wake.set()                         # a first pass at start
        self._arrived: list[str] = []            # named by `notify` since the pass planned
        self._arrival = asyncio.Event()          # set: `_arrived` grew
        self._finishing = asyncio.Event()        # `finish` was called: one last pass
        activity.ACTIVITIES.follow(self, lambda u: activity.upload(u.status))

    def notify(self, names: Iterable[str] = ()) -> None:
        """New objects may be in the local store: upload them soon. `names`, where the
        writer knows them, join the pass under way (see `_put_all`)."""
        before = len(self._arrived)
        # Only packs join a pass: other kinds have rules only the plan applies (a head is
        # replaced, never put; an older roster is skipped).
        self._arrived.extend(n for n in names if n.startswith("packs/"))
        if len(self._arrived) > before:
            self._arrival.set()
        self._wake.set()

    def finish(self) -> None:
        """End `run` after one more pass, which starts now (a backoff is cut short) and sees
        every object stored before this call; whether it failed is in `status`."""
        self._finishing.set()
        self._wake.set()

    async def run(self) -> None:
        """Upload, then wait for `notify`; after a failure, wait (backoff) and try again.
        Until cancelled, or `finish`."""
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                last = self._finishing.is_set()   # (not a pass under way at finish())
                ok = await self.upload_once()
                if last:
                    return
                if not ok:
                    await self._back_off(backoff_delay(self.failures, self._rand))
                    self._wake.set()
        finally:
            await self.close()

    async def _back_off(self, delay: float) -> None:
        """Wait `delay` before the next try; objects that arrive meanwhile (`notify`) are
        counted as behind at once, not at the next try."""
        pause = asyncio.ensure_future(self._sleep(delay))
        waits: list[asyncio.Future[object]] = [pause]
        try:
            while not pause.done():
                woken = asyncio.ensure_future(self._wake.wait())
                waits.append(woken)
                await asyncio.wait((pause, woken), return_when=asyncio.FIRST_COMPLETED)
                if self._wake.is_set():
                    if self._finishing.is_set():
                        return
                    self._wake.clear()
                    await self._count_quietly()
                    # one count per COUNT_INTERVAL at most (each lists the local store):
                    # what arrives meanwhile is counted after it
                    spacing = asyncio.ensure_future(self._sleep(COUNT_INTERVAL))
                    finishing = asyncio.ensure_future(self._finishing.wait())
                    waits += (spacing, finishing)
                    await asyncio.wait((pause, spacing, finishing),
                                       return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    async def _count_quietly(self) -> None:
        """count_behind, where a failure to read the local store leaves the counts as
        they were (the next pass says what is wrong)."""
        try:
            await self.count_behind()
        except FAILURES as exc:
            log.debug("store %s: cannot count what is behind: %s", self.location, exc)

    async def upload_once(self) -> bool:
        """One pass: put what the store lacks. False (and `status.last_error`) if it failed."""
        try:
            await self.upload_pending()
        except FAILURES as exc:
            self.failures += 1
            self.failure = exc
            if self._done is None:   # failed before the pass counted what is behind
                await self._count_quietly()
            line = error_line(exc)
            if line != self.status.last_error and self.on_error is not None:
                self.on_error(line)
            self.status.reachable, self.status.last_error = False, line
            await self.close()   # a broken connection is not reused
            return False
        self.failures, self.failure = 0, None
        self.status.reachable, self.status.last_error = True, None
        return True

    async def close(self) -> None:
        """Let go of the connection to the store (the next pass opens a new one)."""
        remote, self._remote = self._remote, None
        if remote is not None:
            with contextlib.suppress(*FAILURES):
                await remote.close()

    async def _remote_store(self) -> BlobStore:
        if self._remote is None:
            got = self._open_remote()
            self._remote = await got if isinstance(got, Awaitable) else got
        return self._remote

    async def upload_pending(self) -> None:
        """Put every object the store lacks, kind by kind, heads last; raise on failure."""
        remote = await self._remote_store()
        if self._done is None:
            if not self.progress.listed(self.location):
                # First contact: one listing, so a store that already holds most (a second
                # device of the account, an earlier run) is not sent it again.
                names = await self._first_listing(remote)
                self.progress.note_listing(self.location, (
                    n for n in names if (k := ids.object_kind(n)) and k[0] not in MUTABLE))
            self._done = self.progress.uploaded(self.location)
            self._digests = self.progress.digests(self.location)
        self._arrived.clear()   # (the plan sees them; what comes after is named again)
        self._arrival.clear()
        ours = await self._ours_to_write(remote)
        phases, mutable, sizes = await self._plan(self._done, self._digests, ours)
        if not self.failures:
            # (a pass after a failed one has yet to hear from the store: it stays
            # unreachable until a put goes through, not for the moments before one fails)
            self.status.reachable = True
        for phase in sorted(phases):
            await self._put_all(remote, phases[phase], mutable, sizes,
                                lambda: self._joining(phase, ours, sizes))
        await self._heal(remote)
        if self._now() - self._swept >= STALE_SWEEP_INTERVAL:
            await self._sweep(remote)

    async def _heal(self, remote: BlobStore) -> None:
        """Put this device's intact copy in place of each pack the store holds damaged, as
        reading the store noted it (`verify --from`, `restore --from`: that store's index in
        this device's cache), in one step (BlobStore.overwrite): a put that fails half-way
        leaves the damaged copy, never no copy. A store that cannot (the storage server
        deletes and replaces nothing but what a removal record releases) keeps it, said
        once: the intact copy is here and on the peers."""
        cache = os.path.dirname(os.path.dirname(self.repo.index.path))
        noted = await asyncio.to_thread(noted_damage, store_index_path(
            cache, self.repo.config.repo_id, remote.location))
        for pack in sorted(noted.keys() - self._healed):
            name = f"packs/{pack}"
            if pack not in self.repo.index.packs or pack in self.repo.index.damaged:
                continue   # no intact copy here
            if not remote.capabilities.overwrite:
                self._healed.add(pack)
                log.warning("store %s keeps its damaged copy of pack %s (%s); the intact copy "
                            "is here and on the peers", self.location, pack[:12],
                            "it deletes only what a removal record releases"
                            if remote.capabilities.append_only
                            else "it cannot replace an object in one step")
                continue
            with contextlib.suppress(NotFound):   # (healed at an earlier run: the note lags)
                if await asyncio.to_thread(pack_name, await remote.get(name)) == pack:
                    self._healed.add(pack)
                    continue
            data = await self.repo.store.get(name)
            if await asyncio.to_thread(pack_name, data) != pack:
                self._rotten(name)
                continue
            await self._send(remote, name, data, overwrite=True)
            self._healed.add(pack)
            log.warning("store %s held a damaged copy of pack %s: replaced by the intact copy "
                        "here", self.location, pack[:12])

    async def _sweep(self, remote: BlobStore) -> None:
        """Remove what interrupted puts left on the store (any device's; said, never a
        failure of the pass)."""
        self._swept = self._now()
        try:
            removed = await remote.remove_stale_temporaries(self._swept - STALE_TEMPORARY_AGE)
        except FAILURES as exc:
            log.warning("store %s: cannot remove what interrupted uploads left: %s",
                        self.location, error_line(exc))
            return
        if removed:
            log.info("store %s: removed %d leftovers of interrupted uploads", self.location,
                     removed)

    async def _plan(self, done: set[str], digests: dict[str, bytes],
                    ours: Callable[[str], bool]
                    ) -> tuple[dict[int, list[str]], dict[str, bytes], dict[str, int]]:
        """What the store lacks of the local store, given the immutable names it holds
        (`done`), the digests of its mutable ones and which names this device may write
        there (`ours`): the names by phase, the bytes of the mutable ones to put and the
        size of each. Sets `status`'s objects and bytes behind. Reads only the local store
        and the progress noted: no request to the remote."""
        # Heads are read before the listing: a head names segments and a snapshot stored
        # before it, so those are in the listing and go up first.
        mutable: dict[str, bytes] = {}
        async for name in self.repo.store.list("heads/"):
            if upload_phase(name) == LAST and ours(name):
                await self._take_mutable(name, mutable, digests)
        phases: dict[int, list[str]] = {}
        # A roster version older than one the store holds is superseded there (the storage
        # server keeps only the newest and refuses older ones, as a partner does).
        held_roster = max((int(n[len(ROSTER_PREFIX):]) for n in done
                           if n.startswith(ROSTER_PREFIX)), default=0)
        for name in await offered_names(self.repo):
            phase = upload_phase(name)
            if phase is None or phase == LAST or name in done or not ours(name):
                continue
            if name.startswith(ROSTER_PREFIX) and int(name[len(ROSTER_PREFIX):]) < held_roster:
                continue
            if ids.object_kind(name)[0] in MUTABLE and \
                    not await self._take_mutable(name, mutable, digests):  # type: ignore[index]
                continue   # (a log anchor the store has)
            phases.setdefault(phase, []).append(name)
        heads = sorted(n for n in mutable if upload_phase(n) == LAST)
        if heads:
            phases[LAST] = heads
        sizes: dict[str, int] = {}
        for names in phases.values():
            for name in names:
                with contextlib.suppress(NotFound):
                    sizes[name] = len(mutable[name]) if name in mutable \
                        else await self.repo.store.size(name)
        self.status.objects_behind = sum(len(p) for p in phases.values())
        self.status.bytes_behind = sum(sizes.values())
        return phases, mutable, sizes

    async def _joining(self, phase: int, ours: Callable[[str], bool],
                       sizes: dict[str, int]) -> list[str]:
        """The packs `notify` named since the pass planned, if `phase` is theirs: a pack
        names nothing, and what names it (index, snapshot) is stored after it, so it goes
        up in a later phase or pass. The rest wait for the next pass `notify` asked for."""
        self._arrival.clear()
        done = self._done or set()
        taken = [n for n in self._arrived
                 if upload_phase(n) == phase and ours(n) and n not in done]
        self._arrived = [n for n in self._arrived if upload_phase(n) != phase]
        joining = []
        for name in taken:
            with contextlib.suppress(NotFound):
                sizes[name] = await self.repo.store.size(name)
                joining.append(name)
                self.status.objects_behind += 1
                self.status.bytes_behind += sizes[name]
        return joining

    async def count_behind(self) -> None:
        """Set `status`'s objects and bytes behind without a pass (the store unreachable,
        or waiting out a backoff): from what was noted as uploaded, everything before the
        first contact."""
        ours = await self._ours_to_write(await self._remote_store())
        if self._done is not None:
            await self._plan(self._done, self._digests, ours)
        else:
            await self._plan(self.progress.uploaded(self.location),
                             self.progress.digests(self.location), ours)

    async def _ours_to_write(self, remote: BlobStore) -> Callable[[str], bool]:
        """Which names this device puts on `remote`: every one, but a store that keeps a
        partner's rules (the storage server) takes another device's log and head, and the
        account's config, membership and keyring from a member, only from the device that
        may write them: those are left to it (else every pass would fail on them)."""
        if not remote.capabilities.partner_rules or self.repo.identity is None:
            return lambda name: True
        me = self.repo.identity.device_id
        got = await store_membership.load(self.repo)
        member = got[0].member(me) if got is not None else None
        role = member.role if member is not None else OWNER   # (a lone device's account)
        return lambda name: role_refusal(role, me, name) is None

    async def _first_listing(self, remote: BlobStore) -> list[str]:
        """The store's names at first contact. A store that signs its requests (the storage
        server) knows no account until one of its owners registers it: this device sends
        the account's roster first (the store's `invite` option goes with it), writing the
        first version if the account has none yet (no storage partner ever needed one)."""
        try:
            return [n async for n in remote.list("")]
        except NotFound:
            if not remote.capabilities.signed_requests:
                raise
        name = await self._roster_to_register()
        await self._send(remote, name, bytes(await self.repo.store.get(name)))
        log.info("registered the account on store %s (with %s)", self.location, name)
        return [n async for n in remote.list("")]

    async def _roster_to_register(self) -> str:
        """The name of the roster version that registers the account: the newest one, which
        this device (an owner of it) may sign; written first if there is none."""
        got = await store_membership.load(self.repo)
        me = got[0].member(self.repo.identity.device_id) \
            if got is not None and self.repo.identity is not None else None
        if me is None or me.role != OWNER:
            raise ConfigError(f"store {self.location}: the account is not registered there, "
                              "and only an owner device registers it: `p2pbackup store add` "
                              "it with the invite on an owner device first")
        assert got is not None and self.repo.identity is not None
        written = await roster.publish(self.repo.store, self.repo.identity, got[0])
        if written is not None:
            log.info("wrote %s: the account's devices, for store %s", written, self.location)
            return written
        newest = await roster.newest(self.repo.store)
        assert newest is not None
        return roster_name(newest[0].seq)

    async def _take_mutable(self, name: str, into: dict[str, bytes],
                            digests: dict[str, bytes]) -> bool:
        """Read a mutable object into `into` if the store lacks these bytes of it."""
        try:
            data = bytes(await self.repo.store.get(name))
        except NotFound:
            return False
        if digests.get(name) == blake3.blake3(data).digest():
            return False
        into[name] = data
        return True

    async def _put_all(self, remote: BlobStore, names: list[str], mutable: dict[str, bytes],
                       sizes: dict[str, int],
                       joining: Callable[[], Awaitable[list[str]]]) -> None:
        """`names` with up to `parallel` puts at once, the largest first; the first failure
        stops the rest. Objects stored meanwhile (`joining`: a snapshot's packs as its
        sink writes them) are put in the same run as slots free up: ending the run at its
        slowest put with the other slots idle, then planning anew, left a 16 MiB pack's
        upload time unused per pass."""
        def largest_last(batch: list[str]) -> list[str]:
            return sorted(batch, key=lambda n: (sizes.get(n, 0), n))

        queue = largest_last(names)
        seen = set(names)
        running: set[asyncio.Future[None]] = set()
        try:
            while True:
                if not queue and self._arrival.is_set():
                    queue = largest_last([n for n in await joining() if n not in seen])
                    seen.update(queue)
                while queue and len(running) < self.settings.parallel:
                    running.add(asyncio.ensure_future(
                        self._put_one(remote, queue.pop(), mutable)))
                if not running:
                    return
                arrival = asyncio.ensure_future(self._arrival.wait()) if not queue else None
                done, _ = await asyncio.wait(running | ({arrival} if arrival else set()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if arrival is not None:
                    arrival.cancel()
                for task in done - {arrival}:
                    running.discard(task)   # type: ignore[arg-type]
                    if task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def _put_one(self, remote: BlobStore, name: str, mutable: dict[str, bytes]) -> None:
        at = None
        if name in mutable:
            data = mutable[name]
            at = await self._replace(remote, name, data)
            digest = blake3.blake3(data).digest()
            self._digests[name] = digest
            self.progress.note(self.location, name, digest=digest, at=at)
        else:
            try:
                data = await self.repo.store.get(name)
            except NotFound:
                return   # pruned since the listing
            if name.startswith("packs/") and \
                    await asyncio.to_thread(pack_name, data) != name[6:]:
                self._rotten(name)
                return
            # (a create-only store takes the same bytes again without complaint)
            if remote.capabilities.create_only or not await remote.has(name):
                at = await self._send_once(remote, name, data)
            assert self._done is not None
            self._done.add(name)
            self.progress.note(self.location, name, at=at)
        self.status.objects_behind = max(0, self.status.objects_behind - 1)
        self.status.bytes_behind = max(0, self.status.bytes_behind - len(data))

    async def _replace(self, remote: BlobStore, name: str, data: bytes) -> float | None:
        """Put a mutable object where the store's is older (or missing, or damaged); the
        time it was put, None if the store's was kept. Where the store can, the put is
        conditional on the version read (another device of the account may put a newer
        one in between); one that moved meanwhile is read and judged again."""
        kind = ids.object_kind(name)[0]  # type: ignore[index]
        swap = remote.capabilities.conditional_replace
        unreadable: tuple[bytes, str | None] | None = None
        for _ in range(REPLACE_TRIES):
            try:
                theirs, tag = await remote.get_tagged(name) if swap \
                    else (await remote.get(name), None)
            except NotFound:
                theirs, tag = None, None
            if theirs == data:
                return None
            verdict = None if theirs is None else \
                await compare_mutable(self.repo, kind, name, data, theirs)
            if verdict == OLDER:
                log.info("store %s holds a newer %s than this device; kept", self.location,
                         name[:60])
                return None
            if verdict == DAMAGED and unreadable != (theirs, tag):
                # A read cut short (or another object from a proxy) looks damaged too:
                # replaced only once a second read says the same.
                unreadable = (theirs, tag)  # type: ignore[assignment]
                continue
            if not swap:
                return await self._send_once(remote, name, data)
            at = await self._send_if(remote, name, data, tag)
            if at is not None:
                return at
        raise StorageError(f"store {self.location}: {name[:60]} was replaced by another "
                           f"writer under each of {REPLACE_TRIES} tries; tried again later")

    def _rotten(self, name: str) -> None:
        """A pack here no longer matches its name: it stays here (behind) rather than put
        damage on the store; the daemon checks it and heals it from a peer."""
        if name not in self._rotten_said:
            self._rotten_said.add(name)
            log.warning("pack %s here does not match its name (damaged); not uploaded to %s",
                        name[6:18], self.location)
        if self.repo.damage_seen is not None:
            self.repo.damage_seen(name[6:])

    async def _send_once(self, remote: BlobStore, name: str, data: bytes) -> float | None:
        """`_send`, where a store that refuses to replace other bytes under `name` keeps
        them (said once; retrying cannot change it): None then."""
        try:
            return await self._send(remote, name, data)
        except ObjectExists:
            log.warning("store %s holds other bytes under %s and refuses to replace them "
                        "(`verify --from` it)", self.location, name[:60])
            return None

    async def _send(self, remote: BlobStore, name: str, data: bytes, *,
                    overwrite: bool = False) -> float:
        """Put one object within the bandwidth cap (`overwrite`: in place of what is there);
        the time it was done."""
        await self._spend(len(data))
        await (remote.overwrite if overwrite else remote.put)(name, data)
        return self._sent(len(data))

    async def _send_if(self, remote: BlobStore, name: str, data: bytes,
                       tag: str | None) -> float | None:
        """`_send` of a mutable object only while the store holds version `tag` of it (None:
        none); None, nothing sent, if another writer changed it meanwhile."""
        await self._spend(len(data))
        if not await remote.replace_if(name, data, tag):
            return None
        return self._sent(len(data))

    async def _spend(self, size: int) -> None:
        if self.bucket is not None:
            await self.bucket.take(size)

    def _sent(self, size: int) -> float:
        at = self._now()
        self.status.reachable = True
        self.status.last_upload, self.status.uploaded = at, self.status.uploaded + 1
        self.status.uploaded_bytes += size
        return at
