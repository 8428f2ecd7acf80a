"""The pack index keeps a blob found in several packs when one of them goes."""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from p2pbackup.backup.maintenance import forget_and_prune
from p2pbackup.backup.restore import restore
from p2pbackup.backup.verify import verify
from p2pbackup.format.header import Kind
from p2pbackup.format.pack import PackBuilder
from p2pbackup.repo.index import INDEX_VERSION, BlobLocation, PackIndex
from p2pbackup.repo.repository import Repository

from tests.index_view import blob_locations

from .conftest import A, KEYS

Pack = tuple[str, str, int, int, list[tuple[bytes, int, int, int, int]]]


def _pack(ids: list[bytes]) -> Pack:
    return os.urandom(32).hex(), "src", 0, len(ids) * 100, \
        [(bid, 1, i * 100, 90, 200) for i, bid in enumerate(ids)]


async def _open(path: Path) -> PackIndex:
    index = PackIndex(str(path))
    await index.open()
    return index


async def test_a_blob_in_two_packs_survives_dropping_either(tmp_path: Path):
    shared, only_old, only_new = os.urandom(32), os.urandom(32), os.urandom(32)
    # The repacked pack arrives first, then the original it replaced: the order a new
    # device can see during a prune's grace period.
    new, old = _pack([only_new, shared]), _pack([shared, only_old])
    for first, second, dropped in ((new, old, old), (new, old, new), (old, new, old)):
        path = tmp_path / os.urandom(4).hex() / "index.sqlite"
        index = await _open(path)
        await index.add_packs([first])
        await index.add_pack(*second[:4], second[4])
        assert index.blobs[shared].pack == first[0]   # the first location stays in use
        await index.remove_pack(dropped[0])
        kept = second if dropped is first else first
        assert index.blobs[shared].pack == kept[0], "the blob moved to the surviving copy"
        assert index.blobs[shared].offset == next(o for b, _k, o, _l, _r in kept[4] if b == shared)
        held = await blob_locations(index)
        assert all(loc.pack != dropped[0] for loc in held.values())
        assert all(index.blobs.get(bid) == loc for bid, loc in held.items())
        await index.close()
        # The same after reopening: the database and its blob map agree.
        again = await _open(path)
        assert await blob_locations(again) == held
        assert all(again.blobs.get(bid) == loc for bid, loc in held.items())
        await again.remove_pack(kept[0])
        assert shared not in again.blobs and not again.blobs   # no copy left: gone
        await again.close()


async def test_spares_in_one_batch_and_a_pack_added_twice(tmp_path: Path):
    shared = os.urandom(32)
    a, b, c = _pack([shared]), _pack([shared]), _pack([shared, os.urandom(32)])
    index = await _open(tmp_path / "index.sqlite")
    await index.add_packs([a, b, c])
    await index.add_packs([b])          # sync_index or a re-sent pack: no second spare
    assert index.blobs[shared].pack == a[0]
    await index.remove_packs([a[0], c[0]])
    assert index.blobs[shared] == BlobLocation(b[0], 0, 90, 200, 1)
    await index.remove_pack(b[0])
    assert not index.blobs and not index.packs
    await index.close()
    db = sqlite3.connect(tmp_path / "index.sqlite")
    assert db.execute("SELECT count(*) FROM spare").fetchone() == (0,)
    db.close()


async def test_an_index_of_an_older_version_is_rebuilt_from_the_packs(pair, caplog):
    a, _b, _src = pair
    path, held = a.index.path, await blob_locations(a.index)
    await a.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value=? WHERE key='version'", (str(INDEX_VERSION - 1),))
    db.commit()
    db.close()
    with caplog.at_level("INFO"):
        again = await Repository.open(a.store, a.keys, a.identity,
                                      os.path.dirname(os.path.dirname(path)))
    assert "made by another version" in caplog.text and "damaged" not in caplog.text
    assert await blob_locations(again.index) == held
    assert all(again.index.blobs.get(bid) == loc for bid, loc in held.items())
    await again.close()



async def _store_a_copy(repo: Repository, name: str) -> str:
    """Write a second pack holding the same blobs as pack `name` (as repair or repack do)."""
    data = await repo.store.get(f"packs/{name}")
    scope, epoch, _ = repo.index.packs[name]
    copy = PackBuilder(scope, epoch, repo.config.pack_size)
    for bid, loc in await repo.index.pack_blobs(name):
        copy.add(loc.kind, bid, data[loc.offset:loc.offset + loc.length], loc.raw_length)
    copy_name, copy_data, trailer = copy.finish(repo.keys.meta_key)
    assert copy_name != name
    await repo.store.put(f"packs/{copy_name}", copy_data)
    await repo.index.add_pack(copy_name, scope, epoch, len(copy_data),
                              [(b.id, b.kind, b.offset, b.length, b.raw_length)
                               for b in trailer.blobs])
    return copy_name


async def test_a_pack_holding_only_copies_is_pruned_and_takes_over_when_the_original_goes(
        pair, tmp_path: Path):
    a, _b, src = pair
    name = next(loc.pack for loc in (await blob_locations(a.index)).values()
                if loc.kind == Kind.CHUNK)
    copy = await _store_a_copy(a, name)
    assert not await a.index.pack_blobs(copy)   # every blob is read from the original

    # Nothing reads from the copy: prune frees it rather than keeping it forever.
    result = await forget_and_prune(a, A, None, prune_after=True)
    assert result["prune"]["packs_deleted"] == 1 and result["prune"]["packs_repacked"] == 0
    assert not await a.store.has(f"packs/{copy}") and await a.store.has(f"packs/{name}")
    assert (await verify(a, read_data=True)).ok

    # The original goes (a repair, a peer's prune): the copy takes over, nothing is lost.
    copy = await _store_a_copy(a, name)
    await a.index.remove_pack(name)
    await a.store.delete(f"packs/{name}")
    assert await a.index.pack_blobs(copy)
    assert (await verify(a, read_data=True)).ok
    (latest,), _ = await a.list_snapshots()
    await restore(a, latest, str(tmp_path / "out"))
    for f in src.iterdir():
        assert (tmp_path / "out" / "src" / f.name).read_bytes() == f.read_bytes()


async def test_a_process_that_loaded_earlier_still_moves_blobs_to_their_copies(tmp_path: Path):
    """The daemon and a command share the index: one that opened before the other added packs
    still finds their blobs and spares in the database when it drops a pack."""
    path = tmp_path / "index.sqlite"
    early = await _open(path)
    shared = os.urandom(32)
    first, copy = _pack([shared, os.urandom(32)]), _pack([shared])
    writer = await _open(path)
    await writer.add_packs([first])
    await writer.add_packs([copy])
    await writer.close()
    await early.remove_pack(first[0])     # it never saw either pack
    await early.close()
    after = await _open(path)
    assert await blob_locations(after) == {shared: BlobLocation(copy[0], 0, 90, 200, 1)}
    assert after.blobs.get(shared) == BlobLocation(copy[0], 0, 90, 200, 1)
    await after.close()


async def test_a_damaged_pack_loses_only_its_bad_blobs_and_a_spare_copy_takes_over(
        tmp_path: Path):
    from p2pbackup.repo.index import PackDamage

    bad, spared, good = os.urandom(32), os.urandom(32), os.urandom(32)
    damaged, other = _pack([bad, spared, good]), _pack([spared])
    path = tmp_path / "index.sqlite"
    index = await _open(path)
    await index.add_packs([damaged, other])
    where = {bid: index.blobs[bid] for bid in (bad, spared)}
    await index.mark_damaged(damaged[0], PackDamage("changed", where))
    assert bad not in index.blobs and index.bad_blobs[bad] == where[bad]
    assert index.blobs[spared].pack == other[0]        # the copy elsewhere is read now
    assert index.blobs[good].pack == damaged[0]        # what authenticates stays in use
    held = await blob_locations(index)
    await index.close()
    again = await _open(path)                          # kept in the database, not only here
    assert again.damaged[damaged[0]].bad == where and await blob_locations(again) == held
    # An intact copy of the pack added again (a peer sent it, repair fetched it): healed.
    await again.add_packs([damaged])
    assert not again.damaged and not again.bad_blobs and again.blobs[bad].pack == damaged[0]
    # A damaged pack that leaves the store leaves the list too.
    await again.mark_damaged(damaged[0], PackDamage("changed", {bad: where[bad]}))
    await again.remove_pack(damaged[0])
    assert not again.damaged and bad not in again.blobs
    await again.close()
    last = await _open(path)
    assert not last.damaged
    await last.close()


def _index_threads() -> set:
    import threading

    return {t for t in threading.enumerate() if "_connection_worker_thread" in t.name}


def _no_new_thread_stays(before: set) -> None:
    for t in _index_threads() - before:
        t.join(timeout=10)   # a closed connection's thread ends at once; a leaked one never
        assert not t.is_alive(), "an index connection's thread keeps running"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
async def test_a_full_disk_is_not_damage_and_a_reader_keeps_the_index_in_memory(
        pair, tmp_path: Path):
    from p2pbackup.errors import DiskFull
    from tests.diskfull import fill, small_tmpfs

    a, _b, _src = pair
    with small_tmpfs(tmp_path / "small", "1m") as fs:
        first = await Repository.open(a.store, a.keys, A, str(fs))
        path = first.index.path
        await first.close()
        with closing(sqlite3.connect(path)) as db:   # a pack to index: opening writes
            db.execute("DELETE FROM blobs WHERE pack=(SELECT min(num) FROM packs)")
            db.execute("DELETE FROM packs WHERE num=(SELECT min(num) FROM packs)")
            db.execute("UPDATE meta SET value=value+1 WHERE key='generation'")
            db.commit()
        before = Path(path).read_bytes()
        threads = _index_threads()
        for held in (True, False):   # held open (as by a running daemon), or by nobody
            with closing(sqlite3.connect(path)) as holder:
                if held:
                    holder.execute("SELECT count(*) FROM packs").fetchone()
                fill(fs)
                with pytest.raises(DiskFull):
                    await Repository.open(a.store, a.keys, A, str(fs))
                _no_new_thread_stays(threads)
                reader = await Repository.open(a.store, a.keys, A, str(fs), read_only=True)
                assert reader.index.in_memory
                assert await blob_locations(reader.index) == await blob_locations(a.index)
                assert all(reader.index.blobs.get(bid) == loc for bid, loc in
                           (await blob_locations(a.index)).items())
                assert not reader.missing_packs and not reader.damaged_packs
                await reader.close()
            assert Path(path).read_bytes() == before   # neither thrown away nor written
        _no_new_thread_stays(threads)


async def test_a_repository_whose_creation_fails_leaves_no_thread(tmp_path: Path):
    from p2pbackup.blobs.local import LocalDirStore
    from p2pbackup.errors import DiskFull

    class FullForRecords(LocalDirStore):
        """The disk fills up right after the repository config is written."""

        async def put(self, name, data):
            if name.startswith("devices/"):
                raise DiskFull(self.root)
            await super().put(name, data)

    threads = _index_threads()
    with pytest.raises(DiskFull):
        await Repository.create(FullForRecords(tmp_path / "store"), KEYS, A,
                                str(tmp_path / "cache"), "a")
    _no_new_thread_stays(threads)


async def test_the_stores_size_over_time_is_kept_a_minute_apart_and_thinned_after_two_days(
        tmp_path: Path):
    """The web console's chart of the store's size: the index notes the totals after each
    change to its packs (packs carry no time, so nothing else can tell how the store grew)."""
    index = await _open(tmp_path / "index.sqlite")
    t = 1_800_000_000.0
    index.clock = lambda: t
    one, two = _pack([os.urandom(32)]), _pack([os.urandom(32), os.urandom(32)])
    await index.add_packs([one])
    t += 10   # the same minute: one row, its latest totals
    await index.add_packs([two])
    t += 120
    await index.remove_pack(one[0])
    start = int(1_800_000_000) // 60 * 60
    assert await index.size_history() == [(start, 300, 2), (start + 120, 200, 1)]
    # Beyond two days, one row an hour is kept (the last of it).
    for minute in range(3 * 60):
        t = start + 3600 * 10 + minute * 60
        await index.add_packs([_pack([os.urandom(32)])])
    t += 3 * 86400
    await index.add_packs([_pack([os.urandom(32)])])
    history = await index.size_history()
    assert history[0] == (start + 120, 200, 1)   # its first hour: the last row of it
    hours = [when for when, _, _ in history][1:-1]
    assert len(hours) == 3 and all(when % 3600 == 3540 for when in hours)
    assert history[-1][1:] == (200 + 181 * 100, 1 + 181)
    await index.close()
    again = await _open(tmp_path / "index.sqlite")
    assert await again.size_history() == history
    await again.close()


async def test_the_size_history_totals_follow_every_writer_and_an_index_made_before_them(
        tmp_path: Path):
    """The totals are kept by the database, not summed at each commit: they must still be the
    sum of `packs` after writes through another connection, a pack stored again at a new size,
    an index written before the totals existed, and the in-memory copy of a full disk."""
    path = tmp_path / "index.sqlite"
    index = await _open(path)
    one, two = _pack([os.urandom(32)]), _pack([os.urandom(32), os.urandom(32)])
    await index.add_packs([one, two])
    await index.close()
    with closing(sqlite3.connect(path)) as db, db:   # as an older p2pbackup left it
        for trigger in ("pack_added", "pack_removed", "pack_resized"):
            db.execute(f"DROP TRIGGER {trigger}")
        db.execute("DROP TABLE pack_totals")
        db.execute("INSERT INTO packs (num, name, scope, epoch, size) VALUES (99, 'x', 's', 0, 7)")

    def summed() -> tuple[int, int]:
        with closing(sqlite3.connect(path)) as db:
            return db.execute("SELECT coalesce(sum(size), 0), count(*) FROM packs").fetchone()

    index = await _open(path)
    other = await _open(path)   # a second process writing the same index
    await other.add_packs([_pack([os.urandom(32)] * 3)])
    await index.add_packs([(one[0], "src", 0, 1000, one[4])])   # stored again, another size
    await other.remove_pack(two[0])
    await index.add_packs([_pack([os.urandom(32)])])
    assert (await index.size_history())[-1][1:] == summed() == (1000 + 7 + 300 + 100, 4)
    await other.close()
    await index.close()
    copy = PackIndex(str(path), in_memory=True)
    await copy.open()
    await copy.add_packs([_pack([os.urandom(32)])])
    assert (await copy.size_history())[-1][1:] == (1000 + 7 + 300 + 100 + 100, 5)
    await copy.close()
