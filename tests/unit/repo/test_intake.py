"""Packs from peers checked and written by worker processes (real processes, real memfds)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import blake3
import pytest

from p2pbackup.backup.restore import restore
from p2pbackup.backup.verify import verify
from p2pbackup.errors import IntegrityError, StorageError
from p2pbackup.format.header import Kind
from p2pbackup.format.objects import seal_object
from p2pbackup.format.pack import PackBuilder
from p2pbackup.repo import intake as intake_mod
from p2pbackup.repo import replica
from p2pbackup.repo.intake import PackIntake

from .conftest import KEYS

pytestmark = pytest.mark.skipif(not intake_mod.available(), reason="needs memfd and /proc")


@pytest.fixture
async def intake(pair):
    _, b, _ = pair
    workers = PackIntake(b.store.root)
    yield workers
    await workers.close()


async def accept(repo, name: str, data: bytes, workers: PackIntake) -> bool:
    """As the daemon does: a pack's parts joined into shared memory, then accepted."""
    if name.startswith("packs/"):
        view = workers.join([data[:1000], data[1000:]], len(data))
        try:
            return await replica.accept(repo, name, view, durable=False, intake=workers)
        finally:
            workers.release(view)
    return await replica.accept(repo, name, data)


def temp_files(root: str) -> list[str]:
    return [f for _, _, files in os.walk(root) for f in files if f.endswith(".tmp")]


async def test_packs_checked_by_workers_are_stored_and_restore(pair, intake,
                                                               tmp_path: Path):
    a, b, src = pair
    names = sorted([n async for n in a.store.list("")], key=replica.transfer_order)
    for name in names:
        await accept(b, name, bytes(await a.store.get(name)), intake)
    await b.store.sync()
    assert len(intake._workers) == 2 and all(w.proc.returncode is None for w in intake._workers)
    for name in [n for n in names if n.startswith("packs/")]:
        assert await b.store.get(name) == await a.store.get(name)
    assert (await verify(b, read_data=True)).ok
    (latest,), _ = await b.list_snapshots()
    await restore(b, latest, str(tmp_path / "out"))
    assert (tmp_path / "out" / "src" / "f3").read_bytes() == (src / "f3").read_bytes()
    assert intake._free and not intake._in_use   # buffers went back for the next packs


async def test_a_worker_refuses_a_lying_blob_and_an_altered_pack(pair, intake):
    a, b, _ = pair
    keys = KEYS.scope("src", 0)
    builder = PackBuilder("src", 0)
    plain = b"planted content" * 100
    builder.add(Kind.CHUNK, keys.blob_id(b"what the id claims"),
                seal_object(Kind.CHUNK, plain, keys.data_key), len(plain))
    name, data, _ = builder.finish(KEYS.meta_key)
    with pytest.raises(IntegrityError, match="does not match its id"):
        await accept(b, f"packs/{name}", bytes(data), intake)
    assert not await b.store.has(f"packs/{name}")
    # A blob that expands beyond the raw length its trailer records (a decompression bomb).
    builder = PackBuilder("src", 0)
    bomb = b"\0" * (8 * 1024 * 1024)
    builder.add(Kind.CHUNK, keys.blob_id(bomb), seal_object(Kind.CHUNK, bomb, keys.data_key),
                1000)
    name, data, _ = builder.finish(KEYS.meta_key)
    with pytest.raises(IntegrityError, match="more than the raw length of 1000"):
        await accept(b, f"packs/{name}", bytes(data), intake)
    assert not await b.store.has(f"packs/{name}")

    pack = [n async for n in a.store.list("packs/")][0]
    altered = bytearray(await a.store.get(pack))
    altered[100] ^= 1
    with pytest.raises(IntegrityError, match="does not match its name"):
        await accept(b, pack, bytes(altered), intake)
    renamed = f"packs/{blake3.blake3(altered).hexdigest()}"
    with pytest.raises(IntegrityError, match="failed authentication"):
        await accept(b, renamed, bytes(altered), intake)   # named right, but a blob fails
    assert not await b.store.has(pack) and not await b.store.has(renamed)
    assert temp_files(b.store.root) == []
    assert pack.split("/")[1] not in b.index.packs


async def test_a_pack_held_by_a_killed_worker_goes_to_a_new_one(pair, intake):
    a, b, _ = pair
    pack = [n async for n in a.store.list("packs/")][0]
    data = bytes(await a.store.get(pack))
    view = intake.join([data], len(data))
    trailer, keys = replica._pack_trailer(b, view, "pack")
    blobs = [(x.kind, x.id, x.offset, x.length, x.raw_length) for x in trailer.blobs]
    await intake._worker()
    first = [w.proc for w in intake._workers]
    for p in first:
        os.kill(p.pid, signal.SIGSTOP)          # the pack reaches a worker...
    task = asyncio.get_running_loop().create_task(
        intake.take(pack, view, pack.split("/")[1], blobs, (keys.data_key, keys.id_key),
                    "pack"))
    await asyncio.sleep(0.3)
    assert not task.done()
    for p in first:
        os.kill(p.pid, signal.SIGKILL)          # ...which dies while on it
    await task                                  # a new worker stored it
    assert await b.store.get(pack) == data
    assert all(p.returncode == -signal.SIGKILL for p in first)
    assert not any(w.proc in first for w in intake._workers) and intake.usable


async def test_a_buffer_freed_twice_is_not_handed_out_twice(intake):
    first = intake.join([b"x" * 5000], 5000)
    intake.release(first)
    second = intake.join([b"y" * 5000], 5000)
    assert second.obj is first.obj              # reused for the next pack
    intake.release(first)                       # a late second release of the old view...
    third = intake.join([b"z" * 5000], 5000)
    assert third.obj is not second.obj          # ...must not free the buffer `second` uses
    assert bytes(second) == b"y" * 5000
    intake.release(second)
    intake.release(third)


def test_workers_die_with_a_daemon_killed_by_sigkill(tmp_path: Path):
    script = textwrap.dedent(f"""
        import asyncio, os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[3])!r})
        from p2pbackup.repo.intake import PackIntake

        async def main():
            workers = PackIntake({str(tmp_path)!r})
            await workers._worker()
            print(" ".join(str(w.proc.pid) for w in workers._workers), flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(p) for p in pids), "a pack worker outlived its daemon"
    finally:
        proc.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_an_idle_intake_lets_its_workers_and_buffers_go(pair, tmp_path: Path):
    a, b, _ = pair
    workers = PackIntake(b.store.root, idle=0.3)
    try:
        pack = [n async for n in a.store.list("packs/")][0]
        data = bytes(await a.store.get(pack))
        await accept(b, pack, data, workers)
        procs = [w.proc for w in workers._workers]
        assert len(procs) == 2 and workers._free
        for _ in range(500):       # 0.3 s, then the workers' exit is reaped
            if not workers._workers and all(p.returncode is not None for p in procs):
                break
            await asyncio.sleep(0.02)
        assert workers._workers == [] and workers._free == []
        assert all(p.returncode == 0 for p in procs)     # they ended, and were reaped
        await b.store.delete(pack)
        await accept(b, pack, data, workers)             # the next pack starts them again
        assert await b.store.get(pack) == data and len(workers._workers) == 2
    finally:
        await workers.close()


async def test_workers_that_cannot_run_give_way_to_checks_in_the_daemon(pair, monkeypatch,
                                                                        caplog):
    """A worker that dies at once (here: no Python to run it) fails its pack in one line;
    after three in a row, packs are checked in the daemon's own process and still stored."""
    a, b, _ = pair
    monkeypatch.setattr(intake_mod.sys, "executable", "/bin/false")
    workers = PackIntake(b.store.root)
    try:
        pack = [n async for n in a.store.list("packs/")][0]
        data = bytes(await a.store.get(pack))
        for _ in range(intake_mod.FAILURES):   # a take retries a worker found dead, so
            if not workers.usable:               # three failures may come in fewer packs
                break
            with pytest.raises(StorageError, match="checking packs from peers ended") as err:
                await accept(b, pack, data, workers)
            assert "\n" not in str(err.value)
        assert not workers.usable
        assert "checked in the daemon's own process from now on" in caplog.text
        assert await accept(b, pack, data, workers)
        assert await b.store.get(pack) == data
        altered = bytearray(data)
        altered[-100] ^= 1
        with pytest.raises(IntegrityError):       # and still checked
            await accept(b, f"packs/{blake3.blake3(altered).hexdigest()}", bytes(altered),
                         workers)
    finally:
        await workers.close()
