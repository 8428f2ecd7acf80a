"""forget and prune: the right snapshots go, the rest still restores, kill -9 is harmless."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import random
import re
import signal
import time
from pathlib import Path

from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.config import sources_for_paths
from p2pbackup.device import open_device
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


def _dated_snapshots(home: Path, plan: list[tuple[Path | None, dt.datetime]]) -> list[str]:
    """Take a snapshot per (ad-hoc directory or None for the configured sources, time) and
    store it dated so: the engine stamps the wall clock, so each is saved again with the time
    given (and the original deleted). Each configured-source snapshot first writes its time
    into `when.txt` of the first source, so a restore shows which one it came from."""
    async def go() -> list[str]:
        ids = []
        async with open_device(home, write=True) as dev:
            for adhoc, when in plan:
                sources = sources_for_paths([str(adhoc)]) if adhoc else dev.config.sources
                if adhoc is None:
                    Path(sources[0].path, "when.txt").write_text(when.isoformat())
                taken = (await take_snapshot(dev.repo, sources, temp_dir=dev.temp_dir,
                                             hostname=dev.config.device_name)).stored
                ns = int(when.timestamp() * 1e9)
                ids.append((await dev.repo.save_snapshot(
                    dataclasses.replace(taken.snapshot, time_ns=ns))).id)
                await dev.repo.store.delete(f"snapshots/{taken.id}")
        return ids
    return asyncio.run(go())


def _groups_printed(text: str) -> dict[str, dict[str, list[str]]]:
    """forget's text output: group header -> {"keep": [short ids], "forget": [...]}."""
    out: dict[str, dict[str, list[str]]] = {}
    header = ""
    for line in text.splitlines():
        row = re.match(r"^  (keep|(?:would )?forget) +([0-9a-f]{8})  ", line)
        if row:
            out[header]["keep" if row.group(1) == "keep" else "forget"].append(row.group(2))
        elif line and not line.startswith("keep "):
            header = line
            out[header] = {"keep": [], "forget": []}
    return out


def test_readme_policy_keeps_each_source_set_and_latest_means_what_is_asked(cli: Cli,
                                                                             tmp_path: Path):
    """The issue: after `init --source A` and an ad-hoc `snapshot B`, the README's policy
    forgot every snapshot of A and `restore latest` restored B."""
    a, b = tmp_path / "A", tmp_path / "B"
    _make(a, 3, 50_000, 1)
    _make(b, 2, 50_000, 2)
    cli("init", "--source", str(a))
    # Mondays Feb 17 and 24, then every day Mar 3 (a Monday) .. Mar 16 2025 at noon, local time;
    # one more on Mar 16 at 08:00, and B ad hoc on Mar 16 at 18:00.
    days = [dt.datetime(2025, 2, 17, 12), dt.datetime(2025, 2, 24, 12)] + \
        [dt.datetime(2025, 3, d, 12) for d in range(3, 17)]
    plan = [(None, t) for t in days[:-1]] + [(None, dt.datetime(2025, 3, 16, 8)),
                                             (None, days[-1]), (b, dt.datetime(2025, 3, 16, 18))]
    ids = dict(zip([t for _, t in plan], _dated_snapshots(cli.home, plan)))
    b_id = ids.pop(dt.datetime(2025, 3, 16, 18))
    # 7 daily (Mar 10..16) and 4 weekly (+ Mar 9, Feb 24, Feb 17); B is a group of its own
    kept_a = {ids[t] for t in days if t.day in (17, 24, 9) or t >= dt.datetime(2025, 3, 10)}
    forgotten_a = set(ids.values()) - kept_a
    assert len(kept_a) == 10 and len(forgotten_a) == 7

    policy = ("--keep-daily", "7", "--keep-weekly", "4")
    dry = _groups_printed(cli("forget", *policy, "--dry-run").stdout)
    assert len(dry) == 2, dry
    (a_group,) = [g for h, g in dry.items() if h.endswith(f"sources {a}: keep 10, would forget 7")]
    assert set(a_group["keep"]) == {i[:8] for i in kept_a}
    assert set(a_group["forget"]) == {i[:8] for i in forgotten_a}
    (b_group,) = [g for h, g in dry.items() if h.endswith(f"sources {b}: keep 1, would forget 0")]
    assert b_group == {"keep": [b_id[:8]], "forget": []}
    assert len(list((cli.home / "store" / "snapshots").iterdir())) == 18  # a dry run

    done = json.loads(cli("forget", *policy, "--prune", "--json").stdout)
    assert set(done["kept"]) == kept_a | {b_id} and set(done["forgotten"]) == forgotten_a
    assert sorted(tuple(g["paths"]) for g in done["groups"]) == [(str(a),), (str(b),)]
    assert "no problems found" in cli("verify").stdout

    latest = cli("restore", "latest", "--to", str(tmp_path / "out"))
    assert (tmp_path / "out" / "A" / "when.txt").read_text() == days[-1].isoformat()
    assert not (tmp_path / "out" / "B").exists()
    assert "latest: snapshot " + ids[days[-1]][:8] in latest.stderr
    cli("restore", "latest", "--path", "B", "--to", str(tmp_path / "out-b"))
    assert tree_state(tmp_path / "out-b" / "B") == tree_state(b)
    # point in time: the same rule, among the snapshots taken by then
    cli("restore", "latest", "--at", "2025-03-16T20:00", "--to", str(tmp_path / "out-at"))
    assert (tmp_path / "out-at" / "A" / "when.txt").read_text() == days[-1].isoformat()
    assert not (tmp_path / "out-at" / "B").exists()
    cli("restore", "latest", "--at", "2025-03-12T20:00", "--to", str(tmp_path / "out-12"))
    assert (tmp_path / "out-12" / "A" / "when.txt").read_text() == \
        dt.datetime(2025, 3, 12, 12).isoformat()

    again = cli("prune")
    assert again.stdout.startswith("prune: nothing to do"), again.stdout


def test_latest_is_refused_when_several_groups_could_be_meant(cli: Cli, tmp_path: Path):
    a, b = tmp_path / "A", tmp_path / "B"
    _make(a, 1, 1000, 1)
    _make(b, 1, 1000, 2)
    cli("init")  # no configured sources: nothing says which snapshots `latest` means
    first = json.loads(cli("snapshot", str(a), "--json").stdout)["short_id"]
    second = json.loads(cli("snapshot", str(b), "--json").stdout)["short_id"]
    refused = cli("restore", "latest", "--to", str(tmp_path / "out"), check=False)
    assert refused.returncode == 17, refused.stderr
    line = refused.stderr.strip()
    assert "\n" not in line and "ambiguous" in line and first in line and second in line
    assert not (tmp_path / "out").exists()
    cli("restore", "latest", "--path", "A", "--to", str(tmp_path / "out"))
    assert tree_state(tmp_path / "out" / "A") == tree_state(a)
