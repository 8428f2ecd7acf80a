"""Sparse writing and extended attributes on real files."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from p2pbackup.backup import fsmeta
from p2pbackup.format.records import FILE, TreeEntry

# Runs of data and zeros, cut into chunks at arbitrary places (as content-defined chunking
# would): the file must read back the same whatever the cuts.
data_runs = st.binary(min_size=1, max_size=9000).map(lambda b: b.replace(b"\0", b"x"))
zero_runs = st.integers(1, 3 * fsmeta.HOLE_MIN).map(bytes)
runs = st.lists(st.one_of(data_runs, zero_runs), max_size=8)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(runs, st.lists(st.integers(1, 20000), min_size=1, max_size=6))
def test_write_sparse_reads_back_exactly(tmp_path: Path, parts: list[bytes], cuts: list[int]):
    data = b"".join(parts)
    chunks, i, k = [], 0, 0
    while i < len(data):
        piece = data[i:i + cuts[k % len(cuts)]]  # as decoded chunks, or zeros kept for damage
        chunks.append(bytearray(piece) if k % 2 else memoryview(piece))
        i += cuts[k % len(cuts)]
        k += 1
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        assert fsmeta.write_sparse(fd, chunks) == len(data)
    finally:
        os.close(fd)
    assert path.read_bytes() == data


def test_write_sparse_leaves_long_zero_runs_unallocated(tmp_path: Path):
    mib = 1024 * 1024
    chunks = [os.urandom(100_000), bytes(3 * mib), os.urandom(5000) + bytes(mib), bytes(123)]
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        fsmeta.write_sparse(fd, chunks)
        os.fsync(fd)
    finally:
        os.close(fd)
    st = os.stat(path)
    assert st.st_size == 100_000 + 4 * mib + 5000 + 123
    assert st.st_blocks * 512 <= 200 * 1024  # the data and the blocks it shares, no more
    fd = os.open(path, os.O_RDONLY)
    try:
        assert fsmeta.is_sparse(fd, os.fstat(fd))
    finally:
        os.close(fd)


def test_xattrs_read_sorted_and_set_back(tmp_path: Path):
    src, dst = tmp_path / "a", tmp_path / "b"
    src.write_bytes(b"x")
    dst.write_bytes(b"x")
    try:
        for name in ("user.zz", "user.aa", "user.mm"):
            os.setxattr(src, name, name.encode() * 3)
    except OSError as exc:
        import pytest
        pytest.skip(f"no user.* attributes here: {exc.strerror}")
    got = fsmeta.read_xattrs(os.fsencode(src))
    assert [k for k, _ in got] == [b"user.aa", b"user.mm", b"user.zz"]
    entry = TreeEntry(FILE, b"b", 0o100644, 0, 0, 0, xattrs=got + ((b"bogus.ns", b"v"),))
    fd = os.open(dst, os.O_RDONLY)
    try:
        failed = fsmeta.apply_xattrs(fd, entry)
        assert fsmeta.read_xattrs(fd) == got
    finally:
        os.close(fd)
    assert len(failed) == 1 and failed[0].startswith("bogus.ns (")
