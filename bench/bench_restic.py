#!/usr/bin/env python3
"""Benchmark p2pbackup against restic on the synthetic device tree from mkdata.py.

Everything (data set, both repositories, caches, restore targets) lives on a fresh
loop-mounted ext4 file system under bench/work/, which is unmounted and deleted at the
end (unless --keep), also on failure or Ctrl-C.  Needs root.

Steps, each timed (wall clock) with the peak RSS of the process (`ru_maxrss` from
`os.wait4`), restic first, then p2pbackup, after a `sync` (page cache stays warm):

  1. generate the data set (mkdata.py, seed 42)
  2. initial backup              restic backup            vs p2pbackup snapshot
  3. no-change backup            (same commands again)
  4. mutate (mkdata.py --mutate --seed 1), then backup again; repository growth by du -sb
  5. full restore of latest      restic restore           vs p2pbackup restore; the
     p2pbackup restore is compared with the source tree
  6. full check                  restic check --read-data vs p2pbackup verify --read-data

The results go to stdout and to a Markdown file (bench/RESULTS.md by default).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import shlex
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "bench" / "work"
MKDATA = REPO.parent / "shared" / "bench" / "mkdata.py"
P2PBACKUP = REPO / ".venv" / "bin" / "p2pbackup"
LIBRARY_PATHS = ("p2pbackup", "cli", "daemon", "pyproject.toml")  # what the results depend on
IMAGE_SIZE = "8G"
RESTIC_PASSWORD = "p2pbackup-bench"
SQLITE_MAGIC = b"SQLite format 3\x00"
RSS_TARGET_MIB = 250
GROWTH_TARGET = 1.0
MiB = 1 << 20

INITIAL, NO_CHANGE, AFTER_MUTATE = "initial backup", "no-change backup", "backup after mutate"
RESTORE, VERIFY = "restore latest", "verify --read-data"
TIME_TARGETS = {INITIAL: 0.5, NO_CHANGE: 0.5, AFTER_MUTATE: 0.7, RESTORE: 0.77, VERIFY: 1.0}


class BenchError(Exception):
    """A problem that makes the rest of the benchmark meaningless."""


@dataclass(frozen=True)
class Run:
    """One finished command: wall time, peak RSS and how it ended."""

    argv: tuple[str, ...]
    seconds: float
    maxrss_kib: int
    exit_code: int
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


@dataclass(frozen=True)
class Step:
    """One benchmark step run with both tools."""

    name: str
    restic: Run
    ours: Run


class Sizes(NamedTuple):
    """Bytes on disk of restic's repository and of p2pbackup's store."""

    restic: int
    ours: int


@dataclass(frozen=True)
class Layout:
    """Where everything lives on the scratch file system."""

    mnt: Path

    @property
    def data(self) -> Path:
        return self.mnt / "device"

    @property
    def restic_repo(self) -> Path:
        return self.mnt / "restic-repo"

    @property
    def p2p_home(self) -> Path:
        return self.mnt / "p2p-home"

    @property
    def p2p_store(self) -> Path:
        return self.p2p_home / "store"

    @property
    def restore_restic(self) -> Path:
        return self.mnt / "restore-restic"

    @property
    def restore_ours(self) -> Path:
        return self.mnt / "restore-p2pbackup"

    @property
    def tmp(self) -> Path:
        return self.mnt / "tmp"

    def restic_env(self) -> dict[str, str]:
        return {**os.environ, "RESTIC_PASSWORD": RESTIC_PASSWORD, "TMPDIR": str(self.tmp),
                "RESTIC_CACHE_DIR": str(self.mnt / "restic-cache")}

    def ours_env(self) -> dict[str, str]:
        return {**os.environ, "P2PBACKUP_HOME": str(self.p2p_home), "TMPDIR": str(self.tmp)}

    def sizes(self) -> Sizes:
        return Sizes(du_bytes(self.restic_repo), du_bytes(self.p2p_store))


@dataclass(frozen=True)
class Results:
    """Everything the report needs."""

    scale: float
    data_files: int
    data_bytes: int
    generate: Run
    mutate: Run
    steps: list[Step]
    initial: Sizes
    growth: Sizes
    mismatches: list[str] | None  # None: the p2pbackup restore did not produce a tree


class Runner:
    """Runs timed commands, keeping each one's stdout and stderr under `logs`."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.count = 0

    def timed(self, label: str, argv: list[str | Path], env: Mapping[str, str]) -> Run:
        """Run `argv` after a `sync`; return its wall time and peak RSS."""
        self.count += 1
        stem = self.logs / f"{self.count:02d}-{label}"
        args = tuple(str(a) for a in argv)
        subprocess.run(["sync"], check=True)
        with open(f"{stem}.out", "wb") as out, open(f"{stem}.err", "wb") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err)
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode in (130, -signal.SIGINT):  # Ctrl-C reached the child first
            raise KeyboardInterrupt
        run = Run(args, seconds, usage.ru_maxrss, proc.returncode,
                  Path(f"{stem}.err").read_text(errors="replace"))
        print(f"  {label}: {seconds:.2f} s, peak RSS {usage.ru_maxrss / 1024:.0f} MiB"
              + ("" if run.ok else f", FAILED (exit {run.exit_code})"), flush=True)
        if not run.ok:
            print(f"    $ {run.command}\n{indent(run.stderr)}", file=sys.stderr, flush=True)
        return run


def indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.rstrip().splitlines())


def require(run: Run) -> Run:
    if not run.ok:
        raise BenchError(f"{run.command} failed (exit {run.exit_code}):\n{run.stderr}")
    return run


def check_call(argv: list[str | Path], env: Mapping[str, str] | None = None) -> str:
    """Run an untimed helper command; return its stdout or raise BenchError."""
    args = [str(a) for a in argv]
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"{shlex.join(args)} failed (exit {proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def du_bytes(path: Path) -> int:
    return int(check_call(["du", "-sb", path]).split()[0])


# ---- scratch file system -------------------------------------------------------------------

@contextmanager
def scratch_fs(keep: bool) -> Iterator[Path]:
    """A fresh ext4 file system on a loop device at bench/work/mnt; removed afterwards."""
    image, mnt = WORK / "fs.img", WORK / "mnt"
    if os.path.ismount(mnt):
        raise BenchError(f"{mnt} is still mounted (an earlier --keep run?): "
                         f"umount {mnt} && rm {image}")
    mnt.mkdir(parents=True, exist_ok=True)
    try:
        check_call(["truncate", "-s", IMAGE_SIZE, image])
        # Initialise inode tables and journal now, not in the background during the steps.
        check_call(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                    image])
        check_call(["mount", "-o", "loop", image, mnt])
        yield mnt
    finally:
        if keep and os.path.ismount(mnt):
            print(f"kept {mnt}; remove with: umount {mnt} && rm {image}")
        else:
            remove_fs(image, mnt)


def remove_fs(image: Path, mnt: Path) -> None:
    if os.path.ismount(mnt) and subprocess.run(["umount", mnt]).returncode != 0:
        subprocess.run(["umount", "-l", mnt])  # still busy: detach now, free it when idle
    image.unlink(missing_ok=True)
    if mnt.is_dir() and not any(mnt.iterdir()):
        mnt.rmdir()


# ---- restore check -------------------------------------------------------------------------

def entry_kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    return "file" if stat.S_ISREG(mode) else "other"


def tree_entries(root: Path) -> dict[str, str]:
    """Relative path -> kind ("dir", "file", "symlink" or "other") of everything under root."""
    entries: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            entries[os.path.relpath(path, root)] = entry_kind(os.lstat(path).st_mode)
    return entries


def is_sqlite(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sqlite_problem(source: Path, restored: Path) -> str | None:
    """Compare two SQLite databases by integrity_check and iterdump(); None if equal."""
    conns = [sqlite3.connect(p.as_uri() + "?mode=ro", uri=True) for p in (source, restored)]
    try:
        for conn, which in zip(conns, ("source", "restored"), strict=True):
            result = conn.execute("PRAGMA integrity_check").fetchone()[0]
            if result != "ok":
                return f"{which} database fails integrity_check: {result}"
        dumps = zip_longest(conns[0].iterdump(), conns[1].iterdump())
        if any(a != b for a, b in dumps):
            return "database contents differ (iterdump)"
        return None
    finally:
        for conn in conns:
            conn.close()


def entry_problem(source: Path, restored: Path, kind: str) -> str | None:
    if kind == "symlink" and os.readlink(source) != os.readlink(restored):
        return "symlink target differs"
    if kind != "file":
        return None
    if is_sqlite(source) and is_sqlite(restored):
        return sqlite_problem(source, restored)
    if source.stat().st_size != restored.stat().st_size:
        return "size differs"
    if file_digest(source) != file_digest(restored):
        return "contents differ"
    return None


def compare_trees(source: Path, restored: Path) -> list[str]:
    """Differences between two trees: presence, kind, symlink targets and file contents."""
    want, got = tree_entries(source), tree_entries(restored)
    problems: list[str] = []
    for rel in sorted(want.keys() | got.keys()):
        if rel not in got:
            problem: str | None = "missing from restore"
        elif rel not in want:
            problem = "not in source"
        elif want[rel] != got[rel]:
            problem = f"is a {got[rel]}, source has a {want[rel]}"
        else:
            problem = entry_problem(source / rel, restored / rel, want[rel])
        if problem:
            problems.append(f"{rel}: {problem}")
    return problems


# ---- the benchmark -------------------------------------------------------------------------

def both(runner: Runner, lay: Layout, name: str, restic_args: list[str | Path],
         ours_args: list[str | Path]) -> Step:
    """Run one step with restic, then with p2pbackup."""
    print(f"{name}:", flush=True)
    label = name.replace(" ", "-").replace("--", "")
    restic = runner.timed(f"restic-{label}", ["restic", "-r", lay.restic_repo, *restic_args],
                          lay.restic_env())
    ours = runner.timed(f"p2pbackup-{label}", [P2PBACKUP, *ours_args], lay.ours_env())
    return Step(name, restic, ours)


def mkdata(runner: Runner, lay: Layout, scale: float, mutate: bool) -> Run:
    extra = ["--mutate", "--seed", "1"] if mutate else ["--seed", "42"]
    label = "mutate" if mutate else "generate"
    print(f"{label} data:", flush=True)
    return require(runner.timed(label, [sys.executable, MKDATA, lay.data, "--scale", str(scale),
                                        *extra], os.environ))


def init_repos(lay: Layout) -> None:
    """Untimed: an empty restic repository and a p2pbackup home backing up the data."""
    check_call(["restic", "init", "-r", lay.restic_repo], lay.restic_env())
    check_call([P2PBACKUP, "init", "--source", lay.data], lay.ours_env())


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def benchmark(runner: Runner, mnt: Path, scale: float) -> Results:
    lay = Layout(mnt)
    lay.tmp.mkdir()
    generate = mkdata(runner, lay, scale, mutate=False)
    data_files, data_bytes = count_files(lay.data), du_bytes(lay.data)
    init_repos(lay)
    backup: tuple[list[str | Path], list[str | Path]] = (["backup", lay.data], ["snapshot"])
    steps = [both(runner, lay, INITIAL, *backup)]
    initial = lay.sizes()
    steps.append(both(runner, lay, NO_CHANGE, *backup))
    mutate = mkdata(runner, lay, scale, mutate=True)
    before = lay.sizes()
    steps.append(both(runner, lay, AFTER_MUTATE, *backup))
    after = lay.sizes()
    steps.append(both(runner, lay, RESTORE, ["restore", "latest", "--target", lay.restore_restic],
                      ["restore", "latest", "--to", lay.restore_ours]))
    restored = lay.restore_ours / lay.data.name
    print("checking the p2pbackup restore against the source ...", flush=True)
    mismatches = compare_trees(lay.data, restored) if restored.is_dir() else None
    steps.append(both(runner, lay, VERIFY, ["check", "--read-data"], ["verify", "--read-data"]))
    growth = Sizes(after.restic - before.restic, after.ours - before.ours)
    return Results(scale, data_files, data_bytes, generate, mutate, steps, initial, growth,
                   mismatches)


# ---- the report ----------------------------------------------------------------------------

def ratio(ours: float, restic: float) -> float | None:
    return ours / restic if restic > 0 else None


def verdict(value: float | None, target: float) -> str:
    return "—" if value is None else ("yes" if value <= target else "**no**")


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def fmt_seconds(run: Run) -> str:
    return f"{run.seconds:.2f}" if run.ok else f"FAILED (exit {run.exit_code})"


def fmt_bytes(n: int) -> str:
    return f"{n:,} ({n / MiB:.1f} MiB)"


def time_row(step: Step) -> str:
    target = TIME_TARGETS[step.name]
    r = ratio(step.ours.seconds, step.restic.seconds) if step.ours.ok and step.restic.ok else None
    met = verdict(r, target) if step.ours.ok else "**no** (failed)"
    return (f"| {step.name} | {fmt_seconds(step.restic)} | {fmt_seconds(step.ours)} | "
            f"{fmt_ratio(r)} | ≤ {target} | {met} |")


def results_table(res: Results) -> list[str]:
    grow = ratio(res.growth.ours, res.growth.restic)
    return [
        "| step | restic s | p2pbackup s | ratio (ours/restic) | target | met? |",
        "|---|---|---|---|---|---|",
        *(time_row(step) for step in res.steps),
        f"| repo growth after mutate (bytes) | {fmt_bytes(res.growth.restic)} | "
        f"{fmt_bytes(res.growth.ours)} | {fmt_ratio(grow)} | ≤ {GROWTH_TARGET} | "
        f"{verdict(grow, GROWTH_TARGET)} |",
        f"| initial repo size (bytes) | {fmt_bytes(res.initial.restic)} | "
        f"{fmt_bytes(res.initial.ours)} | {fmt_ratio(ratio(res.initial.ours, res.initial.restic))}"
        " | — | — |",
    ]


def rss_table(res: Results) -> list[str]:
    rows = ["| step | restic peak RSS MiB | p2pbackup peak RSS MiB | target | met? |",
            "|---|---|---|---|---|"]
    for step in res.steps:
        ours = step.ours.maxrss_kib / 1024
        rows.append(f"| {step.name} | {step.restic.maxrss_kib / 1024:.0f} | {ours:.0f} | "
                    f"≤ {RSS_TARGET_MIB} | {verdict(ours, RSS_TARGET_MIB)} |")
    return rows


def restore_check(res: Results) -> list[str]:
    what = ("Compared with the source tree: presence and kind of every entry, symlink targets, "
            "file contents (size + SHA-256); SQLite files by `PRAGMA integrity_check` and "
            "identical `iterdump()`.")
    if res.mismatches is None:
        return [f"p2pbackup's restore produced no tree to check. {what}"]
    lines = [f"**{len(res.mismatches)} mismatches** in p2pbackup's restore. {what}"]
    lines += [f"- `{m}`" for m in res.mismatches[:20]]
    if len(res.mismatches) > 20:
        lines.append(f"- ... and {len(res.mismatches) - 20} more")
    return lines


def failures(res: Results) -> list[str]:
    failed = [run for step in res.steps for run in (step.restic, step.ours) if not run.ok]
    if not failed:
        return ["None: every command exited 0."]
    lines: list[str] = []
    for run in failed:
        lines += [f"- `{run.command}` exited {run.exit_code}; stderr:", "", "```",
                  run.stderr.rstrip(), "```", ""]
    return lines


def machine() -> str:
    meminfo = Path("/proc/meminfo").read_text().split()
    mem_gib = int(meminfo[meminfo.index("MemTotal:") + 1]) / (1 << 20)
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    return f"{os.cpu_count()} CPUs ({cpu}), {mem_gib:.1f} GiB RAM, Linux {platform.release()}"


def git_revision() -> str:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read only: no index refresh
    head = check_call(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], env).strip()
    dirty = check_call(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no",
                        "--", *LIBRARY_PATHS], env)
    return head + (" plus uncommitted library changes" if dirty.strip() else "")


def invocation() -> str:
    def rel(path: str) -> str:
        p = Path(path).absolute()
        return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)

    direct = shlex.join([rel(sys.executable), rel(sys.argv[0]), *sys.argv[1:]])
    return f"make bench  # runs: {direct}" if "MAKELEVEL" in os.environ else direct


def report(res: Results, started: datetime.datetime) -> str:
    restic_version = check_call(["restic", "version"]).strip()
    lines = [
        "# p2pbackup vs restic",
        "",
        f"- date: {started:%Y-%m-%d %H:%M %Z}",
        f"- machine: {machine()}",
        f"- restic: {restic_version}",
        f"- p2pbackup: git {git_revision()}",
        f"- scale: {res.scale} — data set: {res.data_files:,} files, "
        f"{fmt_bytes(res.data_bytes)} (generated in {res.generate.seconds:.1f} s; "
        f"mutated in {res.mutate.seconds:.1f} s)",
        f"- command (from the repository root): `{invocation()}`",
        "",
        "## Time and size",
        "",
        *results_table(res),
        "",
        "## Peak RSS",
        "",
        *rss_table(res),
        "",
        "## Restore check",
        "",
        *restore_check(res),
        "",
        "## Failures",
        "",
        *failures(res),
        "",
        "## Method",
        "",
        "- Everything (data, both repositories, restic's cache, restore targets) is on a fresh "
        f"{IMAGE_SIZE} ext4 file system on a loop device (bench/work/fs.img).",
        "- Each step runs restic first, then p2pbackup, always in that order; one run of each "
        "(no repetitions, so small differences are within noise).",
        "- Caches are warm: `sync` runs before each timed command (so one tool's dirty pages "
        "are not written back on the other's clock), but the page cache is never dropped; the "
        "data set was just written and fits in RAM.",
        "- Wall-clock time of the whole process; peak RSS is `ru_maxrss` from `os.wait4` (the "
        "largest single process, not a sum).",
        "- `restic init` and `p2pbackup init` are not timed. restic uses its defaults "
        "(repository format and compression as `restic init` chooses them).",
        "- Repository sizes are `du -sb` of restic's repository directory and of "
        "`$P2PBACKUP_HOME/store` (p2pbackup's index cache is not counted; restic's cache "
        "is outside its repository too).",
        "- Growth is the size after the after-mutate backup minus the size before it.",
        "",
    ]
    return "\n".join(lines)


# ---- entry point ---------------------------------------------------------------------------

def ensure_tools() -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root: the benchmark mounts a loop file system")
    if not MKDATA.is_file():
        raise BenchError(f"data generator not found: {MKDATA}")
    if not P2PBACKUP.is_file():
        raise BenchError(f"{P2PBACKUP} not found: run `make setup` first")
    if shutil.which("restic") is None:
        print("restic not found; installing it with apt-get", flush=True)
        check_call(["apt-get", "update", "-qq"])
        check_call(["apt-get", "install", "-y", "-qq", "restic"])


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="data set size for mkdata.py (1.0 is about 1 GB, 20k files)")
    ap.add_argument("--keep", action="store_true",
                    help="leave the scratch file system mounted at bench/work/mnt")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "RESULTS.md",
                    help="Markdown results file (default: bench/RESULTS.md)")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on kill, too
    started = datetime.datetime.now().astimezone()
    try:
        ensure_tools()
        logs = WORK / "logs" / f"{started:%Y%m%d-%H%M%S}"
        with scratch_fs(args.keep) as mnt:
            logs.mkdir(parents=True)
            results = benchmark(Runner(logs), mnt, args.scale)
    except BenchError as exc:
        print(f"benchmark aborted: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    text = report(results, started)
    print("\n" + text)
    args.out.write_text(text)
    print(f"written to {args.out}; command logs in {logs}")
    ok = all(run.ok for step in results.steps for run in (step.restic, step.ours))
    return 0 if ok and results.mismatches == [] else 1


if __name__ == "__main__":
    sys.exit(main())
