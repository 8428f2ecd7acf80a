"""How many folders inotify watches, against how many there are.

inotify takes one watch per folder, and the kernel allows each user a number of them
(`fs.inotify.max_user_watches`; a user namespace may allow fewer, `user.max_inotify_watches`).
watchfiles (Rust notify) adds a watch for each folder under a source and, past the limit,
stops adding them without a word (we ask it to skip folders it may not read, and it skips
these too). So once its watches are in place the daemon counts the folders it holds a watch
on (this process's inotify descriptors, in /proc/self/fdinfo) and the folders it can list
under the sources; when some are not watched it says so once, `status` shows it, and the
rescan compares the unwatched folders' files more often (the watched ones report their own
changes).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

LIMIT_FILES = ("/proc/sys/fs/inotify/max_user_watches", "/proc/sys/user/max_inotify_watches")


def watch_limit() -> int | None:
    """The number of inotify watches this user may hold (the lowest of the limits that apply),
    None if the kernel does not say."""
    limits = []
    for path in LIMIT_FILES:
        try:
            with open(path) as f:
                limits.append(int(f.read()))
        except (OSError, ValueError):
            continue
    return min(limits) if limits else None


def folder_key(st: os.stat_result) -> int:
    """A folder's device and inode as one int (a set of a million of these stays small)."""
    return st.st_dev << 64 | st.st_ino


def watched_folders(pid: int | str = "self") -> set[int]:
    """folder_key of every folder the inotify instances of process `pid` (this one) watch."""
    out: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return out
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                text = f.read()
        except OSError:
            continue  # closed meanwhile
        for line in text.splitlines():
            if not line.startswith("inotify wd:"):
                continue
            fields = dict(part.split(":", 1) for part in line.split()[1:] if ":" in part)
            try:
                ino, sdev = int(fields["ino"], 16), int(fields["sdev"], 16)
            except (KeyError, ValueError):
                continue
            # The kernel prints its own dev_t: major in the top 12 bits, minor in the low 20.
            out.add(os.makedev(sdev >> 20, sdev & 0xFFFFF) << 64 | ino)
    return out


def folder_keys(paths: Iterable[str]) -> Iterator[int]:
    """folder_key of each folder under `paths` (themselves included) that can be listed,
    symlinks not followed: the watches a complete watch needs. One stat per folder."""
    todo = [os.fsencode(p) for p in paths]
    while todo:
        path = todo.pop()
        try:
            st = os.stat(path, follow_symlinks=False)
            with os.scandir(path) as it:
                todo.extend(e.path for e in it if e.is_dir(follow_symlinks=False))
        except OSError:
            continue  # unreadable: inotify cannot watch it either (and it is not backed up)
        yield folder_key(st)


@dataclass(slots=True)
class WatchCoverage:
    """How much of the sources inotify covers, as last counted."""

    folders: int
    watched: int  # of those folders
    limit: int | None

    @property
    def complete(self) -> bool:
        return self.watched >= self.folders

    def message(self, rescan_every: float) -> str:
        missing = self.folders - self.watched
        if self.limit is None:
            limit, raise_to = "a limited number of", "raise it"
        else:
            limit, raise_to = f"{self.limit:,}", f"raise it to {self.limit + missing:,} or more"
        return (f"inotify watches {self.watched:,} of the sources' {self.folders:,} folders: "
                f"the kernel allows {limit} watches per user (fs.inotify.max_user_watches); "
                f"the other {missing:,} are rescanned every {rescan_every:g} s instead "
                f"({raise_to} to watch them all)")

    def status(self) -> dict[str, Any]:
        return {"folders": self.folders, "watched": self.watched, "limit": self.limit}


def measure(paths: list[str]) -> WatchCoverage:
    """Count the folders under `paths` and how many of them this process watches (blocking)."""
    watched = watched_folders()
    folders = missing = 0
    for key in folder_keys(paths):
        folders += 1
        missing += key not in watched
    return WatchCoverage(folders, folders - missing, watch_limit())
