"""mDNS between network namespaces: advertise, find by tag, browse updates and removals.

All zeroconf traffic stays inside namespaces the test made: each side is a
`tests.integration.mdns_agent` process started with `ip netns exec`.
"""

from __future__ import annotations

import json
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from p2pbackup.discovery.mdns import decode_txt
from tests.netns import Host, NetLab

REPO = Path(__file__).resolve().parents[2]
PAIR = "_p2pbackup-pair._tcp.local."
TXT = {"v": "1", "tag": "abc"}


class Agent:
    """One mdns_agent process; its JSON stdout lines arrive on a queue."""

    def __init__(self, host: Host, *args: str) -> None:
        self.proc = host.popen([sys.executable, "-m", "tests.integration.mdns_agent", *args],
                               cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self.lines.put(json.loads(line))
        except (ValueError, OSError):
            pass  # the pipe was closed under us at teardown

    def expect(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 8) -> dict:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(msg)
            if pred(msg):
                return msg
        self.proc.kill()
        raise AssertionError(f"no expected line in {timeout}s; seen {self.seen}; "
                             f"stderr: {self.proc.communicate()[1][-2000:]}")

    def send(self, obj: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()


def advertise(host: Host, txt: dict[str, str], port: int = 4242) -> Agent:
    return Agent(host, "advertise", PAIR, str(port), json.dumps(txt))


@pytest.fixture
def two_lans(netlab: NetLab) -> NetLab:
    lan1, lan2 = netlab.lan("home"), netlab.lan("away")
    netlab.host("a", lan1, "10.10.0.1/24")
    netlab.host("b", lan1, "10.10.0.2/24")
    netlab.host("x", lan1, "10.10.0.3/24")
    netlab.host("c", lan2, "10.20.0.1/24")
    return netlab


def test_find_by_tag_on_the_lan_only(two_lans: NetLab):
    h = two_lans.hosts
    ad_a = advertise(h["a"], TXT, port=4242)
    ad_x = advertise(h["x"], {"v": "1", "tag": "other"}, port=4343)
    find_b = Agent(h["b"], "find", PAIR, "abc", "8")
    find_x = Agent(h["b"], "find", PAIR, "other", "8")
    find_c = Agent(h["c"], "find", PAIR, "abc", "3")

    found = find_b.expect(lambda m: "found" in m)["found"]
    assert found["addresses"] == ["10.10.0.1"] and found["port"] == 4242
    assert found["txt"] == TXT
    # The other tag's service is visible, so "abc" really picked A among two.
    assert find_x.expect(lambda m: "found" in m)["found"]["addresses"] == ["10.10.0.3"]
    assert find_c.expect(lambda m: "found" in m)["found"] is None

    # Nothing identifying: random instance and host names, different per advertisement.
    ready_a = ad_a.expect(lambda m: "ready" in m)
    ready_x = ad_x.expect(lambda m: "ready" in m)
    assert ready_a["ready"] == found["name"]
    for ready in (ready_a, ready_x):
        assert socket.gethostname() not in ready["ready"] + ready["server"]
        assert h["a"].ns not in ready["ready"] + ready["server"]
    assert ready_a["ready"].split(".")[0] != ready_x["ready"].split(".")[0]
    assert ready_a["server"] != ready_x["server"]


def test_browser_sees_update_and_removal_and_ignores_other_tags(two_lans: NetLab):
    h = two_lans.hosts
    browse = Agent(h["b"], "browse", PAIR, "abc")
    browse.expect(lambda m: "ready" in m)
    ad_x = advertise(h["x"], {"v": "1", "tag": "other"})
    ad_a = advertise(h["a"], TXT)
    ad_a.expect(lambda m: "ready" in m)
    added = browse.expect(lambda m: "event" in m)
    assert added["event"] == "added" and added["addresses"] == ["10.10.0.1"]
    assert added["txt"] == TXT

    ad_a.send({"v": "1", "tag": "abc", "n": "2"})
    ad_a.expect(lambda m: "updated" in m)
    updated = browse.expect(lambda m: "event" in m)
    assert updated["event"] == "updated" and updated["txt"]["n"] == "2"
    assert updated["name"] == added["name"]

    ad_a.stop()
    ad_a.expect(lambda m: "stopped" in m)
    removed = browse.expect(lambda m: "event" in m)
    assert removed["event"] == "removed" and removed["name"] == added["name"]

    ad_x.expect(lambda m: "ready" in m)
    browse.stop()
    assert browse.proc.wait(10) == 0
    assert all(m.get("txt", {}).get("tag") != "other" for m in browse.seen)


def test_tag_rotated_away_is_removed(two_lans: NetLab):
    h = two_lans.hosts
    browse = Agent(h["b"], "browse", PAIR, "abc")
    browse.expect(lambda m: "ready" in m)
    ad_a = advertise(h["a"], TXT)
    assert browse.expect(lambda m: "event" in m)["event"] == "added"
    ad_a.send({"v": "1", "tag": "def"})
    assert browse.expect(lambda m: "event" in m)["event"] == "removed"


@pytest.mark.parametrize("multicast_flag", [False, True], ids=["plain-lo", "lo-multicast-on"])
def test_loopback_inside_one_namespace(netlab: NetLab, multicast_flag: bool):
    # What a demo on one machine needs: two processes, one namespace with only lo.
    solo = netlab.host("solo", None)
    if multicast_flag:
        solo.run(["ip", "link", "set", "lo", "multicast", "on"], check=True)
    Agent(solo, "advertise", PAIR, "4243", json.dumps(TXT), "lo")
    found = Agent(solo, "find", PAIR, "abc", "8", "lo").expect(lambda m: "found" in m)["found"]
    assert found is not None
    assert found["addresses"] == ["127.0.0.1"] and found["port"] == 4243


def test_txt_decoding_refuses_garbage():
    assert decode_txt({b"v": b"1", b"tag": b"abc"}) == {"v": "1", "tag": "abc"}
    assert decode_txt({}) == {}
    assert decode_txt({b"tag": b"\xff\xfe"}) is None
    assert decode_txt({b"\xff": b"x"}) is None
    assert decode_txt({b"flag": None}) is None
