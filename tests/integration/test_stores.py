"""p2pbackupd uploading to a configured store ([[stores]]), through the real CLI and daemon:
a new device recovers and restores from the store alone; a daemon killed mid-upload resumes
without sending anything twice; a full store is one status line and the daemon goes on."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from tests.conftest import Cli, tree_state
from tests.diskfull import fill, small_tmpfs
from tests.eventually import eventually_sync
from tests.integration.test_daemon import Daemon, wait_for_first_snapshot


def _init(cli: Cli, src: Path, tmp_path: Path) -> Path:
    """Set up `cli.home` backing up `src`; the recovery code goes to a file."""
    out = cli("init", "--source", str(src)).stdout
    code = re.search(r"^\s+([0-9A-Z]{5}(?:-[0-9A-Z]{1,5}){10})\s*$", out, re.M).group(1)
    (tmp_path / "code").write_text(code)
    return tmp_path / "code"


def _device(cli: Cli, tmp_path: Path, big: int) -> tuple[Path, Path]:
    """A home backing up a small tree with a `big`-byte random file, sealing every second;
    returns the tree and the recovery code's file."""
    src = tmp_path / "src"
    (src / "docs").mkdir(parents=True)
    (src / "big.bin").write_bytes(os.urandom(big))
    (src / "docs" / "a.txt").write_text("hello\n" * 1000)
    code = _init(cli, src, tmp_path)
    with open(cli.home / "config.toml", "a") as f:
        f.write("\n[daemon]\nseal_interval = 1\n")
    return src, code


def _local_objects(cli: Cli) -> set[str]:
    out = set()
    root = cli.home / "store"
    for dirpath, _, files in os.walk(root):
        for f in files:
            rel = os.path.relpath(os.path.join(dirpath, f), root)
            if f != "lock" and not f.endswith(".tmp"):
                out.add(rel)
    return out


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Each object file of a directory store: (inode, mtime_ns); a re-put changes both."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".tmp"):
                st = os.stat(os.path.join(dirpath, f))
                out[os.path.relpath(os.path.join(dirpath, f), root)] = (st.st_ino,
                                                                          st.st_mtime_ns)
    return out


def _store_status(cli: Cli) -> dict:
    return json.loads(cli("status", "--json").stdout)["stores"][0]


def test_a_store_the_daemon_uploads_to_recovers_a_new_device_even_after_a_kill(
        cli: Cli, tmp_path: Path):
    src, code = _device(cli, tmp_path, 3 * 1024 * 1024)
    remote = tmp_path / "remote"
    # A cap that makes the upload take a while: the first pack goes at once (on credit),
    # what follows waits for it to be paid, so there is a moment to kill the daemon in.
    cli("store", "add", str(remote), "--bandwidth", "128KiB", "--parallel", "1")
    listed = json.loads(cli("store", "list", "--json").stdout)
    assert listed == [{"location": str(remote), "bandwidth": 128 * 1024, "parallel": 1,
                       "options": {}}]
    d = Daemon(cli, tmp_path)
    try:
        d.wait_for("READY=1")
        eventually_sync(lambda: any((remote / "packs").rglob("*"))
                        and not (remote / "snapshots").exists(), timeout=60, interval=0.05)
        behind = _store_status(cli)
        assert behind["reachable"] is True and behind["objects_behind"] > 0, behind
    finally:
        d.stop(signal.SIGKILL)
    before = _files(remote)
    assert before and not any(n.startswith("snapshots/") for n in before)

    # Restarted without the cap: it resumes, and puts nothing it had put already.
    cli("store", "remove", str(remote))
    with open(cli.home / "config.toml", "a") as f:
        f.write(f'\n[[stores]]\nlocation = "{remote}"\n')
    d = Daemon(cli, tmp_path)
    try:
        d.wait_for("READY=1")
        eventually_sync(lambda: _local_objects(cli) <= set(_files(remote)), timeout=60)
        eventually_sync(lambda: _store_status(cli)["objects_behind"] == 0, timeout=30)
        st = _store_status(cli)
        assert st["reachable"] is True and st["last_error"] is None and st["last_upload"]
        text = cli("status").stdout
        assert f"store {remote}: reachable; up to date; last upload" in text
        # A change is sealed into the log, and the segment and head go up soon after.
        expected = tree_state(src)
        (src / "later.txt").write_text("written later\n")
        eventually_sync(lambda: any((remote / "segments").rglob("000000000001"))
                        and any((remote / "heads").glob("*")), timeout=30)
    finally:
        assert d.stop() == 0
    after = _files(remote)
    assert {n: after[n] for n in before} == before   # each object was put once

    # The store alone: listed, verified, and a new device set up and restored from it.
    assert len(json.loads(cli("snapshots", "--from", str(remote), "--json").stdout)) == 1
    assert "no problems found" in cli("verify", "--read-data", "--from", str(remote)).stdout
    new = Cli(tmp_path / "home-new")
    new("recover", "--from", str(remote), "--recovery-code-file", str(code))
    new("restore", "latest", "--from", str(remote), "--to", str(tmp_path / "out"))
    assert tree_state(tmp_path / "out" / "src") == expected


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_store_is_one_status_line_and_uploads_resume_when_there_is_room(
        cli: Cli, tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(1024 * 1024))
    _init(cli, src, tmp_path)
    with small_tmpfs(tmp_path / "usb", "4m") as usb:
        fill(usb)
        remote = usb / "store"
        cli("store", "add", str(remote))
        d = Daemon(cli, tmp_path)
        try:
            d.wait_for("READY=1")
            wait_for_first_snapshot(cli)
            eventually_sync(lambda: _store_status(cli)["last_error"] is not None, timeout=30)
            st = _store_status(cli)
            assert st["reachable"] is False and st["objects_behind"] > 0, st
            line = [ln for ln in cli("status").stdout.splitlines() if "store " in ln]
            assert len(line) == 1 and "unreachable" in line[0], line
            assert "No space left on the device holding" in line[0], line
            assert d.proc.poll() is None     # the daemon goes on
            os.unlink(usb / "filler")          # room again: the next try goes through
            eventually_sync(lambda: _store_status(cli)["last_error"] is None
                            and _local_objects(cli) <= set(_files(remote)), timeout=60)
            # A command that writes the store in its own process (the daemon pauses for it):
            # what it stored goes up once the daemon has the store back.
            cli("snapshot", "--offline")
            eventually_sync(lambda: len(list((remote / "snapshots").iterdir())) == 2,
                            timeout=30)
        finally:
            assert d.stop() == 0
        assert "no problems found" in cli("verify", "--read-data", "--from",
                                          str(remote)).stdout


def test_store_commands_edit_the_config_and_refuse_bad_input(cli: Cli, tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    _init(cli, src, tmp_path)
    env_cwd = tmp_path / "work"
    env_cwd.mkdir()

    def run(*args: str, check: bool = True):
        import subprocess

        proc = subprocess.run(cli.argv(*args), env=cli.env(), capture_output=True, text=True,
                              cwd=env_cwd, timeout=60, stdin=subprocess.DEVNULL)
        assert not check or proc.returncode == 0, proc.stderr
        return proc

    out = run("store", "add", "usb", "-o", "password=hunter2", "-o", "user=me").stdout
    assert f"added store {env_cwd / 'usb'}" in out           # a path is made absolute
    assert os.stat(cli.home / "config.toml").st_mode & 0o077 == 0   # it holds a password
    listed = json.loads(run("store", "list", "--json").stdout)
    assert listed == [{"location": str(env_cwd / "usb"), "bandwidth": None, "parallel": 4,
                       "options": {"password": "***", "user": "me"}}]
    for args, says in [
        (("store", "add", "usb"), "is already configured"),
        (("store", "add", "other", "-o", "novalue"), "give KEY=VALUE"),
        (("store", "add", "other", "-o", "parallel=3"), "give KEY=VALUE"),
        # every command taking -o parses it alike (store check and push said exit 2 before)
        (("store", "check", "other", "-o", "novalue"), "give KEY=VALUE"),
        (("store", "push", "other", "-o", "novalue"), "give KEY=VALUE"),
        (("store", "add", "other", "--bandwidth", "fast"), "'bandwidth' 'fast': give a size"),
        (("store", "add", str(cli.home / "store")), "is this device's own store"),
        (("store", "remove", "nowhere"), f"no store nowhere in {cli.home / 'config.toml'}"),
    ]:
        got = run(*args, check=False)
        assert got.returncode == 10 and says in got.stderr, (args, got.stderr)
        assert len(got.stderr.strip().splitlines()) == 1, got.stderr
    assert len(json.loads(run("store", "list", "--json").stdout)) == 1   # nothing was written
    assert "removed store" in run("store", "remove", "usb").stdout      # as typed, relative
    assert "no stores configured" in run("store", "list").stdout


def _stored(root: Path, kind: str) -> bool:
    """True once a directory store holds an object of `kind` (packs, snapshots)."""
    return any(p.is_file() and not p.name.endswith(".tmp") for p in (root / kind).rglob("*"))


def test_the_daemon_uploads_a_snapshots_packs_while_the_snapshot_runs(cli: Cli,
                                                                      tmp_path: Path):
    _device(cli, tmp_path, 64 * 1024 * 1024)   # four 16 MiB packs: a snapshot of a while
    remote = tmp_path / "remote"
    cli("store", "add", str(remote))
    seen: list[tuple[bool, bool]] = []   # (a pack on the store, the snapshot here) per look

    def snapshot_stored() -> bool:
        seen.append((_stored(remote, "packs"), _stored(cli.home / "store", "snapshots")))
        return seen[-1][1]

    d = Daemon(cli, tmp_path)
    try:   # (its first snapshot starts at once)
        eventually_sync(snapshot_stored, timeout=120, interval=0.02)
        eventually_sync(lambda: _local_objects(cli) <= set(_files(remote)), timeout=60)
    finally:
        assert d.stop() == 0
    assert (True, False) in seen, seen[:3] + seen[-3:]
