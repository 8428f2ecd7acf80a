"""A damaged pack healed from a paired device: `repair --from peer:DEVICE` through the real
CLI, and the daemon on its own (it finds the damage when it opens its store and gets the
intact copy at the next session). Real daemons, real mDNS, in network namespaces."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import Cli, make_sample_tree, tree_state
from tests.eventually import eventually_sync
from tests.integration.test_peer_restore import run_in, wait_status
from tests.integration.test_peers_lan import (start_daemon, stop_all, two_paired_devices,
                                              wait_connected, wait_replicated)

pytestmark = pytest.mark.timeout(240)


def _flip(cli: Cli, name: str) -> bytes:
    """Flip one byte a third of the way into pack `name` of `cli`'s store; returns the
    intact bytes."""
    path = next((cli.home / "store" / "packs").rglob(name))
    intact = path.read_bytes()
    damaged = bytearray(intact)
    damaged[len(damaged) // 3] ^= 0x40
    path.write_bytes(damaged)
    return intact


def test_a_damaged_pack_is_healed_from_a_peer(netlab, tmp_path: Path):
    ha, hb, a, b, src, a_id = two_paired_devices(
        netlab, tmp_path, lambda src: make_sample_tree(src, big=2_000_000))
    procs = [start_daemon(ha, a, tmp_path, "a"), start_daemon(hb, b, tmp_path, "b")]
    try:
        wait_status(a)
        wait_connected(b, a_id, 30)
        a("snapshot")
        wait_replicated(a, b, 60)
        stop_all([procs.pop()])                       # b's daemon holds b's writer lock
        pack = max((b.home / "store" / "packs").rglob("*"), key=lambda p: p.stat().st_size
                   if p.is_file() else -1).name
        intact = _flip(b, pack)
        assert b("verify", "--read-data", check=False).returncode == 13

        # 1. By hand: repair reads the intact copy from a's daemon (found by mDNS).
        out = run_in(hb, b, "repair", "--from", f"peer:{a_id[:10]}")
        assert f"pack {pack[:12]}" in out.stdout and "replaced by the intact copy from peer" \
            in out.stdout, out.stdout
        assert "no problems found" in b("verify", "--read-data").stdout
        b("restore", "latest", "--to", str(tmp_path / "out"))
        assert tree_state(tmp_path / "out" / "src") == tree_state(src)

        # 2. On its own: the damage found when b's daemon opens its store (its index cache
        # was lost), the pack left out of b's inventory, a's copy sent at the next session.
        _flip(b, pack)
        shutil.rmtree(b.home / "cache")
        procs.append(start_daemon(hb, b, tmp_path, "b"))
        store_b = next((b.home / "store" / "packs").rglob(pack))
        eventually_sync(lambda: store_b.read_bytes() == intact, timeout=60, interval=0.3)
        stop_all([procs.pop()])
        assert "no problems found" in b("verify", "--read-data").stdout
        log = (tmp_path / "b.log").read_text()
        assert f"pack {pack[:12]} is damaged" in log and "healed" in log, log
    finally:
        stop_all(procs)
