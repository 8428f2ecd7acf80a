"""What a file system holds beyond contents and stat: extended attributes (POSIX ACLs are
the system.posix_acl_* ones), holes in sparse files, FIFOs and device nodes.

Capture reads them for snapshots and the daemon's log alike; restore recreates them. Restore
works relative to directory descriptors and never follows a symlink it did not expect: a
FIFO or device node is made at a name inside `dir_fd`, then set up through an O_PATH
descriptor of the very node it made (its /proc/self/fd link), since Linux has no
fsetxattr/fchmod for nodes that cannot be opened for reading.
"""

from __future__ import annotations

import errno
import os
import re
import stat as statmod
from collections.abc import Iterable

from ..format.records import BLOCKDEV, CHARDEV, FIFO, TreeEntry

XATTR_VALUE_MAX = 64 * 1024  # Linux's XATTR_SIZE_MAX: no file system here holds a bigger one
# A tree is one blob held whole in memory; attributes beyond this per entry are refused with
# a warning (ACLs, SELinux labels and capabilities take tens to hundreds of bytes).
XATTRS_MAX = 1024 * 1024
HOLE_MIN = 4096  # zero runs at least this long are left as holes (the usual fs block)
_ZERO_RUN = re.compile(rb"\x00{%d,}" % HOLE_MIN)
_NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP)
_NODE_TYPES = {CHARDEV: statmod.S_IFCHR, BLOCKDEV: statmod.S_IFBLK}

Xattrs = tuple[tuple[bytes, bytes], ...]


def current_umask() -> int:
    """The process's umask, read without setting it: os.umask can only read it by setting
    it, which for an instant gives files other threads create (inside the daemon) the wrong
    mode. Linux says it in /proc/self/status (since 4.7); elsewhere the set-and-restore."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---- capture -------------------------------------------------------------------------------

def read_xattrs(target: int | bytes) -> Xattrs:
    """The extended attributes of an open file (fd) or of a path (a symlink is not followed),
    sorted by name; () where the file system keeps none. Raises OSError if they cannot be
    read (E2BIG when they exceed XATTRS_MAX)."""
    path = not isinstance(target, int)
    try:
        names = os.listxattr(target, follow_symlinks=False) if path else os.listxattr(target)
    except OSError as exc:
        if exc.errno in _NO_XATTRS:
            return ()
        raise
    if not names:
        return ()
    out: list[tuple[bytes, bytes]] = []
    total = 0
    for name in names:
        try:
            value = (os.getxattr(target, name, follow_symlinks=False) if path
                     else os.getxattr(target, name))
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                continue  # removed since it was listed
            raise
        key = os.fsencode(name)
        total += len(key) + len(value)
        if len(value) > XATTR_VALUE_MAX or total > XATTRS_MAX:
            raise OSError(errno.E2BIG, f"extended attributes larger than {XATTRS_MAX >> 20} MiB")
        out.append((key, value))
    out.sort()
    return tuple(out)


def is_sparse(fd: int, st: os.stat_result) -> bool:
    """True if the open file `fd` has a hole. Fewer allocated blocks than the size suggests
    one (free: it is in the stat); SEEK_HOLE confirms it, since inline data, compression and
    delayed allocation also leave st_blocks short."""
    if st.st_blocks * 512 >= st.st_size:
        return False
    try:
        return os.lseek(fd, 0, os.SEEK_HOLE) < st.st_size
    except OSError:
        return False  # no SEEK_HOLE here: restoring it dense is still correct


# ---- restore -------------------------------------------------------------------------------

def proc_path(fd: int) -> str:
    """A path to exactly the file `fd` refers to (an O_PATH descriptor included)."""
    return f"/proc/self/fd/{fd}"


def apply_xattrs(target: int | str, entry: TreeEntry) -> list[str]:
    """Set `entry`'s extended attributes on an open file or directory (fd), or on the file a
    path leads to (use proc_path of an O_PATH descriptor for symlinks and special files).
    Returns one "name (reason)" per attribute that could not be set: the file system may keep
    none, trusted.* needs root, user.* is refused on symlinks and special files."""
    failed: list[str] = []
    for key, value in entry.xattrs:
        name = os.fsdecode(key)
        try:
            os.setxattr(target, name, value)
        except OSError as exc:
            failed.append(f"{name} ({exc.strerror})")
    return failed


def special_matches(st: os.stat_result, entry: TreeEntry) -> bool:
    """True if `st` is the FIFO or device node `entry` describes (same kind and number)."""
    if statmod.S_IFMT(st.st_mode) != statmod.S_IFMT(entry.mode):
        return False
    return entry.type == FIFO or (os.major(st.st_rdev), os.minor(st.st_rdev)) == entry.rdev


def make_special(dir_fd: int, name: bytes, entry: TreeEntry, *, owner: bool) -> list[str]:
    """Make the FIFO or device node `entry` at `name` in directory `dir_fd` with its mode,
    extended attributes, mtime and (if `owner`) owner. Raises OSError if it cannot be made
    (a device node needs root: EPERM); returns the attributes that could not be set."""
    if entry.type == FIFO:
        os.mkfifo(name, 0o600, dir_fd=dir_fd)
    else:
        os.mknod(name, _NODE_TYPES[entry.type] | 0o600, os.makedev(*entry.rdev), dir_fd=dir_fd)
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        at = proc_path(fd)
        if owner:
            os.chown(at, entry.uid, entry.gid)  # before the mode: chown clears set-id bits
        failed = apply_xattrs(at, entry)
        os.chmod(at, statmod.S_IMODE(entry.mode))
        os.utime(at, ns=(entry.mtime_ns, entry.mtime_ns))
    finally:
        os.close(fd)
    return failed


def write_sparse(fd: int, chunks: Iterable[bytes | bytearray | memoryview]) -> int:
    """Write `chunks` to the new, empty file `fd`, leaving zero runs of HOLE_MIN bytes or more
    unwritten (holes), and set its size; return the size.

    A zero byte never needs writing into a file that starts empty; only long runs are worth a
    seek. Most chunks are all data or all zeros: one count decides those; only chunks that
    mix both are searched for runs.
    """
    pos = 0
    for data in chunks:
        if isinstance(data, memoryview):
            data = data.tobytes()  # the zeros a damaged file is kept with (keep_damaged)
        n = len(data)
        zeros = data.count(0)
        if zeros < HOLE_MIN:
            _pwrite_all(fd, data, pos)
        elif zeros < n:
            view = memoryview(data)
            start = 0
            for run in _ZERO_RUN.finditer(data):
                if run.start() > start:
                    _pwrite_all(fd, view[start:run.start()], pos + start)
                start = run.end()
            if start < n:
                _pwrite_all(fd, view[start:], pos + start)
        pos += n
    os.ftruncate(fd, pos)
    return pos


def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done
