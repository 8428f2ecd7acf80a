"""Replaying the log: seq orders, time is metadata (a clock that jumps back breaks nothing)."""

from __future__ import annotations

import os
import time
from pathlib import Path


from p2pbackup.backup.pointintime import plan_at
from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.config import Source
from p2pbackup.format.log import DEL, GENESIS, PUT, Change, ChangeList, Segment, SegmentPart
from p2pbackup.format.records import FILE, TreeEntry
from p2pbackup.repo.logstore import LogStore
from p2pbackup.repo.repository import Repository

S = 1_000_000_000


def entry(name: bytes, size: int) -> TreeEntry:
    return TreeEntry(FILE, name, 0o100644, 0, 0, 1, 1, 1, size, ())


async def test_clock_going_backwards_keeps_log_order(repo: Repository, tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    snap = await take_snapshot(repo, (Source("src", str(src)),), temp_dir=str(tmp_path / "t"))
    t0 = snap.stored.snapshot.time_ns
    log = LogStore(repo)
    ident = repo.identity
    # Wall-clock times: +10 s, +20 s, then the clock jumps back to +5 s, then +30 s.
    steps = [[Change(PUT, b"a", t0 + 10 * S, entry(b"a", 1))],
             [Change(PUT, b"b", t0 + 20 * S, entry(b"b", 2))],
             [Change(DEL, b"a", t0 + 5 * S)],
             [Change(PUT, b"c", t0 + 30 * S, entry(b"c", 3))]]
    prev, seq = GENESIS, 0
    for changes in steps:
        seq += 1
        part = SegmentPart("src", 0, log.seal_changes("src", 0, ChangeList(tuple(changes))))
        head = await log.append(ident, Segment(ident.device_id, seq, prev, changes[0].time_ns,
                                               (part,)))
        prev = head.segment
    links, problems = await log.load_chain(ident.device_id)
    assert problems == [] and [s.seq for _, s in links] == [1, 2, 3, 4]

    async def names_at(t: int) -> list[bytes]:
        _, overlays, _ = await plan_at(repo, "latest", t)
        return [e.name for e in overlays["src"].tree(b"", None).entries]

    # Replay goes in seq order and stops at the first change made after T, so every answer is
    # a state the device really passed through, even though "delete a" is dated +5 s.
    assert await names_at(t0 + 15 * S) == [b"a"]  # stops at b (+20)
    assert await names_at(t0 + 25 * S) == [b"b"]  # a, b, then the back-dated delete; stops at c
    assert await names_at(t0 + 30 * S) == [b"b", b"c"]
    assert await names_at(t0 + 7 * S) == []  # stops at once: a (+10) came first


async def test_rescan_compares_with_this_devices_snapshot_not_a_peers_newer_one(
        repo: Repository, tmp_path: Path):
    from p2pbackup.blobs.local import LocalDirStore
    from p2pbackup.crypto.identity import DeviceIdentity
    from p2pbackup.backup.seal import SealState, SegmentSealer
    from p2pbackup.daemon.rescan import rescan

    src, theirs = tmp_path / "src", tmp_path / "theirs"
    src.mkdir()
    theirs.mkdir()
    (src / "a.txt").write_text("a\n")
    sources = (Source("src", str(src)),)
    mine = await take_snapshot(repo, sources, temp_dir=str(tmp_path / "t"))
    # Another device of the account replicated a newer snapshot of its own into this store.
    peer = await Repository.open(LocalDirStore(tmp_path / "store"), repo.keys,
                                 DeviceIdentity.generate(), str(tmp_path / "cache-peer"))
    try:
        await peer.register_device(peer.identity, "peer")
        await take_snapshot(peer, (Source("theirs", str(theirs)),), temp_dir=str(tmp_path / "t"))
    finally:
        await peer.close()
    base, _, _ = await plan_at(repo, "latest", time.time_ns(), sources=sources)
    assert base.id == mine.stored.id

    (src / "b.txt").write_text("made while the daemon was down\n")
    sealer = SegmentSealer(repo, repo.identity, sources, str(tmp_path / "t"), SealState(0, GENESIS))
    try:
        assert await rescan(repo, sealer) == 1
    finally:
        sealer.close()


async def test_the_log_records_a_wal_databases_commit_as_the_database_never_its_side_files(
        repo: Repository, tmp_path: Path):
    """In WAL mode a commit writes only the -wal file: the daemon must capture the database
    (consistently, through SQLite) when its side files change, and never log the -wal/-shm
    themselves, which a point-in-time restore would put next to the database (a snapshot
    never stores them either)."""
    import sqlite3

    from p2pbackup.backup.seal import SealState, SegmentSealer

    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "t").mkdir()  # the daemon's temp dir, where the consistent copy is made
    db = sqlite3.connect(src / "app.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (x)")
    db.commit()
    sources = (Source("src", str(src)),)
    sealer = SegmentSealer(repo, repo.identity, sources, str(tmp_path / "t"), SealState(0, GENESIS))
    try:
        db.execute("INSERT INTO t VALUES ('made after the snapshot')")
        db.commit()  # only app.db-wal changes
        for name in ("app.db-wal", "app.db-shm"):
            await sealer.capture(os.fsencode(src / name))
        logged = [(c.path, c.entry.sqlite if c.entry else None)
                  for c in sealer.pending.get("src", [])]
        assert logged and {p for p, _ in logged} == {b"app.db"}, logged
        assert all(sq for _, sq in logged)
    finally:
        sealer.close()
        db.close()


async def test_segment_summaries_are_read_once_and_only_the_newest_kept(repo: Repository):
    from p2pbackup.backup.pointintime import log_summaries

    logs = LogStore(repo)
    prev = GENESIS
    for seq in range(1, 6):
        change = Change(PUT, b"f%d" % seq, 1000 + seq,
                        TreeEntry(FILE, b"f%d" % seq, 0o100644, 0, 0, 1))
        seg = Segment(repo.identity.device_id, seq, prev, 2000 + seq, (SegmentPart(
            "src", 0, logs.seal_changes("src", 0, ChangeList((change,)))),))
        prev = (await logs.append(repo.identity, seg)).segment
    known: dict = {}
    got = await log_summaries(logs, repo.identity.device_id, 3, known)
    assert [(s.seq, s.changes, s.first_ns) for s in got] == \
        [(3, (("src", 1),), 1003), (4, (("src", 1),), 1004), (5, (("src", 1),), 1005)]
    loads = 0
    load = logs.load_segment

    async def counted(device, seq):
        nonlocal loads
        loads += 1
        return await load(device, seq)
    logs.load_segment = counted  # type: ignore[method-assign]
    assert await log_summaries(logs, repo.identity.device_id, 2, known) == got[1:]
    assert loads == 0 and sorted(k[1] for k in known) == [4, 5]
