"""Pairing, partners, removal and recovery with real processes and homes, on loopback.

The host listens on 127.0.0.1 (`--no-mdns`) and the joiner is given `--peer`; the same
exchange over real multicast DNS between network namespaces is in test_pairing_lan.py.
"""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Cli, make_sample_tree, tree_state
from tests.eventually import eventually_sync
from tests.integration.test_daemon import Daemon


def refuses(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:`port` any more."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except ConnectionResetError:
        return False   # still listening while it closes: accepted, then dropped
    except ConnectionRefusedError:
        return True


def test_a_pairing_port_in_use_is_one_line_and_exit_10(cli: Cli, sample_tree: Path):
    cli("init", "--source", str(sample_tree))
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = cli("pair", "--no-mdns", "--no-qr", "--port", str(port), "--yes", check=False)
    assert r.returncode == 10, r.stderr
    assert f"cannot listen for pairing on port {port}" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "internal error" not in r.stderr


class Host:
    """`p2pbackup pair` running in the background; reads the code it prints.

    With `tty=True` its stdin is a terminal (a pty) on which `answer()` types the reply to the
    verification question; otherwise it runs with `--yes`, as a script would.
    """

    def __init__(self, cli: Cli, *args: str, tty: bool = False) -> None:
        self.port = 0  # any free port: the host says which (a port picked here could be
        # taken by the time it binds, on a machine running other tests)
        argv = cli.argv("pair", "--no-mdns", "--no-qr", "--port", "0", *args)
        self.terminal = None
        if tty:
            self.terminal, stdin = pty.openpty()
        else:
            argv.append("--yes")
            stdin = subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, env=cli.env(), stdin=stdin, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        if tty:
            os.close(stdin)
        self.code = ""
        self.lines: list[str] = []
        self.read_until("Waiting")
        assert self.code, f"no code printed: {self.lines} {self.proc.stderr.read() if self.proc.stderr else ''}"

    def read_until(self, prefix: str) -> str:
        """Read stdout lines until one starts with `prefix`; return it ("" at the end)."""
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()  # the test's own timeout bounds this
            if not line:
                return ""
            self.lines.append(line)
            m = re.match(r"Pairing code: (\S+)", line)
            if m:
                self.code = m.group(1)
            m = re.match(r"Listening on port (\d+)", line)
            if m:
                self.port = int(m.group(1))
            if line.startswith(prefix):
                return line

    def answer(self, reply: str) -> str:
        """Wait for the verification number, type `reply` at the question; return the number."""
        line = self.read_until("Verification:")
        assert line, f"no verification number shown: {self.lines}"
        assert self.terminal is not None
        os.write(self.terminal, reply.encode() + b"\n")
        return re.search(r"\d{3} \d{3}", line).group(0)

    @property
    def peer(self) -> str:
        return f"127.0.0.1:{self.port}"

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        # Not communicate(): it reads the pipe itself and would miss what readline() buffered.
        assert self.proc.stdout is not None and self.proc.stderr is not None
        out, err = self.proc.stdout.read(), self.proc.stderr.read()
        self.proc.wait(timeout=timeout)
        if self.terminal is not None:
            os.close(self.terminal)
        return self.proc.returncode, "".join(self.lines) + out, err


def wrong_words(code: str) -> str:
    nameplate, first, second = code.split("-")
    from p2pbackup.crypto.wordlist import EVEN_WORDS, ODD_WORDS

    other_first = next(w for w in ODD_WORDS + EVEN_WORDS if w != first and
                       (w in ODD_WORDS) == (first in ODD_WORDS))
    return f"{nameplate}-{other_first}-{second}"


def devices(cli: Cli) -> dict:
    return json.loads(cli("devices", "--json").stdout)


@pytest.fixture
def owner(tmp_path: Path) -> tuple[Cli, Path]:
    cli = Cli(tmp_path / "home-a")
    src = tmp_path / "src"
    make_sample_tree(src, big=300_000)
    cli("init", "--source", str(src))
    cli("snapshot")
    return cli, src


def test_pair_gives_the_new_device_the_account(owner, tmp_path: Path):
    a, src = owner
    b = Cli(tmp_path / "home-b")
    host = Host(a, tty=True)
    joining = b.popen("pair", host.code, "--peer", host.peer, "--name", "laptop")
    shown_a = host.answer("y")  # the person at the host compares the numbers and says yes
    joined_out, joined_err = joining.communicate(timeout=60)
    assert joining.returncode == 0, joined_err
    code, out, err = host.finish()
    assert code == 0, err
    assert "'laptop'" in out and "asks to join as owner" in out and "joined as owner" in out
    shown_b = re.search(r"Verification: (\d{3} \d{3})", joined_out).group(1)
    assert shown_a == shown_b  # both people see the same short string
    listed = devices(a)
    assert listed["version"] == 2
    assert {d["name"]: d["role"] for d in listed["devices"]}["laptop"] == "owner"
    assert devices(b)["devices"] == [{**d, "this_device": d["name"] == "laptop"}
                                     for d in listed["devices"]]
    assert (b.home / "keys" / "keyring").stat().st_mode & 0o777 == 0o600
    b("restore", "latest", "--from", str(a.home / "store"), "--to", str(tmp_path / "out"))
    assert tree_state(tmp_path / "out" / "src") == tree_state(src)


def test_wrong_code_fails_closed_and_burns_the_code(owner, tmp_path: Path):
    a, _ = owner
    b = Cli(tmp_path / "home-b")
    host = Host(a)
    wrong = b("pair", wrong_words(host.code), "--peer", host.peer, check=False)
    assert wrong.returncode == 24
    assert "code was wrong" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1
    code, _, err = host.finish()
    assert code == 24 and "wrong code" in err and "used up" in err
    assert not (b.home / "config.toml").exists()      # nothing written on the joiner
    assert devices(a)["version"] == 1                  # nor in the membership
    again = b("pair", host.code, "--peer", host.peer, check=False)  # the right code, too late
    assert again.returncode == 24 and not (b.home / "config.toml").exists()


def test_host_declines_the_number_and_the_joiner_gets_no_key(owner, tmp_path: Path):
    a, _ = owner
    b = Cli(tmp_path / "home-b")
    host = Host(a, tty=True)
    joining = b.popen("pair", host.code, "--peer", host.peer, "--name", "laptop")
    shown_a = host.answer("n")
    out, err = joining.communicate(timeout=60)
    assert f"Verification: {shown_a}" in out  # the joiner showed the same number
    assert joining.returncode == 24
    assert err.strip().splitlines() == ["p2pbackup: error: pairing failed: the other device "
                                        "declined: the verification number was not confirmed"]
    code, _, host_err = host.finish()
    assert code == 24 and "not confirmed" in host_err
    assert not (b.home / "config.toml").exists() and not (b.home / "keys").exists()
    assert devices(a)["version"] == 1


def test_joiner_interrupted_while_the_host_asks(owner, tmp_path: Path):
    a, _ = owner
    b = Cli(tmp_path / "home-b")
    host = Host(a, tty=True)
    joining = b.popen("pair", host.code, "--peer", host.peer, "--name", "laptop")
    assert joining.stdout is not None
    assert joining.stdout.readline().startswith("Verification:")
    assert host.read_until("Verification:")  # the question is open on the host
    joining.send_signal(signal.SIGINT)  # the joiner's user presses Ctrl-C
    _, err = joining.communicate(timeout=60)
    assert joining.returncode == 130 and len(err.strip().splitlines()) == 1, err
    code, _, host_err = host.finish()  # the host stops asking by itself
    assert code == 24 and "stopped" in host_err, host_err
    assert not (b.home / "config.toml").exists()
    assert devices(a)["version"] == 1


def test_pair_without_a_terminal_needs_yes(owner):
    a, _ = owner
    refused = a("pair", "--no-mdns", "--no-qr", "--expires", "5", check=False)
    assert refused.returncode == 10, refused
    assert "--yes" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert "Pairing code" not in refused.stdout


def test_a_code_expires(owner, tmp_path: Path):
    a, _ = owner
    started = time.monotonic()
    host = Host(a, "--expires", "5")
    code, _, err = host.finish(timeout=30)
    assert code == 24 and "expired" in err
    assert 4 < time.monotonic() - started < 25
    assert devices(a)["version"] == 1


def test_a_racing_guess_fails_and_a_new_code_works(owner, tmp_path: Path):
    a, _ = owner
    intruder, b = Cli(tmp_path / "home-x"), Cli(tmp_path / "home-b")
    host = Host(a)
    guess = intruder("pair", wrong_words(host.code), "--peer", host.peer, check=False)
    assert guess.returncode == 24
    assert host.finish()[0] == 24
    late = b("pair", host.code, "--peer", host.peer, check=False)
    assert late.returncode == 24
    host2 = Host(a)
    b("pair", host2.code, "--peer", host2.peer, "--name", "laptop")
    assert host2.finish()[0] == 0
    names = {d["name"] for d in devices(a)["devices"]}
    assert "laptop" in names and len(names) == 2
    assert not (intruder.home / "config.toml").exists()


def test_junk_does_not_end_pairing_through_the_daemon_and_its_question_reaches_the_cli(
        owner, tmp_path: Path):
    a, _ = owner
    daemon = Daemon(a, tmp_path)
    try:
        daemon.wait_for("READY=1")
        host = Host(a, tty=True)  # goes through the daemon, which holds the writer lock
        with socket.create_connection(("127.0.0.1", host.port)) as s:
            s.sendall(b"\x00\x00\x00\x07garbage")
            s.settimeout(10)
            reply = s.recv(4096)
        assert b"malformed" in reply  # the stranger is told why, in an error frame
        assert daemon.proc.poll() is None and host.proc.poll() is None  # still waiting
        assert a("status").returncode == 0
        # The device with the code pairs; the daemon's question is answered at the CLI.
        b = Cli(tmp_path / "home-b")
        joining = b.popen("pair", host.code, "--peer", host.peer, "--name", "laptop")
        shown = host.answer("y")
        joined_out, joined_err = joining.communicate(timeout=60)
        assert joining.returncode == 0, joined_err
        assert f"Verification: {shown}" in joined_out
        code, out, err = host.finish()
        assert code == 0 and "joined as owner" in out, err
        assert devices(a)["version"] == 2
        # And a declined one through the daemon sends no key.
        c = Cli(tmp_path / "home-c")
        host2 = Host(a, tty=True)
        refused = c.popen("pair", host2.code, "--peer", host2.peer, "--name", "tablet")
        host2.answer("n")
        _, refused_err = refused.communicate(timeout=60)
        assert refused.returncode == 24 and "declined" in refused_err
        assert host2.finish()[0] == 24
        assert not (c.home / "keys").exists() and devices(a)["version"] == 2
        # Ctrl-C at the question is a no at once (not after the daemon's 2-minute wait).
        host3 = Host(a, tty=True)
        waiting = c.popen("pair", host3.code, "--peer", host3.peer, "--name", "tablet")
        assert host3.read_until("Verification:")
        host3.proc.send_signal(signal.SIGINT)
        _, waiting_err = waiting.communicate(timeout=60)
        assert waiting.returncode == 24 and "declined" in waiting_err, waiting_err
        assert host3.finish()[0] == 130
        assert not (c.home / "keys").exists() and devices(a)["version"] == 2
        # A `pair` that is killed takes its code with it: the daemon stops offering it (a
        # joiner would otherwise wait for an answer nobody gives) and a new code can start.
        host4 = Host(a)
        host4.proc.kill()
        host4.proc.wait()
        eventually_sync(lambda: refuses(host4.port), timeout=20)
        host5 = Host(a)
        assert host5.code and host5.code != host4.code
        host5.proc.kill()
        host5.proc.wait()
        # A port already in use is said in one line, with the same exit code as without the
        # daemon (10), and leaves no code behind.
        with socket.socket() as taken:
            taken.bind(("0.0.0.0", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            r = a("pair", "--no-mdns", "--no-qr", "--port", str(busy), "--yes", check=False)
        assert r.returncode == 10 and f"port {busy}" in r.stderr, r.stderr
        Host(a).proc.kill()  # a new code starts: none was left offered
    finally:
        assert daemon.stop() == 0
    log = (tmp_path / "daemon.log").read_text()
    assert sum("malformed" in line for line in log.splitlines()) == 1


def test_partner_gets_no_key_only_a_quota(owner, tmp_path: Path):
    a, _ = owner
    friend = Cli(tmp_path / "home-friend")
    host = Host(a, "--partner", "--quota", "50G")
    out = friend("pair", host.code, "--peer", host.peer, "--name", "friends-nas")
    assert host.finish()[0] == 0
    assert "storage partner" in out.stdout and "50.0 GiB" in out.stdout
    assert not (friend.home / "keys" / "account.key").exists()
    assert not (friend.home / "keys" / "keyring").exists()
    grants = list((friend.home / "partners").glob("*.grant"))
    assert len(grants) == 1
    assert (friend.home / "partners" / "tag.key").stat().st_mode & 0o077 == 0
    assert b"account.key" not in grants[0].read_bytes()
    refused = friend("snapshots", check=False)
    assert refused.returncode == 10 and "storage partner" in refused.stderr
    partner = next(d for d in devices(a)["devices"] if d["name"] == "friends-nas")
    assert partner["role"] == "partner" and partner["quota"] == 50 << 30


def test_scoped_member_reads_only_its_sources(tmp_path: Path):
    a, b = Cli(tmp_path / "home-a"), Cli(tmp_path / "home-b")
    docs, photos = tmp_path / "docs", tmp_path / "photos"
    make_sample_tree(docs, big=200_000)
    make_sample_tree(photos, big=200_000)
    a("init", "--source", str(docs), "--source", str(photos))
    a("snapshot")
    host = Host(a, "--sources", "docs")
    b("pair", host.code, "--peer", host.peer, "--name", "tablet")
    assert host.finish()[0] == 0
    member = next(d for d in devices(a)["devices"] if d["name"] == "tablet")
    assert member["role"] == "member" and member["sources"] == ["docs"]
    store = str(a.home / "store")
    b("restore", "latest", "--from", store, "--path", "docs", "--to", str(tmp_path / "o1"))
    assert tree_state(tmp_path / "o1" / "docs") == tree_state(docs)
    denied = b("restore", "latest", "--from", store, "--path", "photos",
               "--to", str(tmp_path / "o2"), check=False)
    assert denied.returncode == 15 and "no key for source 'photos'" in denied.stderr
    bad = a("pair", "--sources", "music", "--no-mdns", "--yes", check=False)
    assert bad.returncode == 10 and "no source named 'music'" in bad.stderr


def test_removed_device_cannot_read_new_data_nor_come_back(owner, tmp_path: Path):
    a, src = owner
    b = Cli(tmp_path / "home-b")
    host = Host(a)
    b("pair", host.code, "--peer", host.peer, "--name", "stolen-laptop")
    assert host.finish()[0] == 0
    old = json.loads(a("snapshots", "--json").stdout)[-1]["id"]

    removed = a("devices", "remove", "stolen-laptop")
    new_code = re.search(r"^\s+([0-9A-Z]{5}(?:-[0-9A-Z]{1,5}){10})\s*$", removed.stdout,
                         re.M).group(1)
    listed = devices(a)
    assert listed["key_epoch"] == 1 and len(listed["removed"]) == 1
    (src / "after-removal.txt").write_text("the thief must not read this\n")
    new = json.loads(a("snapshot", "--json").stdout)["id"]
    store = str(a.home / "store")

    # The removed device still reads what it could read before, and nothing written after.
    b("restore", old, "--from", store, "--to", str(tmp_path / "old"))
    denied = b("restore", new, "--from", store, "--to", str(tmp_path / "new"), check=False)
    assert denied.returncode == 13
    assert "key this device does not hold" in denied.stderr
    seen = json.loads(b("snapshots", "--from", store, "--json").stdout)
    assert [s["id"] for s in seen] == [old]
    # It cannot join again either, not even as a storage partner.
    host2 = Host(a, "--partner")
    again = b("pair", host2.code, "--peer", host2.peer, check=False)
    assert again.returncode == 24 and "removed" in again.stderr
    assert host2.finish()[0] == 24

    # The owner's repository is intact, and the new recovery code opens all of it.
    assert "no problems found" in a("verify", "--read-data").stdout
    (tmp_path / "code").write_text(new_code)
    c = Cli(tmp_path / "home-c")
    c("recover", "--from", store, "--recovery-code-file", str(tmp_path / "code"))
    c("restore", new, "--from", store, "--to", str(tmp_path / "c-out"))
    assert tree_state(tmp_path / "c-out" / "src") == tree_state(src)


def test_recover_from_a_directory_store(owner, tmp_path: Path):
    a, src = owner
    code = re.search(r"^\s+([0-9A-Z]{5}(?:-[0-9A-Z]{1,5}){10})\s*$",
                     Cli(tmp_path / "other")("init").stdout, re.M).group(1)
    store = str(a.home / "store")
    # The code of another account opens nothing, and nothing is left behind.
    (tmp_path / "other-code").write_text(code)
    new = Cli(tmp_path / "home-new")
    wrong = new("recover", "--from", store, "--recovery-code-file",
                str(tmp_path / "other-code"), check=False)
    assert wrong.returncode == 15 and "another account" in wrong.stderr
    assert not (new.home / "config.toml").exists()
    typo = subprocess.run(new.argv("recover", "--from", store), env=new.env(), input="ABCDE-1\n",
                          capture_output=True, text=True, timeout=60)
    assert typo.returncode != 0 and "recovery code" in typo.stderr
    # The right code, read from stdin.
    a_code = (a.home / "keys" / "account.key").read_bytes()
    from p2pbackup.crypto import recovery

    ok = subprocess.run(new.argv("recover", "--from", store, "--name", "replacement"),
                        env=new.env(), input=recovery.encode(a_code) + "\n",
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "now listed" in ok.stdout
    new("restore", "latest", "--from", store, "--to", str(tmp_path / "out"))
    assert tree_state(tmp_path / "out" / "src") == tree_state(src)
    names = {d["name"] for d in devices(new)["devices"]}
    assert "replacement" in names
    # The source store learned of the new device too (signed by the recovery signer).
    assert "replacement" in {d["name"] for d in devices(a)["devices"]}


def test_remaining_devices_pick_up_the_new_keys_after_a_removal(owner, tmp_path: Path):
    a, src = owner
    b, c = Cli(tmp_path / "home-b"), Cli(tmp_path / "home-c")
    for joiner, name in ((b, "desktop"), (c, "old-phone")):
        host = Host(a)
        joiner("pair", host.code, "--peer", host.peer, "--name", name)
        assert host.finish()[0] == 0
    a("devices", "remove", "old-phone")
    (src / "new.txt").write_text("written in epoch 1\n")
    new = json.loads(a("snapshot", "--json").stdout)["id"]
    # Replication (the P2P issue) carries the membership to the other devices; here a copy.
    for f in (a.home / "store" / "membership").iterdir():
        (b.home / "store" / "membership" / f.name).write_bytes(f.read_bytes())
        (c.home / "store" / "membership" / f.name).write_bytes(f.read_bytes())
    mine = tmp_path / "b-files"
    mine.mkdir()
    b("snapshot", str(mine))  # any writing command picks up the grant sealed to this device
    assert devices(b)["key_epoch"] == 1
    b("restore", new, "--from", str(a.home / "store"), "--to", str(tmp_path / "b-out"))
    assert (tmp_path / "b-out" / "src" / "new.txt").read_text() == "written in epoch 1\n"
    refused = c("snapshot", str(mine), check=False)
    assert refused.returncode == 15 and "removed from the account" in refused.stderr
