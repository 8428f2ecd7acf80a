"""Network namespaces for multi-host tests: LANs as bridges in a private switch namespace.

Nothing is created in the root namespace. Every name starts with a per-lab random prefix, so
parallel runs never touch each other, and `NetLab.close()` removes all of it.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

SKIP_REASON = "network namespaces need root and iproute2 (ip)"

# Raw-socket ICMP echo (the image has no ping binary); exit 0 when dst answers in time, after
# printing the round trip in ms.
_PING = r"""
import os, socket, struct, sys, time
dst, timeout = sys.argv[1], float(sys.argv[2])
def csum(b):
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
ident = os.getpid() & 0xFFFF
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
deadline = time.monotonic() + timeout
seq = 0
sent = {}
while time.monotonic() < deadline:
    seq += 1
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"netlab"
    sent[seq] = time.monotonic()
    try:
        sock.sendto(hdr[:2] + struct.pack("!H", csum(hdr)) + hdr[4:], (dst, 0))
    except OSError:
        pass  # unreachable right now (no route, link down): retry until the deadline
    resend = min(deadline, time.monotonic() + 0.25)
    while (left := resend - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, addr = sock.recvfrom(2048)
        except OSError:
            break
        ihl = (data[0] & 0x0F) * 4
        kind, _code, _sum, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
        if kind == 0 and rid == ident and addr[0] == dst:
            print(f"{(time.monotonic() - sent[rseq]) * 1000:.2f}")
            sys.exit(0)
sys.exit(1)
"""


def available() -> bool:
    """True when this process may create namespaces (root, iproute2 present)."""
    return os.geteuid() == 0 and shutil.which("ip") is not None


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


@dataclass(frozen=True)
class Lan:
    """One LAN: a bridge in the lab's switch namespace."""

    name: str
    bridge: str


@dataclass
class Host:
    """A namespace with `lo` up and (usually) `eth0` plugged into a LAN."""

    lab: NetLab = field(repr=False)
    name: str
    ns: str
    ip: str | None = None
    lan: Lan | None = None
    # Switch-side veth names per interface inside the host ("eth0" -> "nlab12-v1").
    ports: dict[str, str] = field(default_factory=dict)

    def exec_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]

    def run(self, argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        """subprocess.run inside this namespace (default timeout 60 s)."""
        kw.setdefault("timeout", 60)
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.exec_prefix() + list(argv), **kw)

    def popen(self, argv: list[str], env: dict[str, str] | None = None,
              **kw: Any) -> subprocess.Popen:
        """Start a process inside this namespace; `env` is added to os.environ; killed at teardown."""
        full_env = dict(os.environ)
        full_env.update(env or {})
        kw.setdefault("stdin", subprocess.DEVNULL)
        # Own process group, so teardown can kill whatever the process spawned as well.
        proc = subprocess.Popen(self.exec_prefix() + list(argv), env=full_env,
                                start_new_session=True, **kw)
        self.lab._procs.append(proc)
        return proc

    def ping(self, ip: str, timeout: float = 1.0) -> bool:
        """True when `ip` answers an ICMP echo from this host within `timeout` seconds."""
        return self.rtt_ms(ip, timeout) is not None

    def rtt_ms(self, ip: str, timeout: float = 1.0) -> float | None:
        """The round trip of an ICMP echo to `ip` in ms; None if none came back in time."""
        proc = self.run([sys.executable, "-I", "-S", "-c", _PING, ip, str(timeout)],
                        capture_output=True, text=True, timeout=timeout + 30)
        return float(proc.stdout) if proc.returncode == 0 else None


class NetLab:
    """Namespaces, veths and bridges of one test, all named with one random prefix."""

    def __init__(self) -> None:
        existing = set(self._netns_names())
        while True:
            # "nl" + 4 hex: leaves room in the 15-character limit for "-v123" / "-b12".
            self.prefix = "nl" + secrets.token_hex(2)
            if not any(n.startswith(self.prefix) for n in existing):
                break
        self.switch = f"{self.prefix}-sw"
        self.lans: dict[str, Lan] = {}
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._nports = 0
        self._closed = False
        _open_labs.add(self)
        self._add_ns(self.switch)

    @staticmethod
    def _netns_names() -> list[str]:
        out = _run(["ip", "netns", "list"]).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def _add_ns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def lan(self, name: str) -> Lan:
        """A new LAN (bridge) called `name`."""
        if name in self.lans:
            raise ValueError(f"lan {name!r} exists")
        lan = Lan(name, f"{self.prefix}-b{len(self.lans) + 1}")
        _run(["ip", "-n", self.switch, "link", "add", lan.bridge, "type", "bridge"])
        _run(["ip", "-n", self.switch, "link", "set", lan.bridge, "up"])
        self.lans[name] = lan
        return lan

    def host(self, name: str, lan: Lan | str | None, ip: str | None = "10.10.0.1/24") -> Host:
        """A namespace with eth0 on `lan` (address `ip`, CIDR); lan=None gives only `lo`."""
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists")
        host = Host(self, name, f"{self.prefix}-{name}")
        self._add_ns(host.ns)
        self.hosts[name] = host
        if lan is not None:
            self.attach(host, lan, ip, ifname="eth0")
            host.lan = self.lans[lan] if isinstance(lan, str) else lan
            host.ip = ip.split("/")[0] if ip else None
        return host

    def attach(self, host: Host, lan: Lan | str, ip: str | None, *, ifname: str = "eth1") -> str:
        """Plug another interface `ifname` of `host` into `lan` (routers need two)."""
        lan = self.lans[lan] if isinstance(lan, str) else lan
        self._nports += 1
        port = f"{self.prefix}-v{self._nports}"
        sw = ["ip", "-n", self.switch, "link"]
        _run(sw + ["add", port, "type", "veth", "peer", "name", ifname, "netns", host.ns])
        _run(sw + ["set", port, "master", lan.bridge, "up"])
        if ip:
            _run(["ip", "-n", host.ns, "addr", "add", ip, "dev", ifname])
        _run(["ip", "-n", host.ns, "link", "set", ifname, "up"])
        host.ports[ifname] = port
        return port

    def link(self, host: Host, up: bool, *, ifname: str = "eth0") -> None:
        """Unplug (up=False) or replug the host's cable: its switch port goes down or up."""
        _run(["ip", "-n", self.switch, "link", "set", host.ports[ifname],
              "up" if up else "down"])

    def delay(self, host: Host, ms: float, *, ifname: str = "eth0") -> None:
        """Delay every frame on the host's cable by `ms` each way (a user-space delay line in
        the switch, tests/delayline.py: this kernel has no sch_netem). Lasts until close."""
        port = host.ports[ifname]
        bridge = json.loads(_run(["ip", "-n", self.switch, "-j", "link", "show", port]
                                 ).stdout)[0]["master"]
        self._nports += 1
        line, to_bridge = f"{self.prefix}-v{self._nports}", f"{self.prefix}-w{self._nports}"
        sw = ["ip", "-n", self.switch, "link"]
        _run(sw + ["add", line, "type", "veth", "peer", "name", to_bridge])
        _run(sw + ["set", port, "nomaster"])
        _run(sw + ["set", to_bridge, "master", bridge, "up"])
        _run(sw + ["set", line, "up"])
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.switch, sys.executable, "-I",
             str(Path(__file__).with_name("delayline.py")), port, line, str(ms)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
            start_new_session=True)
        self._procs.append(proc)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "delayline ready":
            raise RuntimeError(f"the delay line on {port} did not start")

    def loss(self, host: Host, percent: float, *, ifname: str = "eth0") -> None:
        """Drop `percent` % of the packets the host sends and receives on its cable, at random
        (iptables' statistic match: this kernel has no sch_netem); 0 removes it."""
        for chain, flag in (("INPUT", "-i"), ("OUTPUT", "-o")):
            rule = [chain, flag, ifname, "-m", "statistic", "--mode", "random",
                    "--probability", f"{percent / 100:.4f}", "-j", "DROP"]
            base = ["ip", "netns", "exec", host.ns, "iptables", "-w"]
            _run(base + ["-F", chain])
            if percent > 0:
                _run(base + ["-A", *rule])

    def refuse_tcp(self, host: Host, *, except_port: int, ifname: str = "eth0") -> None:
        """Silently drop every TCP connection attempt reaching `host` on its cable, except to
        `except_port` (a firewall that lets signaling through and nothing else)."""
        _run(["ip", "netns", "exec", host.ns, "iptables", "-w", "-A", "INPUT", "-i", ifname,
              "-p", "tcp", "--syn", "!", "--dport", str(except_port), "-j", "DROP"])

    def dropped(self, host: Host) -> int:
        """Packets the `loss` rules of `host` dropped so far."""
        out = _run(["ip", "netns", "exec", host.ns, "iptables", "-w", "-L", "-v", "-n", "-x"])
        return sum(int(line.split()[0]) for line in out.stdout.splitlines()
                   if "statistic" in line and line.split()[0].isdigit())

    def shape(self, host: Host, rate: str | None, *, direction: str = "both",
              ifname: str = "eth0") -> None:
        """Limit the host's cable to `rate` (e.g. "10mbit") with tbf; None removes it."""
        qdisc = ["tbf", "rate", rate, "burst", "64kb", "latency", "200ms"] if rate else None
        self._qdisc(host, qdisc, direction, ifname)

    def _qdisc(self, host: Host, qdisc: list[str] | None, direction: str, ifname: str) -> None:
        if direction not in ("in", "out", "both"):
            raise ValueError(direction)
        ends = []
        if direction in ("out", "both"):
            ends.append((host.ns, ifname))
        if direction in ("in", "both"):
            ends.append((self.switch, host.ports[ifname]))
        for ns, dev in ends:
            if qdisc is None:
                _run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"],
                     check=False)
                continue
            argv = ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
                    *qdisc]
            proc = _run(argv, check=False)
            if proc.returncode != 0 and "qdisc kind is unknown" in proc.stderr:
                pytest.skip(f"kernel has no {qdisc[0]} qdisc")
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")

    def close(self) -> None:
        """Kill every process, then delete every namespace (their veths and bridges go too)."""
        if self._closed:
            return
        self._closed = True
        _open_labs.discard(self)
        for proc in self._procs:
            _kill_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 3
        for proc in self._procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
                proc.wait(5)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
        for ns in reversed(self._namespaces):
            # Stragglers that left the process group (daemons) would keep the namespace alive.
            for pid in _run(["ip", "netns", "pids", ns], check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _run(["ip", "netns", "del", ns], check=False)

    def leftovers(self) -> list[str]:
        """Namespaces with this lab's prefix that still exist (empty after close)."""
        return [n for n in self._netns_names() if n.startswith(self.prefix)]

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    # Even when the leader has exited, what it spawned may still run in its group.
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


# Labs still open at interpreter exit (a test run interrupted mid-teardown) are closed here.
_open_labs: set[NetLab] = set()
atexit.register(lambda: [lab.close() for lab in list(_open_labs)])


@pytest.fixture
def netlab() -> Iterator[NetLab]:
    """A fresh NetLab per test, torn down whatever the outcome."""
    if not available():
        pytest.skip(SKIP_REASON)
    lab = NetLab()
    try:
        yield lab
    finally:
        lab.close()
