"""The device daemon as a real process: inotify, sealed signed segments, kill -9, systemd."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from p2pbackup.device import open_device
from p2pbackup.format.log import DEL, PUT
from p2pbackup.repo.logstore import LogStore
from tests.conftest import Cli
from tests.eventually import eventually_sync


class Daemon:
    """p2pbackupd in a subprocess, with a datagram socket standing in for systemd."""

    def __init__(self, cli: Cli, tmp: Path, watchdog_usec: int | None = None,
                 prefix: list[str] | tuple[str, ...] = ()) -> None:
        self.cli = cli
        self.sock_path = str(tmp / f"notify-{random.getrandbits(32):x}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.sock_path)
        self.sock.settimeout(0.2)
        env = cli.env()
        env["NOTIFY_SOCKET"] = self.sock_path
        if watchdog_usec:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.log = open(tmp / "daemon.log", "ab")
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "p2pbackup.daemon.main"],
                                     env=env,
                                     stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        self.messages: list[str] = []

    def wait_for(self, text: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}"
            try:
                msg = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            self.messages.append(msg)
            if text in msg:
                return msg
        raise AssertionError(f"no {text!r} from the daemon within {timeout} s: {self.messages}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        self.sock.close()
        os.unlink(self.sock_path)
        self.log.close()
        return code


@pytest.fixture
def home(cli: Cli, tmp_path: Path) -> tuple[Cli, Path]:
    src = tmp_path / "src"
    src.mkdir()
    cli("init", "--source", str(src))
    with open(cli.home / "config.toml", "a") as f:
        f.write("\n[daemon]\nseal_interval = 1\n")
    return cli, src


def chain(cli: Cli):
    async def go():
        async with open_device(cli.home) as dev:
            ls = LogStore(dev.repo)
            links, problems = await ls.load_chain(dev.identity.device_id)
            head = await ls.read_head(dev.identity.device_id)
            changes = [(seg.seq, ls.open_changes(seg)) for _, seg in links]
            return links, problems, head, changes
    return asyncio.run(go())


def wait_for_seq(cli: Cli, seq: int, timeout: float = 30) -> None:
    def sealed() -> bool:
        head = chain(cli)[2]
        return head is not None and head.seq >= seq
    eventually_sync(sealed, timeout=timeout, interval=0.2)


def wait_for_first_snapshot(cli: Cli) -> None:
    """The roll-up snapshot a daemon takes at start when the device has none."""
    eventually_sync(lambda: json.loads(cli("snapshots", "--json").stdout), timeout=20,
                    interval=0.1)


def test_changes_become_sealed_signed_segments(home, tmp_path: Path):
    cli, src = home
    d = Daemon(cli, tmp_path)
    try:
        d.wait_for("READY=1")
        (src / "a.txt").write_text("version 1\n")
        (src / "dir").mkdir()
        (src / "dir" / "b.bin").write_bytes(os.urandom(300_000))
        wait_for_seq(cli, 1)
        (src / "a.txt").unlink()
        wait_for_seq(cli, 2)
        assert "sealed segment" in d.wait_for("STATUS=sealed segment")
    finally:
        assert d.stop() == 0
    links, problems, head, changes = chain(cli)
    assert problems == [] and head.seq == len(links) >= 2
    ops = [(c.op, c.path) for _, parts in changes for _, cl in parts for c in cl.changes]
    assert (PUT, b"a.txt") in ops and (PUT, b"dir/b.bin") in ops and (DEL, b"a.txt") in ops
    put_b = next(c for _, parts in changes for _, cl in parts for c in cl.changes
                 if c.path == b"dir/b.bin" and c.op == PUT)
    assert put_b.entry.size == 300_000 and len(put_b.entry.chunks) >= 2
    assert "no problems found" in cli("verify", "--read-data").stdout


def test_watchdog_pings(home, tmp_path: Path):
    cli, _ = home
    d = Daemon(cli, tmp_path, watchdog_usec=400_000)
    try:
        d.wait_for("READY=1")
        d.wait_for("WATCHDOG=1")
        d.wait_for("WATCHDOG=1")
    finally:
        assert d.stop() == 0


def test_kill_9_at_random_moments_keeps_the_chain(home, tmp_path: Path):
    cli, src = home
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            (src / f"f{i % 50}.txt").write_bytes(os.urandom(random.randint(100, 200_000)))
            if i % 7 == 0:
                try:
                    (src / f"f{(i * 3) % 50}.txt").unlink()
                except FileNotFoundError:
                    pass
            i += 1
            time.sleep(0.005)

    t = threading.Thread(target=writer)
    t.start()
    rng = random.Random(1234)
    sealed_before: list[int] = []
    try:
        for _ in range(20):
            d = Daemon(cli, tmp_path)
            d.wait_for("READY=1")
            time.sleep(rng.uniform(0.2, 1.6))
            d.stop(signal.SIGKILL)
            head = chain(cli)[2]
            sealed_before.append(head.seq if head else 0)
        d = Daemon(cli, tmp_path)
        d.wait_for("READY=1")
        time.sleep(1.5)
    finally:
        stop.set()
        t.join()
    assert d.stop() == 0
    links, problems, head, _ = chain(cli)
    assert problems == []
    assert [seg.seq for _, seg in links] == list(range(1, head.seq + 1))
    assert head.seq >= max(sealed_before) and head.seq > 5  # nothing sealed was lost
    assert "no problems found" in cli("verify", "--read-data").stdout


def test_torn_segment_is_discarded_and_the_chain_goes_on(home, tmp_path: Path):
    cli, src = home
    d = Daemon(cli, tmp_path)
    d.wait_for("READY=1")
    (src / "a.txt").write_text("one")
    wait_for_seq(cli, 1)
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    links, _, head, _ = chain(cli)
    seg_dir = cli.home / "store" / "segments" / links[0][1].device
    good = (seg_dir / "000000000001").read_bytes()
    (seg_dir / "000000000002").write_bytes(good[: len(good) // 2])  # a half-written segment
    d = Daemon(cli, tmp_path)
    d.wait_for("READY=1")
    (src / "b.txt").write_text("two")
    wait_for_seq(cli, 2)
    assert d.stop() == 0
    log_text = (tmp_path / "daemon.log").read_text()
    assert "segment 2 is torn or damaged" in log_text and "discarded" in log_text
    links, problems, head, changes = chain(cli)
    assert problems == [] and head.seq == 2
    assert any(c.path == b"b.txt" for _, parts in changes for _, cl in parts for c in cl.changes)


def test_config_error_is_one_line_naming_key_and_file(home, tmp_path: Path):
    cli, _ = home
    cfg = cli.home / "config.toml"
    cfg.write_text(cfg.read_text().replace("seal_interval = 1", "seal_interval = 0"))
    proc = subprocess.run([sys.executable, "-m", "p2pbackup.daemon.main"], env=cli.env(),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 10
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "daemon.seal_interval" in lines[0] and str(cfg) in lines[0]


def test_a_source_that_disappears_does_not_stop_the_daemon(cli: Cli, tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    cli("init", "--source", str(a), "--source", str(b))
    with open(cli.home / "config.toml", "a") as f:
        f.write("\n[daemon]\nseal_interval = 1\n")
    d = Daemon(cli, tmp_path)
    try:
        d.wait_for("READY=1")
        # The roll-up snapshot at start holds both (the rescan that catches up on a source
        # that comes back compares it with the latest snapshot).
        d.wait_for("STATUS=snapshot")
        (a / "x").write_text("x")
        wait_for_seq(cli, 1)
        subprocess.run(["rm", "-rf", str(b)], check=True)
        time.sleep(0.5)
        (a / "y").write_text("y")
        wait_for_seq(cli, 2)
        import json

        st = json.loads(cli("status", "--json").stdout)
        assert [s["present"] for s in st["sources"]] == [True, False]
        assert any("disappeared" in e for e in st["errors"])
        # It comes back: watched again, and status no longer says it is gone.
        b.mkdir()
        (b / "z").write_text("z")
        eventually_sync(lambda: any(c.path == b"z" for _, parts in chain(cli)[3]
                                    for scope, cl in parts if scope == "b"
                                    for c in cl.changes))
        st = json.loads(cli("status", "--json").stdout)
        assert [s["present"] for s in st["sources"]] == [True, True]
        assert not any("disappeared" in e for e in st["errors"]), st["errors"]
        assert "MISSING" not in cli("status").stdout
    finally:
        assert d.stop() == 0
    assert chain(cli)[1] == []
    log_lines = [ln for ln in (tmp_path / "daemon.log").read_text().splitlines()
                 if "disappeared" in ln]
    assert len(log_lines) == 1


def test_status_and_snapshot_go_through_the_daemon(home, tmp_path: Path):
    import json
    import stat

    cli, src = home
    d = Daemon(cli, tmp_path)
    try:
        d.wait_for("READY=1")
        sock = cli.home / "daemon.sock"
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        (src / "a.txt").write_text("a")
        snap = json.loads(cli("snapshot", "--json").stdout)  # not refused: the daemon takes it
        assert snap["log_seq"] >= 1
        st = json.loads(cli("status", "--json").stdout)
        assert st["log"]["seq"] >= snap["log_seq"] and st["last_snapshot"]["id"] == snap["id"]
        assert st["sources"][0]["present"] is True
        # What it is doing now (p2pbackup.activity): nothing runs once the snapshot is done.
        assert [a for a in st["activities"] if a["kind"] in ("snapshot", "seal")] == []
        assert "p2pbackupd running" in cli("status").stdout
        # A malformed control message gets an error reply; the daemon keeps running.
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.sendall(b"this is not json\n")
            reply = json.loads(s.makefile().readline())
        assert reply["ok"] is False and "not JSON" in reply["error"]
        assert json.loads(cli("status", "--json").stdout)["pid"] == d.proc.pid
    finally:
        assert d.stop() == 0
    assert not (cli.home / "daemon.sock").exists()
    proc = cli("status", check=False)
    assert proc.returncode == 19 and "not running" in proc.stderr


def _state(root: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = None if p.is_dir() else p.read_bytes()
    return out


def test_point_in_time_restore(home, tmp_path: Path):
    import datetime as dt

    cli, src = home
    d = Daemon(cli, tmp_path)
    moments: list[tuple[str, dict]] = []

    def checkpoint() -> None:
        seq = chain(cli)[2].seq if chain(cli)[2] else 0
        wait_for_seq(cli, seq + 1)
        time.sleep(0.05)
        moments.append((dt.datetime.now().astimezone().isoformat(), _state(src)))
        time.sleep(0.05)

    try:
        d.wait_for("READY=1")
        wait_for_first_snapshot(cli)
        (src / "a.txt").write_text("version 1\n")
        (src / "b.txt").write_text("bee\n")
        checkpoint()
        (src / "a.txt").write_text("version 2, longer\n")
        (src / "b.txt").rename(src / "c.txt")
        (src / "d").mkdir()
        (src / "d" / "e.txt").write_text("inside d\n")
        checkpoint()
        (src / "a.txt").write_text("version 3\n")
        (src / "c.txt").unlink()
        subprocess.run(["rm", "-rf", str(src / "d")], check=True)
        (src / "f.bin").write_bytes(os.urandom(200_000))
        checkpoint()
    finally:
        assert d.stop() == 0
    for i, (moment, expected) in enumerate(moments):
        out = tmp_path / f"at-{i}"
        proc = cli("restore", "latest", "--at", moment, "--to", str(out))
        assert "logged changes" in proc.stdout
        assert _state(out / "src") == expected, f"state at checkpoint {i + 1}"
    proc = cli("restore", "latest", "--at", "2001-01-01T00:00:00", "--to",
               str(tmp_path / "never"), check=False)
    assert proc.returncode == 17 and "no snapshot at or before" in proc.stderr
    bad = cli("restore", "latest", "--at", "the day after tomorrow", "--to", str(tmp_path / "x"),
              check=False)
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr


def test_point_in_time_restore_carries_fifos_devices_xattrs_and_holes(home, tmp_path: Path):
    import datetime as dt

    from tests.conftest import make_fidelity_tree, tree_state

    cli, src = home
    staged = make_fidelity_tree(tmp_path / "staging" / "tree")
    d = Daemon(cli, tmp_path)
    try:
        d.wait_for("READY=1")
        wait_for_first_snapshot(cli)
        os.rename(staged, src / "tree")  # one event; the daemon walks what it finds
        expected = {b"tree/" + rel for rel in tree_state(src / "tree")} | {b"tree"}

        def all_logged() -> bool:
            logged = {c.path for _, parts in chain(cli)[3] for _, cl in parts
                      for c in cl.changes if c.op == PUT}
            return expected <= logged

        eventually_sync(all_logged, timeout=30, interval=0.2)
        moment = dt.datetime.now().astimezone().isoformat()
    finally:
        assert d.stop() == 0
    out = tmp_path / "out"
    proc = cli("restore", "latest", "--at", moment, "--to", str(out), check=False)
    assert proc.returncode == 0 and "warning" not in proc.stderr \
        and "notice" not in proc.stderr, proc.stderr
    assert "+ 0 logged changes" not in proc.stdout and "logged changes" in proc.stdout, \
        proc.stdout
    assert tree_state(out / "src" / "tree") == tree_state(src / "tree")
    restored, original = os.stat(out / "src" / "tree" / "sparse.img"), \
        os.stat(src / "tree" / "sparse.img")
    assert original.st_blocks <= restored.st_blocks <= original.st_blocks + 512


def test_prune_through_the_daemon_folds_the_log(home, tmp_path: Path):
    import json

    cli, src = home
    d = Daemon(cli, tmp_path)
    try:
        d.wait_for("READY=1")
        for i in range(3):
            (src / f"f{i}.txt").write_text(f"file {i}\n" * 1000)
            wait_for_seq(cli, i + 1)
        snap = json.loads(cli("snapshot", "--json").stdout)
        (src / "after.txt").write_text("after the snapshot")
        wait_for_seq(cli, snap["log_seq"] + 1)
        out = json.loads(cli("forget", "--keep-last", "1", "--prune", "--json").stdout)
        assert out["kept"] == [snap["id"]] and out["prune"]["segments_folded"] >= 3
        (src / "later.txt").write_text("the chain goes on after the fold")
        wait_for_seq(cli, snap["log_seq"] + 2)
    finally:
        assert d.stop() == 0
    links, problems, head, _ = chain(cli)
    assert problems == [] and links[0][1].seq == snap["log_seq"] + 1
    assert "no problems found" in cli("verify", "--read-data").stdout
    cli("restore", "latest", "--at", "now", "--to", str(tmp_path / "now"))
    assert (tmp_path / "now" / "src" / "later.txt").read_text().startswith("the chain")


def test_changes_made_while_the_daemon_was_down_are_caught_up(home, tmp_path: Path):
    cli, src = home
    (src / "keep.txt").write_text("unchanged")
    (src / "edit.txt").write_text("before")
    (src / "gone.txt").write_text("to be deleted")
    d = Daemon(cli, tmp_path)
    d.wait_for("READY=1")
    wait_for_first_snapshot(cli)
    d.stop(signal.SIGKILL)
    seq = (chain(cli)[2].seq if chain(cli)[2] else 0)
    time.sleep(0.05)
    (src / "edit.txt").write_text("after, while nobody watched")
    (src / "gone.txt").unlink()
    (src / "new").mkdir()
    (src / "new" / "born.txt").write_text("new while down")
    d = Daemon(cli, tmp_path)
    try:
        d.wait_for("READY=1")
        wait_for_seq(cli, seq + 1)
    finally:
        assert d.stop() == 0
    changes = {(c.op, c.path) for _, parts in chain(cli)[3] for _, cl in parts for c in cl.changes}
    assert {(PUT, b"edit.txt"), (DEL, b"gone.txt"), (PUT, b"new"),
            (PUT, b"new/born.txt")} <= changes
    assert (PUT, b"keep.txt") not in changes  # unchanged files are not captured again
    cli("restore", "latest", "--at", "now", "--to", str(tmp_path / "now"))
    got = tmp_path / "now" / "src"
    assert (got / "edit.txt").read_text() == "after, while nobody watched"
    assert not (got / "gone.txt").exists() and (got / "new" / "born.txt").exists()


def test_verify_checks_the_log_chain(home, tmp_path: Path):
    cli, src = home
    d = Daemon(cli, tmp_path)
    try:
        d.wait_for("READY=1")
        for i in range(3):
            (src / f"f{i}").write_text(str(i))
            wait_for_seq(cli, i + 1)
    finally:
        assert d.stop() == 0
    assert "log segments" in cli("verify").stdout
    links = chain(cli)[0]
    seg_dir = cli.home / "store" / "segments" / links[0][1].device
    (seg_dir / "000000000002").unlink()  # a hole in the chain
    proc = cli("verify", check=False)
    assert proc.returncode == 13 and "segment 2 is missing" in proc.stdout


def test_no_change_is_lost_when_seals_overlap_captures(home, tmp_path: Path):
    """Busy writes across many seals: the log replayed 'now' equals the tree, file by file."""
    cli, src = home
    d = Daemon(cli, tmp_path)
    try:
        d.wait_for("READY=1")
        rng = random.Random(5)
        end = time.monotonic() + 4
        i = 0
        while time.monotonic() < end:  # each file written once: a lost change stays visible
            name = src / f"d{i % 7}" / f"f{i}.txt"
            name.parent.mkdir(exist_ok=True)
            name.write_bytes(rng.randbytes(rng.randrange(1, 150_000)))
            if i % 11 == 10:
                (src / f"d{(i - 10) % 7}" / f"f{i - 10}.txt").unlink()
            i += 1
            time.sleep(0.003)
        seq = chain(cli)[2].seq
        wait_for_seq(cli, seq + 1)  # the last writes are sealed too
        time.sleep(1.5)
    finally:
        assert d.stop() == 0
    cli("restore", "latest", "--at", "now", "--to", str(tmp_path / "now"))
    assert _state(tmp_path / "now" / "src") == _state(src)


def test_changes_through_a_symlinked_directory_are_logged_under_the_real_path(home, tmp_path):
    cli, src = home
    (src / "real" / "deep").mkdir(parents=True)
    os.symlink("real", src / "link")
    d = Daemon(cli, tmp_path)
    try:
        d.wait_for("READY=1")
        (src / "real" / "deep" / "a.txt").write_text("through the real path")
        wait_for_seq(cli, 1)
        (src / "real" / "deep" / "a.txt").write_text("changed again")
        seq = chain(cli)[2].seq
        wait_for_seq(cli, seq + 1)
    finally:
        assert d.stop() == 0
    paths = {c.path for _, parts in chain(cli)[3] for _, cl in parts for c in cl.changes}
    assert b"real/deep/a.txt" in paths and not any(p.startswith(b"link/") for p in paths)
    cli("restore", "latest", "--at", "now", "--to", str(tmp_path / "now"))
    got = tmp_path / "now" / "src"
    assert (got / "real" / "deep" / "a.txt").read_text() == "changed again"
    assert os.readlink(got / "link") == "real"


def test_a_name_the_watcher_cannot_decode_does_not_stop_the_daemon(home, tmp_path: Path):
    cli, src = home
    (src / "a.txt").write_text("a\n")
    daemon = Daemon(cli, tmp_path)
    try:
        daemon.wait_for("READY=1")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not json.loads(
                cli("status", "--json").stdout)["last_snapshot"]:
            time.sleep(0.3)  # the start-up snapshot first, so later changes go to the log
        # inotify reports this name; the Rust watcher cannot decode it and gives up.
        with open(os.path.join(os.fsencode(src), b"bad-\xff-name.txt"), "wb") as f:
            f.write(b"x")
        (src / "after.txt").write_text("written after the watcher stopped\n")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st = cli("status", "--json").stdout
            if "rescan every" in st:
                break
            time.sleep(0.3)
        assert "rescan every" in st and daemon.proc.poll() is None
        (src / "later.txt").write_text("picked up by the rescan\n")
        deadline = time.monotonic() + 30
        found = False
        while time.monotonic() < deadline and not found:
            found = any(c.path == b"later.txt" or c.path.endswith(b"/later.txt")
                        for c in _changes(cli))
            time.sleep(0.5)
        assert found
    finally:
        assert daemon.stop() == 0


def _changes(cli: Cli) -> list:
    async def go():
        async with open_device(cli.home) as dev:
            logs = LogStore(dev.repo)
            links, _ = await logs.load_chain(dev.identity.device_id)
            return [c for _, seg in links for _, cl in logs.open_changes(seg) for c in cl.changes]

    return asyncio.run(go())


_LEASE_HOLDER = """
import asyncio, os
from p2pbackup import control
from p2pbackup.config import load_config

async def main():
    async with control.lease(load_config().control_socket, "pause",
                             {"pid": os.getpid(), "command": "a test"}):
        print("paused", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


def _logged_paths(cli: Cli) -> set[bytes]:
    return {c.path for _, parts in chain(cli)[3] for _, cl in parts for c in cl.changes}


def test_commands_that_write_pause_the_daemon_instead_of_waiting_for_it(home, tmp_path: Path):
    from p2pbackup.repo.lock import WriterLock

    cli, src = home
    (src / "a.txt").write_text("a")
    other = tmp_path / "other"
    other.mkdir()
    (other / "o.txt").write_text("o")
    d = Daemon(cli, tmp_path)
    try:
        d.wait_for("READY=1")
        for args in (["snapshot", "--offline"], ["snapshot", str(other)], ["repair"],
                     ["index", "rebuild"]):
            proc = cli(*args, check=False)
            assert proc.returncode == 0, (args, proc.stderr)
        # The daemon has the store back: it logs changes and snapshots on request.
        (src / "b.txt").write_text("b")
        eventually_sync(lambda: b"b.txt" in _logged_paths(cli))
        assert json.loads(cli("snapshot", "--json").stdout)["log_seq"] >= 1

        # A command killed while it holds the pause: the daemon resumes by itself, and what
        # changed meanwhile is logged then.
        holder = subprocess.Popen([sys.executable, "-c", _LEASE_HOLDER], env=cli.env(),
                                  stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        try:
            assert holder.stdout.readline().strip() == "paused"
            st = json.loads(cli("status", "--json").stdout)
            assert st["paused_for"]["pid"] == holder.pid
            assert "a test" in st["paused_for"]["command"]
            with WriterLock(str(cli.home / "store" / "lock"), "the store"):
                pass  # the daemon let go of the store
            (src / "c.txt").write_text("c")
        finally:
            holder.kill()
            holder.wait()
        eventually_sync(lambda: b"c.txt" in _logged_paths(cli))
        assert json.loads(cli("status", "--json").stdout)["paused_for"] is None
    finally:
        assert d.stop() == 0
    log_text = (tmp_path / "daemon.log").read_text()
    assert "Traceback" not in log_text and "resumed after" in log_text
    paths = [s["paths"] for s in json.loads(cli("snapshots", "--json").stdout)]
    # the daemon's at start, --offline, DIR, the daemon's on request
    assert paths.count([str(other)]) == 1 and paths.count([str(src)]) == 3
    assert "no problems found" in cli("verify", "--read-data").stdout


def _control(sock: Path, raw: bytes) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(raw)
        return json.loads(s.makefile().readline())


def test_bad_control_requests_get_an_error_reply_and_no_traceback(home, tmp_path: Path):
    cli, _src = home
    d = Daemon(cli, tmp_path)
    bad = [b"[" * 100_000 + b"\n", b'{"v": 1, "cmd": "x", "args": ' + b"[" * 50_000 + b"\n",
           b'{"v": 1, "cmd": 5}\n', b'{"v": 1, "cmd": "status", "args": [1]}\n']
    for cmd, args in (("snapshot", {"scheduled": "yes"}), ("forget", {"dry_run": {"a": 1}}),
                      ("forget", {"policy": [1, 2]}), ("prune", {"dry_run": 3}),
                      ("pair_start", {"sources": 5}), ("pair_start", {"sources": [1, {}]}),
                      ("pair_start", {"expires": "soon"}), ("pair_start", {"role": []}),
                      ("pair_wait", {"code": {"x": 1}}), ("devices_remove", {"device": []}),
                      ("pause", {"pid": "me"}), ("pause", {"command": 7})):
        bad.append(json.dumps({"v": 1, "cmd": cmd, "args": args}).encode() + b"\n")
    try:
        d.wait_for("READY=1")
        for raw in bad:
            reply = _control(cli.home / "daemon.sock", raw)
            assert reply["ok"] is False and reply["exit"] in (10, 17, 20, 24), (raw[:60], reply)
            assert "\n" not in reply["error"] and "internal error" not in reply["error"]
        assert json.loads(cli("status", "--json").stdout)["pid"] == d.proc.pid
    finally:
        assert d.stop() == 0
    assert "Traceback" not in (tmp_path / "daemon.log").read_text()
