"""Daemons find each other on a LAN (real mDNS between namespaces) and open signed sessions;
a daemon of another account on the same LAN is ignored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Cli
from tests.integration.test_pairing import Host


def start_daemon(host, cli: Cli, tmp_path: Path, name: str) -> subprocess.Popen:
    log = open(tmp_path / f"{name}.log", "ab")
    return host.popen([sys.executable, "-m", "p2pbackup.daemon.main"],
                      env={"P2PBACKUP_HOME": str(cli.home), "P2PBACKUP_LAN": "on"},
                      stdout=log, stderr=log)


def peers(cli: Cli) -> list[dict]:
    proc = cli("status", "--json", check=False)
    return json.loads(proc.stdout)["peers"] if proc.returncode == 0 else []


def wait_connected(cli: Cli, device: str, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if any(p["device"] == device and p["connected"] for p in peers(cli)):
            return time.monotonic() - start
        time.sleep(0.2)
    raise AssertionError(f"{device[:12]} not connected after {timeout} s: {peers(cli)}")


def two_paired_devices(netlab, tmp_path: Path, fill, *, direct_lane: bool = True,
                       seal_interval: int | None = None):
    """Hosts a and b on one bridge; home a (sources filled by `fill`) paired with home b."""
    lan = netlab.lan("lan")
    ha, hb = netlab.host("a", lan, "10.10.0.1/24"), netlab.host("b", lan, "10.10.0.2/24")
    return (ha, hb, *paired_homes(tmp_path, fill, direct_lane=direct_lane,
                                  seal_interval=seal_interval))


def paired_homes(tmp_path: Path, fill, *, direct_lane: bool = True,
                 seal_interval: int | None = None):
    """Home a (sources filled by `fill`) paired with home b: (a, b, src, a's device id)."""
    a, b = Cli(tmp_path / "home-a"), Cli(tmp_path / "home-b")
    src = tmp_path / "src"
    fill(src)
    a("init", "--source", str(src))
    host = Host(a)
    b("pair", host.code, "--peer", host.peer, "--name", "laptop")
    assert host.finish()[0] == 0
    for cli in (a, b):
        with open(cli.home / "config.toml", "a") as f:
            if not direct_lane:
                f.write("\n[peers]\ndirect_lane = false\n")
            if seal_interval and cli is a:
                f.write(f"\n[daemon]\nseal_interval = {seal_interval}\n")
    a_id = json.loads(a("devices", "--json").stdout)["devices"][0]["id"]
    return a, b, src, a_id


def paired_with_random_files(netlab, tmp_path: Path, n: int, size: int, direct_lane: bool):
    """two_paired_devices whose source holds `n` random files of `size` bytes, snapshotted."""
    def fill(src: Path) -> None:
        src.mkdir()
        for i in range(n):
            (src / f"f{i}.bin").write_bytes(os.urandom(size))

    ha, hb, a, b, src, a_id = two_paired_devices(netlab, tmp_path, fill,
                                                 direct_lane=direct_lane)
    a("snapshot")
    return ha, hb, a, b, src, a_id


def pack_names(cli: Cli) -> set[str]:
    packs = cli.home / "store" / "packs"
    return {p.name for p in packs.rglob("*") if p.is_file()} if packs.exists() else set()


def wait_replicated(a: Cli, b: Cli, timeout: float) -> None:
    """Until b holds every pack of a and a snapshot."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pack_names(a) <= pack_names(b) and json.loads(b("snapshots", "--json").stdout):
            return
        time.sleep(0.5)
    raise AssertionError(f"replication did not finish: {peers(b)}")


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        assert p.wait(timeout=30) == 0


def test_paired_daemons_find_each_other_and_strangers_are_ignored(netlab, tmp_path: Path):
    lan = netlab.lan("lan")
    hosts = {x: netlab.host(x, lan, f"10.10.0.{i}/24") for i, x in enumerate("abd", 1)}
    a, b, d = (Cli(tmp_path / f"home-{x}") for x in "abd")
    for cli in (a, b, d):
        src = tmp_path / f"src-{cli.home.name}"
        src.mkdir()
    a("init", "--source", str(tmp_path / "src-home-a"))
    d("init", "--source", str(tmp_path / "src-home-d"))   # another account
    host = Host(a)
    b("pair", host.code, "--peer", host.peer, "--name", "laptop")
    assert host.finish()[0] == 0
    ids = {d_["name"]: d_["id"] for d_ in json.loads(a("devices", "--json").stdout)["devices"]}

    procs = [start_daemon(hosts[x], cli, tmp_path, x) for x, cli in (("a", a), ("b", b),
                                                                      ("d", d))]
    try:
        took = wait_connected(a, ids["laptop"], 30)
        wait_connected(b, next(i for n, i in ids.items() if n != "laptop"), 10)
        time.sleep(2)
        # Same LAN: bulk moved to the direct lane (TLS, certificates pinned in the session).
        assert [p for p in peers(a) if p["connected"]][0]["path"] == "direct lane"
        assert peers(d) == []                                   # nothing of another account
        assert {p["device"] for p in peers(a)} == {ids["laptop"]}
        text = a("status").stdout
        assert "peer laptop" in text and "connected over the direct lane" in text
        print(f"discovered and connected in {took:.1f} s")
    finally:
        stop_all(procs)


@pytest.mark.parametrize("direct_lane", [True, False], ids=["direct-lane", "webrtc-only"])
def test_paired_daemons_replicate_and_the_other_device_restores(netlab, tmp_path: Path,
                                                                direct_lane: bool):
    from tests.conftest import make_sample_tree, tree_state

    def fill(src: Path) -> None:
        make_sample_tree(src, big=2_000_000)
        for name in os.listdir(os.fsencode(src)):  # inotify, not the rescan fallback, here
            try:
                name.decode()
            except UnicodeDecodeError:
                os.unlink(os.path.join(os.fsencode(src), name))

    ha, hb, a, b, src, a_id = two_paired_devices(netlab, tmp_path, fill,
                                                 direct_lane=direct_lane, seal_interval=1)
    procs = [start_daemon(ha, a, tmp_path, "a"), start_daemon(hb, b, tmp_path, "b")]
    try:
        wait_connected(b, a_id, 30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            snaps = json.loads(b("snapshots", "--json").stdout)
            if any(s["device"] == a_id for s in snaps):
                break
            time.sleep(0.3)
        else:
            raise AssertionError("the other device's snapshot never arrived")
        # A change on a is sealed, announced and pulled by b within seconds (push).
        (src / "new.txt").write_text("made after the first sync\n")
        seg_dir = b.home / "store" / "segments" / a_id
        start = time.monotonic()
        while time.monotonic() - start < 60 and not (seg_dir.exists() and any(seg_dir.iterdir())):
            time.sleep(0.1)
        assert seg_dir.exists() and any(seg_dir.iterdir()), "no segment reached b"
        print(f"segment reached the peer {time.monotonic() - start:.1f} s after the write")
        path = next(p["path"] for p in peers(b) if p["device"] == a_id)
        assert path == ("direct lane" if direct_lane else "data channel")
        # One LAN: the data channel's ICE pair is host to host, and status says so.
        assert next(p["ice_path"] for p in peers(b) if p["device"] == a_id) == "host"
        if not direct_lane:
            assert "connected over the data channel (LAN)" in b("status").stdout
    finally:
        stop_all(procs)
    # b restores a's data from its own store, and its store verifies.
    b("restore", "latest", "--to", str(tmp_path / "out"))
    expected = tree_state(src)
    expected.pop(b"new.txt", None)
    got = tree_state(tmp_path / "out" / "src")
    got.pop(b"new.txt", None)
    assert got == expected
    assert "no problems found" in b("verify", "--read-data").stdout


@pytest.mark.parametrize("direct_lane", [True, False], ids=["direct-lane", "webrtc-only"])
def test_replication_survives_the_link_dropping_mid_transfer(netlab, tmp_path: Path,
                                                             direct_lane: bool):
    from tests.conftest import tree_state

    ha, hb, a, b, src, a_id = paired_with_random_files(netlab, tmp_path, 12, 4_000_000,
                                                       direct_lane)

    def pack_count() -> int:
        return len(pack_names(b))

    netlab.shape(hb, "64mbit")  # ~8 MB/s: the 48 MB take seconds, so the drop lands mid-way
    procs = [start_daemon(ha, a, tmp_path, "a"), start_daemon(hb, b, tmp_path, "b")]
    try:
        wait_connected(b, a_id, 30)
        deadline = time.monotonic() + 60
        while pack_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pack_count() < 3, "the transfer finished before the link could drop"
        netlab.link(hb, False)       # the cable is pulled mid-transfer...
        time.sleep(3)
        netlab.link(hb, True)        # ...and plugged back in
        wait_replicated(a, b, 120)
    finally:
        stop_all(procs)
    assert "no problems found" in b("verify", "--read-data").stdout
    assert "no problems found" in a("verify", "--read-data").stdout
    b("restore", "latest", "--to", str(tmp_path / "out"))
    assert tree_state(tmp_path / "out" / "src") == tree_state(src)


@pytest.mark.parametrize("direct_lane", [True, False], ids=["direct-lane", "webrtc-only"])
def test_replication_completes_over_a_lossy_slow_link(netlab, tmp_path: Path,
                                                     direct_lane: bool):
    """5% of the packets either way are dropped and every frame waits 20 ms each way, for the
    whole run (iptables and a user-space delay line: this kernel has no sch_netem):
    discovery, signaling and transfer still complete."""
    from tests.conftest import tree_state

    ha, hb, a, b, src, a_id = paired_with_random_files(netlab, tmp_path, 5, 2_000_000,
                                                       direct_lane)
    netlab.delay(hb, 20)
    rtt = ha.rtt_ms(hb.ip)
    assert rtt is not None and rtt >= 40, f"round trip {rtt} ms: the delay line is not in place"
    netlab.loss(hb, 5)
    procs = [start_daemon(ha, a, tmp_path, "a"), start_daemon(hb, b, tmp_path, "b")]
    try:
        wait_connected(b, a_id, 60)
        wait_replicated(a, b, 150)
        path = next(p["path"] for p in peers(b) if p["device"] == a_id)
        assert path == ("direct lane" if direct_lane else "data channel")
        assert netlab.dropped(hb) > 0, "the loss rules dropped nothing"
    finally:
        stop_all(procs)
    assert "no problems found" in b("verify", "--read-data").stdout
    b("restore", "latest", "--to", str(tmp_path / "out"))
    assert tree_state(tmp_path / "out" / "src") == tree_state(src)


def test_a_direct_lane_that_cannot_connect_leaves_the_transfer_on_the_data_channel(
        netlab, tmp_path: Path):
    """Both sides offer a lane, but a firewall drops every TCP connection except signaling:
    objects wait for the lane only briefly, then all go over the data channel."""
    from tests.conftest import tree_state

    ha, hb, a, b, src, a_id = paired_with_random_files(netlab, tmp_path, 3, 500_000, True)
    for cli in (a, b):
        with open(cli.home / "config.toml", "a") as f:
            f.write("\n[peers]\nport = 47000\n")
    for host in (ha, hb):
        netlab.refuse_tcp(host, except_port=47000)
    procs = [start_daemon(ha, a, tmp_path, "a"), start_daemon(hb, b, tmp_path, "b")]
    try:
        wait_connected(b, a_id, 30)
        wait_replicated(a, b, 60)
        path = next(p["path"] for p in peers(b) if p["device"] == a_id)
        assert path == "data channel"
    finally:
        stop_all(procs)
    logs = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    assert "no direct lane within" in logs     # the wait ended; nothing was stranded
    assert "bulk moved to the direct lane" not in logs
    b("restore", "latest", "--to", str(tmp_path / "out"))
    assert tree_state(tmp_path / "out" / "src") == tree_state(src)


def test_a_running_daemon_takes_the_new_key_epoch_when_a_removal_reaches_it(netlab,
                                                                            tmp_path: Path):
    """b's daemon learns of a removal done on a by replication and, without a restart, takes
    the key epoch granted to it (the membership versions sealed in it open only then)."""
    from p2pbackup.config import load_config, load_keys

    def fill(src: Path) -> None:
        src.mkdir()
        (src / "f.txt").write_text("hello\n")

    ha, hb, a, b, _, a_id = two_paired_devices(netlab, tmp_path, fill)
    c = Cli(tmp_path / "home-c")
    host = Host(a)
    c("pair", host.code, "--peer", host.peer, "--name", "old-phone")
    assert host.finish()[0] == 0
    a("snapshot")   # so a's daemon takes none at start: only the removal has news for b
    procs = [start_daemon(ha, a, tmp_path, "a"), start_daemon(hb, b, tmp_path, "b")]
    try:
        wait_connected(b, a_id, 30)
        a("devices", "remove", "old-phone")      # through a's daemon
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and \
                load_keys(load_config(b.home))[0].epoch != 1:
            time.sleep(0.3)
        assert load_keys(load_config(b.home))[0].epoch == 1
    finally:
        stop_all(procs)
    assert "took the keys of key epoch 1" in (tmp_path / "b.log").read_text()
