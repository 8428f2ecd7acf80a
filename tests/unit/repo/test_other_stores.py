"""`--from LOCATION` for a store that is not a directory here: snapshots, verify, restore and
recover go through the BlobStore interface alone (no local path, no blocking fast path).

The store below keeps its objects in a directory but offers only the async interface with
the default capabilities, as an S3 or WebDAV store does; it is registered in open_store's
scheme table as `elsewhere://`, so the same entry points the CLI calls are exercised."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p2pbackup import account, blobs, device
from p2pbackup.backup.restore import restore
from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.backup.verify import verify
from p2pbackup.blobs.base import BlobStore
from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.config import load_config
from tests.conftest import tree_state


class ElsewhereStore(BlobStore):
    """A store reached only through the async interface (capabilities: the defaults)."""

    def __init__(self, root: Path) -> None:
        self._dir = LocalDirStore(root)
        self.location = f"elsewhere://{root}"
        self.calls = 0
        self.whole: list[str] = []          # names read whole with get
        self.ranged: dict[str, int] = {}    # bytes read with get_range, per name

    async def put(self, name, data):
        self.calls += 1
        await self._dir.put(name, data)

    async def get(self, name):
        self.calls += 1
        self.whole.append(name)
        return await self._dir.get(name)

    async def get_range(self, name, offset, length):
        self.calls += 1
        got = await self._dir.get_range(name, offset, length)
        self.ranged[name] = self.ranged.get(name, 0) + len(got)
        return got

    async def has(self, name):
        return await self._dir.has(name)

    async def size(self, name):
        return await self._dir.size(name)

    async def list(self, prefix=""):
        async for n in self._dir.list(prefix):
            yield n

    async def delete(self, name):
        await self._dir.delete(name)


OPENED: list[ElsewhereStore] = []


def open_elsewhere(location: str, options: dict) -> ElsewhereStore:
    """The opener of `elsewhere://PATH` (registered in open_store's scheme table)."""
    OPENED.append(ElsewhereStore(Path(location.removeprefix("elsewhere://"))))
    return OPENED[-1]


@pytest.fixture
async def account_store(tmp_path: Path, monkeypatch):
    """A home with a snapshot of `src`, its recovery code, and its store's location as an
    `elsewhere://` store."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "big.bin").write_bytes(os.urandom(600_000))
    # Over restore's threshold for worker processes, which only a local store can feed (cheap:
    # it dedupes to a few chunks).
    (src / "pattern.bin").write_bytes(b"0123456789abcdef" * (33 * 65536))
    (src / "d" / "small.txt").write_text("small\n")
    home = tmp_path / "home"
    _, code = await device.init_device(home, [str(src)])
    async with device.open_device(home, write=True) as dev:
        await take_snapshot(dev.repo, dev.config.sources, temp_dir=dev.temp_dir)
    OPENED.clear()
    monkeypatch.setitem(blobs.OPENERS, "elsewhere", f"{__name__}:open_elsewhere")
    return home, src, code, f"elsewhere://{home / 'store'}"


async def test_snapshots_verify_and_restore_from_a_store_that_is_no_directory(
        account_store, tmp_path):
    home, src, _, location = account_store
    async with device.open_device(home, store=location) as dev:
        assert isinstance(dev.repo.store, ElsewhereStore)
        snaps, unreadable = await dev.repo.list_snapshots()
        assert len(snaps) == 1 and not unreadable
        report = await verify(dev.repo, read_data=True)
        assert report.ok and report.blobs_read > 0
        stored = await dev.repo.find_snapshot("latest", sources=dev.config.sources)
        summary = await restore(dev.repo, stored, str(tmp_path / "out"), workers=4)
        assert summary.files_restored == 3
    assert tree_state(tmp_path / "out" / "src") == tree_state(src)
    assert OPENED and OPENED[0].calls > 0


async def test_recover_sets_up_a_new_device_from_a_store_that_is_no_directory(
        account_store, tmp_path):
    home, src, code, location = account_store
    new = tmp_path / "new"
    got = await account.recover(new, location, code, "new-laptop")
    assert got.joined and load_config(new).device_name == "new-laptop"
    assert OPENED[0].calls > 0
    async with device.open_device(new, store=location) as dev:
        stored = await dev.repo.find_snapshot("latest")
        await restore(dev.repo, stored, str(tmp_path / "out"))
    assert tree_state(tmp_path / "out" / "src") == tree_state(src)


async def test_a_store_named_with_from_is_never_written(account_store):
    home, _, _, location = account_store
    from p2pbackup.errors import ConfigError

    with pytest.raises(ConfigError, match="read here, never written"):
        async with device.open_device(home, write=True, store=location):
            pass


async def test_opening_a_store_elsewhere_reads_each_packs_trailer_not_the_whole_pack(
        account_store):
    """A first `--from` of a remote store indexes its packs from their trailers (a ranged
    read of each pack's end): it used to download every pack whole to check it against its
    name, the whole repository before a restore could start. The index is the one reading
    every pack whole builds, and a changed byte in a pack's body is still caught where the
    blob is read (`verify --read-data`)."""
    home, _, _, location = account_store
    async with device.open_device(home) as dev:
        local = {n: (v, sorted(await dev.repo.index.pack_blobs(n)))
                 for n, v in dev.repo.index.packs.items()}
        sizes = {n: v[2] for n, v in dev.repo.index.packs.items()}
    assert len(local) >= 2
    async with device.open_device(home, store=location) as dev:
        store = OPENED[-1]
        assert not [n for n in store.whole if n.startswith("packs/")], store.whole
        for name in local:
            assert store.ranged[f"packs/{name}"] <= min(sizes[name], 64 << 10)
        assert {n: (v, sorted(await dev.repo.index.pack_blobs(n)))
                for n, v in dev.repo.index.packs.items()} == local
    big = max(sizes, key=lambda n: sizes[n])
    path = next((home / "store").glob(f"packs/*/{big}"))
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 1
    path.write_bytes(bytes(data))
    async with device.open_device(home, store=location) as dev:
        await dev.repo.rebuild_index()
        assert big not in dev.repo.index.damaged   # (its trailer is intact)
        report = await verify(dev.repo, read_data=True)
        assert [d.pack for d in report.damage] == [big]


async def test_a_pack_whose_trailer_is_unreadable_is_read_whole_and_scanned(
        account_store):
    """Where the trailer does not open (cut short, another key), the pack is examined
    whole as before: its blobs are found by scanning and it is noted as damaged."""
    home, _, _, location = account_store
    async with device.open_device(home) as dev:
        sizes = {n: v[2] for n, v in dev.repo.index.packs.items()}
    big = max(sizes, key=lambda n: sizes[n])
    path = next((home / "store").glob(f"packs/*/{big}"))
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))   # the trailer's length byte
    async with device.open_device(home, store=location) as dev:
        await dev.repo.rebuild_index()
        assert f"packs/{big}" in OPENED[-1].whole
        assert big in dev.repo.index.damaged
        assert dev.repo.index.packs[big][0] is not None   # (scanning found its blobs)


async def test_a_trailer_longer_than_the_first_read_is_read_again_whole(account_store,
                                                                       monkeypatch):
    """A pack of many small blobs has a trailer longer than the bytes first read from its
    end: a second read from the end takes all of it, and the pack is indexed, not scanned."""
    from p2pbackup.repo import repository

    home, _, _, location = account_store
    async with device.open_device(home) as dev:
        local = {n: v for n, v in dev.repo.index.packs.items()}
    monkeypatch.setattr(repository, "TRAILER_TAIL", 64)
    async with device.open_device(home, store=location) as dev:
        assert dict(dev.repo.index.packs) == local
        assert not dev.repo.index.damaged
        assert not [n for n in OPENED[-1].whole if n.startswith("packs/")]
