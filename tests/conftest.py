"""Shared fixtures: a CLI runner against a temporary home, and sample trees."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns import netlab  # noqa: F401  (the fixture, for every test)

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


def tree_state(root: Path) -> dict[bytes, tuple]:
    """Everything restore must reproduce: type, mode, size, mtime_ns, content, link target."""
    out: dict[bytes, tuple] = {}
    base = os.fsencode(str(root))
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, base)
            st = os.lstat(p)
            if os.path.islink(p):
                out[rel] = ("l", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("d", st.st_mode, st.st_mtime_ns, st.st_uid, st.st_gid)
            else:
                with open(p, "rb") as f:
                    data = f.read()
                out[rel] = ("f", st.st_mode, st.st_mtime_ns, st.st_uid, st.st_gid, data)
    return out


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
