"""A restore from S3 (weed mini) reads each window of a pack once, however far apart in the
tree the files whose chunks it holds are, and its writers take what is held without the
event loop."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pbackup.backup.restore import restore
from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.blobs.s3 import S3Store
from p2pbackup.blobs.windows import RangeWindows
from p2pbackup.config import Source
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.crypto.keys import AccountKeys
from p2pbackup.repo.repository import Repository
from tests import servers
from tests.conftest import tree_state


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.S3Server]:
    yield from servers.weed_mini(tmp_path_factory.mktemp("weed"))


async def test_a_restore_fetches_no_window_twice(weed: servers.S3Server, tmp_path: Path
                                                 ) -> None:
    # a/x and c/x are one file's bytes (their chunks are stored once); b's files come
    # between them in the tree and fill more windows than are kept.
    src = tmp_path / "src"
    for folder in ("a", "b", "c"):
        (src / folder).mkdir(parents=True)
    x = os.urandom(256 << 10)
    (src / "a" / "x").write_bytes(x)
    for i in range(8):
        (src / "b" / f"f{i}").write_bytes(os.urandom(200 << 10))
    (src / "c" / "x").write_bytes(x)
    store = S3Store(f"s3://{weed.new_bucket()}/repo", weed.options())
    fetched: Counter[tuple[str, int, int]] = Counter()

    async def counted(name: str, start: int, length: int) -> bytes:
        fetched[name, start, length] += 1
        return await read(name, start, length)

    read = store._read_exact
    # Windows small enough for this tree to need more of them than are kept.
    store._windows = RangeWindows(counted, window=128 << 10, keep=8)
    repo = await Repository.create(store, AccountKeys(os.urandom(32)),
                                   DeviceIdentity.generate(), str(tmp_path / "cache"), "test")
    try:
        stored = (await take_snapshot(repo, (Source("src", str(src)),),
                                      temp_dir=str(tmp_path / "t"))).stored
        fetched.clear()
        await restore(repo, stored, str(tmp_path / "out"), workers=1, processes=False)
    finally:
        await repo.close()
    assert tree_state(tmp_path / "out" / "src") == tree_state(src)
    packs = {k: n for k, n in fetched.items() if k[0].startswith("packs/")}
    assert packs and max(packs.values()) == 1, sorted(packs.items())


async def test_each_folder_listing_is_read_once(weed: servers.S3Server, tmp_path: Path
                                                ) -> None:
    # The plan reads every listing before the restore starts; its walk read each again
    # (through the event loop, one request each), unless the plan kept it.
    src = tmp_path / "src"
    for a in range(3):
        for b in range(3):
            folder = src / f"d{a}" / f"e{b}"
            folder.mkdir(parents=True)
            (folder / "f").write_bytes(os.urandom(1000 + a * 10 + b))
    store = S3Store(f"s3://{weed.new_bucket()}/repo", weed.options())
    repo = await Repository.create(store, AccountKeys(os.urandom(32)),
                                   DeviceIdentity.generate(), str(tmp_path / "cache"), "test")
    reads: Counter[bytes] = Counter()
    read_blob = repo.read_blob_blocking

    def counted(blob_id: bytes, scope: str | None = None) -> bytes:
        reads[blob_id] += 1
        return read_blob(blob_id, scope)

    try:
        stored = (await take_snapshot(repo, (Source("src", str(src)),),
                                      temp_dir=str(tmp_path / "t"))).stored
        repo.read_blob_blocking = counted   # type: ignore[method-assign]
        await restore(repo, stored, str(tmp_path / "out"), workers=1, processes=False)
    finally:
        await repo.close()
    assert tree_state(tmp_path / "out" / "src") == tree_state(src)
    # the 13 listings (src, d0-d2 and their e0-e2), each read once (the files are chunks)
    assert len(reads) >= 13 and max(reads.values()) == 1, sorted(reads.values())


async def test_reads_of_windows_held_do_not_go_through_the_event_loop(
        weed: servers.S3Server, tmp_path: Path) -> None:
    # Folders of small files, as a home holds: each window holds many files' chunks.
    src = tmp_path / "src"
    for a in range(4):
        (src / f"d{a}").mkdir(parents=True)
        for i in range(40):
            (src / f"d{a}" / f"f{i}").write_bytes(os.urandom(20_000 + i))
    store = S3Store(f"s3://{weed.new_bucket()}/repo", weed.options())
    repo = await Repository.create(store, AccountKeys(os.urandom(32)),
                                   DeviceIdentity.generate(), str(tmp_path / "cache"), "test")
    ways: Counter[str] = Counter()
    held, on_loop = store.get_spans_held, repo.run_blocking

    def counted_held(name: str, spans: list[tuple[int, int]]) -> list | None:
        got = held(name, spans)
        ways["held" if got is not None else "missed"] += 1
        return got

    def counted_loop(coro):   # type: ignore[no-untyped-def]
        ways["loop"] += 1
        return on_loop(coro)

    try:
        stored = (await take_snapshot(repo, (Source("src", str(src)),),
                                      temp_dir=str(tmp_path / "t"))).stored
        store.get_spans_held = counted_held   # type: ignore[method-assign]
        repo.run_blocking = counted_loop   # type: ignore[method-assign]
        await restore(repo, stored, str(tmp_path / "out"), workers=2, processes=False)
    finally:
        await repo.close()
    assert tree_state(tmp_path / "out" / "src") == tree_state(src)
    # every read asks for what is held first; only those it lacks go to the loop
    assert ways["held"] > 0 and ways["loop"] < ways["held"] + ways["missed"], ways
    assert ways["held"] >= 4 * ways["missed"], ways   # (162 and 3 here, measured)
