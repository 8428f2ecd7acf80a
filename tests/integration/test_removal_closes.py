"""A removed device loses its open session and direct lane at once (real daemons in
namespaces): `devices remove` closes them with one log line, not at the next reconnect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.eventually import eventually_sync
from tests.integration.test_peer_restore import wait_status
from tests.integration.test_peers_lan import (peers, start_daemon, stop_all,
                                              two_paired_devices, wait_connected)

pytestmark = pytest.mark.timeout(180)


def connections(host) -> int:
    """Established TCP connections in `host`'s namespace (a daemon's direct lanes: sessions
    run over UDP, signaling connections last a moment)."""
    out = host.run(["ss", "-Htn", "state", "established"], capture_output=True, text=True).stdout
    return len(out.splitlines())


def test_removing_a_device_closes_its_session_and_direct_lane_at_once(netlab, tmp_path: Path):
    ha, hb, a, b, src, a_id = two_paired_devices(netlab, tmp_path, lambda src: src.mkdir())
    b_id = next(d["id"] for d in json.loads(a("devices", "--json").stdout)["devices"]
                if d["name"] == "laptop")
    procs = [start_daemon(ha, a, tmp_path, "a"), start_daemon(hb, b, tmp_path, "b")]
    try:
        wait_status(a)
        wait_connected(a, b_id, 60)
        eventually_sync(lambda: [p["path"] for p in peers(a)] == ["direct lane"], timeout=30)
        eventually_sync(lambda: connections(ha) == 1, timeout=10)

        a("devices", "remove", "laptop")      # through a's daemon
        eventually_sync(lambda: not any(p["connected"] for p in peers(a)), timeout=10)
        eventually_sync(lambda: connections(ha) == 0, timeout=10)
        lines = [line for line in (tmp_path / "a.log").read_text().splitlines()
                 if "no longer in the account" in line]
        assert len(lines) == 1 and "session" in lines[0] and "direct lane" in lines[0], lines
        # The removed device heard why its session ended.
        eventually_sync(lambda: "the peer ended the session: this device was removed from the "
                        "account" in (tmp_path / "b.log").read_text(), timeout=10)
        assert not any(p["connected"] for p in peers(a))
    finally:
        stop_all(procs)
