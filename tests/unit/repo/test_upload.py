"""The uploader that keeps a configured store up to date: order, resume, faults, heads, the
bandwidth cap. Directory stores stand for the remote (the uploader never looks at the
scheme); a wrapper fails on demand and counts what is done to it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from p2pbackup.blobs.base import BlobStore, ObjectExists, StoreCapabilities, StoreFull
from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.config import StoreSettings
from p2pbackup.errors import DiskFull, NotFound, PeerNotPaired, StorageError
from p2pbackup.format.log import Segment
from p2pbackup.repo.logstore import LogStore
from p2pbackup.repo.replica import offered_names
from p2pbackup.repo.repository import Repository
from p2pbackup.repo.upload import (LAST, StoreUploader, TokenBucket, UploadProgress,
                                   backoff_delay, store_error, upload_phase)

from tests.eventually import eventually

from .conftest import A, B, KEYS


class WatchedStore(BlobStore):
    """A directory store that records puts and listings and fails while `fail` is set."""

    def __init__(self, root: Path, *, create_only: bool = False) -> None:
        self.inner = LocalDirStore(root)
        self.location = self.inner.location
        self.capabilities = StoreCapabilities(create_only=create_only)
        self.puts: list[str] = []
        self.lists = 0
        self.has_calls = 0
        self.fail: Exception | None = None
        self.fail_after: int | None = None   # fail once this many puts succeeded

    def _check(self) -> None:
        if self.fail is not None:
            raise self.fail

    async def put(self, name, data):
        self._check()
        if self.fail_after is not None and len(self.puts) >= self.fail_after:
            raise StorageError("the connection was reset")
        if self.capabilities.create_only and not name.startswith("heads/") \
                and await self.inner.has(name):
            if await self.inner.get(name) != bytes(data):
                raise ObjectExists(f"{name} holds other bytes")
            return
        # Recorded when the write is done, even if the uploader is cancelled meanwhile (its
        # thread finishes the file, and the next pass finds it there: not a second put).
        write = asyncio.ensure_future(self.inner.put(name, data))
        write.add_done_callback(
            lambda w: None if w.cancelled() or w.exception() else self.puts.append(name))
        await asyncio.shield(write)

    async def get(self, name):
        self._check()
        return await self.inner.get(name)

    async def get_range(self, name, offset, length):
        self._check()
        return await self.inner.get_range(name, offset, length)

    async def has(self, name):
        self._check()
        self.has_calls += 1
        return await self.inner.has(name)

    async def size(self, name):
        self._check()
        return await self.inner.size(name)

    async def list(self, prefix=""):
        self._check()
        self.lists += 1
        async for n in self.inner.list(prefix):
            yield n

    async def delete(self, name):
        self._check()
        await self.inner.delete(name)


class Clock:
    """Injected time: sleeping moves it on at once."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds
        await asyncio.sleep(0)


def uploader(repo, remote, progress, clock=None, **settings) -> StoreUploader:
    clock = clock or Clock()
    return StoreUploader(repo, StoreSettings(remote.location, **settings), progress,
                         lambda: remote, now=clock.now, monotonic=clock.now, sleep=clock.sleep,
                         rand=lambda: 0.5)


@pytest.fixture
def progress(tmp_path: Path):
    p = UploadProgress(tmp_path / "cache" / "uploads.sqlite")
    yield p
    p.close()


async def test_every_object_goes_up_packs_before_records_heads_last(pair, tmp_path, progress):
    a, _, _ = pair
    remote = WatchedStore(tmp_path / "remote")
    up = uploader(a, remote, progress)
    assert await up.upload_once()
    local = await offered_names(a)
    assert set(remote.puts) == local and len(remote.puts) == len(local)
    phases = [upload_phase(n) for n in remote.puts]
    assert phases == sorted(phases), remote.puts       # kind by kind, barrier between
    assert remote.puts[-1].startswith("heads/") and upload_phase(remote.puts[-1]) == LAST
    first_record = min(i for i, n in enumerate(remote.puts) if n.startswith(("snapshots/",
                                                                             "segments/")))
    assert all(n.startswith("packs/") is False for n in remote.puts[first_record:])
    assert up.status.reachable is True and up.status.objects_behind == 0
    assert up.status.bytes_behind == 0 and up.status.last_upload == 1000.0
    # the store alone is a whole repository
    r = await Repository.open(remote.inner, KEYS, None, str(tmp_path / "c2"), read_only=True)
    try:
        snaps, _ = await r.list_snapshots()
        assert len(snaps) == 1
        assert (await LogStore(r).read_head(A.device_id)).seq == 2
    finally:
        await r.close()


async def test_nothing_new_means_no_request_but_a_new_head_goes_up(pair, tmp_path, progress):
    a, _, _ = pair
    remote = WatchedStore(tmp_path / "remote")
    up = uploader(a, remote, progress)
    assert await up.upload_once()
    remote.puts.clear()
    has_before = remote.has_calls
    assert await up.upload_once()
    assert remote.puts == [] and remote.has_calls == has_before and remote.lists == 1
    logs = LogStore(a)
    head = await logs.read_head(A.device_id)
    await logs.append(A, Segment(A.device_id, 3, head.segment, time.time_ns(), ()))
    assert await up.upload_once()
    assert remote.puts == [f"segments/{A.device_id}/000000000003", f"heads/{A.device_id}"]


async def test_a_restarted_uploader_resumes_and_puts_each_object_once(pair, tmp_path):
    a, _, _ = pair
    remote = WatchedStore(tmp_path / "remote")
    remote.fail_after = 3   # killed part-way: the connection drops after 3 puts
    db = tmp_path / "cache" / "uploads.sqlite"
    first = UploadProgress(db)
    up = uploader(a, remote, first)
    assert not await up.upload_once()
    assert up.status.last_error == "the connection was reset" and len(remote.puts) >= 3
    first.close()
    # Restarted (a new progress from the same file); one put was made but not noted before
    # the kill: the store has it, so it is not put again either.
    remote.fail_after = None
    second = UploadProgress(db)
    lost = next(n for n in sorted(await offered_names(a)) if n not in remote.puts
                and not n.startswith("heads/"))
    await remote.inner.put(lost, await a.store.get(lost))
    remote.puts.append(lost)
    try:
        up = uploader(a, remote, second)
        assert await up.upload_once()
    finally:
        second.close()
    counts = Counter(remote.puts)
    assert set(counts) == await offered_names(a) and max(counts.values()) == 1, counts
    assert remote.lists == 1   # the remote was listed at first contact only


async def test_a_failing_store_backs_off_with_jitter_and_resumes(pair, tmp_path, progress):
    a, _, _ = pair
    remote = WatchedStore(tmp_path / "remote")
    remote.fail = DiskFull(remote.location)
    clock = Clock()
    errors: list[str] = []
    up = uploader(a, remote, progress, clock)
    up.on_error = errors.append
    task = asyncio.create_task(up.run())
    try:
        while len(clock.slept) < 5:
            await asyncio.sleep(0)
        assert clock.slept[:5] == [0.75, 1.5, 3.0, 6.0, 12.0]   # base 1 s, doubling, x0.75
        line = up.status.last_error
        assert line is not None and "\n" not in line and "No space left" in line
        assert up.status.reachable is False and errors == [line]   # said once, not per try
        remote.fail = None   # the store is back
        local = await offered_names(a)
        await eventually(lambda: set(remote.puts) == local and up.failures == 0, timeout=10,
                         interval=0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert up.status.last_error is None and up.status.reachable is True


async def test_objects_behind_show_at_once_while_the_store_is_unreachable(pair, tmp_path,
                                                                          progress):
    """The store unreachable from the start (its first listing fails): status shows every
    object as behind, and an object written while the uploader waits out its backoff is
    counted as soon as it is there, not at the next try."""
    a, _, _ = pair
    remote = WatchedStore(tmp_path / "remote")
    remote.fail = StorageError("cannot reach the server")
    release = asyncio.Event()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:   # a backoff that lasts until released
        slept.append(seconds)
        await release.wait()

    up = StoreUploader(a, StoreSettings(remote.location), progress, lambda: remote,
                       sleep=sleep, rand=lambda: 0.5)
    local = await offered_names(a)
    size = sum([await a.store.size(n) for n in local])
    task = asyncio.create_task(up.run())
    try:
        await eventually(lambda: slept, timeout=10, interval=0.01)
        assert up.status.reachable is False
        assert (up.status.objects_behind, up.status.bytes_behind) == (len(local), size)
        logs = LogStore(a)
        head = await logs.read_head(A.device_id)
        await logs.append(A, Segment(A.device_id, 3, head.segment, time.time_ns(), ()))
        up.notify()
        # (the new segment; the head was behind already and still is, with new bytes)
        await eventually(lambda: up.status.objects_behind == len(local) + 1, timeout=10,
                         interval=0.01)
        assert up.failures == 1   # no pass was tried for it: still waiting out the backoff
        remote.fail = None
        release.set()
        await eventually(lambda: up.status.objects_behind == 0 and up.failures == 0,
                         timeout=10, interval=0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_backoff_is_capped_and_jittered():
    assert backoff_delay(1, lambda: 0.0) == 0.5
    assert backoff_delay(1, lambda: 0.999) < 1.0
    assert backoff_delay(100, lambda: 0.999) < 300.0 and backoff_delay(100, lambda: 0.0) == 150


async def test_a_head_on_the_store_never_goes_back(pair, tmp_path, progress):
    a, _, _ = pair
    older = tmp_path / "older"
    shutil.copytree(a.store.root, older)          # a second device's copy, at segment 2
    remote = WatchedStore(tmp_path / "remote")
    logs = LogStore(a)
    head = await logs.read_head(A.device_id)
    await logs.append(A, Segment(A.device_id, 3, head.segment, time.time_ns(), ()))
    assert await uploader(a, remote, progress).upload_once()
    c = await Repository.open(LocalDirStore(older), KEYS, None, str(tmp_path / "cc"))
    try:
        other = UploadProgress(tmp_path / "other" / "uploads.sqlite")
        assert await uploader(c, remote, other).upload_once()
        other.close()
        r = await Repository.open(remote.inner, KEYS, None, str(tmp_path / "cr"))
        assert (await LogStore(r).read_head(A.device_id)).seq == 3
        # A damaged head there is replaced by ours, which authenticates.
        await remote.inner.put(f"heads/{A.device_id}", b"garbage")
        other = UploadProgress(tmp_path / "third" / "uploads.sqlite")
        assert await uploader(c, remote, other).upload_once()
        other.close()
        assert (await LogStore(r).read_head(A.device_id)).seq == 2
        await r.close()
    finally:
        await c.close()


async def test_a_create_only_store_is_not_asked_has_first(pair, tmp_path, progress, caplog):
    a, _, _ = pair
    remote = WatchedStore(tmp_path / "remote", create_only=True)
    names = sorted(await offered_names(a))
    same, other = names[0], names[1]
    await remote.inner.put(same, await a.store.get(same))   # another device put it
    await remote.inner.put(other, b"other bytes")           # damage there
    progress.note_listing(remote.location, [])  # (progress does not know them)
    up = uploader(a, remote, progress)
    assert await up.upload_once()
    assert remote.has_calls == 0
    assert set(remote.puts) == set(names) - {same, other}
    assert await remote.inner.get(other) == b"other bytes"  # never replaced...
    assert f"holds other bytes under {other}" in caplog.text   # ...but said
    assert await up.upload_once() and remote.puts.count(names[2]) == 1


async def test_the_bandwidth_cap_holds_over_injected_time(pair, tmp_path, progress):
    a, _, _ = pair
    remote = WatchedStore(tmp_path / "remote")
    clock = Clock()
    rate = 64 * 1024
    sent: list[tuple[float, int]] = []
    real_put = remote.put

    async def timed_put(name, data):
        sent.append((clock.t, len(data)))   # as it starts
        await real_put(name, data)

    remote.put = timed_put
    start = clock.t
    assert await uploader(a, remote, progress, clock, bandwidth=rate, parallel=4).upload_once()
    total = sum(n for _, n in sent)
    assert total > 4 * rate   # (the fixture's packs: enough to need the cap)
    so_far = 0
    for t, n in sent:
        so_far += n
        # bytes that started before time t: at most one second's burst plus the rate since
        # the start (the object starting at t may take its bytes on credit)
        assert so_far - n <= rate * (t - start) + rate, (t - start, so_far)
    assert clock.t - start >= (total - rate - max(n for _, n in sent)) / rate


async def test_token_bucket_waits_off_a_debt():
    clock = Clock()
    bucket = TokenBucket(100, now=clock.now, sleep=clock.sleep)
    await bucket.take(100)
    await bucket.take(300)      # on credit
    assert clock.slept == []
    await bucket.take(1)        # waits for the 300 to be paid
    assert clock.slept == [3.0]


async def test_objects_replicated_from_a_peer_are_uploaded_when_they_arrive(tmp_path):
    from tests.unit.replication.test_member import running, two_repositories

    _, a_id, b_id, ra, rb = await two_repositories(tmp_path)
    remote = WatchedStore(tmp_path / "remote")
    progress = UploadProgress(tmp_path / "cb" / "uploads.sqlite")
    up = uploader(rb, remote, progress)
    assert await up.upload_once()          # b alone: its config and device record
    up._wake.clear()
    task = asyncio.create_task(up.run())   # it waits to be told of new objects
    try:
        async with running(ra, rb, a_id, b_id, keep_open=True) as (_, _, pb):
            pb.on_stored = up.notify       # as the daemon wires it
            wanted = await offered_names(ra)
            await eventually(lambda: wanted <= set(remote.puts), timeout=20)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        progress.close()
        await ra.close()
        await rb.close()


class SealsAfterListing(LocalDirStore):
    """This device's store, where a seal lands just after the uploader's listing."""

    seal = None

    async def list(self, prefix=""):
        async for n in super().list(prefix):
            yield n
        if prefix == "" and self.seal is not None:
            seal, self.seal = self.seal, None
            await seal()


async def test_a_head_sealed_during_a_pass_never_reaches_the_store_before_its_segment(
        pair, tmp_path, progress):
    a, _, _ = pair
    a.store = SealsAfterListing(a.store.root)
    logs = LogStore(a)

    async def seal() -> None:
        head = await logs.read_head(A.device_id)
        await logs.append(A, Segment(A.device_id, 3, head.segment, time.time_ns(), ()))

    a.store.seal = seal
    remote = WatchedStore(tmp_path / "remote")
    up = uploader(a, remote, progress)
    assert await up.upload_once()
    r = await Repository.open(remote.inner, KEYS, None, str(tmp_path / "cr"))
    try:
        head = await LogStore(r).read_head(A.device_id)
        assert await remote.inner.has(f"segments/{A.device_id}/{head.seq:012d}"), head.seq
        assert await up.upload_once()   # the next pass takes the new segment, then its head
        assert (await LogStore(r).read_head(A.device_id)).seq == 3
    finally:
        await r.close()


async def test_a_store_added_again_is_listed_again_and_gets_what_it_lost(pair, tmp_path,
                                                                       progress):
    a, _, _ = pair
    remote = WatchedStore(tmp_path / "remote")
    assert await uploader(a, remote, progress).upload_once()
    lost = next(n for n in remote.puts if n.startswith("packs/"))
    await remote.inner.delete(lost)            # the store lost an object
    remote.puts.clear()
    assert await uploader(a, remote, progress).upload_once()
    assert remote.puts == []                   # progress says it is there: not looked at
    progress.keep_only([])                     # `store remove`
    progress.keep_only([remote.location])      # `store add` again
    assert await uploader(a, remote, progress).upload_once()
    assert remote.puts == [lost] and remote.lists == 2


async def test_a_pack_that_rotted_here_is_not_uploaded_but_checked(pair, tmp_path, progress,
                                                                  caplog):
    a, _, _ = pair
    pack = sorted(n for n in await offered_names(a) if n.startswith("packs/"))[0]
    path = Path(a.store.path_of(pack))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF                  # one bit of rot, not yet found out here
    path.write_bytes(bytes(raw))
    seen: list[str] = []
    a.damage_seen = seen.append
    remote = WatchedStore(tmp_path / "remote")
    up = uploader(a, remote, progress)
    assert await up.upload_once()
    assert pack not in remote.puts and set(remote.puts) == await offered_names(a) - {pack}
    assert seen == [pack[6:]] and "does not match its name" in caplog.text
    assert up.status.objects_behind == 1       # still owed to the store


class RegisteringStore(WatchedStore):
    """Stands for the storage server: it knows no account until a roster is put, then keeps
    only the newest roster version and refuses older ones (as a partner does)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, create_only=True)
        self.capabilities = StoreCapabilities(create_only=True, signed_requests=True)

    def _registered(self) -> bool:
        return any(n.startswith("roster/") for n in self.puts)

    async def put(self, name, data):
        newest = max((n for n in self.puts if n.startswith("roster/")), default="")
        if name.startswith("roster/") and newest and name <= newest:
            raise StorageError(f"{name}: an older roster than {newest}, held here")
        if not self._registered() and not name.startswith("roster/"):
            raise NotFound("the account is not registered")
        await super().put(name, data)
        if newest and name.startswith("roster/"):
            await self.inner.delete(newest)

    async def list(self, prefix=""):
        if not self._registered():
            raise NotFound("the account is not registered on this server")
        async for n in super().list(prefix):
            yield n


async def _as_members(a: Repository, b: Repository) -> None:
    """`a`'s device an owner and `b`'s a member of both stores' membership."""
    from p2pbackup.format.membership import MEMBER, OWNER, Member, Membership, sign_membership
    from p2pbackup.repo import membership as store_membership

    now = time.time_ns()
    m = Membership(1, b"", 0, (Member(A.device_id, A.public_key, "a", OWNER, added_ns=now),
                               Member(B.device_id, B.public_key, "b", MEMBER, added_ns=now)),
                   time_ns=now)
    for repo in (a, b):
        await store_membership.append(repo, sign_membership(m, A.device_id, A.sign))


async def test_an_owner_registers_the_account_with_its_first_roster_before_anything_else(
        pair, tmp_path, progress):
    a, b, _ = pair
    await _as_members(a, b)
    remote = RegisteringStore(tmp_path / "server")
    assert not [n async for n in a.store.list("roster/")]
    u = uploader(a, remote, progress)
    assert await u.upload_once(), u.status.last_error
    # The roster was written here (no partner ever needed one) and went up first; everything
    # else followed.
    assert [n async for n in a.store.list("roster/")] == ["roster/000000000001"]
    assert remote.puts[0] == "roster/000000000001"
    assert set(remote.puts) == await offered_names(a)
    # A second roster version goes up; a store listed afresh that holds it (and, as the
    # server, not the first) is not sent the first, which it would refuse.
    from p2pbackup.repo import roster

    held = await roster.newest(a.store)
    await a.store.put(roster.roster_name(2), roster.roster_object(
        roster.roster_of(await _membership(a), 2, roster.roster_hash(held[1]), time.time_ns()),
        A.device_id, A.sign))
    u.notify()
    assert await u.upload_once(), u.status.last_error
    assert remote.puts[-1] == "roster/000000000002"
    before = len(remote.puts)
    again = uploader(a, remote, UploadProgress(tmp_path / "cache2" / "uploads.sqlite"))
    assert await again.upload_once(), again.status.last_error
    assert len(remote.puts) == before


async def _membership(repo: Repository):
    from p2pbackup.repo import membership as store_membership

    return (await store_membership.load(repo))[0]


async def test_a_member_device_does_not_register_the_account_and_says_so_in_one_line(
        pair, tmp_path, progress):
    a, b, _ = pair
    await _as_members(a, b)
    remote = RegisteringStore(tmp_path / "server")
    u = uploader(b, remote, progress)
    assert not await u.upload_once()
    assert u.status.reachable is False and remote.puts == []
    assert u.status.last_error == (
        f"store {remote.location}: the account is not registered there, and only an owner "
        "device registers it: `p2pbackup store add` it with the invite on an owner device first")


async def test_a_store_that_lacks_objects_is_listed_as_an_activity(pair, tmp_path, progress):
    from p2pbackup.activity import ACTIVITIES

    a, _, _ = pair
    remote = WatchedStore(tmp_path / "remote")
    remote.fail_after = 1   # one object goes up, then the store fails
    up = uploader(a, remote, progress)
    assert not await up.upload_once()
    (view,) = [v for v in ACTIVITIES.view() if v["kind"] == "upload"
               and v["name"] == remote.location]
    assert view["phase"] == "retrying" and view["uploaded_objects"] == 1
    assert view["objects_behind"] > 0 and view["total"] > view["done"] > 0


# ---- two devices of the account uploading to one store (real servers) -----------------------

class Interleaved(BlobStore):
    """A real remote store (its conditions are the server's) where, the first time the
    uploader reads `name`, `meanwhile` runs: another device's upload lands between the
    read and the write."""

    def __init__(self, inner: BlobStore, name: str, meanwhile) -> None:
        self.inner, self.location = inner, inner.location
        self.capabilities = inner.capabilities
        self._name, self._meanwhile = name, meanwhile

    async def _read(self, name: str) -> None:
        if name == self._name and self._meanwhile is not None:
            meanwhile, self._meanwhile = self._meanwhile, None
            await meanwhile()

    async def get(self, name):
        try:
            return await self.inner.get(name)
        finally:
            await self._read(name)

    async def get_tagged(self, name):
        try:
            return await self.inner.get_tagged(name)
        finally:
            await self._read(name)

    async def replace_if(self, name, data, tag):
        return await self.inner.replace_if(name, data, tag)

    async def put(self, name, data):
        await self.inner.put(name, data)

    async def get_range(self, name, offset, length):
        return await self.inner.get_range(name, offset, length)

    async def has(self, name):
        return await self.inner.has(name)

    async def size(self, name):
        return await self.inner.size(name)

    async def list(self, prefix=""):
        async for n in self.inner.list(prefix):
            yield n

    async def delete(self, name):
        await self.inner.delete(name)


@pytest.fixture(params=["weed", "wsgidav", "dir"])
def shared_remote(request, tmp_path: Path):
    """A store that two devices upload to, on a real server or a shared directory: a
    function that opens a client of it."""
    from p2pbackup.blobs import open_store
    from tests import servers

    if request.param == "weed":
        with contextlib.contextmanager(servers.weed_mini)(tmp_path / "weed") as s3:
            bucket = s3.new_bucket()
            yield lambda: open_store(f"s3://{bucket}/shared", options=s3.options())
    elif request.param == "wsgidav":
        with servers.wsgidav(tmp_path / "dav") as dav:
            yield lambda: open_store(f"webdav://{dav.url.split('://')[1]}/dav/shared")
    else:   # a directory both devices reach (a NAS mount)
        yield lambda: open_store(str(tmp_path / "nas"))


async def _a_device_behind(a: Repository, tmp_path: Path) -> Repository:
    """Device C: a copy of `a`'s store holding A's log at seq 2, while A goes on to seq 3
    (C's repository: close it)."""
    older = tmp_path / "older"
    shutil.copytree(a.store.root, older)
    logs = LogStore(a)
    head = await logs.read_head(A.device_id)
    await logs.append(A, Segment(A.device_id, 3, head.segment, time.time_ns(), ()))
    return await Repository.open(LocalDirStore(older), KEYS, None, str(tmp_path / "cc"))


async def test_two_devices_racing_to_one_store_never_put_an_older_head_over_a_newer(
        pair, tmp_path, shared_remote):
    """Device C holds device A's head at seq 2 (replicated earlier), A itself is at seq 3.
    C reads the store's head of A (none there), then A's own upload lands (seq 3), then C
    writes: C's seq 2 must not replace A's seq 3 (weed: If-None-Match/If-Match; wsgidav:
    MOVE with Overwrite: F or an If header naming the ETag read)."""
    a, _, _ = pair
    c = await _a_device_behind(a, tmp_path)
    remote_a, remote_c = shared_remote(), shared_remote()
    progress_a = UploadProgress(tmp_path / "pa" / "uploads.sqlite")
    progress_c = UploadProgress(tmp_path / "pc" / "uploads.sqlite")
    name = f"heads/{A.device_id}"
    try:
        async def a_uploads() -> None:
            assert await uploader(a, remote_a, progress_a).upload_once()

        raced = Interleaved(remote_c, name, a_uploads)
        assert await uploader(c, raced, progress_c).upload_once()
        assert raced._meanwhile is None   # (A's upload did run in between)
        assert await remote_a.get(name) == await a.store.get(name), \
            "the store's head of A went back from A's seq 3 to C's seq 2"
        # and C, asked again, still keeps it
        assert await uploader(c, remote_c, progress_c).upload_once()
        assert await remote_a.get(name) == await a.store.get(name)
    finally:
        for p in (progress_a, progress_c):
            p.close()
        await remote_a.close()
        await remote_c.close()
        await c.close()


async def test_a_pass_removes_what_interrupted_webdav_uploads_left_and_never_lists_it(
        pair, tmp_path):
    """A WebDAV put is a PUT to a temporary name and a MOVE; a client killed in between
    leaves the temporary file. A pass removes those older than a day (by the injected
    clock), keeps younger ones (a put of another device may still be running), and the
    store never lists any of them as objects."""
    from p2pbackup.blobs import open_store
    from tests import servers

    a, _, _ = pair
    now = time.time()
    with servers.wsgidav(tmp_path / "dav") as dav:
        remote = open_store(f"webdav://{dav.url.split('://')[1]}/dav/store")
        progress = UploadProgress(tmp_path / "p" / "uploads.sqlite")
        try:
            folder = dav.root / "store" / "packs" / "ab"
            folder.mkdir(parents=True)
            old = folder / f"{'ab' * 32}.0123456789abcdef.tmp"
            young = folder / f"{'ab' * 31}cd.fedcba9876543210.tmp"
            for leftover, age in ((old, 3 * 86400), (young, 3600)):
                leftover.write_bytes(b"half a pack")
                os.utime(leftover, (now - age, now - age))
            assert not [n async for n in remote.list("") if n.endswith(".tmp")]
            up = StoreUploader(a, StoreSettings(remote.location), progress, lambda: remote,
                               now=lambda: now)
            assert await up.upload_once()
            assert not old.exists() and young.exists()
            names = [n async for n in remote.list("")]
            assert set(names) == await offered_names(a)
        finally:
            progress.close()
            await remote.close()


async def test_to_the_storage_server_a_device_sends_only_its_own_log_and_head(pair, tmp_path):
    """The storage server takes a device's head, log segments and anchor from that device
    only (a partner's rule). A device holding another device's log (replicated from it)
    uploads everything else, and the pass succeeds; the other device sends its own."""
    from p2pbackup.blobs import open_store
    from p2pbackup.blobs.base import StoreSigner
    from p2pbackup.format.log import GENESIS
    from tests import servers

    a, b, _ = pair
    await _as_members(a, b)
    await LogStore(a).append(B, Segment(B.device_id, 1, GENESIS, time.time_ns(), ()))
    assert await a.store.has(f"heads/{B.device_id}")
    with servers.storage_server(tmp_path / "server", "--open-registration") as server:
        remote = open_store(server.location, options={"ca_file": server.ca_file},
                            signer=StoreSigner(A, KEYS.fingerprint()))
        progress = UploadProgress(tmp_path / "p" / "uploads.sqlite")
        try:
            up = uploader(a, remote, progress)
            assert await up.upload_once(), up.status.last_error
            held = {n async for n in remote.list("")}
            assert f"heads/{A.device_id}" in held
            assert not any(B.device_id in n for n in held)
            assert up.status.objects_behind == 0
            assert await up.upload_once() and up.status.objects_behind == 0
        finally:
            progress.close()
            await remote.close()


def _flip_a_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))


@pytest.mark.parametrize("kind", ["dir", "wsgidav", "weed", "server"])
async def test_a_pack_damaged_in_a_store_is_replaced_by_the_intact_copy_here(
        pair, tmp_path, kind, caplog):
    """Reading a store (`verify --from` it) noted one of its packs as damaged (rot in the
    store). The next pass puts this device's intact copy in its place, also on a store that
    never replaces an object (BlobStore.overwrite), and the store verifies clean. The
    storage server deletes nothing on request: it keeps the damaged copy, said in one line,
    and verify against it still names it."""
    from p2pbackup.blobs import open_store
    from p2pbackup.blobs.base import StoreSigner
    from tests import servers

    a, b, _ = pair
    with contextlib.ExitStack() as stack:
        if kind == "dir":
            files = tmp_path / "usb"
            remote = open_store(str(files))
        elif kind == "wsgidav":
            dav = stack.enter_context(servers.wsgidav(tmp_path / "dav"))
            remote = open_store(f"webdav://{dav.url.split('://')[1]}/dav/store")
            files = dav.root / "store"
        elif kind == "weed":
            s3 = stack.enter_context(contextlib.contextmanager(servers.weed_mini)(
                tmp_path / "weed"))
            location = f"s3://{s3.new_bucket()}/store"
            remote = open_store(location, options=s3.options())
            files = None   # (rot is put there through a client that does not refuse it)
        else:
            await _as_members(a, b)
            server = stack.enter_context(servers.storage_server(tmp_path / "server",
                                                                "--open-registration"))
            remote = open_store(server.location, options={"ca_file": server.ca_file},
                                signer=StoreSigner(A, KEYS.fingerprint()))
            files = server.data / "partners" / KEYS.fingerprint() / "store"
        progress = UploadProgress(tmp_path / "p" / "uploads.sqlite")
        try:
            up = uploader(a, remote, progress)
            assert await up.upload_once()
            pack = sorted(n for n in await offered_names(a) if n.startswith("packs/"))[0][6:]
            if files is not None:
                _flip_a_byte(next(files.glob(f"packs/*/{pack}")))
            else:
                rot = open_store(location, options={**s3.options(),
                                                    "conditional_writes": "false"})
                data = bytearray(await rot.get(f"packs/{pack}"))
                data[len(data) // 2] ^= 1
                await rot.delete(f"packs/{pack}")
                await rot.put(f"packs/{pack}", bytes(data))
                await rot.close()
            # `verify --from` the store: its own index (per store, in this device's cache)
            assert pack in await _noted_damaged_in(a, remote)
            assert await up.upload_once(), up.status.last_error
            report = await _verify_store(a, remote)
            if kind == "server":
                assert [d.pack for d in report.damage] == [pack]
                assert f"keeps its damaged copy of pack {pack[:12]}" in caplog.text
            else:
                assert report.ok, [d.line() for d in report.damage]
                assert pack not in await _noted_damaged_in(a, remote)
        finally:
            progress.close()
            await remote.close()


async def _verify_store(a: Repository, remote: BlobStore):
    """`verify --read-data --from` the store: its own index, in `a`'s cache."""
    from p2pbackup.backup.verify import verify

    cache = str(Path(a.index.path).parent.parent)
    checked = await Repository.open(remote, KEYS, None, cache, read_only=True)
    try:
        return await verify(checked, read_data=True)
    finally:
        await checked.close()


async def _noted_damaged_in(a: Repository, remote: BlobStore) -> set[str]:
    """Read `remote` as `verify --read-data --from` it does (its own index in this device's
    cache, which verify notes the damage it finds in): the packs noted as damaged there.
    (Opening a remote store indexes its packs from their trailers: it finds no rot.)"""
    from p2pbackup.backup.verify import verify

    cache = str(Path(a.index.path).parent.parent)
    seen = await Repository.open(remote, KEYS, None, cache, read_only=True)
    try:
        await verify(seen, read_data=True)
        return set(seen.index.damaged)
    finally:
        await seen.close()


async def _nap(seconds: float) -> None:
    await asyncio.sleep(0)


@pytest.mark.parametrize("kind, fault", [("wsgidav", "status"), ("wsgidav", "reset"),
                                         ("weed", "status"), ("weed", "reset")])
async def test_healing_a_damaged_pack_whose_put_fails_leaves_the_damaged_copy_in_place(
        pair, tmp_path, progress, kind, fault):
    """The intact copy replaces the damaged one in one step (S3: a PUT overwrites; WebDAV:
    a temporary file MOVEd with Overwrite: T), never delete-then-put: a PUT that fails
    (a server error, a connection cut mid-body) leaves the store with its damaged copy,
    not without the pack, and the next pass heals it."""
    from p2pbackup.blobs.s3 import S3Store
    from p2pbackup.blobs.webdav import WebDavStore
    from tests import servers
    from tests.faultproxy import Fault, FaultProxy

    a, _, _ = pair
    with contextlib.ExitStack() as stack:
        if kind == "wsgidav":
            dav = stack.enter_context(servers.wsgidav(tmp_path / "dav"))
            proxy = stack.enter_context(FaultProxy(dav.url))
            remote = WebDavStore(f"webdav://{proxy.url.split('://')[1]}/dav/store",
                                 sleep=_nap)
        else:
            s3 = stack.enter_context(contextlib.contextmanager(servers.weed_mini)(
                tmp_path / "weed"))
            proxy = stack.enter_context(FaultProxy(s3.endpoint))
            bucket = s3.new_bucket()
            remote = S3Store(f"s3://{bucket}/store", s3.options(endpoint=proxy.url),
                             sleep=_nap)
        try:
            up = uploader(a, remote, progress)
            assert await up.upload_once(), up.status.last_error
            pack = sorted(n for n in await offered_names(a) if n.startswith("packs/"))[0][6:]
            name = f"packs/{pack}"
            if kind == "wsgidav":
                _flip_a_byte(next((dav.root / "store").glob(f"packs/*/{pack}")))
            else:   # (through a client that does not refuse to replace it)
                rot = S3Store(remote.location, s3.options(conditional_writes="false"))
                data = bytearray(await rot.get(name))
                data[len(data) // 2] ^= 1
                await rot.delete(name)
                await rot.put(name, bytes(data))
                await rot.close()
            damaged = await remote.get(name)
            assert pack in await _noted_damaged_in(a, remote)
            proxy.fault = Fault(fault, method="PUT", match=pack)
            assert not await up.upload_once(), "the pass did not fail"
            assert proxy.fault.hits, "the intact copy was not put through the proxy"
            proxy.fault = None
            assert await remote.has(name), "the store was left without the pack"
            assert await remote.get(name) == damaged
            assert await up.upload_once(), up.status.last_error
            assert await remote.get(name) == await a.store.get(name)
            report = await _verify_store(a, remote)
            assert report.ok, [d.line() for d in report.damage]
        finally:
            await remote.close()


async def test_damage_verify_finds_in_a_store_it_indexed_whole_before_is_healed_by_the_next_pass(
        pair, tmp_path, progress):
    """`verify --read-data --from` a store whose pack rotted after that store's index (in
    this device's cache) took it whole: verify records the damage there, so the uploader's
    next pass puts the intact copy in its place."""
    a, _, _ = pair
    remote = LocalDirStore(tmp_path / "usb")
    up = uploader(a, remote, progress)
    assert await up.upload_once()
    assert not await _noted_damaged_in(a, remote)   # indexed whole
    pack = sorted(n for n in await offered_names(a) if n.startswith("packs/"))[0][6:]
    _flip_a_byte(Path(remote.path_of(f"packs/{pack}")))
    assert not (await _verify_store(a, remote)).ok
    assert await up.upload_once(), up.status.last_error
    report = await _verify_store(a, remote)
    assert report.ok, [d.line() for d in report.damage]


class CutShort(Interleaved):
    """The first read of `name` comes back cut short (a proxy that truncates a GET under a
    Content-Length that says it is all)."""

    def __init__(self, inner: BlobStore, name: str) -> None:
        super().__init__(inner, name, None)
        self.cut = 0

    async def get_tagged(self, name):
        data, tag = await self.inner.get_tagged(name)
        if name == self._name and not self.cut:
            self.cut += 1
            return data[:len(data) // 2], tag
        return data, tag

    async def get(self, name):
        return (await self.get_tagged(name))[0]


async def test_a_newer_head_read_cut_short_is_not_taken_for_damage_and_replaced(
        pair, tmp_path, progress):
    """The store holds A's head at seq 3; device C (at seq 2) reads it cut short once. A
    copy there that does not authenticate is replaced (it is damage), but only once a
    second read says the same: a read cut short must not put seq 2 over seq 3."""
    a, _, _ = pair
    c = await _a_device_behind(a, tmp_path)
    shared = LocalDirStore(tmp_path / "nas")
    assert await uploader(a, shared, progress).upload_once()
    name = f"heads/{A.device_id}"
    other = UploadProgress(tmp_path / "pc" / "uploads.sqlite")
    try:
        cut = CutShort(shared, name)
        assert await uploader(c, cut, other).upload_once()
        assert cut.cut == 1
        assert await shared.get(name) == await a.store.get(name), \
            "a read cut short had C put its seq 2 over the store's seq 3"
        # real damage there is still replaced
        await shared.put(name, b"garbage")
        assert await uploader(c, shared, UploadProgress(tmp_path / "p3" / "u.sqlite")
                              ).upload_once()
        assert await shared.get(name) == await c.store.get(name)
    finally:
        other.close()
        await c.close()


# ---- uploading while a snapshot writes (upload_alongside) ----------------------------------

@pytest.fixture(params=["directory", "weed"])
async def fresh_remote(request, tmp_path: Path):
    """An empty store of each kind: (the store, a coroutine function listing its packs)."""
    if request.param == "directory":
        remote = WatchedStore(tmp_path / "remote")
        yield remote, remote.inner
        return
    servers = pytest.importorskip("tests.servers", reason="the S3 test servers")
    gen = servers.weed_mini(tmp_path / "weed")
    try:
        srv = next(gen)
    except BaseException as exc:   # (skipped when weed is not installed)
        pytest.skip(f"weed mini: {exc}")
    from p2pbackup.blobs import open_store
    remote = open_store(f"s3://{srv.new_bucket()}/up", options=srv.options())
    try:
        yield remote, remote
    finally:
        await remote.close()
        gen.close()


async def _packs(store: BlobStore) -> set[str]:
    return {n async for n in store.list("packs/")}


async def _snapshot_of_new_data(a: Repository, src: Path, tmp_path: Path):
    """A real snapshot of new data in many small packs."""
    from dataclasses import replace

    from p2pbackup.backup.snapshot import take_snapshot
    from p2pbackup.config import Source

    a.config = replace(a.config, pack_size=128 * 1024)   # many packs of a few MiB
    for i in range(12):
        (src / f"new{i}").write_bytes(os.urandom(300_000))
    return await take_snapshot(a, (Source("src", str(src)),), temp_dir=str(tmp_path / "t"))


async def test_packs_reach_the_store_while_the_snapshot_runs_and_the_snapshot_after_them(
        pair, tmp_path, progress, fresh_remote, monkeypatch):
    from p2pbackup.repo.upload import upload_alongside

    a, _, src = pair
    remote, lister = fresh_remote
    up = uploader(a, remote, progress)
    assert await up.upload_once()   # the store is up to date with the first snapshot
    before = await _packs(lister)
    seen_while_running: list[set[str]] = []
    store_snapshot = a.store.put

    async def held_put(name, data):
        # The snapshot object is stored once a pack of this snapshot is on the store: it
        # ends only if packs go up while it runs.
        if name.startswith("snapshots/"):
            async def new_packs() -> bool:
                return bool(await _packs(lister) - before)
            await eventually(new_packs, timeout=60, interval=0.05)
            seen_while_running.append(await _packs(lister) - before)
        return await store_snapshot(name, data)

    monkeypatch.setattr(a.store, "put", held_put)
    summary = await upload_alongside(a, [up], _snapshot_of_new_data(a, src, tmp_path))
    assert seen_while_running and seen_while_running[0]
    assert summary.packs_written > 3
    local = await offered_names(a)
    assert {n async for n in lister.list("")} >= local   # everything, the snapshot too
    assert up.status.last_error is None and up.status.objects_behind == 0
    if isinstance(remote, WatchedStore):
        # a reader of the store never sees the snapshot before the packs it names
        snapshot_at = remote.puts.index(f"snapshots/{summary.stored.id}")
        assert all(i < snapshot_at for i, n in enumerate(remote.puts)
                   if n.startswith("packs/")), remote.puts
        assert len(remote.puts) == len(set(remote.puts))   # each object once


class Stalled(Clock):
    """A backoff that would never end by itself."""

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await asyncio.Event().wait()


async def test_a_store_failing_mid_snapshot_leaves_the_snapshot_whole_and_resumes_later(
        pair, tmp_path, progress):
    from p2pbackup.repo.upload import upload_alongside

    a, _, src = pair
    remote = WatchedStore(tmp_path / "remote")
    up = uploader(a, remote, progress, Stalled())
    assert await up.upload_once()
    remote.fail_after = len(remote.puts) + 2   # the connection drops after two new packs
    summary = await asyncio.wait_for(
        upload_alongside(a, [up], _snapshot_of_new_data(a, src, tmp_path)), timeout=60)
    # the snapshot is whole here; the last pass, at once (not after the backoff), failed too
    assert (await a.load_snapshot(summary.stored.id)).id == summary.stored.id
    assert up.status.last_error == "the connection was reset"
    assert up.status.objects_behind > 0
    # the store is back: a later pass (the daemon's, `store push`) puts the rest, each once
    remote.fail_after = None
    assert await uploader(a, remote, progress).upload_once()
    assert set(remote.puts) == await offered_names(a)
    assert len(remote.puts) == len(set(remote.puts)), Counter(remote.puts).most_common(3)


@pytest.mark.parametrize("failure, code", [
    (StoreFull("s3://b/p", "the server answered 507 to write packs/ab"), 12),
    (PeerNotPaired("store s3://b/p: device 1a2b is not a device of account 3f2a"), 23),
    (StorageError("the connection was reset"), 11),
    (ConnectionResetError(104, "Connection reset by peer"), 11),
    (TimeoutError(), 11)])
def test_a_failed_upload_ends_with_the_failures_exit_code_and_names_the_store_once(
        failure: BaseException, code: int) -> None:
    error = store_error("s3://b/p", failure, "the snapshot is saved here")
    line = str(error)
    assert error.exit_code == code, line
    assert line.count("s3://b/p") == 1 and "\n" not in line, line
    assert line.endswith("; the snapshot is saved here") and ".;" not in line, line


class Gated(WatchedStore):
    """Puts of the names in `held` wait for `release`; `started` records every put begun."""

    def __init__(self, root: Path, held: set[str]) -> None:
        super().__init__(root)
        self.held, self.release = held, asyncio.Event()
        self.started: list[str] = []

    async def put(self, name, data):
        self.started.append(name)
        if name in self.held:
            await self.release.wait()
        await super().put(name, data)


async def _stored_pack(repo: Repository, size: int) -> str:
    from p2pbackup.format.pack import pack_name

    data = os.urandom(size)
    name = f"packs/{pack_name(data)}"
    await repo.store.put(name, data)
    return name


async def test_a_pack_stored_during_a_pass_goes_up_beside_its_slowest_put_not_after(
        pair, tmp_path, progress):
    """A pass used to end at its slowest put, the other slots idle, before a new pass took
    what the snapshot stored meanwhile: packs named by `notify` join the pass under way."""
    a, _, _ = pair
    slow = await _stored_pack(a, 50_000)
    remote = Gated(tmp_path / "remote", {slow})
    up = uploader(a, remote, progress, parallel=2)
    run = asyncio.ensure_future(up.run())
    await eventually(lambda: slow in remote.started, timeout=30)
    late = await _stored_pack(a, 60_000)
    up.notify([late])
    await eventually(lambda: late in remote.puts, timeout=30)
    assert slow not in remote.puts   # still held: `late` did not wait for the pass to end
    remote.release.set()
    up.finish()
    await asyncio.wait_for(run, timeout=30)
    assert set(remote.puts) == await offered_names(a)
    assert len(remote.puts) == len(set(remote.puts))


async def test_a_pass_puts_the_largest_objects_of_a_phase_first(pair, tmp_path, progress):
    """The pass ends with its last put: small ones last fill the slots the large ones
    leave, instead of a 16 MiB pack started last holding the pass alone."""
    a, _, _ = pair
    up0 = uploader(a, WatchedStore(tmp_path / "first"), progress)
    assert await up0.upload_once()
    sizes = {await _stored_pack(a, n): n for n in (3_000, 90_000, 20_000, 150_000, 7_000)}
    remote = WatchedStore(tmp_path / "first")
    up = uploader(a, remote, progress, parallel=1)
    assert await up.upload_once()
    packs = [n for n in remote.puts if n in sizes]
    assert [sizes[n] for n in packs] == [150_000, 90_000, 20_000, 7_000, 3_000], packs


async def test_a_pass_after_a_failed_one_shows_the_store_unreachable_until_a_put_goes_through(
        pair, tmp_path, progress):
    """Status read while a retry pass runs said 'reachable' before its first put failed
    again (a full store flickered between the two; a daemon test read it so)."""
    a, _, _ = pair
    remote = Gated(tmp_path / "remote", set())
    up = uploader(a, remote, progress)
    assert await up.upload_once()
    held = await _stored_pack(a, 40_000)
    remote.held.add(held)
    remote.fail = StorageError("the server is full")
    assert not await up.upload_once()
    remote.fail = None
    retry = asyncio.ensure_future(up.upload_once())
    await eventually(lambda: held in remote.started, timeout=30)
    assert up.status.reachable is False   # the retry has not heard from the store yet
    remote.release.set()
    assert await retry
    assert up.status.reachable is True
