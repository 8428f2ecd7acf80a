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
            status = json.loads(proc.stdout)
            lan = status.get("lan")
            if not lan or lan.get("signaling_port"):   # the LAN endpoint may still be starting
                return status
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
        # Both on one LAN: the session asked for a direct lane, and the reads took it.
        assert "over the direct lane" in out.stderr, out.stderr
        assert tree_state(tmp_path / "out" / "src") == tree_state(src)
        # Or at the address its status shows, without mDNS; the peer's copy verifies.
        port = status["lan"]["signaling_port"]
        checked = run_in(hb, b, "verify", "--read-data", "--from",
                         f"peer:{a_id[:10]}@10.10.0.1:{port}")
        assert "no problems found" in checked.stdout
        assert "over the direct lane" in checked.stderr, checked.stderr
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


def test_a_new_device_recovers_from_a_peer_with_the_recovery_code(netlab, tmp_path: Path):
    from p2pbackup.crypto import recovery

    lan = netlab.lan("lan")
    ha, hc, hd = (netlab.host(x, lan, f"10.10.0.{i}/24") for i, x in enumerate("acd", 1))
    a, c, d = Cli(tmp_path / "home-a"), Cli(tmp_path / "home-c"), Cli(tmp_path / "home-d")
    src = tmp_path / "src"
    make_sample_tree(src, big=1_000_000)
    a("init", "--source", str(src))
    (tmp_path / "src-d").mkdir()
    d("init", "--source", str(tmp_path / "src-d"))        # another account on the same LAN
    a_id = json.loads(a("devices", "--json").stdout)["devices"][0]["id"]
    code = recovery.encode((a.home / "keys" / "account.key").read_bytes())
    (tmp_path / "code").write_text(code)
    (tmp_path / "d-code").write_text(recovery.encode((d.home / "keys" / "account.key")
                                                     .read_bytes()))
    procs = [start_daemon(ha, a, tmp_path, "a"), start_daemon(hd, d, tmp_path, "d")]
    try:
        wait_status(a), wait_status(d)
        a("snapshot")
        # The code of d's account: only d's daemon lets it in (a refuses it), and that
        # account has no device a. One line, and nothing is left behind.
        wrong = run_in(hc, c, "recover", "--from", f"peer:{a_id[:10]}",
                       "--recovery-code-file", str(tmp_path / "d-code"), check=False)
        assert wrong.returncode == 17, wrong.stderr
        assert f"no device '{a_id[:10]}' in this account" in wrong.stderr
        assert not (c.home / "config.toml").exists()
        # The right code: found on the LAN, a checks the code's signature and lets it read.
        out = run_in(hc, c, "recover", "--from", f"peer:{a_id[:10]}", "--name", "phone",
                     "--recovery-code-file", str(tmp_path / "code"))
        assert "is now listed in the account" in out.stdout, out.stdout
        # a took the new device into its membership (checked, signed by the code's key) ...
        names = [x["name"] for x in json.loads(a("devices", "--json").stdout)["devices"]]
        assert "phone" in names
        # ... so the new device reads as a member now, and restores everything.
        run_in(hc, c, "restore", "latest", "--to", str(tmp_path / "out"), "--from",
               f"peer:{a_id[:10]}")
        assert tree_state(tmp_path / "out" / "src") == tree_state(src)
        assert "no problems found" in a("verify").stdout
    finally:
        stop_all(procs)


def test_a_hostile_member_cannot_crash_the_daemon_or_plant_data(netlab, tmp_path: Path):
    import sys

    ha, hb, a, b, src, a_id = two_paired_devices(netlab, tmp_path,
                                                 lambda src: make_sample_tree(src))
    procs = [start_daemon(ha, a, tmp_path, "a")]
    try:
        port = wait_status(a)["lan"]["signaling_port"]
        a("snapshot")
        before = sorted(p.name for p in (a.home / "store").rglob("*") if p.is_file())
        proc = hb.run([sys.executable, "-m", "tests.integration.hostile_agent", str(b.home),
                       "10.10.0.1", str(port), a_id], env=dict(b.env(), P2PBACKUP_LAN="on"),
                      capture_output=True, text=True, timeout=120, cwd=str(Path.cwd()))
        assert proc.returncode == 0, proc.stderr
        results = {r["attack"]: bytes.fromhex(r["replies"]) for r in
                   map(json.loads, proc.stdout.splitlines())}
        assert set(results) == {"random bytes", "wrong content", "fetch abuse",
                                "objects sent part-way", "unfinished puts"}
        # Each session ends with the reason in words; nothing forged is taken.
        assert b"the peer sent a malformed frame" in results["random bytes"]
        assert b"its content does not match its name" in results["wrong content"]
        assert b"its content does not match its name" in results["fetch abuse"]
        assert b"not a store name" in results["fetch abuse"]
        # Past a session's bounds: the session ends, with one line in the daemon's log each.
        assert b"exceeded a session limit" in results["objects sent part-way"]
        assert b"exceeded a session limit" in results["unfinished puts"]
        limit_lines = [line for line in (tmp_path / "a.log").read_text().splitlines()
                       if "session limit" in line]
        assert len(limit_lines) == 2, limit_lines
        # The daemon still runs, stored nothing, and still serves an honest reader.
        assert procs[0].poll() is None and wait_status(a)["device"]
        assert sorted(p.name for p in (a.home / "store").rglob("*") if p.is_file()) == before
        out = run_in(hb, b, "restore", "latest", "--to", str(tmp_path / "out"), "--from",
                     f"peer:{a_id[:10]}")
        assert "restored snapshot" in out.stdout
        log = (tmp_path / "a.log").read_text()
        assert "Traceback" not in log
    finally:
        stop_all(procs)
    assert "no problems found" in a("verify", "--read-data").stdout


def test_an_object_lost_on_the_way_is_asked_for_again(netlab, tmp_path: Path):
    """A pack whose copy never arrives: the daemon waits `stall_timeout`, asks again, and
    ends up with every object of the peer's snapshot (it verifies and restores)."""
    import sys

    ha, hb, a, b, src, a_id = two_paired_devices(
        netlab, tmp_path, lambda src: make_sample_tree(src, big=3_000_000))
    a("snapshot")  # a holds the data; its objects reach b only through the agent below
    with open(b.home / "config.toml", "a") as f:
        f.write("\n[peers]\nstall_timeout = 2\n")
    b_id = next(d["id"] for d in json.loads(b("devices", "--json").stdout)["devices"]
                if d["this_device"])
    procs = [start_daemon(hb, b, tmp_path, "b")]
    try:
        port = wait_status(b)["lan"]["signaling_port"]
        proc = ha.run([sys.executable, "-m", "tests.integration.withholding_agent", str(a.home),
                       "10.10.0.2", str(port), b_id], env=dict(a.env(), P2PBACKUP_LAN="on"),
                      capture_output=True, text=True, timeout=120, cwd=str(Path.cwd()))
        assert proc.returncode == 0, proc.stderr
        lines = [json.loads(line) for line in proc.stdout.splitlines()]
        withheld, again, acked = lines[0]["withheld"], lines[1], lines[2]
        assert again["sent_again"] == withheld and 1.5 < again["after"] < 30
        assert acked == {"acked": withheld, "asks": 1}
        assert "asked for them again" in (tmp_path / "b.log").read_text()
        assert procs[0].poll() is None
    finally:
        stop_all(procs)
    assert (b.home / "store" / withheld.replace("packs/", f"packs/{withheld[6:8]}/")).exists()
    assert "no problems found" in b("verify", "--read-data").stdout
    snap = json.loads(b("snapshots", "--json").stdout)[0]
    assert snap["device"] == a_id
    b("restore", snap["id"], "--to", str(tmp_path / "out"))
    assert tree_state(tmp_path / "out" / "src") == tree_state(src)
