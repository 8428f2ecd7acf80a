"""Sealing segments: a seal cut short (the daemon stopping) never seals its seq a second time."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from p2pbackup.backup.pointintime import plan_at
from p2pbackup.backup.seal import SealState, SegmentSealer
from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.config import Source
from p2pbackup.format.log import GENESIS
from p2pbackup.repo.logstore import LogStore, segment_name
from p2pbackup.repo.repository import Repository


async def test_a_seal_cancelled_after_its_segment_was_stored_does_not_seal_that_seq_again(
        repo: Repository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The daemon cancels its loops when it stops, then seals what is pending. A seal cancelled
    after its segment reached the store used to capture its changes again (stamped later) and
    seal them under the same seq, replacing the stored segment behind the head naming it:
    restore --at a moment between the two versions restored none of it (CI: the tree missing)."""
    src = tmp_path / "src"
    src.mkdir()
    sources = (Source("src", str(src)),)
    await take_snapshot(repo, sources, temp_dir=str(tmp_path / "t"))
    sealer = SegmentSealer(repo, repo.identity, sources, str(tmp_path / "t"),
                           SealState(0, GENESIS))
    name = segment_name(repo.identity.device_id, 1)
    stored, answer = asyncio.Event(), asyncio.Event()
    put = repo.store.put

    async def put_answered_late(key: str, data) -> None:
        await put(key, data)
        if key == name and not stored.is_set():
            stored.set()
            await answer.wait()  # written; the seal hears back only after it is cancelled
    monkeypatch.setattr(repo.store, "put", put_answered_late)
    try:
        (src / "a.txt").write_text("a\n")
        await sealer.capture(os.fsencode(src / "a.txt"))
        sealing = asyncio.create_task(sealer.seal())
        await stored.wait()
        first = bytes(await repo.store.get(name))
        sealing.cancel()
        answer.set()
        with pytest.raises(asyncio.CancelledError):
            await sealing
        moment = max(c.time_ns for _, seg in (await LogStore(repo).load_chain(
            repo.identity.device_id))[0] for _, cl in LogStore(repo).open_changes(seg)
            for c in cl.changes)
        await sealer.seal()  # what the daemon does last when it stops
    finally:
        sealer.close()
    assert bytes(await repo.store.get(name)) == first, "segment 1 was sealed a second time"
    links, problems = await LogStore(repo).load_chain(repo.identity.device_id)
    assert problems == [] and [s.seq for _, s in links] == [1]
    _, overlays, replayed = await plan_at(repo, "latest", moment)
    assert replayed == 1 and [e.name for e in overlays["src"].tree(b"", None).entries] == \
        [b"a.txt"]
