"""What a pack index holds, as a dict: for tests only (the index never holds one in memory)."""

from __future__ import annotations

import sqlite3
import urllib.parse
from contextlib import closing

from p2pbackup.repo.index import BlobLocation, PackIndex


async def blob_locations(index: PackIndex) -> dict[bytes, BlobLocation]:
    """Every blob the index reads, with where (streamed by the index from its database)."""
    out: dict[bytes, BlobLocation] = {}
    async for _name, blobs in index.blobs_by_pack():
        out.update(blobs)
    return out


def stored_blobs(index: PackIndex) -> dict[bytes, BlobLocation]:
    """The same, read from the index's file directly (for code that cannot await)."""
    uri = f"file:{urllib.parse.quote(index.path)}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True)) as db:
        return {row[0]: BlobLocation(*row[1:]) for row in db.execute(
            "SELECT b.id, p.name, b.offset, b.length, b.raw_length, b.kind "
            "FROM blobs b JOIN packs p ON p.num = b.pack")}
