"""A folder of a snapshot as a tar archive, made as it is sent: one file's pieces at a time,
so a folder of any size streams in the memory of one read batch."""

from __future__ import annotations

import os
import stat as statmod
import tarfile
from collections.abc import Iterator

from ..backup.restore import Restorer
from ..format.records import DIR, FILE, SYMLINK, TreeEntry

BLOCK = tarfile.BLOCKSIZE


def _info(name: str, entry: TreeEntry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = statmod.S_IMODE(entry.mode)
    info.uid, info.gid = entry.uid, entry.gid
    info.mtime = entry.mtime_ns // 1_000_000_000
    if entry.type == DIR:
        info.type = tarfile.DIRTYPE
    elif entry.type == SYMLINK:
        info.type = tarfile.SYMTYPE
        info.linkname = os.fsdecode(entry.target or b"")
    else:
        info.size = entry.size
    return info


def tar_stream(reader: Restorer, scope: str, parts: tuple[bytes, ...], entry: TreeEntry | None,
               tree: bytes) -> Iterator[bytes | bytearray | memoryview]:
    """The folder at `parts` (source name first; `entry` None: a source's top folder whose
    metadata the snapshot lacks) whose tree id is `tree`, and everything below it, as tar
    (PAX: long and non-UTF-8 names kept); each folder's entries are decoded a batch at a time
    (Restorer.entries). FIFOs and device nodes are left out. Blocking: iterate in a thread."""
    top = os.fsdecode(parts[-1])
    entry = entry or TreeEntry(DIR, parts[-1], statmod.S_IFDIR | 0o700, os.getuid(),
                               os.getgid(), 0)

    def header(name: str, e: TreeEntry) -> bytes:
        return _info(name, e).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")

    def folder(at: tuple[bytes, ...], name: str, tree_id: bytes | None
               ) -> Iterator[bytes | bytearray | memoryview]:
        for child in reader.entries(scope, at, tree_id):
            path = f"{name}/{os.fsdecode(child.name)}"
            if child.type == DIR:
                yield header(path, child)
                yield from folder(at + (child.name,), path, child.subtree)
            elif child.type == FILE:
                yield header(path, child)
                yield from reader.content(scope, child)
                if child.size % BLOCK:
                    yield bytes(BLOCK - child.size % BLOCK)
            elif child.type == SYMLINK:
                yield header(path, child)

    yield header(top, entry)
    yield from folder(parts, top, tree)
    yield bytes(2 * BLOCK)
