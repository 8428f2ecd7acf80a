"""A storage partner (a friend's device, no key) receives the account's ciphertext by
replication between namespaces, within its quota, and serves it back for a restore."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.conftest import Cli, make_sample_tree, tree_state
from tests.integration.test_pairing import Host
from tests.integration.test_peer_restore import run_in, wait_status
from tests.integration.test_peers_lan import start_daemon, stop_all

pytestmark = pytest.mark.timeout(180)
MARKER = b"PLAINTEXT-THE-PARTNER-MUST-NEVER-SEE-7f3a"


def objects(store: Path) -> set[str]:
    return {str(p.relative_to(store)) for p in store.rglob("*") if p.is_file()
            and p.relative_to(store).parts[0] in ("config", "membership", "devices", "packs",
                                                  "snapshots", "segments", "heads", "keyring")}


def with_partner(netlab, tmp_path: Path, quota: str):
    lan = netlab.lan("lan")
    ha, hf = netlab.host("a", lan, "10.10.0.1/24"), netlab.host("f", lan, "10.10.0.2/24")
    a, friend = Cli(tmp_path / "home-a"), Cli(tmp_path / "home-friend")
    src = tmp_path / "src"
    make_sample_tree(src, big=2_000_000)
    (src / "secret.txt").write_bytes(MARKER * 50)
    a("init", "--source", str(src))
    host = Host(a, "--partner", "--quota", quota)
    friend("pair", host.code, "--peer", host.peer, "--name", "friends-nas")
    assert host.finish()[0] == 0
    account = next((friend.home / "partners").glob("*.grant")).stem
    return ha, hf, a, friend, src, friend.home / "partners" / account / "store"


def test_a_partner_keeps_only_ciphertext_and_serves_it_back(netlab, tmp_path: Path):
    ha, hf, a, friend, src, kept = with_partner(netlab, tmp_path, "50M")
    procs = [start_daemon(ha, a, tmp_path, "a"), start_daemon(hf, friend, tmp_path, "f")]
    try:
        wait_status(a), wait_status(friend)
        a("snapshot")
        want = objects(a.home / "store")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not want <= objects(kept):
            time.sleep(0.3)
        assert want <= objects(kept), f"missing on the partner: {sorted(want - objects(kept))}"
        for p in kept.rglob("*"):
            assert not p.is_file() or MARKER not in p.read_bytes(), p
        assert "storage partner for account" in friend("status").stdout
        assert "peer friends-nas" in a("status").stdout
        # The partner serves it back: a restore from it equals the source tree.
        run_in(ha, a, "restore", "latest", "--to", str(tmp_path / "out"), "--from",
               "peer:friends-nas")
        assert tree_state(tmp_path / "out" / "src") == tree_state(src)
    finally:
        stop_all(procs)


def test_a_partner_over_its_quota_says_so_and_loses_nothing(netlab, tmp_path: Path):
    ha, hf, a, friend, src, kept = with_partner(netlab, tmp_path, "300K")
    procs = [start_daemon(ha, a, tmp_path, "a"), start_daemon(hf, friend, tmp_path, "f")]
    try:
        wait_status(a), wait_status(friend)
        a("snapshot")
        deadline = time.monotonic() + 60
        peer: dict = {}
        while time.monotonic() < deadline:
            peer = next((p for p in wait_status(a)["peers"] if p["name"] == "friends-nas"), {})
            if "quota exceeded" in (peer.get("error") or ""):
                break
            time.sleep(0.3)
        assert "quota exceeded" in (peer.get("error") or ""), peer
        assert "of the 300.0 KiB granted" in peer["error"]
        assert "quota exceeded" in a("status").stdout
        used = sum(p.stat().st_size for p in kept.rglob("*") if p.is_file())
        assert 0 < used <= 300 * 1024
        # Both daemons still run; the owner's repository is whole.
        assert json.loads(friend("status", "--json").stdout)["partner_for"][0]["used"] == used
        assert os.path.exists(a.home / "store" / "config")
    finally:
        stop_all(procs)
    assert "no problems found" in a("verify", "--read-data").stdout


def test_a_partner_paired_while_its_daemon_runs_serves_the_account_without_a_restart(
        netlab, tmp_path: Path):
    """A friend's device that backs up its own account is paired as a storage partner while
    its daemon runs: the daemon takes the new grant at once (the pairing tells it), listens and
    advertises for that account, and receives its ciphertext. It did so only after a restart."""
    from tests.eventually import eventually_sync

    lan = netlab.lan("lan")
    ha, hf = netlab.host("a", lan, "10.10.0.1/24"), netlab.host("f", lan, "10.10.0.2/24")
    a, friend = Cli(tmp_path / "home-a"), Cli(tmp_path / "home-friend")
    src, own = tmp_path / "src", tmp_path / "friends-own"
    make_sample_tree(src, big=300_000)
    make_sample_tree(own, big=1000)
    a("init", "--source", str(src))
    friend("init", "--source", str(own))
    procs = [start_daemon(hf, friend, tmp_path, "f")]
    try:
        wait_status(friend)
        host = Host(a, "--partner", "--quota", "50M")
        paired = friend("pair", host.code, "--peer", host.peer, "--name", "friends-nas")
        assert host.finish()[0] == 0
        assert "p2pbackupd is not running" not in paired.stderr + paired.stdout
        account = next((friend.home / "partners").glob("*.grant")).stem
        assert any(g["account"] == account for g in wait_status(friend)["partner_for"])
        procs.append(start_daemon(ha, a, tmp_path, "a"))
        wait_status(a)
        a("snapshot")
        want, kept = objects(a.home / "store"), friend.home / "partners" / account / "store"
        eventually_sync(lambda: want <= objects(kept), timeout=90, interval=0.3)
    finally:
        stop_all(procs)
