"""Building hostile objects with the library: trees and snapshots no honest writer makes,
signed by a device of the account (a member gone bad, or damage that still authenticates)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import msgpack

from p2pbackup.backup.sink import BlobSink
from p2pbackup.format.header import Kind
from p2pbackup.format.records import FILE, Snapshot, SourceRoot, TreeEntry
from p2pbackup.repo.repository import Repository, StoredSnapshot

PAYLOAD = b"written by a hostile snapshot\n"


async def store_blob(repo: Repository, scope: str, kind: int, data: bytes) -> bytes:
    """Store one blob (a chunk, or a tree's raw bytes as they are) in a pack of its own."""
    def put() -> bytes:
        sink = BlobSink(repo)
        try:
            blob_id = sink.add(repo.keys.scope(scope, repo.keys.epoch), kind, data)
        except BaseException:
            sink.close()
            raise
        sink.flush()
        return blob_id

    return await asyncio.to_thread(put)


def raw_tree(entries: list[TreeEntry]) -> bytes:
    """A tree's encoding made by hand: no check of names, order or duplicates."""
    return msgpack.packb({"v": 1, "e": [e.to_map() for e in entries]}, use_bin_type=True)


async def payload_file(repo: Repository, scope: str, name: bytes) -> TreeEntry:
    """A file entry named `name` (whatever it holds) whose content is stored."""
    cid = await store_blob(repo, scope, Kind.CHUNK, PAYLOAD)
    return TreeEntry(FILE, name, 0o100644, os.geteuid(), os.getegid(), time.time_ns(),
                     size=len(PAYLOAD), chunks=(cid,))


async def hostile_snapshot(repo: Repository, roots: list[SourceRoot]) -> StoredSnapshot:
    """A snapshot of `roots` as given, signed by the repository's device."""
    assert repo.identity is not None
    snap = Snapshot(time.time_ns(), repo.identity.device_id, "hostile", tuple(roots))
    return await repo.save_snapshot(snap)


def outside_state(box: Path, target: Path) -> dict[str, tuple]:
    """Everything under `box` but the restore target: must not change during a restore."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(box):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != target]
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = os.lstat(p)
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
            out[str(p.relative_to(box))] = (st.st_mode, st.st_size, st.st_mtime_ns, data)
    return out
