#!/usr/bin/env python3
"""Replication between two real p2pbackupd processes, against the raw transports, in one run.

  (a) raw aiortc data channel, p2pbackup's message size   } bench_transport.py --json, run
  (b) raw TLS 1.3 over TCP (the direct lane's transport)    } here as a subprocess
  (c) p2pbackupd replicating the mkdata repository to its paired peer over the direct lane
  (d) the same with `[peers] direct_lane = false` on both (WebRTC data channel only)

plus CPU and peak RSS of both daemons during (c)/(d), LAN discovery and connection time of a
newly started peer, and incremental replication after `mkdata.py --mutate` (direct lane).

The two daemons run in two network namespaces on one bridge (tests/netns.py: veth pairs, all
on this machine), with real mDNS between them, as in tests/integration/test_peers_lan.py.
Homes and data go to bench/work/replication/ (git-ignored); removed at the end unless --keep.
The whole measurement holds an exclusive flock on /tmp/p2pbackup-bench.lock.

    .venv/bin/python bench/bench_replication.py [--scale 1.0] [--write-results]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import REPLICATION_HEADING as HEADING  # noqa: E402
from _common import bench_lock, write_section  # noqa: E402
from bench_restic import MKDATA, fmt_bytes, git_revision, invocation, machine  # noqa: E402

import tomli_w  # noqa: E402

from p2pbackup.repo.replica import is_object_name  # noqa: E402
from p2pbackup.transport.datachannel import MESSAGE_SIZE  # noqa: E402

WORK = REPO / "bench" / "work" / "replication"
RESULTS = REPO / "bench" / "RESULTS.md"
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
MiB = 1 << 20
POLL = 0.05
# smaps_rollup walks a process's page tables: sampled at every poll it cost the bench itself
# ~0.2 of a core during the transfer, taken from the daemons it measures (2 cores in all).
PSS_EVERY = 0.5

# Targets (from the issue)
LANE_MBPS_TARGET = 150.0      # (c) MB/s
LANE_RATIO_TARGET = 0.40      # (c)/(b)
DC_RATIO_TARGET = 0.80        # (d)/(a)
CPU_TARGET = 1.5              # cores per daemon during (c)/(d)
RSS_TARGET_MIB = 250          # per daemon
INCR_TARGET = 3.0             # s, new snapshot on sender -> all its objects on receiver
DISCOVERY_TARGET = 2.0        # s, second daemon start -> first daemon sees it on the LAN


class BenchError(Exception):
    pass


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- small helpers ---------------------------------------------------------------------------

def cli(home: Path, *args: str, timeout: float = 3600, check: bool = True
        ) -> subprocess.CompletedProcess:
    env = {**os.environ, "P2PBACKUP_HOME": str(home), "P2PBACKUP_LAN": "off"}
    env.pop("COLUMNS", None)
    proc = subprocess.run([PY, "-m", "p2pbackup.cli.main", *args], env=env, text=True,
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise BenchError(f"p2pbackup {' '.join(args)} exited {proc.returncode}: "
                         f"{proc.stderr.strip()[-2000:]}")
    return proc


def control(home: Path, cmd: str, timeout: float = 10) -> dict[str, Any] | None:
    """One request on the daemon's control socket; None while the daemon is not answering."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(home / "daemon.sock"))
            s.sendall(json.dumps({"v": 1, "cmd": cmd, "args": {}}).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                reply += chunk
        obj = json.loads(reply)
    except (OSError, ValueError):
        return None
    return obj.get("result") if obj.get("ok") else None


def peer_entry(status: dict | None, device: str) -> dict | None:
    if not status:
        return None
    return next((p for p in status.get("peers", []) if p.get("device") == device), None)


def store_objects(store: Path) -> dict[str, int]:
    """Store path (relative) -> size for every replicable object file under a store."""
    out: dict[str, int] = {}
    root = str(store)
    for dirpath, _dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        for f in files:
            path = prefix + f
            # packs/ab/abcd... is the object packs/abcd... (blobs/local.py shards packs)
            name = "packs/" + f if path.startswith("packs/") and path.count("/") == 2 else path
            if is_object_name(name):
                try:
                    out[path] = os.stat(os.path.join(dirpath, f)).st_size
                except FileNotFoundError:
                    pass
    return out


def missing(store: Path, paths) -> list[str]:
    return [n for n in paths if not os.path.exists(store / n)]


def proc_cpu(pid: int) -> float:
    """CPU seconds of `pid` and of its worker processes (live ones, and those it reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    own = sum(int(f) for f in fields[11:15]) / CLK_TCK   # utime stime cutime cstime
    return own + sum(proc_cpu(c) for c in children(pid))


def proc_kib(pid: int, key: str, *, tree: bool = False) -> int:
    """A /proc status field (kB) of `pid` (`tree`: plus its worker processes')."""
    own = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                own = int(line.split()[1])
    except FileNotFoundError:
        return 0
    return own + (sum(proc_kib(c, key, tree=True) for c in children(pid)) if tree else 0)


def tree_pss_kib(pid: int) -> int:
    """Proportional set size of `pid` and its workers: each shared page (libraries, the
    shared pack buffers) counted once, split between the processes that map it."""
    total = 0
    for p in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def set_config(home: Path, **tables: dict[str, Any]) -> None:
    path = home / "config.toml"
    cfg = tomllib.loads(path.read_text())
    for table, values in tables.items():
        cfg.setdefault(table, {}).update(values)
    path.write_text(tomli_w.dumps(cfg))


def run_timed(argv: list[str], logfile: Path, env: dict | None = None) -> float:
    t0 = time.monotonic()
    with open(logfile, "ab") as f:
        rc = subprocess.run(argv, stdout=f, stderr=f, env=env, stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        raise BenchError(f"{' '.join(map(str, argv))} exited {rc} (see {logfile})")
    return time.monotonic() - t0


# ---- (a), (b): raw transports ----------------------------------------------------------------

def transport(seconds: float, repeat: int, logs: Path, earlier: list | None = None,
              tag: str = "before") -> dict[str, Any]:
    """Raw transport runs (this call's plus `earlier` ones), with medians over all of them."""
    argv = [PY, str(REPO / "bench" / "bench_transport.py"), "--seconds", str(seconds),
            "--repeat", str(repeat), "--json", "--dc-sizes", str(MESSAGE_SIZE)]
    log("raw transports: " + " ".join(argv[1:]))
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=600)
    (logs / f"transport-{tag}.json").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise BenchError(f"bench_transport.py exited {proc.returncode}: {proc.stderr[-1500:]}")
    rows = (earlier or []) + json.loads(proc.stdout)
    dc = [r for r in rows if r["kind"] == "dc"]
    lane = [r for r in rows if r["kind"] == "lane"]
    return {"dc": statistics.median(r["mb_per_s"] for r in dc),
            "lane": statistics.median(r["mb_per_s"] for r in lane),
            "dc_all": [r["mb_per_s"] for r in dc], "lane_all": [r["mb_per_s"] for r in lane],
            "rows": rows}


# ---- the daemons -----------------------------------------------------------------------------

@dataclass
class Daemon:
    name: str
    home: Path
    proc: subprocess.Popen
    logfile: Path
    started: float
    pid: int = 0

    def real_pid(self) -> int:
        """`ip netns exec` execs the command, so the popen pid is the daemon; check anyway."""
        if self.pid:
            return self.pid
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for pid in [self.proc.pid, *children(self.proc.pid)]:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except FileNotFoundError:
                    continue
                if b"p2pbackup.daemon.main" in cmd and b"netns" not in cmd.split(b"\0")[0]:
                    self.pid = pid
                    return pid
            time.sleep(0.02)
        raise BenchError(f"daemon {self.name}: no p2pbackupd process under {self.proc.pid}")

    def ready(self) -> bool:
        return b"watching " in self.logfile.read_bytes()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def start_daemon(host, name: str, home: Path, logs: Path, tag: str) -> Daemon:
    logfile = logs / f"daemon-{name}-{tag}.log"
    f = open(logfile, "wb")
    t0 = time.monotonic()
    proc = host.popen([PY, "-m", "p2pbackup.daemon.main"],
                      env={"P2PBACKUP_HOME": str(home), "P2PBACKUP_LAN": "on"},
                      stdout=f, stderr=f)
    f.close()
    d = Daemon(name, home, proc, logfile, t0)
    d.real_pid()
    return d


def settle(pid: int, window: float = 0.5, share: float = 0.05, timeout: float = 120) -> float:
    """Wait until the process uses under `share` of a core over `window` s (the start-up
    rescan of the sources is over); returns how long that took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        c0 = proc_cpu(pid)
        time.sleep(window)
        if proc_cpu(pid) - c0 < share * window:
            break
    return time.monotonic() - t0


def wait_for(pred, timeout: float, what: str, poll: float = POLL):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(poll)
    raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Replication:
    mode: str                      # "direct lane" / "data channel"
    path_seen: str | None = None
    discovered_s: float | None = None     # b start -> a's status shows b on_lan
    connected_s: float | None = None      # b start -> a's status shows b connected
    b_connected_s: float | None = None    # b start -> b's status shows a connected
    first_byte_s: float | None = None     # b start -> first of a's objects in b's store
    objects: int = 0
    bytes: int = 0
    transfer_s: float = 0.0               # connected -> all of a's objects in b's store
    first_byte_to_done_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)     # cores over the transfer window
    cpu_s: dict[str, float] = field(default_factory=dict)
    hwm_mib: dict[str, float] = field(default_factory=dict)        # right after the transfer
    hwm_sum_mib: dict[str, float] = field(default_factory=dict)    # same, summed with workers'
    pss_mib: dict[str, float] = field(default_factory=dict)        # peak while transferring
    hwm_end_mib: dict[str, float] = field(default_factory=dict)    # after the incremental step
    exit_codes: dict[str, int] = field(default_factory=dict)
    incr_s: float | None = None
    incr_objects: int = 0
    incr_bytes: int = 0
    incr_snapshot_s: float | None = None
    incr_mutate_s: float | None = None
    incr_path: str | None = None
    incr_since_mutate: int = 0
    incr_left_at_start: int = 0
    incr_poll_s: float | None = None
    sender_settle_s: float = 0.0
    sender_dials: bool = False
    perf_lines: list[str] = field(default_factory=list)

    @property
    def mbps(self) -> float:
        return self.bytes / self.transfer_s / 1e6 if self.transfer_s else 0.0


def replicate(lab_hosts, homes: dict[str, Path], b_template: Path, a_id: str, b_id: str,
              direct: bool, logs: Path, data: Path, scale: float, incremental: bool,
              tag: str, perf: bool = False) -> Replication:
    ha, hb = lab_hosts
    mode = "direct lane" if direct else "data channel"
    res = Replication(mode, sender_dials=a_id < b_id)
    a_home, b_home = homes["a"], homes["b"]
    if b_home.exists():
        shutil.rmtree(b_home)
    subprocess.run(["cp", "-a", str(b_template), str(b_home)], check=True)
    for home in (a_home, b_home):
        set_config(home, peers={"direct_lane": direct})
    a_store, b_store = a_home / "store", b_home / "store"
    before_b = set(store_objects(b_store))
    perf_proc = None

    log(f"[{mode}] starting the sender's daemon")
    da = start_daemon(ha, "a", a_home, logs, tag)
    db = None
    try:
        wait_for(da.ready, 120, "the sender's daemon to be ready")
        wait_for(lambda: control(a_home, "status"), 30, "the sender's control socket")
        res.sender_settle_s = settle(da.real_pid())
        objs_a = store_objects(a_store)
        want = [n for n in objs_a if n not in before_b]
        log(f"[{mode}] sender ready; {len(want)} objects, "
            f"{fmt_bytes(sum(objs_a[n] for n in want))} to replicate; starting the receiver")
        db = start_daemon(hb, "b", b_home, logs, tag)
        pa, pb = da.real_pid(), db.real_pid()
        if perf:
            perf_proc = subprocess.Popen(
                ["perf", "record", "-F", "499", "-g", "-o", str(logs / f"perf-{tag}.data"),
                 "-p", f"{pa},{pb}"], stdout=subprocess.DEVNULL,
                stderr=open(logs / f"perf-{tag}.log", "wb"))
        t0 = db.started
        left = list(want)
        cpu0: dict[str, float] | None = None
        t_conn = None
        t_done = None
        pss_at = 0.0
        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            now = time.monotonic()
            if None in (res.discovered_s, res.connected_s):
                e = peer_entry(control(a_home, "status", timeout=5), b_id)
                if e and e.get("on_lan") and res.discovered_s is None:
                    res.discovered_s = now - t0
                if e and e.get("connected") and res.connected_s is None:
                    res.connected_s = now - t0
            if res.b_connected_s is None:
                eb = peer_entry(control(b_home, "status", timeout=5), a_id)
                if eb and eb.get("connected"):
                    res.b_connected_s = now - t0
            if t_conn is None and (res.connected_s is not None or res.b_connected_s is not None):
                t_conn = now
                cpu0 = {"a": proc_cpu(pa), "b": proc_cpu(pb)}
            if now - pss_at >= PSS_EVERY:
                pss_at = now
                for k, pid in (("a", pa), ("b", pb)):
                    res.pss_mib[k] = max(res.pss_mib.get(k, 0.0), tree_pss_kib(pid) / 1024)
            left = missing(b_store, left)
            if res.first_byte_s is None and len(left) < len(want):
                res.first_byte_s = time.monotonic() - t0
                if t_conn is None:   # objects arrived before a status poll saw the session
                    t_conn = now
                    cpu0 = {"a": proc_cpu(pa), "b": proc_cpu(pb)}
            if not left:
                # Exact: every object the sender holds now (it may have sealed more) is here.
                objs_a = store_objects(a_store)
                left = [n for n in objs_a if not os.path.exists(b_store / n)]
                if not left:
                    t_done = time.monotonic()
                    break
            if da.proc.poll() is not None or db.proc.poll() is not None:
                raise BenchError(f"a daemon exited during the transfer (see {logs})")
            time.sleep(POLL)
        if t_done is None or t_conn is None or cpu0 is None:
            raise BenchError(f"[{mode}] replication did not finish: {len(left)} objects left")
        cpu1 = {"a": proc_cpu(pa), "b": proc_cpu(pb)}
        if perf_proc is not None:
            perf_proc.send_signal(signal.SIGINT)
            perf_proc.wait(60)
            res.perf_lines = perf_report(logs / f"perf-{tag}.data", pa, pb,
                                         logs / f"perf-{tag}.txt")
        sent = [n for n in objs_a if n not in before_b]
        res.objects, res.bytes = len(sent), sum(objs_a[n] for n in sent)
        res.transfer_s = t_done - t_conn
        res.first_byte_to_done_s = t_done - t0 - (res.first_byte_s or 0)
        for k in ("a", "b"):
            res.cpu_s[k] = cpu1[k] - cpu0[k]
            res.cpu[k] = res.cpu_s[k] / res.transfer_s
        # A pack stored but refused afterwards (not indexed) still lands in the store and
        # would count as arrived, faster for the work skipped: such a run measures nothing.
        for name in ("a", "b"):
            bad = [ln for ln in (logs / f"daemon-{name}-{tag}.log").read_text(
                errors="replace").splitlines() if ": WARNING: " in ln or ": ERROR: " in ln]
            if bad:
                raise BenchError(f"[{mode}] the {name} daemon reported {len(bad)} problems "
                                 f"during the transfer, first: {bad[0]}")
        st_b = control(b_home, "status")
        eb = peer_entry(st_b, a_id)
        res.path_seen = (eb or {}).get("path") or res.path_seen
        log(f"[{mode}] {res.objects} objects, {fmt_bytes(res.bytes)} in {res.transfer_s:.2f} s "
            f"= {res.mbps:.1f} MB/s (path: {res.path_seen}); CPU a {res.cpu['a']:.2f} "
            f"b {res.cpu['b']:.2f} cores")

        for k, d in (("a", da), ("b", db)):
            res.hwm_mib[k] = proc_kib(d.real_pid(), "VmHWM") / 1024
            res.hwm_sum_mib[k] = proc_kib(d.real_pid(), "VmHWM", tree=True) / 1024
        if incremental:
            incremental_step(res, da, db, a_home, b_home, data, scale, logs)
            for k, d in (("a", da), ("b", db)):
                res.hwm_end_mib[k] = proc_kib(d.real_pid(), "VmHWM") / 1024
    finally:
        for k, d in (("b", db), ("a", da)):
            if d is not None:
                res.exit_codes[k] = d.stop()
    return res


def perf_report(data: Path, pa: int, pb: int, out: Path) -> list[str]:
    """Where each daemon's CPU went (perf samples from the receiver's start to the end of the
    transfer): the full reports go to `out`, the top symbols per thread are returned."""
    parts, summary = [], []
    threads = subprocess.run(["perf", "script", "-i", str(data), "-F", "pid,tid"],
                             capture_output=True, text=True, timeout=300).stdout.split()
    counts: dict[tuple[int, int], int] = {}
    for item in threads:
        pid, tid = map(int, item.split("/"))
        counts[pid, tid] = counts.get((pid, tid), 0) + 1
    total = sum(counts.values()) or 1
    for who, pid in (("sender", pa), ("receiver", pb)):
        proc = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                               "--pid", str(pid), "--sort", "dso,sym", "-g", "none",
                               "--percentage", "relative", "--percent-limit", "0.5"],
                              capture_output=True, text=True, timeout=300)
        parts.append(f"==== {who} (pid {pid}) by dso,sym\n{proc.stdout}")
        mine = sorted(((n, tid) for (p, tid), n in counts.items() if p == pid), reverse=True)
        for n, tid in mine:
            if n < 0.05 * total:
                continue
            proc = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                                   "--tid", str(tid), "--sort", "dso,sym", "-g", "none",
                                   "--percentage", "relative", "--percent-limit", "3"],
                                  capture_output=True, text=True, timeout=300)
            parts.append(f"==== {who} thread {tid} by dso,sym\n{proc.stdout}")
            top = []
            for line in proc.stdout.splitlines():
                m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[.\]\s+(.+?)\s*$", line)
                if m:
                    top.append(f"{m.group(1)}% {m.group(3)} ({m.group(2)})")
            kind = "main thread" if tid == pid else "worker thread"
            summary.append(f"- {who}, {kind} {tid}: {100 * n / total:.0f}% of all samples; "
                           + "; ".join(top[:6]))
    out.write_text("\n".join(parts))
    log(f"perf report in {out}")
    return summary


def incremental_step(res: Replication, da: Daemon, db: Daemon, a_home: Path, b_home: Path,
                     data: Path, scale: float, logs: Path) -> None:
    """One day of changes while both daemons run; time from the new snapshot existing on the
    sender (`p2pbackup snapshot` returned) until the receiver holds every object of the
    sender's store as it was at that moment."""
    a_store, b_store = a_home / "store", b_home / "store"
    log("[incremental] mkdata.py --mutate while both daemons run")
    pre_mutate = set(store_objects(a_store))
    res.incr_mutate_s = run_timed([PY, str(MKDATA), str(data), "--mutate", "--seed", "1",
                                   "--scale", str(scale)], logs / "mutate.log")
    before = store_objects(a_store)
    t_snap = time.monotonic()
    cli(a_home, "snapshot")                                    # through the running daemon
    t0 = time.monotonic()
    res.incr_snapshot_s = t0 - t_snap
    objs = store_objects(a_store)
    new = [n for n in objs if n not in before]
    left = [n for n in objs if not os.path.exists(b_store / n)]
    res.incr_objects, res.incr_bytes = len(new), sum(objs[n] for n in new)
    res.incr_since_mutate = sum(1 for n in objs if n not in pre_mutate)
    res.incr_left_at_start = len(left)
    deadline = t0 + 300
    while left and time.monotonic() < deadline:
        time.sleep(0.01)
        left = missing(b_store, left)
    if left:
        raise BenchError(f"[incremental] {len(left)} objects never reached the receiver")
    res.incr_poll_s = time.monotonic() - t0
    # Exact times from the file systems' ctimes (set when an object is renamed into place;
    # one clock, one machine): the new snapshot object on the sender -> the last of the
    # objects new since the mutation began arriving on the receiver.
    since = [n for n in objs if n not in pre_mutate]
    snaps = [n for n in new if n.startswith("snapshots/")]
    if snaps:
        t_snapshot = max(os.stat(a_store / n).st_ctime_ns for n in snaps)
        t_last = max(os.stat(b_store / n).st_ctime_ns for n in since)
        res.incr_s = max(0, t_last - t_snapshot) / 1e9
    else:
        res.incr_s = res.incr_poll_s
    a_dev = (control(a_home, "status") or {}).get("device", "")
    res.incr_path = (peer_entry(control(b_home, "status"), a_dev) or {}).get("path")
    log(f"[incremental] {res.incr_objects} new objects ({fmt_bytes(res.incr_bytes)}) on the "
        f"receiver {res.incr_s:.2f} s after the snapshot (polled {res.incr_poll_s:.2f} s) (snapshot took "
        f"{res.incr_snapshot_s:.2f} s)")


def own_device_id(home: Path) -> str:
    devs = json.loads(cli(home, "devices", "--json").stdout)["devices"]
    mine = [d for d in devs if d.get("this_device")]
    if len(mine) != 1:
        raise BenchError(f"cannot tell this device in {devs}")
    return mine[0]["id"]


# ---- setup -----------------------------------------------------------------------------------

@dataclass
class Prepared:
    homes: dict[str, Path]
    b_template: Path
    a_id: str
    b_id: str
    data: Path
    data_files: int
    data_bytes: int
    generate_s: float
    snapshot_s: float


def pair_homes(a_home: Path, b_home: Path, data: Path) -> tuple[str, str]:
    """Home a (backing up `data`) paired with a new home b, neither taking scheduled snapshots;
    returns their device ids."""
    from tests.integration.test_pairing import Host
    from tests.conftest import Cli

    cli(a_home, "init", "--source", str(data))
    host = Host(Cli(a_home))
    cli(b_home, "pair", host.code, "--peer", host.peer, "--name", "laptop")
    rc, out, err = host.finish()
    if rc != 0:
        raise BenchError(f"pairing failed: {out} {err}")
    for home in (a_home, b_home):
        set_config(home, daemon={"snapshot_interval": 86400})
    return own_device_id(a_home), own_device_id(b_home)


def prepare(work: Path, scale: float, logs: Path) -> Prepared:
    data = work / "data"
    log(f"mkdata.py at scale {scale}")
    gen = run_timed([PY, str(MKDATA), str(data), "--scale", str(scale)], logs / "mkdata.log")
    nfiles = nbytes = 0
    for dirpath, _d, files in os.walk(data):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            nfiles += 1
            nbytes += st.st_size if not os.path.islink(os.path.join(dirpath, f)) else 0
    a_home, b_home = work / "home-a", work / "home-b"
    # No scheduled snapshots during the run; the sender's snapshot is taken below.
    a_id, b_id = pair_homes(a_home, b_home, data)
    log("initial snapshot of the data on the sender (no daemon running)")
    t0 = time.monotonic()
    cli(a_home, "snapshot")
    snap_s = time.monotonic() - t0
    template = work / "home-b.template"
    subprocess.run(["cp", "-a", str(b_home), str(template)], check=True)
    return Prepared({"a": a_home, "b": b_home}, template, a_id, b_id, data, nfiles, nbytes,
                    gen, snap_s)


# ---- report ----------------------------------------------------------------------------------

def met(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**no**")


def runs(values, fmt="{:.2f}") -> str:
    return ", ".join(fmt.format(v) for v in values)


def table(tr: dict | None, lanes: list[Replication], dc: Replication | None) -> list[str]:
    rows = ["| measure | value | target | met? |", "|---|---|---|---|"]
    a = tr["dc"] if tr else None
    b = tr["lane"] if tr else None
    if tr:
        rows.append(f"| (a) raw data channel, {MESSAGE_SIZE // 1024} KiB messages "
                    f"(bench_transport.py, loopback of a private netns), median of runs before, then after the daemons: "
                    f"{runs(tr['dc_all'], '{:.1f}')} | {a:.1f} MB/s | — | — |")
        rows.append(f"| (b) raw TLS 1.3 over TCP, 1 MiB messages (same), median of runs "
                    f"{runs(tr['lane_all'], '{:.0f}')} | {b:.1f} MB/s | — | — |")
    lane = None
    if lanes:
        lane = sorted(lanes, key=lambda r: r.mbps)[(len(lanes) - 1) // 2]   # median run
    groups = [(lanes, lane, b, "(c)", "(b)", LANE_RATIO_TARGET),
              ([dc] if dc else [], dc, a, "(d)", "(a)", DC_RATIO_TARGET)]
    for rs, r, raw, label, raw_name, ratio_target in groups:
        if r is None:
            rows.append(f"| {label} | not measured (see Failures) | — | — |")
            continue
        many = f", median of {len(rs)} runs: {runs([x.mbps for x in rs], '{:.0f}')} MB/s" \
            if len(rs) > 1 else ""
        if raw:
            ratio = r.mbps / raw
            rows.append(f"| **{label}/{raw_name}**: replication over the {r.mode} / raw "
                        f"transport, same run | **{ratio:.2f}** ({r.mbps:.1f} / {raw:.1f} MB/s) "
                        f"| ≥ {ratio_target:.2f} | {met(ratio >= ratio_target)} |")
        else:
            rows.append(f"| {label}/{raw_name} | not measured | ≥ {ratio_target:.2f} | — |")
        tgt = f"≥ {LANE_MBPS_TARGET:.0f} MB/s" if label == "(c)" else "—"
        ok = (r.mbps >= LANE_MBPS_TARGET) if label == "(c)" else None
        rows.append(f"| {label} replication over the {r.mode} (path in status: {r.path_seen}): "
                    f"{r.objects:,} objects, {fmt_bytes(r.bytes)}, session connected → all on "
                    f"the receiver{many} | {r.mbps:.1f} MB/s ({r.transfer_s:.2f} s) | {tgt} | "
                    f"{met(ok)} |")
        for k, who in (("a", "sender"), ("b", "receiver")):
            cpu = max(x.cpu[k] for x in rs)
            rows.append(f"| {label} CPU of the {who}'s daemon over the transfer"
                        f"{' (max over runs: ' + runs([x.cpu[k] for x in rs]) + ')' if len(rs) > 1 else ''}"
                        f" | {cpu:.2f} cores | ≤ {CPU_TARGET} | {met(cpu <= CPU_TARGET)} |")
            hwm = max(x.hwm_mib[k] for x in rs)
            pss = max(x.pss_mib.get(k, 0.0) for x in rs)
            hsum = max(x.hwm_sum_mib.get(k, 0.0) for x in rs)
            rows.append(f"| {label} peak memory of the {who}'s daemon"
                        f"{' (max over runs)' if len(rs) > 1 else ''}: its own peak RSS "
                        f"(VmHWM) / daemon and pack workers together, peak PSS sampled every "
                        f"{PSS_EVERY:g} s (shared pages counted once) | {hwm:.0f} / {pss:.0f} MiB "
                        f"(VmHWM summed over the processes, shared pages counted in each: "
                        f"{hsum:.0f} MiB) | ≤ {RSS_TARGET_MIB} MiB | "
                        f"{met(max(hwm, pss) <= RSS_TARGET_MIB)} |")
    started = [*lanes, *([dc] if dc else [])]
    if started:
        def col(attr):
            vals = [getattr(x, attr) for x in started]
            got = [v for v in vals if v is not None]
            med = statistics.median(got) if got else None
            return med, ", ".join("—" if v is None else f"{v:.2f}" for v in vals)
        n = len(started)
        d_med, d_all = col("discovered_s")
        c_med, c_all = col("connected_s")
        bc_med, bc_all = col("b_connected_s")
        f_med, f_all = col("first_byte_s")
        rows.append(f"| new peer on the LAN: receiver daemon start → sender's status lists it "
                    f"`on_lan` (discovery), median of {n} starts: {d_all} s | "
                    f"{d_med:.2f} s | ≤ {DISCOVERY_TARGET:.0f} s | "
                    f"{met(d_med is not None and d_med <= DISCOVERY_TARGET)} |")
        dialer = "sender" if started[0].sender_dials else "receiver"
        rows.append(f"| new peer on the LAN: receiver daemon start → sender's status shows it "
                    f"`connected`, median of {n}: {c_all} s (receiver's own status: {bc_all} s; "
                    f"the lower device id dials, here the {dialer}) | "
                    f"{c_med:.2f} s | ≤ {DISCOVERY_TARGET:.0f} s | "
                    f"{met(c_med is not None and c_med <= DISCOVERY_TARGET)} |")
        rows.append(f"| receiver daemon start → first object stored (setup), median of {n}: "
                    f"{f_all} s | {f_med:.2f} s | — | — |")
    last = lanes[-1] if lanes else None
    if last is not None and last.incr_s is not None:
        rows.append(f"| incremental after `mkdata.py --mutate` over the "
                    f"{last.incr_path or 'direct lane'}: new snapshot object on the sender → "
                    f"every object new since the mutation on the receiver ({last.incr_objects} "
                    f"written by the snapshot, {fmt_bytes(last.incr_bytes)}; "
                    f"{last.incr_since_mutate} new since the mutation began; "
                    f"{last.incr_left_at_start} not yet on the receiver when the command "
                    f"returned) | {last.incr_s:.2f} s (polled from the command's return: "
                    f"{last.incr_poll_s:.2f} s; the command took {last.incr_snapshot_s:.2f} s) | "
                    f"≤ {INCR_TARGET:.0f} s | {met(last.incr_s <= INCR_TARGET)} |")
        rows.append(f"| peak RSS (VmHWM) after the incremental step (includes the sender's "
                    f"snapshot in its daemon): sender / receiver | "
                    f"{last.hwm_end_mib['a']:.0f} / {last.hwm_end_mib['b']:.0f} MiB | — | — |")
    for r in started:
        if any(c != 0 for c in r.exit_codes.values()):
            rows.append(f"| daemons' exit codes ({r.mode} run) | {r.exit_codes} | 0 | **no** |")
    return rows


def method_notes(args, load: tuple) -> list[str]:
    return [
        "- Two `p2pbackupd` processes in two network namespaces on one bridge (veth pairs, "
        "tests/netns.py), i.e. on this machine; real mDNS between them, `P2PBACKUP_LAN=on`. "
        "The sender's home holds one snapshot of the mkdata tree (taken by `p2pbackup snapshot` "
        "before any daemon runs); the receiver is a freshly paired home with an empty store "
        "(the same copy for (c) and (d)). `[daemon] snapshot_interval = 86400` on both.",
        f"- (d) runs first (once: it takes ~30 s at scale 1), then (c) {args.lane_repeat} times "
        "(each with a fresh copy of the empty receiver home and a fresh start of both daemons), "
        "then the incremental step in the last (c) run, all on the same sender home; for (d) "
        "both config.toml have `[peers] direct_lane = false`. (c) is the median run.",
        "- Throughput = bytes of the sender's replicable store objects (packs, trees, "
        "snapshots, log segments, ...; `replica.is_object_name`) that the receiver lacked, "
        "divided by the time from the first status poll (every 50 ms, control socket) that "
        "shows the session connected on either side to the moment every one of those files "
        "exists in the receiver's store (objects are renamed into place complete); the "
        "sender's object set is re-read at the end, so anything sealed meanwhile counts too.",
        "- CPU = utime+stime (/proc/PID/stat) of each daemon over that window, divided by its "
        "wall time, counting the daemon's pack-checking worker processes (live ones and "
        "reaped ones); peak RSS = VmHWM (/proc/PID/status) right after the transfer; the "
        "daemon with its workers is also measured as PSS (/proc/PID/smaps_rollup), sampled "
        f"every {PSS_EVERY:g} s (reading smaps_rollup at every 50 ms poll cost the bench ~0.2 "
        "of a core, taken from the daemons), because a VmHWM sum counts the shared pack "
        "buffers and libraries once per process.",
        "- (a) and (b) come from `bench/bench_transport.py --json --seconds "
        f"{args.transport_seconds:g} --repeat {args.transport_repeat} --dc-sizes {MESSAGE_SIZE}` "
        "run in the same invocation before the daemons start and again after they stop; the "
        "ratios use the median of all these runs (each run is listed: the other core is "
        "shared with whatever else runs on the machine, which moves (a) a lot).",
        "- Incremental: `mkdata.py --mutate --seed 1` with both daemons connected (the sender's "
        "daemon captures it), then `p2pbackup snapshot` (through the daemon). Timed by ctimes (set by the rename "
        "into place; same machine, same clock): from the new `snapshots/` object on the "
        "sender to the last arrival on the receiver of the objects that appeared on the "
        "sender since the mutation began; also polled (10 ms) from the command's return.",
        "- Discovery: the sender's daemon is started first and waited for (log line "
        "`watching N sources`, then under 5% of a core over 0.5 s, i.e. its start-up rescan "
        "is over); from the receiver daemon's start (Popen) to the first status poll of the "
        "sender that lists it `on_lan` / `connected`. Status is polled only until both are "
        "seen, so the transfer itself is not slowed by polling (only existence checks of "
        "the missing files, every 50 ms).",
        f"- Load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 CPUs shared with "
        "everything else running; the whole run holds flock /tmp/p2pbackup-bench.lock).",
    ]


# ---- main ------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--keep", action="store_true", help="keep bench/work/replication")
    ap.add_argument("--skip-transport", action="store_true")
    ap.add_argument("--skip-dc", action="store_true",
                    help="leave out (d) (WebRTC only, the slow part), e.g. to compare (c) "
                         "before/after a change in a few minutes")
    ap.add_argument("--transport-seconds", type=float, default=3.0)
    ap.add_argument("--transport-repeat", type=int, default=2)
    ap.add_argument("--lane-repeat", type=int, default=3,
                    help="runs of (c) (each with a fresh receiver); (d) runs once")
    ap.add_argument("--perf", action="store_true",
                    help="one more (c) run, not counted, under `perf record` (both daemons): "
                         "top symbols per thread in the report, full reports in "
                         "bench/work/replication/logs/perf-lane-perf.txt (use --keep)")
    ap.add_argument("--write-results", action="store_true",
                    help=f"replace/append the '{HEADING}' section of bench/RESULTS.md")
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("ip"):
        raise SystemExit("needs root and iproute2 (network namespaces)")
    from tests.netns import NetLab

    started = datetime.datetime.now(datetime.timezone.utc)
    t_run = time.monotonic()
    lock = contextlib.ExitStack()
    lock.enter_context(bench_lock())
    load = os.getloadavg()
    if WORK.exists():
        shutil.rmtree(WORK)
    logs = WORK / "logs"
    logs.mkdir(parents=True)
    tr = dc = None
    lanes: list[Replication] = []
    profiled: Replication | None = None
    errors: list[str] = []
    prep = None
    try:
        if not args.skip_transport:
            try:
                tr = transport(args.transport_seconds, args.transport_repeat, logs)
                log(f"raw: data channel {tr['dc']:.1f} MB/s, TLS {tr['lane']:.1f} MB/s")
            except (BenchError, subprocess.TimeoutExpired) as exc:
                errors.append(f"raw transports: {exc}")
        prep = prepare(WORK, args.scale, logs)
        with NetLab() as lab:
            lan = lab.lan("lan")
            hosts = (lab.host("a", lan, "10.10.0.1/24"), lab.host("b", lan, "10.10.0.2/24"))
            # (tag, direct lane?, incremental step?, perf?)
            plan = [] if args.skip_dc else [("dc", False, False, False)]
            plan += [(f"lane{i + 1}", True, i == args.lane_repeat - 1, False)
                     for i in range(args.lane_repeat)]
            if args.perf:
                plan.append(("lane-perf", True, False, True))
            for tag, direct, incremental, perf in plan:
                try:
                    r = replicate(hosts, prep.homes, prep.b_template, prep.a_id, prep.b_id,
                                  direct, logs, prep.data, args.scale,
                                  incremental=incremental, tag=tag, perf=perf)
                    if perf:
                        profiled = r
                    elif direct:
                        lanes.append(r)
                    else:
                        dc = r
                except BenchError as exc:
                    errors.append(str(exc))
                    log(f"FAILED: {exc}")
        if not args.skip_transport:
            try:   # again after the daemons, so load changes during the run show up
                tr = transport(args.transport_seconds, args.transport_repeat, logs,
                               tr["rows"] if tr else None, tag="after")
                log(f"raw (all runs): data channel {tr['dc']:.1f} MB/s, TLS {tr['lane']:.1f} MB/s")
            except (BenchError, subprocess.TimeoutExpired) as exc:
                errors.append(f"raw transports (after): {exc}")
    except BenchError as exc:
        errors.append(str(exc))
    finally:
        lock.close()
        if not args.keep and WORK.exists():
            shutil.rmtree(WORK, ignore_errors=True)
    took = time.monotonic() - t_run

    lines = [
        HEADING, "",
        f"- date: {started:%Y-%m-%d %H:%M %Z}",
        f"- machine: {machine()}; load average at start {load[0]:.2f} / {load[1]:.2f} / "
        f"{load[2]:.2f}",
        f"- p2pbackup: git {git_revision()}",
    ]
    if prep:
        lines.append(f"- scale: {args.scale} — data set: {prep.data_files:,} files, "
                     f"{fmt_bytes(prep.data_bytes)}; initial snapshot {prep.snapshot_s:.1f} s")
    lines += [f"- command (from the repository root): `{invocation()}`; whole run {took:.0f} s",
              "- where: two daemons in two network namespaces on one bridge (veth), same "
              "machine", "", *table(tr, lanes, dc), ""]
    if errors:
        lines += ["Failures:", "", *[f"- {e}" for e in errors], ""]
    if profiled is not None and profiled.perf_lines:
        lines += ["### Where the CPU goes in (c) (perf)", "",
                  f"An extra direct-lane run under `perf record -F 499 -g` of both daemons (not "
                  f"in the table; {profiled.mbps:.0f} MB/s under perf; CPU sender "
                  f"{profiled.cpu['a']:.2f}, receiver {profiled.cpu['b']:.2f} cores); samples "
                  f"from the receiver's start to the end of the transfer, threads with ≥ 5% of "
                  f"them, top symbols (≥ 3% of the thread):", "", *profiled.perf_lines, ""]
    lines += ["### Method (replication)", "", *method_notes(args, load), ""]
    section = "\n".join(lines)
    print(section)
    if args.write_results:
        write_section(RESULTS, HEADING, section)
        log(f"wrote the '{HEADING}' section of {RESULTS}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
