"""Peer sessions between namespaces: a member gets a real aiortc data channel; a removed
device is refused at signaling, before any channel exists (the removal issue's "cannot
connect")."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import Cli
from tests.integration.test_pairing import Host


def agent(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.integration.session_agent", *args]


def device_id(cli: Cli, name: str) -> str:
    doc = json.loads(cli("devices", "--json").stdout)
    return next(d["id"] for d in doc["devices"] if d["name"] == name)


def test_members_connect_and_a_removed_device_is_refused(netlab, tmp_path: Path):
    lan = netlab.lan("lan")
    na = netlab.host("a", lan, "10.10.0.1/24")
    nb = netlab.host("b", lan, "10.10.0.2/24")
    nc = netlab.host("c", lan, "10.10.0.3/24")
    a, b, c = (Cli(tmp_path / f"home-{x}") for x in "abc")
    (tmp_path / "src").mkdir()
    a("init", "--source", str(tmp_path / "src"))
    for joiner, name in ((b, "desktop"), (c, "old-phone")):
        host = Host(a)
        joiner("pair", host.code, "--peer", host.peer, "--name", name)
        assert host.finish()[0] == 0
    a("devices", "remove", "old-phone")
    a_id = json.loads(a("devices", "--json").stdout)["devices"][0]["id"]

    server = na.popen(agent("serve", str(a.home), "7400"), stdout=subprocess.PIPE, text=True)
    assert "ready" in json.loads(server.stdout.readline())
    ok = nb.run(agent("connect", str(b.home), "10.10.0.1", "7400", a_id),
                capture_output=True, text=True, timeout=90)
    assert json.loads(ok.stdout.strip().splitlines()[-1]) == {"reply": "ping"}, ok.stderr
    assert json.loads(server.stdout.readline())["connected"] == device_id(a, "desktop")

    refused = nc.run(agent("connect", str(c.home), "10.10.0.1", "7400", a_id),
                     capture_output=True, text=True, timeout=90)
    out = json.loads(refused.stdout.strip().splitlines()[-1])
    assert out["type"] == "PeerNotPaired" and "removed from the account" in out["error"]
    seen = json.loads(server.stdout.readline())
    assert "removed from the account" in seen["refused"]
