#!/usr/bin/env python3
"""Deterministic tree of many small files, for the scale benchmark (bench_scale.py).

    python3 mkfiles.py OUTDIR --files 1000000 [--seed 42]    # generate
    python3 mkfiles.py OUTDIR --mutate [--seed 1]            # one round of changes
    python3 mkfiles.py OUTDIR --digest [--metadata]          # print the tree's digest

The tree: N files in ceil(N / 1000) folders of 1,000 (`d0000/` ...; file i is in folder
i // 1000). Sizes are 50-3,000 bytes, triangular with its mode at 800 bytes (mean 1,283
bytes, so one million files are about 1.2 GiB, like the tree in the issue's table). A third
of the files are random bytes (incompressible, `.bin`/`.jpg`/`.dat`), two thirds text cut
from mkdata.py's corpus (compressible, which zstd shrinks about 3x), each with a header naming
it so no two are alike. Mode 0644; file and folder mtimes are fixed. The same N and seed give
the same names, contents, modes and mtimes.

The mutation (deterministic for a given tree and seed; use another seed for a second round):
rewrite 1% of the files (new contents of a new size, same kind, a later mtime), add 0.5%
(new names in existing folders) and delete 0.5% (none of them a rewritten one).
Counts are rounded: round(0.01 * N), round(0.005 * N), round(0.005 * N).

Stdlib only (plus mkdata.py beside it).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import random
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mkdata import BASE_TIME, EXT_SMALL, Gen  # noqa: E402

FILES_PER_FOLDER = 1000
MIN_SIZE, MODE_SIZE, MAX_SIZE = 50, 800, 3000
RANDOM_SHARE = 1 / 3
RANDOM_EXTS = (".bin", ".jpg", ".dat")
CHANGE_SHARE, ADD_SHARE, DELETE_SHARE = 0.01, 0.005, 0.005
FILE_MODE = 0o644
DAY_NS = 86400 * 10**9


@dataclass(frozen=True, slots=True)
class Made:
    """What a generation or mutation did."""

    files: int  # files written (generate: all of them; mutate: rewritten + added)
    bytes: int  # bytes written
    random_files: int
    changed: int = 0
    added: int = 0
    deleted: int = 0
    seconds: float = 0.0


def mutation_counts(files: int) -> tuple[int, int, int]:
    """(rewritten, added, deleted) for a tree of `files` files."""
    return (round(CHANGE_SHARE * files), round(ADD_SHARE * files), round(DELETE_SHARE * files))


@functools.lru_cache(maxsize=4)
def corpus(seed: int) -> Gen:
    """mkdata's vocabulary and 4 MiB text corpus for `seed` (~1 s to build; only its text
    and random bytes are used, which depend on nothing but the seed and their arguments)."""
    return Gen(seed, 1.0)


class Writer:
    """Makes file contents from one seeded generator and writes them with fixed metadata."""

    def __init__(self, seed: int, stream: str) -> None:
        self.seed = seed
        self.gen = corpus(seed)
        self.rng = random.Random(f"mkfiles-{stream}-{seed}")

    def size(self) -> int:
        return int(self.rng.triangular(MIN_SIZE, MAX_SIZE + 1, MODE_SIZE))

    def contents(self, key: str, rel: str, size: int, is_random: bool) -> bytes:
        if is_random:
            return self.gen.rand_bytes(f"{key}:{rel}", size)
        return self.gen.text(self.rng, size, header=f"# {rel} {key}\n")

    def new_name(self, stem: str) -> tuple[str, bool]:
        """A file name for `stem` and whether the file holds random bytes."""
        is_random = self.rng.random() < RANDOM_SHARE
        ext = self.rng.choice(RANDOM_EXTS if is_random else EXT_SMALL)
        return stem + ext, is_random

    def write(self, root: str, rel: str, data: bytes, mtime_ns: int, *, new: bool) -> None:
        flags = os.O_WRONLY | (os.O_CREAT | os.O_EXCL if new else os.O_TRUNC)
        fd = os.open(os.path.join(root, rel), flags, FILE_MODE)
        try:
            os.write(fd, data)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)


def folder_name(index: int) -> str:
    return f"d{index:04d}"


def old_mtime_ns(rng: random.Random) -> int:
    return (BASE_TIME - rng.randrange(2 * 365 * 86400)) * 10**9


def generate(out: str, files: int, seed: int) -> Made:
    start = time.perf_counter()
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"refusing: {out} exists and is not empty")
    os.makedirs(out, exist_ok=True)
    w = Writer(seed, "generate")
    folders = -(-files // FILES_PER_FOLDER)
    for f in range(folders):
        os.mkdir(os.path.join(out, folder_name(f)))
    total = randoms = 0
    for i in range(files):
        name, is_random = w.new_name(f"f{i:07d}")
        rel = f"{folder_name(i // FILES_PER_FOLDER)}/{name}"
        data = w.contents("v0", rel, w.size(), is_random)
        w.write(out, rel, data, old_mtime_ns(w.rng), new=True)
        total += len(data)
        randoms += is_random
    set_folder_mtimes(out, (folder_name(f) for f in range(folders)), BASE_TIME * 10**9)
    return Made(files, total, randoms, seconds=time.perf_counter() - start)


def set_folder_mtimes(out: str, folders: Iterator[str], mtime_ns: int) -> None:
    """Fixed mtimes for `folders` and the top (writing in a folder changed its mtime)."""
    for rel in folders:
        os.utime(os.path.join(out, rel), ns=(mtime_ns, mtime_ns))
    os.utime(out, ns=(mtime_ns, mtime_ns))


def list_files(out: str) -> list[str]:
    """Every file under `out` as a relative path, in a stable (sorted) order."""
    rels = []
    for dirpath, dirnames, filenames in os.walk(out):
        dirnames.sort()
        base = os.path.relpath(dirpath, out)
        rels += [name if base == "." else f"{base}/{name}" for name in sorted(filenames)]
    return rels


def mutate(out: str, seed: int) -> Made:
    start = time.perf_counter()
    if not os.path.isdir(out):
        raise SystemExit(f"no such tree: {out}")
    existing = list_files(out)
    folders = sorted({os.path.dirname(rel) for rel in existing})
    n_change, n_add, n_delete = mutation_counts(len(existing))
    w = Writer(seed, "mutate")
    picked = w.rng.sample(existing, n_change + n_delete)
    changed, deleted = picked[:n_change], picked[n_change:]
    day_ns = (BASE_TIME * 10**9) + seed * DAY_NS
    total = randoms = 0
    for k, rel in enumerate(changed):
        is_random = rel.endswith(RANDOM_EXTS)
        data = w.contents(f"v{seed}", rel, w.size(), is_random)
        w.write(out, rel, data, day_ns + k * 10**9, new=False)
        total += len(data)
        randoms += is_random
    for rel in deleted:
        os.unlink(os.path.join(out, rel))
    touched = {os.path.dirname(rel) for rel in deleted}
    for k in range(n_add):
        folder = w.rng.choice(folders)
        name, is_random = w.new_name(f"new{seed}-{k:07d}")
        rel = f"{folder}/{name}" if folder else name
        try:
            data = w.contents(f"v{seed}", rel, w.size(), is_random)
            w.write(out, rel, data, day_ns + k * 10**9, new=True)
        except FileExistsError:
            raise SystemExit(f"{rel} exists: this tree was already mutated with seed {seed}")
        total += len(data)
        randoms += is_random
        touched.add(folder)
    set_folder_mtimes(out, (f for f in sorted(touched) if f), day_ns + DAY_NS - 10**9)
    return Made(n_change + n_add, total, randoms, n_change, n_add, n_delete,
                time.perf_counter() - start)


def tree_digest(root: str | Path, metadata: bool = False) -> str:
    """SHA-256 over every entry's relative path, kind and contents (files: their bytes;
    symlinks: their target), in sorted order; with `metadata`, also modes and mtimes (of
    everything but `root` itself). Equal digests: equal trees, as a restore check needs."""
    h = hashlib.sha256()
    root = str(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            h.update(os.path.relpath(path, root).encode(errors="surrogateescape") + b"\0")
            if metadata:
                h.update(f"{st.st_mode:o} {st.st_mtime_ns}\0".encode())
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    h.update(b"f%d\0" % st.st_size + f.read())
            elif stat.S_ISLNK(st.st_mode):
                h.update(b"l" + os.fsencode(os.readlink(path)) + b"\0")
            else:
                h.update(b"d\0" if stat.S_ISDIR(st.st_mode) else b"o\0")
    return h.hexdigest()


def positive_int(text: str) -> int:
    value = int(text.replace("_", "").replace(",", ""))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir")
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--files", type=positive_int, help="generate this many files")
    what.add_argument("--mutate", action="store_true", help="apply one round of changes")
    what.add_argument("--digest", action="store_true", help="print the tree's SHA-256 digest")
    ap.add_argument("--seed", type=int, default=None,
                    help="seed (default: 42 to generate, 1 to mutate)")
    ap.add_argument("--metadata", action="store_true",
                    help="with --digest: include modes and mtimes")
    a = ap.parse_args(argv)
    if a.digest:
        print(tree_digest(a.outdir, a.metadata))
        return 0
    if a.mutate:
        made = mutate(a.outdir, 1 if a.seed is None else a.seed)
        print(f"mutated {a.outdir}: {made.changed} rewritten, {made.added} added, "
              f"{made.deleted} deleted, {made.bytes:,} bytes written in {made.seconds:.1f} s")
    else:
        made = generate(a.outdir, a.files, 42 if a.seed is None else a.seed)
        print(f"generated {a.outdir}: {made.files:,} files ({made.random_files:,} random), "
              f"{made.bytes:,} bytes in {made.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
