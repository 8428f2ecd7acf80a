"""A device registers its account on p2pbackup-server through its daemon: `store add` with an
invite, p2pbackupd publishes the account's first roster and uploads it first, then the rest; a
new device recovers from the server alone (with `recover --option ca_file=...`) and restores.
Refused registrations (no invite, a spent one) and a full account are one status line each
(a member device that is no owner: tests/unit/repo/test_upload.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import Cli, tree_state
from tests.eventually import eventually_sync
from tests.integration.test_daemon import Daemon
from tests.integration.test_stores import _device
from tests.servers import storage_server

pytestmark = pytest.mark.timeout(300)


def _store(cli: Cli) -> dict:
    return json.loads(cli("status", "--json").stdout)["stores"][0]


def _uploaded_all(cli: Cli) -> bool:
    s = _store(cli)
    return s["reachable"] is True and s["objects_behind"] == 0 and s["uploaded"] > 0


def _snapshot_on(cli: Cli, location: str) -> bool:
    """The server holds a snapshot (uploaded after the packs it names). Waiting for the store
    to be "not behind" alone raced the daemon's start-up snapshot: the roster and membership
    went up first and left nothing behind until the next pass (seen under load)."""
    got = cli("snapshots", "--json", "--from", location, check=False)
    return got.returncode == 0 and bool(json.loads(got.stdout))


def test_store_add_with_an_invite_registers_the_account_and_a_new_device_recovers_from_it(
        cli: Cli, tmp_path: Path) -> None:
    src, code = _device(cli, tmp_path, 1024 * 1024)
    with storage_server(tmp_path / "srv") as server:
        out = cli("store", "add", server.location, "-o", f"invite={server.invite()}",
                  "-o", f"ca_file={server.ca_file}")
        assert f"added store {server.location}" in out.stdout
        d = Daemon(cli, tmp_path)
        try:
            d.wait_for("READY=1")
            eventually_sync(lambda: _snapshot_on(cli, server.location) and _uploaded_all(cli),
                            timeout=90, interval=0.5)
            assert _store(cli)["last_error"] is None
        finally:
            assert d.stop() == 0
        expected = tree_state(src)
        # The account exists on the server now (the invite is spent: kept in config.toml,
        # never needed again).
        assert list((server.data / "partners").glob("*.grant"))
        new = Cli(tmp_path / "home-new")
        out = new("recover", "--from", server.location, "--option",
                  f"ca_file={server.ca_file}", "--recovery-code-file", str(code))
        assert "is now listed in the account" in out.stdout
        # ... on the server too: the roster that admits it went first, then the membership
        # version it wrote as that owner (the recovery signer may write only the roster).
        assert "could not" not in out.stderr, out.stderr
        # recover kept the store with its options: restore --from finds its ca_file.
        assert [s["location"] for s in json.loads(new("store", "list", "--json").stdout)] \
            == [server.location]
        new("restore", "latest", "--from", server.location, "--to", str(tmp_path / "out"))
        assert tree_state(tmp_path / "out" / "src") == expected


@pytest.mark.parametrize("invite", ["none", "spent", "full"])
def test_a_registration_the_server_refuses_is_one_status_line(
        cli: Cli, tmp_path: Path, invite: str) -> None:
    _device(cli, tmp_path, 64 * 1024)
    quota = ["--quota", "16K"] if invite == "full" else []
    with storage_server(tmp_path / "srv", *quota) as server:
        options = ["-o", f"ca_file={server.ca_file}"]
        if invite == "full":   # registered (the roster is outside the quota), then full
            options += ["-o", f"invite={server.invite()}"]
        if invite == "spent":
            token = server.invite()
            other = Cli(tmp_path / "other")   # another account takes the token first
            _device(other, tmp_path / "o", 1024)
            other("store", "add", server.location, "-o", f"invite={token}", *options)
            d = Daemon(other, tmp_path / "o")
            try:
                d.wait_for("READY=1")
                eventually_sync(lambda: _uploaded_all(other), timeout=90, interval=0.2)
            finally:
                assert d.stop() == 0
            options += ["-o", f"invite={token}"]
        cli("store", "add", server.location, *options)
        d = Daemon(cli, tmp_path)
        try:
            d.wait_for("READY=1")
            eventually_sync(lambda: _store(cli)["last_error"] is not None, timeout=60,
                            interval=0.2)
            line = _store(cli)["last_error"]
            text = cli("status").stdout
        finally:
            assert d.stop() == 0
    assert "\n" not in line
    assert line.startswith(f"store {server.location}: ") or invite == "full", line
    assert {"none": "needs a valid invitation",
            "spent": "this invitation is not valid (used, expired or mistyped)",
            "full": f"The store {server.location} is full (account "}[invite] in line, line
    # (read again for the text: a full store's line names the bytes used, which the retries
    # meanwhile may have changed; the words before them may not)
    assert f"store {server.location}: unreachable" in text and line.split(" (", 1)[0] in text
