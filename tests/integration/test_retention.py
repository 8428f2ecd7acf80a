"""forget and prune: the right snapshots go, the rest still restores, kill -9 is harmless."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

from tests.conftest import Cli, tree_state


def _make(src: Path, n: int, size: int, seed: int) -> None:
    rng = random.Random(seed)
    src.mkdir(exist_ok=True)
    for i in range(n):
        (src / f"f{i:03d}.bin").write_bytes(rng.randbytes(size))


def test_forget_and_prune_keep_what_the_policy_keeps(cli: Cli, tmp_path: Path):
    src = tmp_path / "src"
    _make(src, 20, 300_000, 1)
    cli("init", "--source", str(src))
    states = []
    for round_ in range(4):
        for f in list(src.iterdir())[: 5]:
            f.unlink()
        _make(src, 5 + round_ * 5, 300_000, 10 + round_)
        states.append((json.loads(cli("snapshot", "--json").stdout)["id"], tree_state(src)))
    store = cli.home / "store"
    size_before = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    out = json.loads(cli("forget", "--keep-last", "2", "--prune", "--json").stdout)
    assert out["forgotten"] == [states[0][0], states[1][0]]
    assert out["kept"] == [states[2][0], states[3][0]]
    assert out["prune"]["packs_deleted"] + out["prune"]["packs_repacked"] >= 1
    size_after = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    assert size_after < size_before
    assert "no problems found" in cli("verify", "--read-data").stdout
    for sid, state in states[2:]:
        cli("restore", sid, "--to", str(tmp_path / sid[:8]))
        assert tree_state(tmp_path / sid[:8] / "src") == state
    again = json.loads(cli("prune", "--json").stdout)["prune"]
    assert again["packs_deleted"] == 0 and again["blobs_dropped"] == 0  # nothing left to drop
    refused = cli("forget", check=False)
    assert refused.returncode == 10 and "--keep" in refused.stderr


def test_kill_9_during_prune_leaves_a_repository_that_verifies(cli: Cli, tmp_path: Path):
    src = tmp_path / "src"
    _make(src, 40, 1_000_000, 2)
    cli("init", "--source", str(src))
    cli("snapshot")
    for f in list(src.iterdir())[:30]:
        f.unlink()
    _make(src, 3, 1_000_000, 3)
    final = json.loads(cli("snapshot", "--json").stdout)["id"]
    expected = tree_state(src)
    cli("forget", "--keep-last", "1")
    packs = cli.home / "store" / "packs"
    before = {p.name for p in packs.rglob("*") if p.is_file()}
    # Kill at the most delicate moment: the repacked pack is written, the old ones not yet gone.
    proc = cli.popen("prune")
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        if {p.name for p in packs.rglob("*") if p.is_file() and not p.name.endswith(".tmp")} - before:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    killed_mid_prune = proc.wait() == -signal.SIGKILL
    assert "no problems found" in cli("verify", "--read-data").stdout
    rng = random.Random(7)
    for attempt in range(3):  # and at random moments
        proc = cli.popen("prune")
        time.sleep(rng.uniform(0.2, 0.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert "no problems found" in cli("verify", "--read-data").stdout, attempt
    assert killed_mid_prune, "prune finished before it could be killed mid-way"
    cli("prune")
    assert "no problems found" in cli("verify", "--read-data").stdout
    cli("restore", final, "--to", str(tmp_path / "out"))
    assert tree_state(tmp_path / "out" / "src") == expected
    assert not list((cli.home / "store").rglob("*.tmp"))
    assert os.path.exists(cli.home / "store" / "config")
