"""BlobSink's batch path: many threads sealing straight into shared pack buffers."""

from __future__ import annotations

import asyncio
import os
import random
import threading


from p2pbackup.backup.sink import BlobSink
from p2pbackup.format.header import FLAG_ZSTD, Kind
from p2pbackup.format.objects import compress_many
from p2pbackup.repo.repository import Repository


def _blobs(seed: int) -> list[bytes]:
    r = random.Random(seed)
    out = []
    for i in range(200):
        n = r.choice([0, 10, 100, 5000, 70_000, 300_000])
        out.append(r.randbytes(n) if i % 2 else (b"text %d " % (i % 17)) * (n // 8))
    return out


async def test_threads_store_each_blob_once_across_many_small_packs(repo: Repository):
    sink = BlobSink(repo, pack_size=200_000)  # packs fill (and close) while others write
    keys = repo.keys.scope("src", 0)
    sets = [_blobs(s % 3) for s in range(6)]  # threads share blobs: each is stored once
    results: list[list[bytes]] = [[] for _ in sets]

    def work(k: int) -> None:
        blobs = sets[k]
        for i in range(0, len(blobs), 7):
            views = [memoryview(bytearray(b)) for b in blobs[i:i + 7]]
            results[k].extend(sink.add_many(keys, Kind.CHUNK, views, probe=bool(k % 2)))

    def run_all() -> None:  # off the event loop: the sink's index commits run on it
        threads = [threading.Thread(target=work, args=(k,)) for k in range(len(sets))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sink.flush()

    await asyncio.to_thread(run_all)
    assert sink.stats.packs_written > 5
    distinct = {b for blobs in sets for b in blobs}
    assert sink.stats.blobs_added == len(distinct) == len(repo.index.blobs)
    for blobs, ids in zip(sets, results):
        assert ids == [keys.blob_id(b) for b in blobs]
        for b, bid in zip(blobs, ids):
            assert await asyncio.to_thread(repo.read_blob_blocking, bid) == b


async def test_the_blobs_a_sink_stored_leave_its_memory_once_indexed(repo: Repository):
    """`known` holds only the blobs of packs in flight: once indexed they are found in the
    index's blob map instead, and a second sink (another snapshot) finds them there."""
    sink = BlobSink(repo, pack_size=50_000)
    keys = repo.keys.scope("src", 0)
    blobs = [os.urandom(3000) for _ in range(400)]
    ids = await asyncio.to_thread(sink.add_many, keys, Kind.CHUNK, blobs)
    assert all(bid in sink.known for bid in ids)
    await asyncio.to_thread(sink.flush)
    assert sink.known.pending == 0
    assert all(bid in sink.known for bid in ids)
    again = BlobSink(repo)
    assert await asyncio.to_thread(again.add_many, keys, Kind.CHUNK, blobs) == ids
    assert again.stats.blobs_added == 0 and again.known.pending == 0
    again.close()


def test_probing_skips_zstd_only_when_the_probes_do_not_compress():
    rnd = [os.urandom(65536) for _ in range(20)]
    text = [b"the quick brown fox %d " % i * 3000 for i in range(20)]
    assert compress_many(rnd, probe=True)[1] == [0] * 20
    assert compress_many(text, probe=True)[1] == [FLAG_ZSTD] * 20
    mixed = rnd[:10] + text[:10]  # the last probe compresses: everything is tried
    bodies, flags = compress_many(mixed, probe=True)
    assert flags == [0] * 10 + [FLAG_ZSTD] * 10 and bodies[:10] == rnd[:10]
