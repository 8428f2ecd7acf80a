#!/usr/bin/env python3
"""Benchmark p2pbackup against restic on the synthetic device tree from mkdata.py.

Everything (data set, both repositories, caches, restore targets) lives on a fresh
loop-mounted ext4 file system under bench/work/, which is unmounted and deleted at the
end (unless --keep), also on failure or Ctrl-C.  Needs root.

Steps, each timed (wall clock) with the peak RSS of the process (`ru_maxrss` from
`os.wait4`) after a `sync` (page cache stays warm).  Each comparison step is repeated
--repeat times, alternating which tool goes first (restic in repetitions 1, 3, ...,
p2pbackup in 2, 4, ...); the report gives the median times and their ratio:

  1. generate the data set (mkdata.py, seed 42)
  2. initial backup              restic backup            vs p2pbackup snapshot
     (every repetition starts from freshly initialised, empty repositories)
  3. no-change backup            (same commands again)
  4. mutate (mkdata.py --mutate --seed 1), then backup again; every repetition starts from
     the same repositories (copied aside before the first); growth by du -sb, first one
  5. full restore of latest      restic restore           vs p2pbackup restore, into
     empty targets; the last p2pbackup restore is compared with the source tree
  6. full check                  restic check --read-data vs p2pbackup verify --read-data

The results go to stdout and to a Markdown file (bench/RESULTS.md by default), which is
rewritten except for the other scripts' sections ("## Daemon", "## Replication", "## Scale"),
kept as they are (bench/_common.py).
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
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_main_report  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "bench" / "work"
MKDATA = REPO / "bench" / "mkdata.py"
P2PBACKUP = REPO / ".venv" / "bin" / "p2pbackup"
CODE_PATHS = ("p2pbackup", "cli", "daemon", "pyproject.toml")  # the code measured
LIBRARY_PATHS = (*CODE_PATHS, "bench/mkdata.py", "bench/mkfiles.py")  # what results depend on
IMAGE_SIZE = "16G"  # sparse; data, repositories, their copies and restores fit
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
class Trial:
    """One repetition of a step: a run of each tool."""

    restic: Run
    ours: Run

    @property
    def ratio(self) -> float | None:
        if not (self.restic.ok and self.ours.ok):
            return None
        return ratio(self.ours.seconds, self.restic.seconds)


@dataclass(frozen=True)
class Step:
    """One benchmark step, repeated with both tools."""

    name: str
    trials: tuple[Trial, ...]

    @property
    def restic(self) -> tuple[Run, ...]:
        return tuple(trial.restic for trial in self.trials)

    @property
    def ours(self) -> tuple[Run, ...]:
        return tuple(trial.ours for trial in self.trials)

    @property
    def runs(self) -> tuple[Run, ...]:
        return self.restic + self.ours


class Spec(NamedTuple):
    """What a step runs: restic's arguments (after `restic -r REPO`) and p2pbackup's."""

    name: str
    restic_args: list[str | Path]
    ours_args: list[str | Path]


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
    def restic_cache(self) -> Path:
        return self.mnt / "restic-cache"

    @property
    def stash(self) -> Path:
        """Where the repositories are copied aside for the repeated after-mutate backup."""
        return self.mnt / "stash"

    @property
    def tmp(self) -> Path:
        return self.mnt / "tmp"

    def state_dirs(self) -> tuple[Path, ...]:
        """Everything the tools keep between commands: repositories and caches."""
        return (self.restic_repo, self.restic_cache, self.p2p_home)

    def restic_env(self) -> dict[str, str]:
        return {**os.environ, "RESTIC_PASSWORD": RESTIC_PASSWORD, "TMPDIR": str(self.tmp),
                "RESTIC_CACHE_DIR": str(self.restic_cache)}

    def ours_env(self) -> dict[str, str]:
        return {**os.environ, "P2PBACKUP_HOME": str(self.p2p_home), "TMPDIR": str(self.tmp)}

    def sizes(self) -> Sizes:
        return Sizes(du_bytes(self.restic_repo), du_bytes(self.p2p_store))


@dataclass(frozen=True)
class Results:
    """Everything the report needs."""

    scale: float
    repeat: int
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

    def timed(self, label: str, argv: list[str | Path], env: Mapping[str, str],
              watch: Callable[[int], AbstractContextManager[object]] | None = None) -> Run:
        """Run `argv` after a `sync`; return its wall time and peak RSS. `watch(pid)`, if
        given, is entered while the command runs (e.g. to sample its memory)."""
        self.count += 1
        stem = self.logs / f"{self.count:02d}-{label}"
        args = tuple(str(a) for a in argv)
        subprocess.run(["sync"], check=True)
        with open(f"{stem}.out", "wb") as out, open(f"{stem}.err", "wb") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err)
            try:
                with watch(proc.pid) if watch else nullcontext():
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
    proc = subprocess.run(args, check=False, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BenchError(f"{shlex.join(args)} failed (exit {proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def du_bytes(path: Path) -> int:
    return int(check_call(["du", "-sb", path]).split()[0])


# ---- scratch file system -------------------------------------------------------------------

@contextmanager
def scratch_fs(keep: bool, tmpfs_size: str | None = None, mnt: Path = WORK / "mnt",
               image_size: str = IMAGE_SIZE, mkfs_args: Sequence[str] = ()) -> Iterator[Path]:
    """A fresh file system at `mnt`, removed afterwards: ext4 on a loop device (its sparse
    image of `image_size` beside `mnt`), or with `tmpfs_size` (e.g. "16G") a tmpfs of at
    most that size."""
    image = None if tmpfs_size else mnt.parent / "fs.img"
    if os.path.ismount(mnt):
        raise BenchError(f"{mnt} is still mounted (an earlier --keep run?): "
                         f"{removal_command(image, mnt)}")
    mnt.mkdir(parents=True, exist_ok=True)
    try:
        if image is None:
            check_call(["mount", "-t", "tmpfs", "-o", f"size={tmpfs_size},mode=0755", "tmpfs",
                        mnt])
        else:
            check_call(["truncate", "-s", image_size, image])
            # Initialise inode tables and journal now, not in the background during the steps.
            check_call(["mkfs.ext4", "-q", "-F", "-E",
                        "lazy_itable_init=0,lazy_journal_init=0", *mkfs_args, image])
            check_call(["mount", "-o", "loop", image, mnt])
        yield mnt
    finally:
        if keep and os.path.ismount(mnt):
            print(f"kept {mnt}; remove with: {removal_command(image, mnt)}")
        else:
            remove_fs(image, mnt)


def removal_command(image: Path | None, mnt: Path) -> str:
    return f"umount {mnt}" + (f" && rm {image}" if image else "")


def remove_fs(image: Path | None, mnt: Path) -> None:
    if os.path.ismount(mnt) and subprocess.run(["umount", mnt], check=False).returncode != 0:
        # still busy: detach now, free it when idle
        subprocess.run(["umount", "-l", mnt], check=False)
    if image is not None:
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

RESTIC, OURS = "restic", "p2pbackup"


def tool_order(rep: int) -> tuple[str, str]:
    """Repetitions 1, 3, ... (rep 0, 2, ...) run restic first, the others p2pbackup."""
    return (RESTIC, OURS) if rep % 2 == 0 else (OURS, RESTIC)


def run_tool(runner: Runner, lay: Layout, spec: Spec, tool: str, rep: int,
             watch: Callable[[int], AbstractContextManager[object]] | None = None) -> Run:
    """Repetition `rep` of a step with one tool (RESTIC or OURS)."""
    label = f"{tool}-" + spec.name.replace(" ", "-").replace("--", "") + f"-{rep + 1}"
    if tool == RESTIC:
        return runner.timed(label, ["restic", "-r", lay.restic_repo, *spec.restic_args],
                            lay.restic_env(), watch)
    return runner.timed(label, [P2PBACKUP, *spec.ours_args], lay.ours_env(), watch)


def trial(runner: Runner, lay: Layout, spec: Spec, rep: int) -> Trial:
    """Run repetition `rep` of a step with both tools, in this repetition's order."""
    runs = {tool: run_tool(runner, lay, spec, tool, rep) for tool in tool_order(rep)}
    return Trial(runs[RESTIC], runs[OURS])


def finish(spec: Spec, trials: list[Trial]) -> Step:
    step = Step(spec.name, tuple(trials))
    print(f"  median: restic {fmt_median(step.restic)} s, p2pbackup {fmt_median(step.ours)} s,"
          f" ratio {fmt_ratio(ratio_of_medians(step))} ({fmt_ratios(step)})", flush=True)
    return step


def repeated(runner: Runner, lay: Layout, spec: Spec, repeat: int,
             prepare: Callable[[], None] | None = None) -> Step:
    """Run a step `repeat` times, each after the untimed `prepare`."""
    print(f"{spec.name}:", flush=True)
    trials: list[Trial] = []
    for rep in range(repeat):
        if prepare is not None:
            prepare()
        trials.append(trial(runner, lay, spec, rep))
    return finish(spec, trials)


def after_mutate(runner: Runner, lay: Layout, spec: Spec, repeat: int) -> tuple[Step, Sizes]:
    """Back up the mutated data `repeat` times, each time onto the same repositories.

    They are copied aside before the first repetition and put back before each further
    one.  Returns the step and the repositories' growth in the first repetition.
    """
    print(f"{spec.name}:", flush=True)
    before = lay.sizes()
    stash_state(lay)
    trials = [trial(runner, lay, spec, 0)]
    after = lay.sizes()
    for rep in range(1, repeat):
        restore_state(lay)
        trials.append(trial(runner, lay, spec, rep))
    shutil.rmtree(lay.stash)
    return finish(spec, trials), Sizes(after.restic - before.restic, after.ours - before.ours)


def mkdata(runner: Runner, lay: Layout, scale: float, mutate: bool) -> Run:
    extra = ["--mutate", "--seed", "1"] if mutate else ["--seed", "42"]
    label = "mutate" if mutate else "generate"
    print(f"{label} data:", flush=True)
    return require(runner.timed(label, [sys.executable, MKDATA, lay.data, "--scale", str(scale),
                                        *extra], os.environ))


# The untimed preparations below write or delete a lot; Runner.timed syncs before it starts
# the clock, so that writeback is not charged to the next timed command.

def remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def fresh_repos(lay: Layout, tools: Sequence[str] = (RESTIC, OURS)) -> None:
    """Empty repositories: a new restic repository (and cache) and a new p2pbackup home
    (of `tools` only; the others' are just removed)."""
    for path in lay.state_dirs():
        remove_tree(path)
    if RESTIC in tools:
        check_call(["restic", "init", "-r", lay.restic_repo], lay.restic_env())
    if OURS in tools:
        check_call([P2PBACKUP, "init", "--source", lay.data], lay.ours_env())


def stash_state(lay: Layout) -> None:
    """Copy the repositories and caches aside (`cp -a`)."""
    lay.stash.mkdir()
    for path in lay.state_dirs():
        if path.exists():
            check_call(["cp", "-a", path, lay.stash / path.name])


def restore_state(lay: Layout) -> None:
    """Replace the repositories and caches with the copies from `stash_state`."""
    for path in lay.state_dirs():
        remove_tree(path)
        saved = lay.stash / path.name
        if saved.exists():
            check_call(["cp", "-a", saved, path])


def clear_restores(lay: Layout) -> None:
    remove_tree(lay.restore_restic)
    remove_tree(lay.restore_ours)


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


def benchmark(runner: Runner, mnt: Path, scale: float, repeat: int) -> Results:
    lay = Layout(mnt)
    lay.tmp.mkdir()
    generate = mkdata(runner, lay, scale, mutate=False)
    data_files, data_bytes = count_files(lay.data), du_bytes(lay.data)
    backup: tuple[list[str | Path], list[str | Path]] = (["backup", lay.data], ["snapshot"])
    steps = [repeated(runner, lay, Spec(INITIAL, *backup), repeat, lambda: fresh_repos(lay))]
    initial = lay.sizes()
    steps.append(repeated(runner, lay, Spec(NO_CHANGE, *backup), repeat))
    mutate = mkdata(runner, lay, scale, mutate=True)
    mutated, growth = after_mutate(runner, lay, Spec(AFTER_MUTATE, *backup), repeat)
    steps.append(mutated)
    restore = Spec(RESTORE, ["restore", "latest", "--target", lay.restore_restic],
                   ["restore", "latest", "--to", lay.restore_ours])
    steps.append(repeated(runner, lay, restore, repeat, lambda: clear_restores(lay)))
    restored = lay.restore_ours / lay.data.name
    print("checking the last p2pbackup restore against the source ...", flush=True)
    mismatches = compare_trees(lay.data, restored) if restored.is_dir() else None
    verify = Spec(VERIFY, ["check", "--read-data"], ["verify", "--read-data"])
    steps.append(repeated(runner, lay, verify, repeat))
    return Results(scale, repeat, data_files, data_bytes, generate, mutate, steps, initial,
                   growth, mismatches)


# ---- the report ----------------------------------------------------------------------------

def ratio(ours: float, restic: float) -> float | None:
    return ours / restic if restic > 0 else None


def verdict(value: float | None, target: float) -> str:
    return "—" if value is None else ("yes" if value <= target else "**no**")


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def median_seconds(runs: Sequence[Run]) -> float | None:
    """Median wall time of the runs; None if any of them failed."""
    return statistics.median(run.seconds for run in runs) if all(r.ok for r in runs) else None


def ratio_of_medians(step: Step) -> float | None:
    restic, ours = median_seconds(step.restic), median_seconds(step.ours)
    return ratio(ours, restic) if ours is not None and restic is not None else None


def fmt_median(runs: Sequence[Run]) -> str:
    seconds = median_seconds(runs)
    if seconds is not None:
        return f"{seconds:.2f}"
    failed = [run for run in runs if not run.ok]
    return f"FAILED {len(failed)} of {len(runs)} (exit {failed[0].exit_code})"


def fmt_ratios(step: Step) -> str:
    return " / ".join(fmt_ratio(trial.ratio) for trial in step.trials)


def fmt_bytes(n: int) -> str:
    return f"{n:,} ({n / MiB:.1f} MiB)"


def time_row(step: Step) -> str:
    target = TIME_TARGETS[step.name]
    r = ratio_of_medians(step)
    met = verdict(r, target) if all(run.ok for run in step.ours) else "**no** (failed)"
    return (f"| {step.name} | {fmt_median(step.restic)} | {fmt_median(step.ours)} | "
            f"{fmt_ratio(r)} | {fmt_ratios(step)} | ≤ {target} | {met} |")


def size_row(name: str, sizes: Sizes, target: float | None) -> str:
    r = ratio(sizes.ours, sizes.restic)
    goal = "—" if target is None else f"≤ {target}"
    met = "—" if target is None else verdict(r, target)
    return (f"| {name} | {fmt_bytes(sizes.restic)} | {fmt_bytes(sizes.ours)} | {fmt_ratio(r)} "
            f"| — | {goal} | {met} |")


def results_table(res: Results) -> list[str]:
    return [
        ("| step | restic s (median) | p2pbackup s (median) | ratio of medians (ours/restic) "
         "| ratio per repetition | target | met? |"),
        "|---|---|---|---|---|---|---|",
        *(time_row(step) for step in res.steps),
        size_row("repo growth after mutate (bytes)", res.growth, GROWTH_TARGET),
        size_row("initial repo size (bytes)", res.initial, None),
    ]


def peak_rss_mib(runs: Sequence[Run]) -> float:
    return max(run.maxrss_kib for run in runs) / 1024


def rss_table(res: Results) -> list[str]:
    rows = ["| step | restic peak RSS MiB (max) | p2pbackup peak RSS MiB (max) | target | met? |",
            "|---|---|---|---|---|"]
    for step in res.steps:
        ours = peak_rss_mib(step.ours)
        rows.append(f"| {step.name} | {peak_rss_mib(step.restic):.0f} | {ours:.0f} | "
                    f"≤ {RSS_TARGET_MIB} | {verdict(ours, RSS_TARGET_MIB)} |")
    return rows


def restore_check(res: Results) -> list[str]:
    what = ("Compared with the source tree: presence and kind of every entry, symlink targets, "
            "file contents (size + SHA-256); SQLite files by `PRAGMA integrity_check` and "
            "identical `iterdump()`.")
    if res.mismatches is None:
        return [f"p2pbackup's last restore produced no tree to check. {what}"]
    lines = [(f"**{len(res.mismatches)} mismatches** in p2pbackup's restore (the last "
              f"repetition's). {what}")]
    lines += [f"- `{m}`" for m in res.mismatches[:20]]
    if len(res.mismatches) > 20:
        lines.append(f"- ... and {len(res.mismatches) - 20} more")
    return lines


def failures(res: Results) -> list[str]:
    failed = [run for step in res.steps for run in step.runs if not run.ok]
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
    # A branch's HEAD may be rebased away; the commit that last changed the code stays.
    code = check_call(["git", "-C", REPO, "log", "-1", "--format=%h", "--", *CODE_PATHS],
                      env).strip()
    dirty = check_call(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no",
                        "--", *LIBRARY_PATHS], env)
    return (head + (f" (code last changed in {code})" if code != head else "")
            + (" plus uncommitted library changes" if dirty.strip() else ""))


def invocation() -> str:
    def rel(path: str) -> str:
        p = Path(path).absolute()
        return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)

    direct = shlex.join([rel(sys.executable), rel(sys.argv[0]), *sys.argv[1:]])
    return f"make bench  # runs: {direct}" if "MAKELEVEL" in os.environ else direct


def method(repeat: int) -> list[str]:
    return [
        (f"- Everything (data, both repositories, restic's cache, restore targets) is on a "
         f"fresh {IMAGE_SIZE} ext4 file system on a loop device (bench/work/fs.img)."),
        (f"- Each step is measured {repeat} times within this run (`--repeat`), alternating "
         "which tool goes first (restic in repetitions 1, 3, ..., p2pbackup in 2, 4, ...). "
         "Times are medians per tool; the targets are judged on the ratio of the medians, and "
         "the ratio of each repetition is listed to show the spread. Peak RSS is the maximum "
         "over the repetitions."),
        ("- Initial backup: every repetition starts from empty repositories (restic's "
         "repository and cache and `$P2PBACKUP_HOME` deleted, `restic init` and "
         "`p2pbackup init` run again, untimed). The last repetition's repositories are used "
         "for the following steps and for the initial repository size."),
        ("- No-change backup and full check: simply repeated (each no-change repetition adds "
         "one more snapshot)."),
        ("- Backup after mutate: the data is mutated once. Before the first repetition "
         "restic's repository and cache and `$P2PBACKUP_HOME` are copied aside (`cp -a`, "
         "untimed); each further repetition first replaces them with these copies, so every "
         "repetition backs up the same change onto the same repositories. Growth is the size "
         "after the first repetition minus the size before it."),
        ("- Restore: every repetition restores into new, empty targets (the previous "
         "repetition's are deleted, untimed). The restore check is done on the last "
         "repetition's p2pbackup restore."),
        ("- Caches are warm: `sync` runs before each timed command (so dirty pages of the "
         "other tool or of the untimed preparations are not written back on the clock), but "
         "the page cache is never dropped; the data set was just written and fits in RAM."),
        ("- Wall-clock time of the whole process; peak RSS is `ru_maxrss` from `os.wait4` "
         "(the largest single process, not a sum)."),
        ("- `restic init` and `p2pbackup init` are not timed. restic uses its defaults "
         "(repository format and compression as `restic init` chooses them)."),
        ("- Repository sizes are `du -sb` of restic's repository directory and of "
         "`$P2PBACKUP_HOME/store` (p2pbackup's index cache is not counted; restic's cache "
         "is outside its repository too)."),
    ]


def report(res: Results, started: datetime.datetime) -> str:
    restic_version = check_call(["restic", "version"]).strip()
    lines = [
        "# p2pbackup vs restic",
        "",
        f"- date: {started:%Y-%m-%d %H:%M %Z}",
        f"- machine: {machine()}",
        f"- restic: {restic_version}",
        f"- p2pbackup: git {git_revision()}",
        (f"- scale: {res.scale} — data set: {res.data_files:,} files, "
         f"{fmt_bytes(res.data_bytes)} (generated in {res.generate.seconds:.1f} s; "
         f"mutated in {res.mutate.seconds:.1f} s)"),
        (f"- repetitions: {res.repeat} per step, alternating which tool goes first "
         "(see Method)"),
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
        *method(res.repeat),
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


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="data set size for mkdata.py (1.0 is about 1 GB, 20k files)")
    ap.add_argument("--repeat", type=positive_int, default=4,
                    help="repetitions of each step, alternating which tool goes first "
                         "(default: 4, so each tool goes first equally often)")
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
            results = benchmark(Runner(logs), mnt, args.scale, args.repeat)
    except BenchError as exc:
        print(f"benchmark aborted: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    text = report(results, started)
    print("\n" + text)
    write_main_report(args.out, text)
    print(f"written to {args.out}; command logs in {logs}")
    ok = all(run.ok for step in results.steps for run in step.runs)
    return 0 if ok and results.mismatches == [] else 1


if __name__ == "__main__":
    sys.exit(main())
