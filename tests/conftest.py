"""Shared fixtures: a CLI runner against a temporary home, and sample trees."""

from __future__ import annotations

import errno
import os
import stat
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns import netlab  # noqa: F401  (the fixture, for every test)
from tests.servers import postgres  # noqa: F401  (the fixture, for every test)

REPO_ROOT = Path(__file__).resolve().parent.parent
# Daemons started by tests stay off the machine's real network; tests that make their own
# namespaces turn it back on for the processes they start there (P2PBACKUP_LAN=on).
os.environ["P2PBACKUP_LAN"] = "off"


@dataclass
class Cli:
    """Runs `p2pbackup` in a subprocess with its own P2PBACKUP_HOME."""

    home: Path

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["P2PBACKUP_HOME"] = str(self.home)
        env.pop("COLUMNS", None)
        return env

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "p2pbackup.cli.main", *args]

    def __call__(self, *args: str, check: bool = True, timeout: float = 120,
                 ) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.argv(*args), env=self.env(), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"p2pbackup {' '.join(args)} exited {proc.returncode}\n"
                                 f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args), env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "home")


def make_sample_tree(root: Path, *, big: int = 3 * 1024 * 1024) -> Path:
    """A small tree with every kind of entry a snapshot must carry."""
    (root / "docs" / "deep" / "er").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "docs" / "a.txt").write_text("hello\n" * 100)
    (root / "docs" / "deep" / "er" / "b.json").write_text('{"x": 1}\n')
    (root / "empty-file").write_bytes(b"")
    (root / "big.bin").write_bytes(os.urandom(big))
    (root / "repeat.bin").write_bytes(b"0123456789abcdef" * (big // 16))
    (root / "exec.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "exec.sh", 0o750)
    os.chmod(root / "docs" / "a.txt", 0o600)
    os.symlink("docs/a.txt", root / "link-to-file")
    os.symlink("docs", root / "link-to-dir")
    os.symlink("nowhere/at/all", root / "dangling")
    os.link(root / "docs" / "a.txt", root / "hardlink-a.txt")
    (root / "naïve – ünïcode.txt").write_text("unicode name\n")
    weird = os.fsencode(str(root)) + b"/bad-\xff-name.txt"
    with open(weird, "wb") as f:
        f.write(b"non-utf8 name\n")
    os.utime(root / "docs" / "a.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    os.utime(root / "empty-dir", ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_001))
    return root


@pytest.fixture
def sample_tree(tmp_path: Path) -> Path:
    return make_sample_tree(tmp_path / "src")


def xattrs_of(path: bytes | str) -> dict[str, bytes]:
    """A path's extended attributes (a symlink's own); {} where the file system has none."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            return {}
        raise
    return {n: os.getxattr(path, n, follow_symlinks=False) for n in names}


def has_hole(path: bytes | str) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return size > 0 and os.lseek(fd, 0, os.SEEK_HOLE) < size
    finally:
        os.close(fd)


def tree_state(root: Path) -> dict[bytes, tuple]:
    """Everything restore must reproduce: type, mode, owner, mtime_ns, extended attributes
    (ACLs included), content and whether it has holes, link target, device number. Sockets
    are left out: restore does not make them."""
    out: dict[bytes, tuple] = {}
    base = os.fsencode(str(root))
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, base)
            st = os.lstat(p)
            meta = (st.st_mode, st.st_mtime_ns, st.st_uid, st.st_gid, xattrs_of(p))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p), st.st_uid, st.st_gid, xattrs_of(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", *meta)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    data = f.read()
                out[rel] = ("f", *meta, data, has_hole(p))
            elif stat.S_ISFIFO(st.st_mode):
                out[rel] = ("p", *meta)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                out[rel] = ("dev", *meta, st.st_rdev)
    return out


def posix_acl(*entries: tuple[int, int, int]) -> bytes:
    """A system.posix_acl_* value (the kernel's xattr form): (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


ACL_UNDEFINED_ID = 0xFFFFFFFF
USER_OBJ, USER, GROUP_OBJ, MASK, OTHER = 0x01, 0x02, 0x04, 0x10, 0x20


def make_fidelity_tree(root: Path) -> Path:
    """Entries beyond plain files: extended attributes and POSIX ACLs on files, directories
    and (as root) a symlink, a FIFO, a socket, a sparse file, and (as root) a device node and
    trusted.* attributes. Skips the test where the file system keeps no user.* attributes."""
    import socket

    root.mkdir(parents=True)
    probe = root / "probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError as exc:
        pytest.skip(f"{root} keeps no user.* extended attributes: {exc.strerror}")
    probe.unlink()
    (root / "dir").mkdir()
    tagged = root / "dir" / "tagged.txt"
    tagged.write_text("tagged\n")
    os.setxattr(tagged, "user.mime_type", b"text/plain")
    os.setxattr(tagged, "user.empty", b"")
    os.setxattr(tagged, "user.binary", bytes(range(256)))
    acl = posix_acl((USER_OBJ, 6, ACL_UNDEFINED_ID), (USER, 6, 1234),
                    (GROUP_OBJ, 4, ACL_UNDEFINED_ID), (MASK, 6, ACL_UNDEFINED_ID),
                    (OTHER, 4, ACL_UNDEFINED_ID))
    os.setxattr(tagged, "system.posix_acl_access", acl)
    os.setxattr(root, "user.source", b"the source folder's own")
    os.setxattr(root / "dir", "user.folder", b"colour=blue")
    os.setxattr(root / "dir", "system.posix_acl_default", acl)
    os.mkfifo(root / "dir" / "a-fifo", 0o640)
    os.symlink("tagged.txt", root / "dir" / "link")
    sparse = root / "sparse.img"  # 64 MiB, 1 MiB of it data in four runs
    with open(sparse, "wb") as f:
        for i in range(4):
            f.seek(i * 16 * 1024 * 1024 + 4096 * i)
            f.write(os.urandom(256 * 1024))
        f.truncate(64 * 1024 * 1024)
    if os.geteuid() == 0:
        os.mknod(root / "dir" / "null", stat.S_IFCHR | 0o620, os.makedev(1, 3))
        os.mknod(root / "dir" / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
        os.setxattr(root / "dir" / "null", "trusted.note", b"char device")
        os.setxattr(root / "dir" / "a-fifo", "trusted.note", b"fifo")
        os.setxattr(root / "dir" / "link", "trusted.note", b"link", follow_symlinks=False)
        os.setxattr(tagged, "trusted.note", b"file")
        os.chown(root / "dir" / "a-fifo", 1234, 5678)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "dir" / "a-socket"))
    sock.close()  # the socket file stays
    for p in [sparse, tagged, root / "dir" / "a-fifo", root / "dir"]:
        os.utime(p, ns=(1_600_000_000_000_000_007, 1_600_000_000_000_000_007))
    return root


def inode_groups(root: Path) -> list[set[bytes]]:
    """Sets of paths sharing an inode (hard links)."""
    groups: dict[int, set[bytes]] = {}
    base = os.fsencode(str(root))
    for dirpath, _d, filenames in os.walk(base):
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if st.st_nlink > 1 and not os.path.islink(p):
                groups.setdefault(st.st_ino, set()).add(os.path.relpath(p, base))
    return sorted(groups.values(), key=sorted)
