"""An owner forgets and prunes; its peers (a member device and a storage partner, in
namespaces) keep everything until the signed removal record is older than their grace period,
then drop what it lists, and nobody fetches it back."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from p2pbackup.blobs.local import LocalDirStore
from tests.conftest import Cli, make_sample_tree
from tests.integration.test_pairing import Host
from tests.integration.test_peer_restore import wait_status
from tests.integration.test_peers_lan import start_daemon, stop_all

pytestmark = pytest.mark.timeout(180)
GRACE = 15


def names(store: Path, prefix: str) -> set[str]:
    return set(LocalDirStore(store).list_sync(prefix + "/"))


def wait_for(what: str, cond, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_removals_reach_peers_and_wait_for_the_grace_period(netlab, tmp_path: Path):
    lan = netlab.lan("lan")
    ha, hb, hf = (netlab.host(x, lan, f"10.10.0.{i}/24") for i, x in enumerate("abf", 1))
    a, b, f = (Cli(tmp_path / f"home-{x}") for x in "abf")
    src = tmp_path / "src"
    make_sample_tree(src, big=200_000)
    (src / "big.bin").write_bytes(os.urandom(4_000_000))
    a("init", "--source", str(src))
    a("snapshot")
    host = Host(a)
    b("pair", host.code, "--peer", host.peer, "--name", "laptop")
    assert host.finish()[0] == 0
    host = Host(a, "--partner", "--quota", "1G")
    f("pair", host.code, "--peer", host.peer, "--name", "friends-nas")
    assert host.finish()[0] == 0
    for cli in (b, f):
        with open(cli.home / "config.toml", "a") as fh:
            fh.write(f"\n[peers]\nremoval_grace = {GRACE}\n")
    account = next((f.home / "partners").glob("*.grant")).stem
    kept = f.home / "partners" / account / "store"
    (src / "big.bin").write_bytes(os.urandom(4_000_000))   # the first version's pack goes
    a("snapshot")
    old, new = (s["id"] for s in json.loads(a("snapshots", "--json").stdout))
    procs = [start_daemon(h, c, tmp_path, n) for h, c, n in ((ha, a, "a"), (hb, b, "b"),
                                                             (hf, f, "f"))]
    try:
        for c in (a, b, f):
            wait_status(c)
        both = {f"snapshots/{old}", f"snapshots/{new}"}
        wait_for("both snapshots on both peers", lambda: both <= names(b.home / "store",
                 "snapshots") and both <= names(kept, "snapshots"))
        packs_before = names(a.home / "store", "packs")
        wait_for("every pack on the partner", lambda: packs_before <= names(kept, "packs"))

        out = json.loads(a("forget", "--keep-last", "1", "--prune", "--json").stdout)
        removed_at = time.monotonic()
        assert out["forgotten"] == [old] and out["removal"].startswith("removals/")
        gone_packs = packs_before - names(a.home / "store", "packs")
        assert gone_packs, f"the test needs prune to delete a pack: {out}"
        # The record reaches both peers at once, but they keep everything for the grace period.
        wait_for("the removal record on both peers", lambda: out["removal"] in
                 names(b.home / "store", "removals") and out["removal"] in names(kept,
                                                                                  "removals"))
        assert f"snapshots/{old}" in names(b.home / "store", "snapshots")
        assert gone_packs <= names(kept, "packs")
        assert time.monotonic() - removed_at < GRACE
        # After it: the member drops the forgotten snapshot, the partner everything listed.
        wait_for("the member to drop the snapshot", lambda: f"snapshots/{old}" not in
                 names(b.home / "store", "snapshots"))
        wait_for("the partner to drop snapshot and packs", lambda: not (
            {f"snapshots/{old}"} | gone_packs) & (names(kept, "snapshots") | names(kept, "packs")))
        assert time.monotonic() - removed_at >= GRACE - 1
        time.sleep(2)   # nobody fetches any of it back from anybody
        assert f"snapshots/{old}" not in names(a.home / "store", "snapshots")
        assert not gone_packs & names(a.home / "store", "packs")
        assert f"snapshots/{new}" in names(b.home / "store", "snapshots") | names(kept,
                                                                                   "snapshots")
    finally:
        stop_all(procs)
    assert [s["id"] for s in json.loads(b("snapshots", "--json").stdout)] == [new]
    # The member's own prune then frees the data only the forgotten snapshot used; what is
    # left verifies on every device.
    pruned = json.loads(b("prune", "--json").stdout)["prune"]
    assert pruned["packs_held"] == 0
    assert not gone_packs & names(b.home / "store", "packs")
    for cli in (a, b):
        assert "no problems found" in cli("verify", "--read-data").stdout
