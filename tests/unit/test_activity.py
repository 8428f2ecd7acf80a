"""What the process is doing now (p2pbackup.activity): listed while it runs, read from the
work's own counters only when looked at, and fed by the snapshot, the seal, replication and
store uploads (the daemon's `status` shows it, the console draws bars)."""

from __future__ import annotations

import gc
import os
from pathlib import Path

from p2pbackup.activity import ACTIVITIES, Activities, sessions, tracked
from p2pbackup.protocol.sync import ObjectReceived, ObjectWanted, SyncSession
from tests.eventually import eventually


def test_an_activity_is_listed_while_it_runs_and_a_followed_one_while_its_owner_lives():
    reg = Activities()
    with reg.running("snapshot", "src", total=10) as act:
        act.done, act.phase = 4, "reading"
        (seen,) = reg.view()
        assert (seen["kind"], seen["name"], seen["done"], seen["total"], seen["phase"]) == \
            ("snapshot", "src", 4, 10, "reading")
    assert reg.view() == []

    class Owner:
        sent = 3
    owner = Owner()
    reg.follow(owner, lambda o: [{"kind": "upload", "name": "x", "done": o.sent}])
    owner.sent = 5
    assert [v["done"] for v in reg.view()] == [5]   # read when looked at
    del owner
    gc.collect()
    assert reg.view() == []   # following held nothing alive


async def test_a_tracked_coroutine_is_listed_while_it_runs():
    inside: list = []

    @tracked("seal")
    async def seal() -> int:
        inside.extend(v["kind"] for v in ACTIVITIES.view())
        return 7
    assert await seal() == 7
    assert "seal" in inside and all(v["kind"] != "seal" for v in ACTIVITIES.view())


def _valid(name: str) -> bool:
    return name.startswith("packs/")


def test_a_session_says_what_it_received_and_what_is_still_to_come():
    objects = {f"packs/{i}": os.urandom(10_000) for i in range(4)}
    a = SyncSession("A", set(objects), valid_name=_valid,
                    sizes={n: len(d) for n, d in objects.items()})
    b = SyncSession("B", set(), valid_name=_valid)
    b.receive_data(a.data_to_send())
    wanted = [e for e in a.receive_data(b.data_to_send()) if isinstance(e, ObjectWanted)]
    a.send_object(wanted[0].name, objects[wanted[0].name])   # one object of four
    got = [e for e in b.receive_data(a.data_to_send()) if isinstance(e, ObjectReceived)]
    assert len(got) == 1
    (view,) = sessions({"A" * 64: b})
    assert view["kind"] == "replication" and view["phase"] == "receiving"
    assert view["received_objects"] == 1 and view["objects_behind"] == 3
    assert view["bytes_behind"] == 30_000 and view["done"] == view["received_bytes"] == 10_000
    assert view["total"] == view["done"] + 30_000


async def test_a_snapshot_is_listed_with_its_progress_while_it_reads(tmp_path: Path,
                                                                      monkeypatch):
    from p2pbackup.backup import snapshot as snapshot_mod
    from p2pbackup.blobs.local import LocalDirStore
    from p2pbackup.config import Source
    from p2pbackup.crypto.identity import DeviceIdentity
    from p2pbackup.crypto.keys import AccountKeys
    from p2pbackup.repo.repository import Repository

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(100_000))
    repo = await Repository.create(LocalDirStore(tmp_path / "store"),
                                   AccountKeys(os.urandom(32)), DeviceIdentity.generate(),
                                   str(tmp_path / "cache"), "test")
    seen: list = []
    run = snapshot_mod.SnapshotBuilder.run

    def watched(self):
        out = run(self)
        seen.extend(v for v in ACTIVITIES.view() if v["kind"] == "snapshot")
        return out
    monkeypatch.setattr(snapshot_mod.SnapshotBuilder, "run", watched)
    try:
        await snapshot_mod.take_snapshot(repo, (Source("src", str(src)),),
                                         temp_dir=str(tmp_path / "t"))
    finally:
        await repo.close()
    assert [(v["name"], v["unit"], v["done"], v["files"]) for v in seen] == \
        [("src", "bytes", 100_000, 1)]
    assert not [v for v in ACTIVITIES.view() if v["kind"] == "snapshot"]


async def test_the_daemons_replicator_lists_each_peer_session(tmp_path: Path):
    from tests.unit.replication.test_member import running, two_repositories

    _src, a_id, b_id, ra, rb = await two_repositories(tmp_path)
    async with running(ra, rb, a_id, b_id) as (_pa, _sb, _pb):
        async def both_listed() -> bool:
            names = {v["name"] for v in ACTIVITIES.view() if v["kind"] == "replication"}
            return {a_id.device_id, b_id.device_id} <= names
        await eventually(both_listed, timeout=30)
        view = next(v for v in ACTIVITIES.view() if v["name"] == a_id.device_id)
        assert {"sent_bytes", "received_bytes", "objects_behind"} <= set(view)


async def test_the_daemons_seal_is_listed_while_it_writes_the_segment(tmp_path: Path):
    from p2pbackup.blobs.local import LocalDirStore
    from p2pbackup.crypto.identity import DeviceIdentity
    from p2pbackup.crypto.keys import AccountKeys
    from p2pbackup.config import Source
    from p2pbackup.backup.seal import SealState, SegmentSealer
    from p2pbackup.format.log import GENESIS
    from p2pbackup.repo.repository import Repository

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a\n")
    repo = await Repository.create(LocalDirStore(tmp_path / "store"),
                                   AccountKeys(os.urandom(32)), DeviceIdentity.generate(),
                                   str(tmp_path / "cache"), "test")
    sealer = SegmentSealer(repo, repo.identity, (Source("src", str(src)),),
                           str(tmp_path / "t"), SealState(0, GENESIS))
    seen: list = []
    store_segment = sealer.logstore.store_segment

    async def watched(identity, segment):
        seen.extend(v["kind"] for v in ACTIVITIES.view())
        return await store_segment(identity, segment)
    sealer.logstore.store_segment = watched  # type: ignore[method-assign]
    try:
        await sealer.capture(os.fsencode(src / "a.txt"))
        assert await sealer.seal() is not None
    finally:
        sealer.close()
        await repo.close()
    assert "seal" in seen


def test_an_activity_in_words_as_status_prints_it():
    from p2pbackup.views import activity_line

    assert activity_line({"kind": "snapshot", "name": "src", "phase": "reading",
                          "done": 1 << 20, "total": 4 << 20, "files": 12}, {}) == \
        "snapshot of src: reading 25% (1.0 MiB of 4.0 MiB); 12 files"
    assert activity_line({"kind": "replication", "name": "b" * 64, "phase": "receiving",
                          "done": 300, "total": 1200, "sent_objects": 0, "sent_bytes": 0,
                          "received_objects": 3, "received_bytes": 300},
                         {"b" * 64: "laptop"}) == \
        ("replication with laptop: receiving 25% (300 B of 1.2 KiB); sent 0 objects (0 B), "
         "received 3 (300 B)")
    assert activity_line({"kind": "seal", "name": "", "phase": "running", "done": 0,
                          "total": None}, {}) == "sealing the log segment: running"
