"""A device removed with `devices remove` loses its access to the account's storage partner:
the owner's daemon writes the next roster, replicates it to the partner's daemon, and the
partner refuses the removed device's sessions from then on (real daemons and CLIs, real mDNS
and WebRTC between network namespaces)."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.repo.partner_store import load_grants
from p2pbackup.format.roster import roster_name
from tests.conftest import Cli, make_sample_tree
from tests.eventually import eventually_sync
from tests.integration.test_pairing import Host
from tests.integration.test_peer_restore import run_in, wait_status
from tests.integration.test_peers_lan import start_daemon, stop_all

pytestmark = pytest.mark.timeout(240)


def rosters(store: Path) -> set[str]:
    return set(LocalDirStore(store).list_sync("roster/"))


def partner_follows(a: Cli, f: Cli) -> bool:
    """The partner's grant holds the owner's newest roster version."""
    (grant,) = load_grants(f.home)
    return max(rosters(a.home / "store")) == roster_name(grant.roster.seq)


def test_a_removed_device_cannot_read_from_the_partner_any_more(netlab, tmp_path: Path):
    lan = netlab.lan("lan")
    ha, hb, hf = (netlab.host(x, lan, f"10.10.0.{i}/24") for i, x in enumerate("abf", 1))
    a, b, f = (Cli(tmp_path / f"home-{x}") for x in "abf")
    src = tmp_path / "src"
    make_sample_tree(src, big=100_000)
    a("init", "--source", str(src))
    a("snapshot")
    host = Host(a, "--partner", "--quota", "1G")     # roster 1: A; 2: A, partner F named
    f("pair", host.code, "--peer", host.peer, "--name", "friends-nas")
    assert host.finish()[0] == 0
    host = Host(a)                                   # roster 3: A and B
    b("pair", host.code, "--peer", host.peer, "--name", "laptop")
    assert host.finish()[0] == 0
    procs = [start_daemon(ha, a, tmp_path, "a"), start_daemon(hf, f, tmp_path, "f")]
    try:
        wait_status(a), wait_status(f)
        eventually_sync(lambda: partner_follows(a, f), timeout=60)
        read = run_in(hb, b, "snapshots", "--from", "peer:friends-nas", "--json")
        assert read.returncode == 0

        a("devices", "remove", "laptop")               # roster 4: A (through A's daemon)
        assert len(rosters(a.home / "store")) == 4
        eventually_sync(lambda: partner_follows(a, f), timeout=60)

        refused = run_in(hb, b, "snapshots", "--from", "peer:friends-nas", check=False)
        assert refused.returncode == 23, refused.stderr      # PeerNotPaired
        assert "removed" in refused.stderr and "Traceback" not in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    finally:
        stop_all(procs)
    log = (tmp_path / "f.log").read_text()
    assert "it was removed from the account" in log
