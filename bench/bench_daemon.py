#!/usr/bin/env python3
"""Benchmark p2pbackupd, the device daemon, on the synthetic device tree from mkdata.py.

Like bench_restic.py, everything (data set, p2pbackup home) lives on a fresh loop-mounted ext4
file system under bench/work/, unmounted and deleted at the end (unless --keep), also on
failure or Ctrl-C.  Needs root.  One daemon runs for the whole benchmark, with
`seal_interval = 1` and `snapshot_interval = 86400` in config.toml's [daemon] table, and with
NOTIFY_SOCKET pointing at a socket this script listens on (READY=1, "STATUS=sealed segment N").

  1. generate the data set (mkdata.py, seed 42); `p2pbackup init`; start p2pbackupd; wait for
     READY=1 and for the roll-up snapshot the daemon takes at start; wait until it is quiet
  2. idle: CPU time of the daemon (utime+stime from /proc/PID/stat) over --idle-seconds of
     wall time, with nothing changing in the tree and nothing talking to the daemon
  3. mutate (mkdata.py --mutate --seed 1, one day of changes) while the daemon runs: time from
     the end of the mutation until everything is sealed (status polled every 0.1 s)
  4. latency: --writes new small files, one at a time, spaced by a random 0.2-1.5 s; for each,
     the time from just before open() until the first segment sealed after the write
  5. peak RSS (VmHWM from /proc/PID/status) at the end; SIGTERM; then, to check that what
     was sealed is complete, `p2pbackup verify`, and a point-in-time restore
     (`restore latest --at now`) compared with the tree

The results go to stdout and replace the "## Daemon" section of a Markdown file
(bench/RESULTS.md by default; appended if the file has none), leaving the rest of it as is.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DAEMON_HEADING, write_section  # noqa: E402
from bench_restic import (MKDATA, P2PBACKUP, REPO, WORK, BenchError,  # noqa: E402
                          check_call, compare_trees, count_files, du_bytes, fmt_bytes,
                          git_revision, indent, invocation, machine, scratch_fs)

P2PBACKUPD = REPO / ".venv" / "bin" / "p2pbackupd"
SEAL_INTERVAL = 1  # seconds, in config.toml
SNAPSHOT_INTERVAL = 86400  # seconds: only the start-up snapshot happens during the run
IDLE_CPU_TARGET = 1.0  # percent of one core
RSS_TARGET_MIB = 200
LATENCY_TARGET = SEAL_INTERVAL + 2.0  # seconds, for the slowest write
MUTATE_TARGET = 5.0  # seconds after the mutation ends
WRITE_GAP = (0.2, 1.5)  # seconds between a write's seal and the next write
QUIET_SECONDS = 3.0  # no seal and nothing pending for this long: the daemon is quiet
SETTLE_SECONDS = 5.0  # after "all sealed": nothing more may be sealed for this long
SETTLE_CPU = 0.1  # ... and the daemon must use less than this share of a core meanwhile
POLL = 0.1  # seconds between status requests while waiting for the mutation to be sealed
CLK_TCK = os.sysconf("SC_CLK_TCK")
SEALED_LINE = re.compile(r"sealed segment (\d+): (\d+) changes")


# ---- where things are ----------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Where everything lives on the scratch file system."""

    mnt: Path

    @property
    def data(self) -> Path:
        return self.mnt / "device"

    @property
    def home(self) -> Path:
        return self.mnt / "p2p-home"

    @property
    def tmp(self) -> Path:
        return self.mnt / "tmp"

    @property
    def notify_socket(self) -> Path:
        return self.tmp / "notify.sock"

    @property
    def control_socket(self) -> Path:
        return self.home / "daemon.sock"

    @property
    def latency_dir(self) -> Path:
        return self.data / "bench-daemon-latency"

    @property
    def restore(self) -> Path:
        return self.mnt / "restore-at-now"

    def env(self) -> dict[str, str]:
        return {**os.environ, "P2PBACKUP_HOME": str(self.home), "TMPDIR": str(self.tmp)}

    def segments(self, device: str) -> Path:
        return self.home / "store" / "segments" / device


# ---- the daemon's notifications (sd_notify) ------------------------------------------------

class NotifyListener:
    """Receives the daemon's sd_notify datagrams on a thread and keeps when each arrived."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.cond = threading.Condition()
        self.ready_at: float | None = None
        self.seals: dict[int, float] = {}  # segment seq -> time.time() the STATUS arrived
        self.snapshots: list[float] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            arrived = time.time()
            with self.cond:
                for line in data.decode(errors="replace").splitlines():
                    self._record(line, arrived)
                self.cond.notify_all()

    def _record(self, line: str, arrived: float) -> None:
        if line == "READY=1":
            self.ready_at = arrived
        elif m := re.fullmatch(r"STATUS=sealed segment (\d+)", line):
            self.seals[int(m.group(1))] = arrived
        elif line.startswith("STATUS=snapshot "):
            self.snapshots.append(arrived)

    @property
    def newest_seq(self) -> int:
        with self.cond:
            return max(self.seals, default=0)

    def first_seal_after(self, seq: int) -> tuple[int, float] | None:
        """The first segment with a seq above `seq` and when it was reported, if any."""
        with self.cond:
            later = [s for s in self.seals if s > seq]
            return (min(later), self.seals[min(later)]) if later else None

    def close(self) -> None:
        self._stopping = True
        self._thread.join()
        self.sock.close()


# ---- the daemon process --------------------------------------------------------------------

def proc_status_kib(pid: int, key: str) -> int:
    """A "kB" line of /proc/PID/status, e.g. VmHWM or VmRSS."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads) from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches summed over the process's live threads."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        total += sum(int(line.split()[1]) for line in text.splitlines()
                     if "ctxt_switches:" in line)
    return total


def control_request(path: Path, cmd: str) -> dict[str, Any]:
    """One request on the daemon's control socket (what `p2pbackup status` sends)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(path))
        s.sendall(json.dumps({"v": 1, "cmd": cmd, "args": {}}).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            reply += chunk
    obj = json.loads(reply)
    if not obj.get("ok"):
        raise BenchError(f"daemon refused {cmd}: {obj.get('error')}")
    return obj["result"]


class Daemon:
    """A running p2pbackupd, its log, its notifications and its /proc numbers."""

    def __init__(self, lay: Layout, listener: NotifyListener, log: Path) -> None:
        self.lay = lay
        self.listener = listener
        self.log = log
        self.started = time.time()
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [str(P2PBACKUPD)], stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                env={**lay.env(), "NOTIFY_SOCKET": str(lay.notify_socket)})
        self.pid = self.proc.pid

    def status(self) -> dict[str, Any]:
        return control_request(self.lay.control_socket, "status")

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        return proc_status_kib(self.pid, "VmRSS")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"p2pbackupd exited with {self.proc.returncode}:\n"
                             f"{indent(self.log_tail())}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait_notify(self, what: str, done: Callable[[], bool], timeout: float) -> None:
        """Wait until `done()` (checked on each notification) or raise after `timeout`."""
        deadline = time.time() + timeout
        with self.listener.cond:
            while not done():
                self.check_alive()
                left = deadline - time.time()
                if left <= 0:
                    raise BenchError(f"p2pbackupd: no {what} within {timeout:.0f} s:\n"
                                     f"{indent(self.log_tail())}")
                self.listener.cond.wait(min(left, 0.5))

    def stop(self, timeout: float = 120) -> Stop:
        """SIGTERM, then wait for the exit (its rusage gives the lifetime peak RSS)."""
        hwm = proc_status_kib(self.pid, "VmHWM")
        start = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        while True:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            seconds = time.perf_counter() - start
            if pid:
                break
            if seconds > timeout:
                raise BenchError(f"p2pbackupd still running {timeout:.0f} s after SIGTERM:\n"
                                 f"{indent(self.log_tail())}")
            time.sleep(0.01)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        return Stop(self.proc.returncode, seconds, hwm, usage.ru_maxrss)

    def kill(self) -> None:
        """Make sure it is gone (after a failure): SIGTERM, then SIGKILL."""
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def sealed_changes(self, first: int, last: int) -> tuple[int, int]:
        """(segments, changes) the log reports for segments first..last."""
        counts = [int(m.group(2)) for m in SEALED_LINE.finditer(self.log.read_text())
                  if first <= int(m.group(1)) <= last]
        return len(counts), sum(counts)


@contextmanager
def running_daemon(lay: Layout, logs: Path) -> Iterator[Daemon]:
    """p2pbackupd with a notify listener; killed (if still running) on the way out."""
    listener = NotifyListener(lay.notify_socket)
    try:
        daemon = Daemon(lay, listener, logs / "p2pbackupd.err")
        try:
            yield daemon
        finally:
            daemon.kill()
    finally:
        listener.close()


# ---- results -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stop:
    """How the daemon ended: exit code, seconds from SIGTERM, peak RSS two ways."""

    exit_code: int
    seconds: float
    hwm_kib: int  # VmHWM just before SIGTERM
    maxrss_kib: int  # ru_maxrss from wait4: includes the final seal


@dataclass(frozen=True)
class Startup:
    """The data set and the daemon's start."""

    generate_s: float
    data_files: int
    data_bytes: int
    ready_s: float  # start -> READY=1
    snapshot_s: float  # READY=1 -> the start-up roll-up snapshot done
    device: str


@dataclass(frozen=True)
class Idle:
    """CPU use over a stretch of wall time with nothing happening."""

    wall_s: float
    cpu_s: float
    switches: int
    seals: int  # segments sealed meanwhile (should be 0)

    @property
    def percent(self) -> float:
        return 100 * self.cpu_s / self.wall_s

    @property
    def wakeups(self) -> float:
        return self.switches / self.wall_s


@dataclass(frozen=True)
class Mutated:
    """The day of changes, and how long after it the daemon had sealed it all."""

    mutate_s: float
    sealed_s: float | None  # end of mutation -> last segment of it sealed; None: timed out
    first_idle_s: float | None  # ... -> the first time status said "nothing pending"
    segments: int
    changes: int


@dataclass(frozen=True)
class Latency:
    """Write -> first segment sealed after it, per write (None: not sealed in time)."""

    samples: list[float | None]
    segments: int
    changes: int

    @property
    def done(self) -> list[float]:
        return [s for s in self.samples if s is not None]


@dataclass(frozen=True)
class Verified:
    """What `p2pbackup verify` said after the run."""

    exit_code: int
    summary: str  # its last line
    damaged: list[str]  # its "damaged: ..." lines


@dataclass(frozen=True)
class Results:
    """Everything the report needs."""

    scale: float
    startup: Startup
    idle: Idle
    mutated: Mutated
    latency: Latency
    stop: Stop
    verified: Verified
    rss_mib: dict[str, float]  # VmRSS after each phase
    mismatches: list[str] | None  # None: the restore failed or produced no tree


# ---- the benchmark -------------------------------------------------------------------------

def run_logged(label: str, argv: list[str | Path], env: Mapping[str, str], logs: Path) -> float:
    """Run a command (stdout/stderr to logs/label.*); return its wall time or raise."""
    args = [str(a) for a in argv]
    with open(logs / f"{label}.out", "wb") as out, open(logs / f"{label}.err", "wb") as err:
        start = time.perf_counter()
        code = subprocess.run(args, env=env, stdin=subprocess.DEVNULL, stdout=out,
                              stderr=err, check=False).returncode
        seconds = time.perf_counter() - start
    if code != 0:
        raise BenchError(f"{' '.join(args)} failed (exit {code}):\n"
                         f"{(logs / f'{label}.err').read_text(errors='replace')}")
    print(f"  {label}: {seconds:.2f} s", flush=True)
    return seconds


def mkdata(lay: Layout, scale: float, logs: Path, mutate: bool) -> float:
    extra = ["--mutate", "--seed", "1"] if mutate else ["--seed", "42"]
    return run_logged("mutate" if mutate else "generate",
                      [sys.executable, MKDATA, lay.data, "--scale", str(scale), *extra],
                      os.environ, logs)


def init_home(lay: Layout, logs: Path) -> None:
    """`p2pbackup init` for the data set, plus the [daemon] table."""
    run_logged("init", [P2PBACKUP, "init", "--source", lay.data], lay.env(), logs)
    with open(lay.home / "config.toml", "a") as f:
        f.write(f"\n[daemon]\nseal_interval = {SEAL_INTERVAL}\n"
                f"snapshot_interval = {SNAPSHOT_INTERVAL}\n")


def device_id(lay: Layout) -> str:
    """The device id, from `p2pbackup status --json` (the CLI, once)."""
    return json.loads(check_call([P2PBACKUP, "status", "--json"], lay.env()))["device"]


def start(daemon: Daemon, lay: Layout, generate_s: float) -> Startup:
    """Wait for READY=1 and for the start-up snapshot."""
    listener = daemon.listener
    daemon.wait_notify("READY=1", lambda: listener.ready_at is not None, 300)
    assert listener.ready_at is not None
    ready_s = listener.ready_at - daemon.started
    print(f"  READY=1 after {ready_s:.2f} s; waiting for the start-up snapshot", flush=True)
    daemon.wait_notify("start-up snapshot", lambda: bool(listener.snapshots), 1800)
    snapshot_s = listener.snapshots[0] - listener.ready_at
    print(f"  start-up snapshot done {snapshot_s:.2f} s after READY=1", flush=True)
    return Startup(generate_s, count_files(lay.data), du_bytes(lay.data), ready_s, snapshot_s,
                   device_id(lay))


def wait_quiet(daemon: Daemon, timeout: float = 600) -> None:
    """Until nothing is pending and nothing was sealed for QUIET_SECONDS."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        daemon.check_alive()
        log = daemon.status()["log"]
        since_seal = time.time() - (log["last_sealed"] or 0)
        if log["pending_changes"] == 0 and since_seal >= QUIET_SECONDS:
            return
        time.sleep(0.5)
    raise BenchError(f"p2pbackupd did not become quiet within {timeout:.0f} s")


def measure_idle(daemon: Daemon, seconds: float) -> Idle:
    """CPU time over `seconds` of wall time, during which nothing talks to the daemon."""
    seals = daemon.listener.newest_seq
    cpu0, switches0, t0 = daemon.cpu(), context_switches(daemon.pid), time.perf_counter()
    time.sleep(seconds)
    cpu1, switches1, t1 = daemon.cpu(), context_switches(daemon.pid), time.perf_counter()
    idle = Idle(t1 - t0, cpu1 - cpu0, switches1 - switches0,
                daemon.listener.newest_seq - seals)
    print(f"  idle: {idle.cpu_s:.2f} s CPU in {idle.wall_s:.1f} s = {idle.percent:.2f}% of one "
          f"core, {idle.wakeups:.0f} context switches/s", flush=True)
    return idle


@dataclass
class _Candidate:
    """A moment at which status said everything was sealed."""

    seq: int
    sealed_at: float
    seen_at: float
    cpu: float


def wait_all_sealed(daemon: Daemon, since: float, timeout: float = 600
                    ) -> tuple[float | None, float | None]:
    """Poll status every POLL s until everything changed before `since` is sealed.

    "Everything sealed": nothing pending and a segment sealed after `since`, and then for
    SETTLE_SECONDS no further segment and the daemon nearly idle (so a change still being read,
    which status does not count as pending, is not missed). Returns the seconds from `since`
    to that last seal and to the first poll that said "nothing pending" (None: timed out).
    """
    first: float | None = None
    cand: _Candidate | None = None
    deadline = time.time() + timeout
    while time.time() < deadline:
        daemon.check_alive()
        log = daemon.status()["log"]
        now = time.time()
        if log["pending_changes"] != 0 or (log["last_sealed"] or 0) <= since:
            cand = None
        elif cand is None or cand.seq != log["seq"]:
            first = now - since if first is None else first
            cand = _Candidate(log["seq"], log["last_sealed"], now, daemon.cpu())
        elif now - cand.seen_at >= SETTLE_SECONDS:
            if (daemon.cpu() - cand.cpu) / (now - cand.seen_at) < SETTLE_CPU:
                return cand.sealed_at - since, first
            cand = _Candidate(cand.seq, cand.sealed_at, now, daemon.cpu())  # busy: look again
        time.sleep(POLL)
    return None, first


def measure_mutate(daemon: Daemon, lay: Layout, scale: float, logs: Path) -> Mutated:
    seq0 = daemon.status()["log"]["seq"]
    mutate_s = mkdata(lay, scale, logs, mutate=True)
    ended = time.time()
    sealed_s, first_s = wait_all_sealed(daemon, ended)
    segments, changes = daemon.sealed_changes(seq0 + 1, daemon.status()["log"]["seq"])
    shown = "not within the timeout" if sealed_s is None else f"{sealed_s:.2f} s"
    print(f"  all sealed after the mutation: {shown} ({segments} segments, {changes} changes)",
          flush=True)
    return Mutated(mutate_s, sealed_s, first_s, segments, changes)


def newest_segment(lay: Layout, device: str) -> int:
    """The highest seq among the sealed segment files (temp files are not all digits)."""
    return max((int(p.name) for p in lay.segments(device).iterdir()
                if p.name.isdigit() and len(p.name) == 12), default=0)


def write_note(path: Path, rng: random.Random) -> float:
    """Save a small text file (open, write, close); return the time just before open()."""
    text = "".join(f"note line {i}: {rng.getrandbits(64):016x}\n"
                   for i in range(rng.randint(8, 200)))
    before = time.time()
    with open(path, "w") as f:
        f.write(text)
    return before


def nothing_pending(daemon: Daemon, timeout: float = 10) -> int:
    """Wait until status shows no pending change (a late event of the previous write would
    be sealed after the next write and taken for it); return the newest seq."""
    deadline = time.time() + timeout
    while True:
        log = daemon.status()["log"]
        if log["pending_changes"] == 0 or time.time() > deadline:
            return int(log["seq"])
        time.sleep(0.05)


def one_write(daemon: Daemon, lay: Layout, device: str, index: int,
              rng: random.Random) -> float | None:
    """Write one file; seconds until the first segment sealed after it (None: not in 30 s)."""
    seq0 = max(daemon.listener.newest_seq, newest_segment(lay, device),
               nothing_pending(daemon))
    written = write_note(lay.latency_dir / f"note-{index:03d}.txt", rng)
    try:
        daemon.wait_notify("seal", lambda: daemon.listener.first_seal_after(seq0) is not None,
                           30)
    except BenchError:
        daemon.check_alive()
        return None
    seq, arrived = daemon.listener.first_seal_after(seq0) or (0, 0.0)
    if not (lay.segments(device) / f"{seq:012d}").is_file():
        raise BenchError(f"STATUS said segment {seq} is sealed, but its file is missing")
    return arrived - written


def make_latency_dir(daemon: Daemon, lay: Layout) -> int:
    """Create the directory for the writes; wait until it is sealed; return the newest seq."""
    before = nothing_pending(daemon)
    lay.latency_dir.mkdir()
    daemon.wait_notify("seal of the new directory",
                       lambda: daemon.listener.first_seal_after(before) is not None, 60)
    wait_quiet(daemon)
    return int(daemon.status()["log"]["seq"])


def measure_latency(daemon: Daemon, lay: Layout, device: str, writes: int, seed: int,
                    rss: dict[str, float]) -> Latency:
    """The writes, one at a time; VmRSS is noted after the first, middle and last one."""
    seq0 = make_latency_dir(daemon, lay)
    rng = random.Random(seed)
    samples: list[float | None] = []
    for i in range(writes):
        time.sleep(rng.uniform(*WRITE_GAP))
        samples.append(one_write(daemon, lay, device, i, rng))
        if i + 1 in (1, (writes + 1) // 2, writes):
            rss[f"after write {i + 1}"] = daemon.rss_kib() / 1024
    wait_quiet(daemon)
    segments, changes = daemon.sealed_changes(seq0 + 1, daemon.status()["log"]["seq"])
    lat = Latency(samples, segments, changes)
    print(f"  latency: {fmt_spread(lat)} s over {len(lat.done)} of {writes} writes "
          f"({segments} segments, {changes} changes)", flush=True)
    return lat


def verify_check(lay: Layout, logs: Path) -> Verified:
    """`p2pbackup verify`: the log chain and every blob the snapshots and the log name."""
    proc = subprocess.run([str(P2PBACKUP), "verify"], env=lay.env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, check=False)
    (logs / "verify.out").write_text(proc.stdout + proc.stderr)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    verified = Verified(proc.returncode, lines[-1] if lines else "",
                        [line for line in lines if line.startswith("damaged:")])
    print(f"  verify: exit {verified.exit_code}: {verified.summary}", flush=True)
    return verified


def restore_check(lay: Layout, logs: Path) -> list[str] | None:
    """Restore the device as it is now (snapshot + log) and compare it with the tree."""
    try:
        run_logged("restore-at-now", [P2PBACKUP, "restore", "latest", "--at", "now", "--to",
                                      lay.restore], lay.env(), logs)
    except BenchError as exc:
        print(f"  {exc}", file=sys.stderr, flush=True)
        return None
    restored = lay.restore / lay.data.name
    return compare_trees(lay.data, restored) if restored.is_dir() else None


def benchmark(mnt: Path, logs: Path, args: argparse.Namespace) -> Results:
    lay = Layout(mnt)
    lay.tmp.mkdir()
    generate_s = mkdata(lay, args.scale, logs, mutate=False)
    init_home(lay, logs)
    rss: dict[str, float] = {}
    with running_daemon(lay, logs) as daemon:
        print(f"p2pbackupd (pid {daemon.pid}):", flush=True)
        startup = start(daemon, lay, generate_s)
        rss["after the start-up snapshot"] = daemon.rss_kib() / 1024
        wait_quiet(daemon)
        print(f"idle ({args.idle_seconds:.0f} s):", flush=True)
        idle = measure_idle(daemon, args.idle_seconds)
        rss["after idle"] = daemon.rss_kib() / 1024
        print("one day of changes:", flush=True)
        mutated = measure_mutate(daemon, lay, args.scale, logs)
        rss["after the mutation"] = daemon.rss_kib() / 1024
        print(f"latency ({args.writes} writes):", flush=True)
        latency = measure_latency(daemon, lay, startup.device, args.writes, args.seed, rss)
        stop = daemon.stop()
        print(f"  stopped: exit {stop.exit_code} {stop.seconds:.2f} s after SIGTERM; VmHWM "
              f"{stop.hwm_kib / 1024:.0f} MiB", flush=True)
    print("checks after the run:", flush=True)
    verified = verify_check(lay, logs)
    mismatches = restore_check(lay, logs)
    return Results(args.scale, startup, idle, mutated, latency, stop, verified, rss,
                   mismatches)


# ---- the report ----------------------------------------------------------------------------

def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def percentile(values: list[float], pct: int) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def fmt_spread(lat: Latency) -> str:
    v = lat.done
    if not v:
        return "—"
    return (f"{min(v):.2f} / {statistics.median(v):.2f} / {percentile(v, 95):.2f} / "
            f"{max(v):.2f}")


def target_rows(res: Results) -> list[str]:
    idle, stop, lat, mut = res.idle, res.stop, res.latency, res.mutated
    hwm = stop.hwm_kib / 1024
    missed = len(lat.samples) - len(lat.done)
    lat_ok = bool(lat.done) and not missed and max(lat.done) <= LATENCY_TARGET
    sealed = "not within 600 s" if mut.sealed_s is None else f"{mut.sealed_s:.2f} s"
    mut_ok = mut.sealed_s is not None and mut.sealed_s <= MUTATE_TARGET
    return [
        (f"| idle CPU over {idle.wall_s:.0f} s, watching {res.startup.data_files:,} files | "
         f"{idle.percent:.2f}% of one core ({idle.cpu_s:.2f} s CPU; {idle.wakeups:.0f} context "
         f"switches/s; {idle.seals} seals) | ≤ {IDLE_CPU_TARGET:g}% | "
         f"{met(idle.percent <= IDLE_CPU_TARGET)} |"),
        (f"| peak RSS of p2pbackupd (VmHWM at the end of the run) | {hwm:.0f} MiB "
         f"(ru_maxrss incl. the final seal: {stop.maxrss_kib / 1024:.0f} MiB) | "
         f"≤ {RSS_TARGET_MIB} MiB | {met(hwm <= RSS_TARGET_MIB)} |"),
        (f"| save → in a sealed, signed segment, {len(lat.samples)} writes, seal_interval "
         f"{SEAL_INTERVAL} s: min / median / p95 / max | {fmt_spread(lat)} s"
         + (f" ({missed} not sealed within 30 s)" if missed else "")
         + f" | max ≤ {LATENCY_TARGET:g} s | {met(lat_ok)} |"),
        (f"| end of `mkdata.py --mutate` → everything sealed | {sealed} | "
         f"≤ {MUTATE_TARGET:g} s | {met(mut_ok)} |"),
        (f"| `p2pbackup verify` after the run | exit {res.verified.exit_code}: "
         f"{fmt_verified(res.verified)} | exit 0 | {met(res.verified.exit_code == 0)} |"),
        (f"| point-in-time restore (`--at now`) after the run = the tree | "
         f"{fmt_mismatches(res.mismatches)} | 0 mismatches | {met(res.mismatches == [])} |"),
    ]


def info_rows(res: Results) -> list[str]:
    s, mut, lat = res.startup, res.mutated, res.latency
    first = "—" if mut.first_idle_s is None else f"{mut.first_idle_s:.2f} s"
    rss = "; ".join(f"{k}: {v:.0f}" for k, v in res.rss_mib.items())
    return [
        f"| start → READY=1 (inotify watches in place) | {s.ready_s:.2f} s | — | — |",
        f"| READY=1 → start-up roll-up snapshot done | {s.snapshot_s:.2f} s | — | — |",
        (f"| the mutation itself (mkdata.py; daemon capturing meanwhile) | {mut.mutate_s:.2f} s "
         f"| — | — |"),
        (f"| end of the mutation → first status poll with nothing pending | {first} "
         "| — | — |"),
        (f"| sealed for the mutation | {mut.segments} segments, {mut.changes} changes "
         "| — | — |"),
        (f"| sealed for the writes | {lat.segments} segments, {lat.changes} changes "
         f"(for {len(lat.samples)} writes) | — | — |"),
        f"| VmRSS (MiB) | {rss} | — | — |",
        (f"| SIGTERM → exit | {res.stop.seconds:.2f} s, exit code {res.stop.exit_code} "
         "| — | — |"),
    ]


def fmt_verified(verified: Verified) -> str:
    shown = "; ".join(f"`{line}`" for line in verified.damaged[:5])
    more = f"; ... and {len(verified.damaged) - 5} more" if len(verified.damaged) > 5 else ""
    return verified.summary + (f" — {shown}{more}" if shown else "")


def fmt_mismatches(mismatches: list[str] | None) -> str:
    if mismatches is None:
        return "restore failed or produced no tree (see its log)"
    shown = "; ".join(f"`{m}`" for m in mismatches[:5])
    more = f"; ... and {len(mismatches) - 5} more" if len(mismatches) > 5 else ""
    return f"{len(mismatches)} mismatches" + (f": {shown}{more}" if mismatches else "")


def method(idle_seconds: float) -> list[str]:
    return [
        ("- One p2pbackupd runs for the whole benchmark on a fresh ext4 file system on a loop "
         "device, from `p2pbackup init --source DATA` plus `[daemon] seal_interval = "
         f"{SEAL_INTERVAL}`, `snapshot_interval = {SNAPSHOT_INTERVAL}`; NOTIFY_SOCKET is a "
         "socket this script reads (READY=1, `STATUS=sealed segment N`). The daemon takes "
         "the start-up roll-up snapshot itself, so its peak RSS includes one full snapshot."),
        ("- Status is asked on the control socket directly (the request `p2pbackup status "
         "--json` sends), since starting the CLI ten times a second would compete for the "
         "CPUs."),
        (f"- Idle: after the start-up snapshot and {QUIET_SECONDS:g} s with nothing pending "
         "and nothing sealed, utime+stime from /proc/PID/stat (all threads) over "
         f"{idle_seconds:g} s of wall time; nothing talks to the daemon meanwhile. Context "
         "switches are summed over its threads' /proc status."),
        ("- Mutation: `mkdata.py --mutate --seed 1` while the daemon runs (the same day of "
         "changes as the restic comparison: it runs before the writes below). From its exit, "
         f"status is polled every {POLL:g} s until nothing is pending, a segment was sealed "
         f"after the exit, and then for {SETTLE_SECONDS:g} s no further segment is sealed and "
         f"the daemon uses < {SETTLE_CPU:.0%} of a core (a file still being read is not "
         "counted as pending). The value is that last segment's `last_sealed` minus the "
         "mutation's exit."),
        (f"- Writes: new 0.3-7 KiB text files in one new directory, one at a time, each "
         f"{WRITE_GAP[0]:g}-{WRITE_GAP[1]:g} s (random) after the previous one was sealed. "
         "Latency is from just before open() to the arrival of `STATUS=sealed segment N` for "
         "the first N above the newest seq at the time of the write (sent after the segment "
         "file is in place and the head is moved; the file's presence is checked). The daemon "
         "seals only when changes are pending and nothing else changes the tree, so that "
         "segment holds the write; the segment and change counts above confirm it."),
        ("- RSS: VmHWM from /proc/PID/status just before SIGTERM; VmRSS after each phase."),
        ("- Checks after the daemon stopped: `p2pbackup verify` (snapshots, trees, packs and "
         "the log chain, including that every blob a log change names is stored); then "
         "`p2pbackup restore latest --at now` "
         "(the start-up snapshot plus the log) is compared with the tree like the restic "
         "comparison's restore check (presence, kind, symlink targets, SHA-256; SQLite "
         "by integrity_check and iterdump)."),
    ]


def report(res: Results, started: datetime.datetime, idle_seconds: float) -> str:
    s = res.startup
    lines = [
        DAEMON_HEADING,
        "",
        f"- date: {started:%Y-%m-%d %H:%M %Z}",
        f"- machine: {machine()}",
        f"- p2pbackup: git {git_revision()}",
        (f"- scale: {res.scale} — data set: {s.data_files:,} files, {fmt_bytes(s.data_bytes)} "
         f"(generated in {s.generate_s:.1f} s)"),
        f"- command (from the repository root): `{invocation()}`",
        "",
        "| measure | value | target | met? |",
        "|---|---|---|---|",
        *target_rows(res),
        *info_rows(res),
        "",
        "### Method (daemon)",
        "",
        *method(idle_seconds),
        "",
    ]
    return "\n".join(lines)


def ran_cleanly(res: Results) -> bool:
    """The exit status: the daemon stopped cleanly and both checks passed (missed time and
    memory targets show only in the report, as in bench_restic.py)."""
    return res.stop.exit_code == 0 and res.verified.exit_code == 0 and res.mismatches == []


# ---- entry point ---------------------------------------------------------------------------

def ensure_tools() -> None:
    if os.geteuid() != 0:
        raise BenchError("run as root: the benchmark mounts a loop file system")
    if not MKDATA.is_file():
        raise BenchError(f"data generator not found: {MKDATA}")
    for tool in (P2PBACKUP, P2PBACKUPD):
        if not tool.is_file():
            raise BenchError(f"{tool} not found: run `make setup` first")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="data set size for mkdata.py (1.0 is about 1 GB, 20k files)")
    ap.add_argument("--idle-seconds", type=float, default=60.0,
                    help="how long to measure idle CPU (default: 60)")
    ap.add_argument("--writes", type=int, default=100,
                    help="files to write for the latency measurement (default: 100)")
    ap.add_argument("--seed", type=int, default=1,
                    help="seed for the write spacing and contents (default: 1)")
    ap.add_argument("--keep", action="store_true",
                    help="leave the scratch file system mounted at bench/work/mnt")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "RESULTS.md",
                    help="Markdown file whose '## Daemon' section is replaced "
                         "(default: bench/RESULTS.md)")
    args = ap.parse_args()
    if args.writes < 1 or args.idle_seconds <= 0:
        ap.error("--writes and --idle-seconds must be positive")
    return args


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on kill, too
    started = datetime.datetime.now().astimezone()
    try:
        ensure_tools()
        logs = WORK / "logs" / f"daemon-{started:%Y%m%d-%H%M%S}"
        with scratch_fs(args.keep) as mnt:
            logs.mkdir(parents=True)
            results = benchmark(mnt, logs, args)
    except BenchError as exc:
        print(f"benchmark aborted: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    text = report(results, started, args.idle_seconds)
    print("\n" + text)
    write_section(args.out, DAEMON_HEADING, text)
    print(f"written to {args.out}; logs in {logs}")
    return 0 if ran_cleanly(results) else 1


if __name__ == "__main__":
    sys.exit(main())
