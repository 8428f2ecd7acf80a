"""Restoring from a peer: a member's CLI reads another device's store over a signed WebRTC
session (fetch protocol), found by real mDNS between namespaces or at an address given."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Cli, make_sample_tree, tree_state
from tests.integration.test_peers_lan import start_daemon, stop_all, two_paired_devices

pytestmark = pytest.mark.timeout(180)


def run_in(host, cli: Cli, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`p2pbackup ARGS` for home `cli` inside `host`'s namespace, with the LAN on."""
    proc = host.run(cli.argv(*args), env=dict(cli.env(), P2PBACKUP_LAN="on"),
                    capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"p2pbackup {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def wait_status(cli: Cli, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = cli("status", "--json", check=False)
        if proc.returncode == 0:
            return json.loads(proc.stdout)
        time.sleep(0.2)
    raise AssertionError("the daemon never answered status")


def test_a_paired_device_restores_from_a_peer_found_on_the_lan(netlab, tmp_path: Path):
    ha, hb, a, b, src, a_id = two_paired_devices(
        netlab, tmp_path, lambda src: make_sample_tree(src, big=3_000_000))
    procs = [start_daemon(ha, a, tmp_path, "a")]      # only a's daemon: b holds nothing of a
    try:
        status = wait_status(a)
        a("snapshot")
        assert json.loads(b("snapshots", "--json").stdout) == []
        # Found by mDNS (a's rotating tag), session signed both ways, objects over WebRTC.
        listed = json.loads(run_in(hb, b, "snapshots", "--json", "--from",
                                   f"peer:{a_id[:10]}").stdout)
        assert [s["device"] for s in listed] == [a_id]
        out = run_in(hb, b, "restore", "latest", "--to", str(tmp_path / "out"), "--from",
                     f"peer:{a_id[:10]}")
        assert "restored snapshot" in out.stdout
        assert tree_state(tmp_path / "out" / "src") == tree_state(src)
        # Or at the address its status shows, without mDNS; the peer's copy verifies.
        port = status["lan"]["signaling_port"]
        checked = run_in(hb, b, "verify", "--read-data", "--from",
                         f"peer:{a_id[:10]}@10.10.0.1:{port}")
        assert "no problems found" in checked.stdout
        # Reading is all: b's own store did not change, a's daemon is still fine.
        assert json.loads(b("snapshots", "--json").stdout) == []
        assert wait_status(a)["peers"] is not None
    finally:
        stop_all(procs)


def test_restoring_from_a_peer_that_is_not_there_says_so(netlab, tmp_path: Path):
    ha, hb, a, b, src, a_id = two_paired_devices(netlab, tmp_path,
                                                 lambda src: make_sample_tree(src))
    proc = run_in(hb, b, "restore", "latest", "--to", str(tmp_path / "out"), "--from",
                  f"peer:{a_id[:10]}", check=False)
    assert proc.returncode == 22, proc.stderr
    assert "is not on the LAN" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_in(hb, b, "restore", "latest", "--to", str(tmp_path / "out"), "--from",
                  "peer:nosuchdevice", check=False)
    assert "no device 'nosuchdevice' in this account" in proc.stderr
    assert not (tmp_path / "out").exists()
