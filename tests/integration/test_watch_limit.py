"""p2pbackupd past the kernel's limit on inotify watches: it says so once (log and status),
the folders it cannot watch are rescanned every `unwatched_rescan_interval`, and once the
limit is raised it watches them all again.

The daemon runs in a user namespace of its own whose limit (user.max_inotify_watches) the
test lowers: the machine's limit, which every other process of the user shares, is left
alone."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from p2pbackup.daemon.watches import folder_key, watched_folders
from tests.conftest import Cli
from tests.eventually import eventually_sync
from tests.integration.test_daemon import Daemon, chain, wait_for_first_snapshot

FOLDERS = 30
LIMIT = 12


def _userns_works() -> bool:
    return subprocess.run(["unshare", "--user", "--map-root-user", "true"],
                          capture_output=True).returncode == 0


def _set_limit(pid: int, limit: int) -> None:
    """Set the inotify watch limit of the user namespace process `pid` runs in."""
    subprocess.run(["nsenter", "--user", "--preserve-credentials", f"--target={pid}", "sh",
                    "-c", f"echo {limit} > /proc/sys/user/max_inotify_watches"], check=True)


def _captured(cli: Cli) -> set[bytes]:
    """Every path a sealed log segment names."""
    return {c.path for _, parts in chain(cli)[3] for _, cl in parts for c in cl.changes}


@pytest.mark.skipif(not _userns_works(), reason="needs user namespaces (unshare --user)")
def test_folders_past_the_watch_limit_are_rescanned_and_watched_once_it_is_raised(
        cli: Cli, tmp_path: Path):
    src = tmp_path / "src"
    for i in range(FOLDERS):
        (src / f"d{i:02d}").mkdir(parents=True)
        (src / f"d{i:02d}" / "old.txt").write_text("old\n")
    cli("init", "--source", str(src))
    with open(cli.home / "config.toml", "a") as f:
        f.write("\n[daemon]\nseal_interval = 1\nrescan_interval = 3600\n"
                "unwatched_rescan_interval = 2\n")
    d = Daemon(cli, tmp_path, prefix=[
        "unshare", "--user", "--map-root-user", "sh", "-c",
        f'echo {LIMIT} > /proc/sys/user/max_inotify_watches && exec "$@"', "daemon"])
    try:
        d.wait_for("READY=1")
        wait_for_first_snapshot(cli)
        status = json.loads(cli("status", "--json").stdout)
        assert status["watch"]["folders"] == FOLDERS + 1
        assert status["watch"]["watched"] <= LIMIT and status["watch"]["limit"] == LIMIT
        line = next(e for e in status["errors"] if e.startswith("inotify watches "))
        assert f"of the sources' {FOLDERS + 1} folders" in line and "rescanned every 2 s" in line
        assert "max_user_watches" in line, line

        # A folder inotify does not watch: what is written there is found by the rescans.
        watched = watched_folders(d.proc.pid)
        blind = next(p for p in sorted(src.iterdir()) if folder_key(p.stat()) not in watched)
        (blind / "new.txt").write_text("found by a rescan\n")
        rel = os.fsencode(blind.name) + b"/new.txt"
        eventually_sync(lambda: rel in _captured(cli), timeout=30, interval=0.3)

        # Said once, however many rescans there were.
        log = (tmp_path / "daemon.log").read_text()
        assert log.count("inotify watches ") == 1, log

        # The limit raised: every folder is watched again, and changes are seen at once
        # (no rescan runs now before the hour is over).
        _set_limit(d.proc.pid, 1000)
        eventually_sync(lambda: json.loads(cli("status", "--json").stdout)["watch"]["watched"]
                        == FOLDERS + 1, timeout=30, interval=0.3)
        status = json.loads(cli("status", "--json").stdout)
        assert not any(e.startswith("inotify watches ") for e in status["errors"])
        (blind / "later.txt").write_text("seen by inotify\n")
        later = os.fsencode(blind.name) + b"/later.txt"
        eventually_sync(lambda: later in _captured(cli), timeout=30, interval=0.3)
        assert "watches all 31 folders of the sources again" in \
            (tmp_path / "daemon.log").read_text()
    finally:
        assert d.stop() == 0
