"""A real owner signs a removal record dated 1970: a peer still keeps what it lists for the
whole grace period, counted from when the peer first held the record (noted beside its store,
never taken from the record), and losing that note only makes deletion later."""

from __future__ import annotations

from pathlib import Path

from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.format.removal import REMOVABLE, Removal, removal_name, removal_object
from p2pbackup.repo import removals

OWNER = DeviceIdentity.generate()
GRACE = 7 * 86400
T0 = 1_800_000_000 * 10**9          # when the peer first holds the record
S = 10**9
PACK, SNAPSHOT = "packs/" + "ab" * 32, "snapshots/" + "cd" * 32


async def peer_store_with_a_1970_record(root: Path) -> LocalDirStore:
    store = LocalDirStore(root)
    for name in (PACK, SNAPSHOT):
        await store.put(name, b"ciphertext")
    record = removal_object(Removal(OWNER.device_id, 0, (PACK, SNAPSHOT)), OWNER.sign)
    await store.put(removal_name(record), record)
    return store


async def due(store: LocalDirStore, seen: removals.FirstSeen, now_ns: int) -> list[str]:
    records = await removals.held(store, {OWNER.device_id: OWNER.public_key}.get)
    assert len(records) == 1   # the record checks out: signed by a real owner
    return await removals.apply_due(store, records, GRACE, kinds=REMOVABLE, seen=seen,
                                    now_ns=now_ns)


async def test_a_backdated_removal_record_waits_the_grace_period_from_its_receipt(tmp_path):
    store = await peer_store_with_a_1970_record(tmp_path / "store")
    seen = removals.FirstSeen(tmp_path / "removals-first-seen")
    assert await due(store, seen, T0) == []
    assert await store.has(PACK) and await store.has(SNAPSHOT)
    # A later look (another process: the note is read back from its file) still keeps it.
    seen = removals.FirstSeen(tmp_path / "removals-first-seen")
    assert await due(store, seen, T0 + GRACE * S - 1) == []
    assert await store.has(PACK) and await store.has(SNAPSHOT)
    assert sorted(await due(store, seen, T0 + GRACE * S)) == [PACK, SNAPSHOT]
    assert not await store.has(PACK) and not await store.has(SNAPSHOT)


async def test_losing_the_first_seen_note_makes_deletion_later_never_earlier(tmp_path):
    store = await peer_store_with_a_1970_record(tmp_path / "store")
    note = tmp_path / "removals-first-seen"
    assert await due(store, removals.FirstSeen(note), T0) == []
    note.unlink()   # lost: the record counts as first seen at the next look
    assert await due(store, removals.FirstSeen(note), T0 + GRACE * S) == []
    note.write_bytes(b"\x93damaged")   # damaged: the same
    assert await due(store, removals.FirstSeen(note), T0 + 2 * GRACE * S) == []
    assert await store.has(PACK)
    assert sorted(await due(store, removals.FirstSeen(note), T0 + 3 * GRACE * S)) == \
        [PACK, SNAPSHOT]
