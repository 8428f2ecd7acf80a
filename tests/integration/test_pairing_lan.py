"""Pairing over real multicast DNS between network namespaces (two LANs on bridges).

Hosts a and b share one LAN; c sits on another, so it must not even see the advertisement.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import Cli, make_sample_tree, tree_state


def _argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "p2pbackup.cli.main", *args]


def test_pairing_finds_the_other_device_by_mdns_and_not_across_lans(netlab, tmp_path: Path):
    lan1, lan2 = netlab.lan("lan1"), netlab.lan("lan2")
    a = netlab.host("a", lan1, "10.10.0.1/24")
    b = netlab.host("b", lan1, "10.10.0.2/24")
    c = netlab.host("c", lan2, "10.20.0.1/24")
    owner = Cli(tmp_path / "home-a")
    src = tmp_path / "src"
    make_sample_tree(src, big=200_000)
    owner("init", "--source", str(src))
    owner("snapshot")

    host = a.popen(_argv("pair", "--no-qr", "--yes"), env={"P2PBACKUP_HOME": str(owner.home)},
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    code = ""
    deadline = time.monotonic() + 30
    while not code and time.monotonic() < deadline:
        line = host.stdout.readline()
        assert line, host.stderr.read()
        m = re.match(r"Pairing code: (\S+)", line)
        code = m.group(1) if m else ""
    assert code

    # The neighbour on the other LAN looks for the same code at the same time.
    far = c.popen(_argv("pair", code, "--name", "far"),
                  env={"P2PBACKUP_HOME": str(tmp_path / "home-c")},
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    joined = b.run(_argv("pair", code, "--name", "laptop"), capture_output=True, text=True,
                   env={**_env(), "P2PBACKUP_HOME": str(tmp_path / "home-b")})
    assert joined.returncode == 0, joined.stderr
    out, err = host.communicate(timeout=60)
    assert host.returncode == 0, err
    assert "laptop" in out and "joined as owner" in out

    far_out, far_err = far.communicate(timeout=60)
    assert far.returncode == 24 and "no device on this network offers" in far_err
    assert not (tmp_path / "home-c" / "config.toml").exists()

    listed = json.loads(owner("devices", "--json").stdout)
    assert {d["name"] for d in listed["devices"]} == {listed["devices"][0]["name"], "laptop"}
    b_cli = Cli(tmp_path / "home-b")
    b_cli("restore", "latest", "--from", str(owner.home / "store"), "--to", str(tmp_path / "o"))
    assert tree_state(tmp_path / "o" / "src") == tree_state(src)


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
