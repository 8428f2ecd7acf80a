"""The netlab fixture: LANs isolate, links go down and up, teardown leaves nothing behind."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from tests.eventually import eventually_sync
from tests.netns import NetLab, available


def test_same_lan_reaches_other_lan_does_not(netlab: NetLab):
    lan1, lan2 = netlab.lan("home"), netlab.lan("other")
    a = netlab.host("a", lan1, "10.10.0.1/24")
    b = netlab.host("b", lan1, "10.10.0.2/24")
    # Same subnet on purpose: only the bridge separates it from lan1.
    c = netlab.host("c", lan2, "10.10.0.3/24")
    assert a.ping(b.ip) and b.ping(a.ip)
    assert not c.ping(a.ip, timeout=0.5)
    assert not a.ping(c.ip, timeout=0.5)
    assert len(netlab.prefix) + len("-v999") <= 15


def test_link_down_stops_traffic_and_up_restores_it(netlab: NetLab):
    lan = netlab.lan("home")
    a = netlab.host("a", lan, "10.10.0.1/24")
    b = netlab.host("b", lan, "10.10.0.2/24")
    assert a.ping(b.ip)
    netlab.link(b, up=False)
    assert not a.ping(b.ip, timeout=0.5)
    netlab.link(b, up=True)
    assert a.ping(b.ip, timeout=3)



_SINK = r"""
import hashlib, socket, sys
s = socket.socket(); s.bind(("0.0.0.0", 5001)); s.listen(1)
print("listening", flush=True)
c, _ = s.accept(); h = hashlib.sha256()
while d := c.recv(1 << 20):
    h.update(d)
print(h.hexdigest(), flush=True)
"""
_SOURCE = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], 5001))
c.sendall(bytes(range(256)) * (80 * 1024))   # 20 MiB: TCP sends large GSO frames
c.close()
"""


def test_a_delayed_cable_delays_both_ways_and_carries_tcp_intact(netlab: NetLab):
    lan = netlab.lan("home")
    a = netlab.host("a", lan, "10.10.0.1/24")
    b = netlab.host("b", lan, "10.10.0.2/24")
    before = a.rtt_ms(b.ip)
    assert before is not None and before < 20
    netlab.delay(b, 25)
    after = a.rtt_ms(b.ip, timeout=3)
    assert after is not None and after >= 50    # 25 ms each way
    sink = b.popen([sys.executable, "-c", _SINK], stdout=subprocess.PIPE, text=True)
    assert sink.stdout.readline().strip() == "listening"
    a.run([sys.executable, "-c", _SOURCE, b.ip], check=True)
    assert sink.stdout.readline().strip() == \
        hashlib.sha256(bytes(range(256)) * (80 * 1024)).hexdigest()
    netlab.link(b, up=False)                    # the cable still unplugs behind the line
    assert not a.ping(b.ip, timeout=0.5)
    netlab.link(b, up=True)
    assert a.ping(b.ip, timeout=3)

def test_popen_runs_inside_the_namespace(netlab: NetLab):
    a = netlab.host("a", netlab.lan("home"), "10.10.0.7/24")
    out = a.run(["ip", "-4", "-o", "addr", "show", "eth0"], capture_output=True, text=True)
    assert "10.10.0.7/24" in out.stdout
    proc = a.popen([sys.executable, "-c", "import time; time.sleep(60)"],
                   env={"NETLAB_MARK": "1"})
    assert proc.poll() is None

    def inside() -> bool:
        # Popen returns once `ip netns exec` runs, before it has entered the namespace: on a
        # loaded machine the listing can come first (it then lists only itself).
        return str(proc.pid) in a.run(["ip", "netns", "pids", a.ns], capture_output=True,
                                      text=True).stdout.split()

    eventually_sync(inside, timeout=10, interval=0.05)


def test_teardown_removes_everything():
    if not available():
        pytest.skip("network namespaces need root and iproute2 (ip)")
    with NetLab() as lab:
        lan = lab.lan("home")
        a = lab.host("a", lan, "10.10.0.1/24")
        lab.host("b", lab.lan("other"), "10.20.0.1/24")
        proc = a.popen([sys.executable, "-c", "import time; time.sleep(60)"])
        assert len(lab.leftovers()) == 3
    assert proc.returncode is not None
    assert lab.leftovers() == []
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert lab.prefix not in netns and lab.prefix not in links


def test_teardown_after_a_failing_test():
    if not available():
        pytest.skip("network namespaces need root and iproute2 (ip)")
    # A failing body must not skip teardown: provoke one and check from the outside.
    with pytest.raises(ZeroDivisionError):
        with NetLab() as inner:
            inner.host("a", inner.lan("home"))
            1 / 0
    assert inner.leftovers() == []
