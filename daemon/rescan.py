"""The safety net under inotify: compare the sources with what the log and snapshots know.

inotify misses what happens while the daemon is down (and can overflow); so at start and then
every `rescan_interval` the daemon walks the sources against the newest snapshot of this device
plus its replayed log, and captures every path whose size, mtime, ctime or inode differ, that
is new, or that is gone. Costs one stat per file and one tree read per directory; the walk
holds one directory's listing per level, whatever the size of the tree. Where inotify cannot
watch every folder (watches.py), the unwatched ones are rescanned more often in between,
the watched folders' files left out.
"""

from __future__ import annotations

import itertools
import logging
import os
import stat as statmod
import time
from collections.abc import Container, Iterator

from p2pbackup.backup.pointintime import Overlay, plan_at
from p2pbackup.backup.seal import SegmentSealer
from p2pbackup.errors import NotFound, P2PError
from p2pbackup.format.records import DIR, FILE, Tree
from p2pbackup.repo.repository import Repository

from .watches import folder_key

log = logging.getLogger("p2pbackupd")

CAPTURE_BATCH = 1024  # changed paths handed from the walking thread to the capture at a time


def _differs(entry_type: str, entry, st: os.stat_result) -> bool:
    if entry_type == FILE:
        return not statmod.S_ISREG(st.st_mode) or (entry.size, entry.mtime_ns, entry.ctime_ns,
                                                    entry.inode) != (st.st_size, st.st_mtime_ns,
                                                                     st.st_ctime_ns, st.st_ino)
    if entry_type == DIR:
        return not statmod.S_ISDIR(st.st_mode)
    # A symlink, FIFO or device node: the same kind (the mode carries it), the same mtime.
    return statmod.S_IFMT(st.st_mode) != statmod.S_IFMT(entry.mode) \
        or entry.mtime_ns != st.st_mtime_ns


def find_changes(repo: Repository, root: bytes, tree_id: bytes, overlay: Overlay,
                 watched: Container[int] = ()) -> Iterator[bytes]:
    """Paths under `root` that differ from the snapshot+log state (blocking), as they are
    found: the caller captures them while the walk goes on, so a tree where everything
    changed is never held as one list. The files of the folders in `watched` (folder_key)
    are not compared: inotify reports their changes."""
    def walk(path: bytes, rel: bytes, tree: Tree, skip_files: bool) -> Iterator[bytes]:
        known = {e.name: e for e in tree.entries}
        try:
            with os.scandir(path) as it:
                present = {e.name: e for e in it}
        except OSError:
            return
        if not skip_files:
            for name in sorted(set(known) - set(present)):
                yield os.path.join(path, name)  # gone
        for name, de in sorted(present.items()):
            entry = known.get(name)
            if skip_files and (entry is None or entry.type != DIR):
                continue
            full = os.path.join(path, name)
            try:
                st = de.stat(follow_symlinks=False)
            except OSError:
                continue
            if entry is None or _differs(entry.type, entry, st):
                if not skip_files:
                    yield full  # new or changed (a new directory is walked by the capture)
            elif entry.type == DIR:
                sub_rel = os.path.join(rel, name) if rel else name
                base = repo.load_tree_blocking(entry.subtree) if entry.subtree else None
                yield from walk(full, sub_rel, overlay.tree(sub_rel, base),
                                folder_key(st) in watched)

    try:
        top = folder_key(os.stat(root)) in watched
    except OSError:
        return
    yield from walk(root, b"", overlay.tree(b"", repo.load_tree_blocking(tree_id)), top)


def _next_paths(changes: Iterator[bytes]) -> list[bytes]:
    return list(itertools.islice(changes, CAPTURE_BATCH))


async def rescan(repo: Repository, sealer: SegmentSealer,
                 watched: Container[int] = ()) -> int:
    """Capture what changed without inotify noticing; return how many paths were captured.

    `watched`: folders (folder_key) whose own files need no comparing (inotify watches them).
    """
    import asyncio

    try:
        base, overlays, _ = await plan_at(repo, "latest", time.time_ns(),
                                          sources=sealer.sources)
    except NotFound:
        return 0  # no snapshot of the sources yet: the first roll-up snapshot covers them
    if base.snapshot.device != sealer.identity.device_id:
        return 0
    count = 0
    for root in base.snapshot.sources:
        src = next((s for s in sealer.sources if s.name == root.name), None)
        if src is None or not os.path.isdir(src.path):
            continue
        changes = find_changes(repo, os.fsencode(src.path), root.tree,
                               overlays.get(root.name, Overlay()), watched)
        while True:
            try:
                paths = await asyncio.to_thread(_next_paths, changes)
            except P2PError as exc:
                log.error("rescan of %s failed: %s", src.name, exc)
                break
            if not paths:
                break
            for p in paths:
                await sealer.capture(p)
            count += len(paths)
    if count:
        log.info("rescan found %d changes inotify had not reported", count)
    return count
