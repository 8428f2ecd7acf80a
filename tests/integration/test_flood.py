"""A real daemon under a connection flood: a LAN stranger (its own namespace, 16 addresses)
holds ~1,100 idle TCP connections open to each of the daemon's signaling and direct-lane
ports, re-opening whatever is closed. The daemon, started with the usual soft limit of 1024
open files, keeps its descriptors bounded, a paired device still restores from it over the
direct lane while the flood runs, and the idle connections are closed after the handshake
timeout (3 s here, from config.toml)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_sample_tree, tree_state
from tests.eventually import eventually_sync
from tests.integration.test_peer_restore import run_in, wait_status
from tests.integration.test_peers_lan import two_paired_devices

pytestmark = pytest.mark.timeout(240)
FLOOD = 1100
TIMEOUT = 3


def soft_limit_1024() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_flood_of_idle_connections_keeps_no_paired_device_out(netlab, tmp_path: Path):
    ha, hb, a, b, src, a_id = two_paired_devices(
        netlab, tmp_path, lambda src: make_sample_tree(src, big=1_000_000))
    hc = netlab.host("c", netlab.lans["lan"], "10.10.0.3/24")
    sources = [f"10.10.0.{100 + i}" for i in range(16)]
    for ip in sources:
        hc.run(["ip", "addr", "add", f"{ip}/24", "dev", "eth0"], check=True)
    with open(a.home / "config.toml", "a") as f:
        f.write(f"\n[peers]\nhandshake_timeout = {TIMEOUT}\n")
    log = open(tmp_path / "a.log", "ab")
    daemon = ha.popen([sys.executable, "-m", "p2pbackup.daemon.main"],
                      env={"P2PBACKUP_HOME": str(a.home), "P2PBACKUP_LAN": "on"},
                      stdout=log, stderr=log, preexec_fn=soft_limit_1024)
    flood = None
    try:
        signaling = wait_status(a)["lan"]["signaling_port"]
        a("snapshot")
        listening = ha.run(["ss", "-Htln"], capture_output=True, text=True).stdout
        # (the web console listens too, on loopback only: not reachable from the LAN)
        ports = {int(local.rsplit(":", 1)[1]) for local in
                 (line.split()[3] for line in listening.splitlines())
                 if not local.startswith(("127.", "[::1]"))}
        (lane,) = ports - {signaling}
        with open(f"/proc/{daemon.pid}/limits") as f:
            files = next(line for line in f if line.startswith("Max open files")).split()
        assert files[3] == files[4] != "1024"    # the daemon raised its soft limit
        baseline = fds(daemon.pid)

        flood = hc.popen([sys.executable, "-m", "tests.integration.flood_agent", "10.10.0.1",
                          f"{signaling},{lane}", str(FLOOD), *sources],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         cwd=str(Path.cwd()))
        ready = json.loads(flood.stdout.readline())["ready"]
        assert all(p["opened"] + p["failed"] == FLOOD for p in ready), ready

        def status() -> list[dict]:
            flood.stdin.write("status\n")
            flood.stdin.flush()
            return json.loads(flood.stdout.readline())["status"]

        # The daemon closed most at once; the flood is re-opening them.
        eventually_sync(lambda: all(p["opened"] > FLOOD for p in status()), timeout=60)
        assert fds(daemon.pid) < baseline + 2 * 64 + 50   # no more than its caps of them
        out = run_in(hb, b, "restore", "latest", "--to", str(tmp_path / "out"), "--from",
                     f"peer:{a_id[:10]}@10.10.0.1:{signaling}")
        assert "over the direct lane" in out.stderr, out.stderr
        assert tree_state(tmp_path / "out" / "src") == tree_state(src)
        assert fds(daemon.pid) < baseline + 2 * 64 + 50
        # The flood stops re-opening: the daemon closes what it still holds, idle, in time.
        flood.stdin.write("stop\n")
        flood.stdin.flush()
        flood.stdout.readline()
        eventually_sync(lambda: fds(daemon.pid) <= baseline + 30, timeout=TIMEOUT + 4)
        assert daemon.poll() is None
        text = (tmp_path / "a.log").read_text()
        assert "Too many open files" not in text and "Traceback" not in text
        # One line per server and kind of flood, not one per connection.
        assert 1 <= sum("have not authenticated" in line for line in text.splitlines()) <= 4
    finally:
        if flood is not None and flood.poll() is None:
            flood.stdin.close()
            flood.wait(timeout=30)
        daemon.terminate()
        daemon.wait(timeout=60)
        log.close()
