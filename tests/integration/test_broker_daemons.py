"""Two daemons with LAN discovery off and one real `p2pbackup-broker`: they find each other
through the broker, replicate over a session it signaled, and a seal reaches the peer as a push;
a device's CLI restores from the other through the broker while its own daemon holds the
device's broker socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.adversary.accounts import pair
from tests.conftest import Cli, tree_state
from tests.eventually import eventually_sync
from tests.integration.test_daemon import Daemon
from tests.servers import RunningBroker, broker_server

pytestmark = pytest.mark.timeout(240)


def through_broker(cli: Cli, url: str) -> None:
    with open(cli.home / "config.toml", "a") as f:
        f.write(f'\n[daemon]\nseal_interval = 1\n\n[peers]\nlan = false\ninterfaces = ["lo"]\n'
                f'\n[broker]\nurl = "{url}"\n')


def status(cli: Cli) -> dict:
    return json.loads(cli("status", "--json").stdout)


@contextlib.contextmanager
def two_daemons(tmp_path: Path) -> Iterator[tuple[Cli, Cli, str, str, Path, RunningBroker]]:
    """Devices a (with a source) and b, LAN discovery off, their daemons connected to one
    broker: (a, b, a's id, b's id, a's source, the broker)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("from the laptop\n")
    a, b = Cli(tmp_path / "a"), Cli(tmp_path / "b")
    a("init", "--source", str(src))
    b_id = asyncio.run(pair(a.home, b.home, "desktop"))
    a_id = status_free_device_id(a)
    with broker_server(tmp_path / "broker") as broker:
        for c in (a, b):
            through_broker(c, broker.url)
        (tmp_path / "da").mkdir()
        (tmp_path / "db").mkdir()
        da, db = Daemon(a, tmp_path / "da"), Daemon(b, tmp_path / "db")
        try:
            da.wait_for("READY=1", 60)
            db.wait_for("READY=1", 60)
            for c in (a, b):
                eventually_sync(lambda: broker_connected(c), 60)
            yield a, b, a_id, b_id, src, broker
        finally:
            for d in (da, db):
                d.stop()


def broker_connected(cli: Cli) -> bool:
    return bool((status(cli).get("broker") or {}).get("connected"))


def test_two_daemons_replicate_through_broker_signaling_and_hear_pushes(tmp_path: Path):
    with two_daemons(tmp_path) as (a, b, a_id, b_id, src, broker):
        assert "broker" in a("status").stdout and "connected" in a("status").stdout

        def peer_connected(c: Cli, other: str) -> bool:
            return any(p["device"] == other and p["connected"]
                       for p in status(c)["peers"])
        eventually_sync(lambda: peer_connected(a, b_id) and peer_connected(b, a_id), 90)
        # A's first snapshot reaches B over the session the broker signaled.
        snapshots = b.home / "store" / "snapshots"
        eventually_sync(lambda: snapshots.is_dir() and any(snapshots.iterdir()), 90)
        # A seals a change: B hears it through the broker, and its segment arrives.
        (src / "b.txt").write_text("sealed later\n")
        eventually_sync(lambda: "has new data (broker push)" in
                        (tmp_path / "db" / "daemon.log").read_text(errors="replace"), 60)
        eventually_sync(lambda: (b.home / "store" / "heads" / a_id).exists(), 60)
        assert "account" in broker.log_text() and "registered" in broker.log_text()


def test_a_restore_from_a_peer_through_the_broker_beside_this_devices_daemon(tmp_path: Path):
    with two_daemons(tmp_path) as (a, b, a_id, b_id, src, broker):
        eventually_sync(lambda: a("snapshots", check=False).returncode == 0 and
                        "src" in a("snapshots").stdout, 60)
        restored = b("restore", "latest", "--from", f"peer:{a_id[:8]}", "--to",
                     str(tmp_path / "out"))
        assert "restored snapshot" in restored.stdout
        assert tree_state(tmp_path / "out" / "src") == tree_state(src)
        listed = b("snapshots", "--from", f"peer:{a_id[:8]}")
        assert "src" in listed.stdout
        # b's daemon kept its socket: the CLI signaled through it, it opened none of its own
        assert broker_connected(b)
        assert "replaced by a newer socket" not in \
            (tmp_path / "db" / "daemon.log").read_text(errors="replace")


def status_free_device_id(cli: Cli) -> str:
    doc = json.loads(cli("devices", "--json").stdout)
    return next(d["id"] for d in doc["devices"] if d.get("this_device") or d.get("current")
                or d["name"] != "desktop")
