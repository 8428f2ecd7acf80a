#!/usr/bin/env python3
"""The million-small-files benchmark: p2pbackup against restic, and p2pbackupd, at N files.

For each N (--files, default 100k, 300k and 1M), on a fresh tmpfs mounted at
bench/work/scale/mnt (unmounted at the end, also on failure or Ctrl-C; needs root):

  1. generate N files of 50-3,000 bytes in N/1000 folders (mkfiles.py, seed 42)
  2. initial snapshot      restic backup            vs p2pbackup snapshot   (empty repositories)
  3. mutate (mkfiles.py --mutate: 1% rewritten, 0.5% added, 0.5% deleted), then
     after mutation        the same commands, each repetition from the same repositories
  4. no-change snapshot    the same commands again (after the mutation, so the snapshots
                           before it are the older half that step 8 forgets)
  5. verify (no data)      restic check             vs p2pbackup verify
  6. verify --read-data    restic check --read-data vs p2pbackup verify --read-data
  7. restore latest        restic restore           vs p2pbackup restore   (into empty targets;
                           the last p2pbackup restore is compared with the tree)
  8. forget half + prune   restic forget --keep-last K --prune vs p2pbackup forget
                           --keep-last K --prune, K = half the snapshots (each repetition from
                           the same repositories)
  9. p2pbackupd only: start on a fresh home (READY=1, the start-up roll-up snapshot, first
     idle), idle RSS; then a restart on that home (READY=1, first idle) and idle RSS

Each step runs --repeat times (default 3, or 2 for N >= 1M) with both tools, alternating which
goes first (restic in repetitions 1, 3, ...). Wall time and peak RSS are recorded: the larger
of ru_maxrss (os.wait4: the largest single process of the tree) and, sampled every 0.2 s, the
command's RSS or, while it has children (p2pbackup forks restore workers), the summed PSS of
it and all its descendants.
Steps can be chosen (--steps, --tools); what a chosen step needs (repositories, the mutation)
is then prepared untimed. The tables are printed even when a step fails; --write-results
replaces the "## Scale" section of bench/RESULTS.md. The whole run holds the machine-wide
benchmark lock (/tmp/p2pbackup-bench.lock).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_daemon  # noqa: E402
from _common import SCALE_HEADING, bench_lock, write_section  # noqa: E402
from bench_restic import (OURS, P2PBACKUP, REPO, RESTIC, WORK, BenchError,  # noqa: E402
                          Layout, Run, Runner, Spec, check_call, clear_restores,
                          compare_trees, fmt_bytes, fresh_repos, git_revision, indent,
                          invocation, machine, positive_int, remove_tree, restore_state,
                          run_tool, scratch_fs, stash_state, tool_order)
from mkfiles import mutation_counts, tree_digest  # noqa: E402

MKFILES = REPO / "bench" / "mkfiles.py"
SCALE_WORK = WORK / "scale"
DEFAULT_FILES = (100_000, 300_000, 1_000_000)
RSS_TARGET_MIB = 300
SAMPLE_EVERY = 0.2  # seconds between samples of a process tree's RSS
IDLE_WINDOW = 1.0  # seconds: the daemon is idle when it used < IDLE_CPU of a core over this
IDLE_CPU = 0.05
IDLE_POLL = 0.25  # seconds between status requests while waiting for the daemon to idle
MiB = 1 << 20
# The tmpfs holds the tree (a 4 KiB page per small file), one restore, both repositories
# and their copies: at most 1.0 GiB at 100k files (10.5 KiB per file).
TMPFS_KIB_PER_FILE = 11
KEEP_FREE_KIB = 2 << 20
# Below this much available memory the N in progress is stopped (and its tmpfs removed):
# there is no swap, so a full memory means the kernel kills processes, other people's too.
# (A 1M-file run on tmpfs got there when other work on the machine grew meanwhile.)
LOW_MEMORY_KIB = 1536 << 10
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

# (key for --steps, row name, target for the ratio of the median times, p2pbackup/restic);
# the table's order. Times of the daemon rows are p2pbackup's alone.
INITIAL, NO_CHANGE, MUTATION = "initial", "no-change", "mutation"
VERIFY, READ_DATA, RESTORE, PRUNE, DAEMON = ("verify", "read-data", "restore", "prune",
                                             "daemon")
STEP_KEYS = (INITIAL, NO_CHANGE, MUTATION, VERIFY, READ_DATA, RESTORE, PRUNE, DAEMON)
ROW_NAMES = {
    INITIAL: "initial snapshot",
    NO_CHANGE: "no-change snapshot",
    MUTATION: "after mutation (1% changed, 0.5% added, 0.5% deleted)",
    VERIFY: "verify (no data) / check",
    READ_DATA: "verify --read-data / check --read-data",
    RESTORE: "restore latest",
    PRUNE: "forget half the snapshots + prune",
}
DAEMON_ROWS = {
    "start": "daemon: start on a fresh home → roll-up snapshot done",
    "start-idle": "daemon: idle after start-up (RSS over the idle window)",
    "restart": "daemon: restart (home with the snapshot) → first idle",
    "restart-idle": "daemon: idle after restart (RSS over the idle window)",
}
TIME_TARGETS = {INITIAL: 0.7, NO_CHANGE: 0.3, MUTATION: 0.5, RESTORE: 0.6}


# ---- memory of a process tree --------------------------------------------------------------

def process_tree(root: int) -> list[int]:
    """`root` and every process descended from it (from each /proc/PID/stat's ppid)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_KIB
    except (OSError, IndexError, ValueError):  # gone meanwhile
        return 0


def pss_kib(pid: int) -> int:
    """Proportional set size: each shared page counted once over the processes sharing it."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(b"Pss:"))
    except (OSError, StopIteration, IndexError, ValueError):
        return 0


def tree_memory_kib(root: int) -> tuple[int, int]:
    """(memory in KiB, number of processes) of `root` and its descendants now: the RSS of
    `root` alone, or, when it has children (forked workers sharing its pages), the larger of
    that and the tree's summed PSS (a sum of RSS would count the shared pages once per
    process)."""
    tree = process_tree(root)
    own = rss_kib(root)
    if len(tree) == 1:
        return own, 1
    return max(own, sum(pss_kib(pid) for pid in tree)), len(tree)


class TreeMemory:
    """Samples the memory of a process tree (tree_memory_kib) on a thread; keeps the peak."""

    def __init__(self) -> None:
        self.peak_kib = 0
        self.processes = 0

    def sample(self, pid: int) -> int:
        kib, count = tree_memory_kib(pid)
        self.peak_kib = max(self.peak_kib, kib)
        self.processes = max(self.processes, count)
        return kib

    @contextmanager
    def watching(self, pid: int) -> Iterator[TreeMemory]:
        stop = threading.Event()

        def run() -> None:
            while True:
                self.sample(pid)
                if stop.wait(SAMPLE_EVERY):
                    return

        thread = threading.Thread(target=run, name="tree-memory", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()


# ---- results -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """One tool's measurement in one repetition of a step."""

    seconds: float | None  # None: the row measures memory only (an idle daemon)
    peak_kib: int  # max(ru_maxrss, the sampled memory of the process tree)
    processes: int = 1  # the most processes of the tree seen at once
    error: str | None = None  # why it failed, if it did
    extra: dict[str, float] = field(default_factory=dict)  # more figures, e.g. "READY=1 s"

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Row:
    """One step of the table: each tool's samples, one per repetition (in order)."""

    key: str
    name: str
    target: float | None
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    detail: str = ""  # shown after the name (not part of it: rows match by name across N)
    problem: str | None = None  # the step could not run (its preparation failed)

    def add(self, tool: str, sample: Sample) -> None:
        self.samples.setdefault(tool, []).append(sample)

    def runs(self, tool: str) -> list[Sample]:
        return self.samples.get(tool, [])


@dataclass
class SizeResult:
    """Everything measured at one N."""

    files: int
    repeat: int
    rows: list[Row] = field(default_factory=list)
    data_bytes: int = 0
    generate_s: float = 0.0
    mutate_s: float | None = None
    mutation: tuple[int, int, int] = (0, 0, 0)
    repo_bytes: dict[str, int] = field(default_factory=dict)  # after the initial snapshot
    restore_check: str = "not run"
    fs: str = "tmpfs"  # the scratch file system (--fs)
    fs_peak_bytes: int = 0
    load_start: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_end: tuple[float, float, float] = (0.0, 0.0, 0.0)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def row(self, key: str) -> Row | None:
        return next((r for r in self.rows if r.key == key), None)


# ---- one N ---------------------------------------------------------------------------------

def sample_of(run: Run, memory: TreeMemory) -> Sample:
    error = None if run.ok else (f"exit {run.exit_code}: "
                                 + (run.stderr.strip().splitlines() or [""])[-1][:200])
    return Sample(run.seconds, max(run.maxrss_kib, memory.peak_kib), memory.processes, error)


class ScaleRun:
    """The steps at one N, on one scratch file system."""

    def __init__(self, mnt: Path, runner: Runner, logs: Path, result: SizeResult,
                 steps: Sequence[str], tools: Sequence[str], idle_seconds: float) -> None:
        self.lay = Layout(mnt)
        self.daemon_lay = bench_daemon.Layout(mnt)  # same data, home and tmp directories
        self.runner = runner
        self.logs = logs
        self.res = result
        self.steps = steps
        self.tools = tools
        self.idle_seconds = idle_seconds
        self.have_repos = False
        self.source_digest: str | None = None

    @property
    def repeat(self) -> int:
        return self.res.repeat

    # -- helpers

    def note_fs_use(self) -> None:
        st = os.statvfs(self.lay.mnt)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        self.res.fs_peak_bytes = max(self.res.fs_peak_bytes, used)

    def mkfiles(self, label: str, *args: str) -> float:
        print(f"{label}:", flush=True)
        run = self.runner.timed(label, [sys.executable, MKFILES, self.lay.data, *args],
                                os.environ)
        if not run.ok:
            raise BenchError(f"{run.command} failed (exit {run.exit_code}):\n{run.stderr}")
        self.note_fs_use()
        return run.seconds

    def backup_untimed(self) -> None:
        """One backup with each tool, not timed (what a chosen step needs first)."""
        if RESTIC in self.tools:
            check_call(["restic", "-r", self.lay.restic_repo, "backup", self.lay.data],
                       self.lay.restic_env())
        if OURS in self.tools:
            check_call([P2PBACKUP, "snapshot"], self.lay.ours_env())

    def ensure_repos(self) -> None:
        if not self.have_repos:
            print("  (untimed: fresh repositories and one backup each)", flush=True)
            fresh_repos(self.lay, self.tools)
            self.backup_untimed()
            self.have_repos = True

    def measure(self, row: Row, spec: Spec, rep: int,
                after: Callable[[str, int], None] | None) -> None:
        """Repetition `rep` of a step: each chosen tool, in this repetition's order, each
        followed by the untimed `after(tool, rep)`."""
        for tool in tool_order(rep):
            if tool in self.tools:
                memory = TreeMemory()
                run = run_tool(self.runner, self.lay, spec, tool, rep, memory.watching)
                row.add(tool, sample_of(run, memory))
                self.note_fs_use()
                if after is not None:
                    after(tool, rep)

    def repeated(self, key: str, spec: Spec,
                 prepare: Callable[[int], None] | None = None,
                 after: Callable[[str, int], None] | None = None) -> None:
        """A step `repeat` times; untimed, `prepare(rep)` before each repetition and
        `after(tool, rep)` after each tool's run."""
        row = self.new_row(key)
        print(f"{row.name}:", flush=True)
        for rep in range(self.repeat):
            if prepare is not None:
                prepare(rep)
            self.measure(row, spec, rep, after)
        print(f"  medians: {median_line(row)}", flush=True)

    def new_row(self, key: str, name: str | None = None) -> Row:
        row = Row(key, name or ROW_NAMES[key], TIME_TARGETS.get(key))
        self.res.rows.append(row)
        return row

    def from_same_state(self, rep: int) -> None:
        """Before each repetition: the repositories as they were before the first."""
        if rep == 0:
            remove_tree(self.lay.stash)
            stash_state(self.lay)
        else:
            restore_state(self.lay)

    def step(self, key: str, body: Callable[[], None]) -> None:
        """Run one step; a failure is noted in the table and the next step still runs."""
        try:
            body()
        except OutOfMemory:
            raise
        except BenchError as exc:
            row = self.res.row(key) or self.new_row(key, DAEMON_ROWS["start"]
                                                    if key == DAEMON else None)
            row.problem = str(exc).strip().splitlines()[0][:300]
            self.res.problems.append(f"{key}: {exc}")
            print(f"  {key} FAILED: {exc}", file=sys.stderr, flush=True)

    # -- the steps, in the order they run

    def run(self) -> None:
        self.res.generate_s = self.mkfiles("generate", "--files", str(self.res.files))
        self.res.data_bytes = int(check_call(["du", "-sb", self.lay.data]).split()[0])
        self.lay.tmp.mkdir(exist_ok=True)
        if INITIAL in self.steps:
            self.step(INITIAL, self.initial)
        if MUTATION in self.steps or PRUNE in self.steps:
            self.step(MUTATION, self.mutation)
        for key, spec in ((NO_CHANGE, self.backup(NO_CHANGE)),
                          (VERIFY, Spec(VERIFY, ["check"], ["verify"])),
                          (READ_DATA, Spec(READ_DATA, ["check", "--read-data"],
                                           ["verify", "--read-data"]))):
            if key in self.steps:
                self.step(key, lambda key=key, spec=spec: self.with_repos(key, spec))
        if RESTORE in self.steps:
            self.step(RESTORE, self.restore)
        if PRUNE in self.steps:
            self.step(PRUNE, self.prune)
        if DAEMON in self.steps and OURS in self.tools:
            self.step(DAEMON, self.daemon)

    def backup(self, key: str) -> Spec:
        return Spec(key, ["backup", self.lay.data], ["snapshot"])

    def initial(self) -> None:
        self.repeated(INITIAL, self.backup(INITIAL),
                      lambda rep: fresh_repos(self.lay, self.tools))
        self.have_repos = True
        self.res.repo_bytes = {
            tool: int(check_call(["du", "-sb", path]).split()[0])
            for tool, path in ((RESTIC, self.lay.restic_repo), (OURS, self.lay.p2p_store))
            if tool in self.tools}

    def mutation(self) -> None:
        self.ensure_repos()
        self.res.mutation = mutation_counts(self.res.files)
        self.res.mutate_s = self.mkfiles("mutate", "--mutate", "--seed", "1")
        if MUTATION in self.steps:
            self.repeated(MUTATION, self.backup(MUTATION), self.from_same_state)
            remove_tree(self.lay.stash)
        else:  # only for prune: its older half must hold data the newer half does not
            print("  (untimed: a backup of the mutated tree)", flush=True)
            self.backup_untimed()

    def with_repos(self, key: str, spec: Spec) -> None:
        self.ensure_repos()
        self.repeated(key, spec)

    def restore(self) -> None:
        self.ensure_repos()
        spec = Spec(RESTORE, ["restore", "latest", "--target", self.lay.restore_restic],
                    ["restore", "latest", "--to", self.lay.restore_ours])

        def check_and_clear(tool: str, rep: int) -> None:
            if tool == OURS and rep == self.repeat - 1:
                self.res.restore_check = self.check_restore()
            # at once: a restore of 1M files takes ~4 GiB of tmpfs, two would not fit
            remove_tree(self.lay.restore_ours if tool == OURS else self.lay.restore_restic)

        self.repeated(RESTORE, spec, lambda rep: clear_restores(self.lay), check_and_clear)

    def check_restore(self) -> str:
        """Compare p2pbackup's restore with the tree: digests first, details if they differ."""
        restored = self.lay.restore_ours / self.lay.data.name
        if not restored.is_dir():
            return "**no tree**: p2pbackup's last restore produced none"
        print("  comparing p2pbackup's restore with the tree ...", flush=True)
        if self.source_digest is None:
            self.source_digest = tree_digest(self.lay.data)
        if tree_digest(restored) == self.source_digest:
            return "0 mismatches"
        problems = compare_trees(self.lay.data, restored)
        return (f"**{len(problems)} mismatches**: "
                + "; ".join(f"`{p}`" for p in problems[:5]) + (" ..." if problems[5:] else ""))

    def snapshot_counts(self) -> dict[str, int]:
        counts = {}
        if RESTIC in self.tools:
            counts[RESTIC] = len(json.loads(check_call(
                ["restic", "-r", self.lay.restic_repo, "snapshots", "--json"],
                self.lay.restic_env())))
        if OURS in self.tools:
            counts[OURS] = len(json.loads(check_call([P2PBACKUP, "snapshots", "--json"],
                                                     self.lay.ours_env())))
        return counts

    def prune(self) -> None:
        self.ensure_repos()
        counts = self.snapshot_counts()
        keep = {tool: str(max(1, n // 2)) for tool, n in counts.items()}
        spec = Spec(PRUNE, ["forget", "--keep-last", keep.get(RESTIC, "1"), "--prune"],
                    ["forget", "--keep-last", keep.get(OURS, "1"), "--prune"])
        self.repeated(PRUNE, spec, self.from_same_state)
        remove_tree(self.lay.stash)
        row = self.res.row(PRUNE)
        assert row is not None
        row.detail = "snapshots " + ", ".join(f"{tool} {counts[tool]} → {keep[tool]}"
                                              for tool in counts)

    # -- p2pbackupd

    def daemon(self) -> None:
        for path in (*self.lay.state_dirs(), self.lay.stash):  # room on the tmpfs
            remove_tree(path)
        self.have_repos = False
        rows = {key: self.new_row(DAEMON, name) for key, name in DAEMON_ROWS.items()}
        print("p2pbackupd:", flush=True)
        for rep in range(self.repeat):
            remove_tree(self.daemon_lay.home)
            logs = self.logs / f"daemon-{rep + 1}"
            for sub in ("start", "restart"):
                (logs / sub).mkdir(parents=True)
            bench_daemon.init_home(self.daemon_lay, logs)
            self.daemon_run(rows["start"], rows["start-idle"], logs / "start", fresh=True)
            self.daemon_run(rows["restart"], rows["restart-idle"], logs / "restart",
                            fresh=False)
            self.note_fs_use()

    def daemon_run(self, busy: Row, idle: Row, logs: Path, fresh: bool) -> None:
        """Start p2pbackupd, wait for READY=1 (and on a fresh home for its roll-up snapshot)
        and for the first idle moment; sample its RSS while idle; stop it."""
        lay = self.daemon_lay
        lay.notify_socket.unlink(missing_ok=True)
        memory = TreeMemory()
        tag = "start" if fresh else "restart"
        with bench_daemon.running_daemon(lay, logs) as daemon, memory.watching(daemon.pid):
            listener = daemon.listener
            daemon.wait_notify("READY=1", lambda: listener.ready_at is not None, 1200)
            assert listener.ready_at is not None
            ready_s = listener.ready_at - daemon.started
            if fresh:
                daemon.wait_notify("start-up snapshot", lambda: bool(listener.snapshots), 7200)
            idle_at = wait_idle(daemon, 3600)
            done_s = (listener.snapshots[0] if fresh else idle_at) - daemon.started
            hwm = bench_daemon.proc_status_kib(daemon.pid, "VmHWM")
            busy_peak = max(hwm, memory.peak_kib)
            idle_kib = [memory.sample(daemon.pid)]
            end = time.time() + self.idle_seconds
            while time.time() < end:
                time.sleep(SAMPLE_EVERY)
                idle_kib.append(memory.sample(daemon.pid))
            stop = daemon.stop()
        error = None if stop.exit_code == 0 else f"exit {stop.exit_code} after SIGTERM"
        times = {"READY=1 s": ready_s}
        if fresh:
            times["first idle s"] = idle_at - daemon.started
        busy.add(OURS, Sample(done_s, busy_peak, memory.processes, error, times))
        idle.add(OURS, Sample(None, max(idle_kib), memory.processes, error,
                              {"median MiB": statistics.median(idle_kib) / 1024}))
        print(f"  {tag}: READY=1 {ready_s:.1f} s, {'snapshot done' if fresh else 'idle'} "
              f"{done_s:.1f} s, peak {busy_peak / 1024:.0f} MiB, idle RSS "
              f"{max(idle_kib) / 1024:.0f} MiB", flush=True)


def wait_idle(daemon: bench_daemon.Daemon, timeout: float) -> float:
    """Poll until, over the last IDLE_WINDOW seconds, p2pbackupd had nothing pending and used
    less than IDLE_CPU of a core; return the start of that window (time.time())."""
    window: deque[tuple[float, float]] = deque()  # (time, CPU seconds) since nothing pending
    deadline = time.time() + timeout
    while time.time() < deadline:
        daemon.check_alive()
        pending = daemon.status()["log"]["pending_changes"]
        now, cpu = time.time(), daemon.cpu()
        if pending:
            window.clear()
        else:
            window.append((now, cpu))
            while len(window) > 1 and now - window[1][0] >= IDLE_WINDOW:
                window.popleft()
            start, cpu0 = window[0]
            if now - start >= IDLE_WINDOW and cpu - cpu0 < IDLE_CPU * (now - start):
                return start
        time.sleep(IDLE_POLL)
    raise BenchError(f"p2pbackupd did not become idle within {timeout:.0f} s:\n"
                     f"{indent(daemon.log_tail())}")


def mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise BenchError("no MemAvailable in /proc/meminfo")


def tmpfs_size(files: int) -> str:
    """The tmpfs's cap for N files: what it will hold (TMPFS_KIB_PER_FILE, measured) with
    room to spare, but never more than the memory available now minus KEEP_FREE_KIB, so a
    full tmpfs fails a step (ENOSPC) instead of the kernel killing processes, other people's
    too (there is no swap). Refuses when even the expected use does not fit."""
    need = files * TMPFS_KIB_PER_FILE
    room = mem_available_kib() - KEEP_FREE_KIB
    if need > room:
        raise BenchError(f"{files:,} files need about {need / (1 << 20):.1f} GiB of tmpfs and "
                         f"only {max(room, 0) / (1 << 20):.1f} GiB of memory is available "
                         f"(keeping {KEEP_FREE_KIB >> 20} GiB free): skipped")
    return f"{min(2 * need + (1 << 20), room)}k"


class OutOfMemory(BenchError):
    """Raised in the main thread by MemoryGuard: stop this N."""


class MemoryGuard:
    """Watches MemAvailable every second; below LOW_MEMORY_KIB it raises OutOfMemory in the
    main thread (by a signal, so also while it waits for a command, which is then killed)."""

    def __init__(self) -> None:
        self.tripped_kib: int | None = None
        self._stop = threading.Event()
        self._main = threading.main_thread().ident

    def _raise(self, *_: object) -> None:
        raise OutOfMemory(f"only {(self.tripped_kib or 0) >> 10} MiB of memory left available "
                          f"on the machine (limit {LOW_MEMORY_KIB >> 10} MiB): stopped this "
                          "size and removed its tmpfs")

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            available = mem_available_kib()
            if available < LOW_MEMORY_KIB:
                self.tripped_kib = available
                assert self._main is not None
                signal.pthread_kill(self._main, signal.SIGUSR1)
                return

    @contextmanager
    def watching(self) -> Iterator[None]:
        previous = signal.signal(signal.SIGUSR1, self._raise)
        thread = threading.Thread(target=self._watch, name="memory-guard", daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join()
            signal.signal(signal.SIGUSR1, previous)


def scratch(files: int, args: argparse.Namespace) -> AbstractContextManager[Path]:
    """The file system for one N: a tmpfs, or with `--fs ext4` a loop-mounted ext4 image on
    the disk (its pages can be written back and dropped, so it needs no free memory), sized
    for the files and their restore (one inode per 4 KiB)."""
    mnt = SCALE_WORK / "mnt"
    if args.fs == "tmpfs":
        return scratch_fs(args.keep, tmpfs_size(files), mnt)
    return scratch_fs(args.keep, mnt=mnt, image_size=f"{max(16, files * 32 // 1_000_000)}G",
                      mkfs_args=("-i", "4096"))


def run_size(files: int, res: SizeResult, args: argparse.Namespace, logs: Path) -> None:
    """Measure at `files` files into `res` (which holds what was done if this is stopped)."""
    start = time.perf_counter()
    print(f"\n=== {files:,} files, {res.repeat} repetitions ===", flush=True)
    logs.mkdir(parents=True)
    try:
        with MemoryGuard().watching(), scratch(files, args) as mnt:
            ScaleRun(mnt, Runner(logs), logs, res, args.steps, args.tools,
                     args.idle_seconds).run()
    except BenchError as exc:
        res.problems.append(str(exc))
        print(f"  aborted at {files:,} files: {exc}", file=sys.stderr, flush=True)
    finally:
        res.seconds = time.perf_counter() - start
        res.load_end = os.getloadavg()
        (logs / "result.json").write_text(json.dumps(asdict(res), indent=1))


# ---- the report ----------------------------------------------------------------------------

def median_s(samples: Sequence[Sample]) -> float | None:
    if not samples or not all(s.ok and s.seconds is not None for s in samples):
        return None
    return statistics.median(s.seconds for s in samples if s.seconds is not None)


def peak_mib(samples: Sequence[Sample]) -> float | None:
    return max(s.peak_kib for s in samples) / 1024 if samples else None


def time_cell(samples: Sequence[Sample]) -> str:
    if not samples:
        return "—"
    failed = [s for s in samples if not s.ok]
    if failed:
        return f"FAILED {len(failed)} of {len(samples)} ({failed[0].error})"
    seconds = median_s(samples)
    return "—" if seconds is None else f"{seconds:.2f}"


def rss_cell(samples: Sequence[Sample]) -> str:
    peak = peak_mib(samples)
    if peak is None:
        return "—"
    procs = max(s.processes for s in samples)
    return f"{peak:.0f}" + (f" ({procs} processes)" if procs > 1 else "")


def ratio_of(row: Row) -> float | None:
    ours, restic = median_s(row.runs(OURS)), median_s(row.runs(RESTIC))
    return ours / restic if ours is not None and restic else None


def rep_ratios(row: Row) -> str:
    pairs = zip(row.runs(OURS), row.runs(RESTIC))
    ratios = [f"{o.seconds / r.seconds:.2f}" if o.ok and r.ok and o.seconds and r.seconds
              else "—" for o, r in pairs]
    return " / ".join(ratios) or "—"


def median_line(row: Row) -> str:
    ratio = ratio_of(row)
    return ", ".join(f"{tool} {time_cell(row.runs(tool))} s" for tool in (RESTIC, OURS)
                     if row.runs(tool)) + ("" if ratio is None else f", ratio {ratio:.2f}")


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**no**")


def row_line(row: Row) -> str:
    ratio = ratio_of(row)
    target = "—" if row.target is None else f"≤ {row.target}"
    met = None if row.target is None or ratio is None else ratio <= row.target
    ours_peak = peak_mib(row.runs(OURS))
    rss_ok = None if ours_peak is None else ours_peak <= RSS_TARGET_MIB
    notes = [row.detail] if row.detail else []
    for key in dict.fromkeys(k for s in row.runs(OURS) for k in s.extra):
        notes.append(f"{key}: " + " / ".join(f"{s.extra[key]:.1f}" for s in row.runs(OURS)
                                              if key in s.extra))
    name = row.name + (f" ({'; '.join(notes)})" if notes else "")
    if row.problem:
        name += f" — **not run: {row.problem}**"
    return (f"| {name} | {time_cell(row.runs(RESTIC))} | {time_cell(row.runs(OURS))} | "
            f"{'—' if ratio is None else f'{ratio:.2f}'} | {rep_ratios(row)} | {target} | "
            f"{verdict(met)} | {rss_cell(row.runs(RESTIC))} | {rss_cell(row.runs(OURS))} | "
            f"{verdict(rss_ok)} |")


def size_table(res: SizeResult) -> list[str]:
    order = {key: i for i, key in enumerate(STEP_KEYS)}
    rows = sorted(res.rows, key=lambda r: order[r.key])  # stable: daemon rows keep theirs
    mut = res.mutation
    lines = [
        f"### {res.files:,} files",
        "",
        (f"- data: {res.files:,} files in {-(-res.files // 1000):,} folders, "
         f"{fmt_bytes(res.data_bytes)} (generated in {res.generate_s:.1f} s"
         + (f"; mutation: {mut[0]:,} rewritten, {mut[1]:,} added, {mut[2]:,} deleted in "
            f"{res.mutate_s:.1f} s" if res.mutate_s is not None else "") + ")"),
        (f"- whole run at this size: {res.seconds / 60:.1f} min ({res.repeat} repetitions); "
         f"load average at start {fmt_load(res.load_start)}, at end {fmt_load(res.load_end)}; "
         f"scratch file system: {res.fs}, peak use {res.fs_peak_bytes / (1 << 30):.1f} GiB"),
    ]
    if res.repo_bytes:
        lines.append("- repository after the initial snapshot: " + ", ".join(
            f"{tool} {fmt_bytes(n)}" for tool, n in res.repo_bytes.items()))
    lines.append(f"- p2pbackup's last restore compared with the tree: {res.restore_check}")
    lines += [
        "",
        ("| step | restic s (median) | p2pbackup s (median) | ratio of medians "
         "(p2pbackup/restic) | ratio per repetition | target | met? | restic peak RSS MiB | "
         f"p2pbackup peak RSS MiB | ≤ {RSS_TARGET_MIB} MiB? |"),
        "|---|---|---|---|---|---|---|---|---|---|",
        *(row_line(row) for row in rows),
    ]
    if res.problems:
        lines += ["", "Failures:", ""]
        lines += [f"- {indent(p, '  ').strip()}" for p in res.problems]
    return lines


def fmt_load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


@dataclass(frozen=True)
class Growth:
    """How one tool's time or memory in one step grows with the number of files."""

    values: dict[int, float]  # files -> seconds or MiB

    @property
    def slope_per_100k(self) -> float:
        """Least-squares slope over the sizes measured, per 100,000 files."""
        xs, ys = list(self.values), list(self.values.values())
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        return 1e5 * (sum((x - mx) * (y - my) for x, y in zip(xs, ys))
                      / sum((x - mx) ** 2 for x in xs))

    @property
    def exponent(self) -> float | None:
        """k in value ~ files^k between the smallest and the largest N (1.0: linear)."""
        lo, hi = min(self.values), max(self.values)
        a, b = self.values[lo], self.values[hi]
        return math.log(b / a) / math.log(hi / lo) if a > 0 and b > 0 else None


def fmt_files(n: int) -> str:
    """1M, 300k, 2,500."""
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    return f"{n / 1000:g}k" if n % 100 == 0 else f"{n:,}"


def growth_lines(results: Sequence[SizeResult]) -> list[str]:
    sizes = [r.files for r in results]
    if len(set(sizes)) < 2:
        return ["(growth needs at least two sizes in one run)"]
    head = " / ".join(fmt_files(n) for n in sizes)
    lines = [
        (f"| step | tool | s at {head} | s per 100k files | time exponent | "
         f"peak MiB at {head} | MiB per 100k files | memory exponent | no faster than "
         "linear? |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names: list[tuple[str, str]] = []
    for res in results:
        names += [(row.key, row.name) for row in res.rows if (row.key, row.name) not in names]
    order = {key: i for i, key in enumerate(STEP_KEYS)}
    for _, name in sorted(names, key=lambda kn: order[kn[0]]):
        for tool in (RESTIC, OURS):
            per_size = {res.files: runs for res in results for row in res.rows
                        if row.name == name and (runs := row.runs(tool))}
            if len(per_size) < 2:
                continue
            times = {n: t for n, runs in per_size.items() if (t := median_s(runs)) is not None}
            mems = {n: peak_mib(runs) or 0.0 for n, runs in per_size.items()}
            growths = [Growth(v) for v in (times, mems) if len(v) >= 2]
            exps = [g.exponent for g in growths]
            linear = None if None in exps else all(e is not None and e <= 1.0 for e in exps)
            t = Growth(times) if len(times) >= 2 else None
            m = Growth(mems)
            lines.append(
                f"| {name} | {tool} | "
                + (" / ".join(f"{times[n]:.2f}" if n in times else "—" for n in sizes)
                   if times else "—")
                + f" | {fmt_num(t.slope_per_100k if t else None)} | "
                f"{fmt_num(t.exponent if t else None)} | "
                + " / ".join(f"{mems[n]:.0f}" if n in mems else "—" for n in sizes)
                + f" | {fmt_num(m.slope_per_100k)} | {fmt_num(m.exponent)} | "
                f"{verdict(linear)} |")
    return lines


def fmt_num(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def method_lines() -> list[str]:
    return [
        ("- Data: `bench/mkfiles.py` (seed 42): N files of 50-3,000 bytes (triangular, mode "
         "800 bytes: mean 1,283), 1,000 per folder, a third random bytes, two thirds text; "
         "mode 0644, fixed mtimes. Mutation (`--mutate --seed 1`): 1% of the files rewritten, "
         "0.5% added, 0.5% deleted."),
        ("- Everything (the tree, both repositories, restic's cache, their copies, the "
         "restores) is on a fresh tmpfs at bench/work/scale/mnt, one per N, unmounted after "
         "it. The tmpfs keeps each small file in a 4 KiB page, so its use is about 4x the "
         "tree's bytes (`--fs ext4`: a loop-mounted ext4 image on the disk instead, for "
         "when the memory is not there; each size says which). Caches are warm; `sync` "
         "runs before each timed command."),
        ("- Each step is measured R times (`--repeat`; default 3, 2 at 1M files) alternating "
         "which tool goes first (restic in repetitions 1, 3, ...). Times are medians per tool "
         "and the targets are judged on the ratio of the medians; each repetition's ratio "
         "shows the spread. Other work on the machine (2 cores shared) makes times noisy: "
         "see the load averages; memory is not affected by it."),
        ("- Peak RSS: the larger of `ru_maxrss` from `os.wait4` (the largest single process "
         "of the command's tree, exact) and a sample every "
         f"{SAMPLE_EVERY} s of the command's own RSS or, while it has children (p2pbackup's "
         "restore workers), the summed PSS (`/proc/PID/smaps_rollup`) of it and all its "
         "descendants (found by parent pid in /proc), which counts pages the forked workers "
         "share with it once. When more than one process was seen, the most at once is "
         "given. Maximum over the repetitions."),
        ("- Order of the steps as run: initial (every repetition from empty repositories, "
         "`init` untimed; the last one's are kept), mutation + after-mutation backup (the "
         "repositories copied aside with `cp -a` before the first repetition and put back "
         "before each further one), no-change (each repetition adds a snapshot), verify, "
         "verify --read-data, restore (into empty targets, deleted after each repetition; "
         "the last p2pbackup restore is compared with the tree by a digest of every path, "
         "kind and content), forget + prune (from the same repositories each repetition), "
         "the daemon."),
        ("- Forget + prune: `--keep-last K`, K = half the snapshots (rounded down): the "
         "initial snapshot (from before the mutation) and the oldest of those after it go, "
         "so prune has the rewritten and deleted files' data to free."),
        ("- Daemon (p2pbackup only): `p2pbackup init --source TREE` with `[daemon] "
         "seal_interval = 1, snapshot_interval = 86400`; p2pbackupd started with "
         "NOTIFY_SOCKET; time from start to the `STATUS=snapshot` notification of the "
         "start-up roll-up snapshot (fresh home) or to the first idle moment (restart: same "
         "home, which holds that snapshot; the start-up rescan runs). Idle: status says "
         f"nothing pending and the daemon used < {IDLE_CPU:.0%} of a core over "
         f"{IDLE_WINDOW:g} s (the time is the start of that window). Peak RSS: VmHWM at "
         "that moment, or the sampled tree, whichever is larger; idle RSS: the largest of "
         "the samples (summed over the tree) over the idle window after it."),
        ("- Growth: least-squares slope over the sizes measured (seconds or MiB per 100,000 "
         "files) and the exponent k in value ~ N^k between the smallest and largest N "
         "(1.0 is linear; memory has a fixed base, so it reads below 1 when flat)."),
    ]


def report(results: Sequence[SizeResult], started: datetime.datetime,
           args: argparse.Namespace) -> str:
    try:
        restic_version = check_call(["restic", "version"]).strip()
    except (BenchError, OSError):
        restic_version = "not found"
    took = sum(r.seconds for r in results)
    lines = [
        SCALE_HEADING,
        "",
        f"- date: {started:%Y-%m-%d %H:%M %Z}",
        f"- machine: {machine()}",
        f"- restic: {restic_version}",
        f"- p2pbackup: git {git_revision()}",
        f"- command (from the repository root): `{invocation()}`; whole run "
        f"{took / 60:.1f} min",
        f"- steps: {', '.join(args.steps)}; tools: {', '.join(args.tools)}",
        "",
    ]
    for res in results:
        lines += [*size_table(res), ""]
    lines += ["### Growth with the number of files", "", *growth_lines(results), "",
              "### Method (scale)", "", *method_lines(), ""]
    return "\n".join(lines)


# ---- entry point ---------------------------------------------------------------------------

def file_count(text: str) -> int:
    """100000, 100_000, 100k or 1M."""
    t = text.strip().replace("_", "").replace(",", "").lower()
    mult = {"k": 1000, "m": 1_000_000}.get(t[-1:], 1)
    try:
        value = int(float(t[:-1]) * mult) if mult > 1 else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of files: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        unknown = [x for x in items if x not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"unknown: {', '.join(unknown) or '(nothing)'}; choose from {','.join(allowed)}")
        return [x for x in allowed if x in items]  # in the benchmark's order
    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", default=DEFAULT_FILES,
                    type=lambda t: [file_count(x) for x in t.split(",") if x.strip()],
                    help="numbers of files, comma-separated (default: 100k,300k,1M)")
    ap.add_argument("--steps", type=choices(STEP_KEYS), default=list(STEP_KEYS),
                    help=f"steps to measure, comma-separated (default: all: "
                         f"{','.join(STEP_KEYS)})")
    ap.add_argument("--tools", type=choices((RESTIC, OURS)), default=[RESTIC, OURS],
                    help="tools to run, comma-separated (default: restic,p2pbackup)")
    ap.add_argument("--repeat", type=positive_int, default=None,
                    help="repetitions of each step (default: 3, or 2 from 1M files on)")
    ap.add_argument("--idle-seconds", type=float, default=5.0,
                    help="how long the idle daemon's RSS is sampled (default: 5)")
    ap.add_argument("--fs", choices=("tmpfs", "ext4"), default="tmpfs",
                    help="where the tree and the repositories are: a tmpfs (default; about "
                         "11 KiB of memory per file) or an ext4 image on the disk (for when "
                         "the memory is not there)")
    ap.add_argument("--keep", action="store_true",
                    help="leave the last tmpfs mounted at bench/work/scale/mnt")
    ap.add_argument("--write-results", action="store_true",
                    help=f"replace (or append) the '{SCALE_HEADING}' section of --out")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "RESULTS.md",
                    help="results file for --write-results (default: bench/RESULTS.md)")
    args = ap.parse_args(argv)
    if not args.files:
        ap.error("--files: give at least one number")
    if args.idle_seconds <= 0:
        ap.error("--idle-seconds must be positive")
    if args.keep and len(args.files) > 1:
        ap.error("--keep keeps one tmpfs: give one --files")
    return args


def repeat_for(files: int, args: argparse.Namespace) -> int:
    return args.repeat or (2 if files >= 1_000_000 else 3)


def ensure_tools(tools: Sequence[str]) -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root: the benchmark mounts a tmpfs")
    for tool in (P2PBACKUP, bench_daemon.P2PBACKUPD):
        if not tool.is_file():
            raise BenchError(f"{tool} not found: run `make setup` first")
    if RESTIC in tools and shutil.which("restic") is None:
        print("restic not found; installing it with apt-get", flush=True)
        check_call(["apt-get", "update", "-qq"])
        check_call(["apt-get", "install", "-y", "-qq", "restic"])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, terminated)  # clean up and report on kill, too
    started = datetime.datetime.now().astimezone()
    results: list[SizeResult] = []
    logs = WORK / "logs" / f"scale-{started:%Y%m%d-%H%M%S}"
    code = 0
    try:
        ensure_tools(args.tools)
        with bench_lock():
            for files in args.files:
                results.append(SizeResult(files, repeat_for(files, args), fs=args.fs,
                                          load_start=os.getloadavg()))
                run_size(files, results[-1], args, logs / f"{files}")
                print("\n" + "\n".join(size_table(results[-1])), flush=True)
    except BenchError as exc:
        print(f"benchmark aborted: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    if results:
        text = report(results, started, args)
        print("\n" + text)
        if args.write_results and code == 0:
            write_section(args.out, SCALE_HEADING, text)
            print(f"written to {args.out}", flush=True)
        print(f"command logs and result.json per N in {logs}")
    return code or (0 if all(complete(r) for r in results) else 1)


def terminated(*_: object) -> None:
    raise KeyboardInterrupt  # the same clean-up and partial report as Ctrl-C


def complete(res: SizeResult) -> bool:
    """Every step ran and every command succeeded."""
    return not res.problems and all(s.ok for row in res.rows
                                    for samples in row.samples.values() for s in samples)


if __name__ == "__main__":
    sys.exit(main())
