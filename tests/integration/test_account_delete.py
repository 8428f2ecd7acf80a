"""`p2pbackup account delete` through the real CLI: a directory store, a real storage server
and the home."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.blobs.server import ServerStore
from p2pbackup.config import edit_stores
from p2pbackup.device import open_device
from p2pbackup.errors import NotFound
from p2pbackup.repo import membership as store_membership
from p2pbackup.repo import roster
from p2pbackup.repo.replica import transfer_order
from tests.adversary import accounts
from tests.conftest import Cli
from tests.servers import RunningServer, free_port, storage_server

pytestmark = pytest.mark.timeout(240)


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def copy_store(home: Path, to: LocalDirStore | ServerStore) -> int:
    """What p2pbackupd would upload: every object of the home's store (the roster first: on
    the server it registers the account); how many."""
    local = LocalDirStore(home / "store")
    names = sorted([n async for n in local.list("")],
                   key=lambda n: (not n.startswith("roster/"), transfer_order(n)))
    for name in names:
        await to.put(name, await local.get(name))
    await to.close()
    return len(names)


async def on_server(cli: Cli, server: RunningServer) -> ServerStore:
    """This home's account on `server`, copied there and opened as its device."""
    async with open_device(cli.home) as dev:
        # An account without storage partners has no roster yet: the server needs one.
        membership = (await store_membership.load(dev.repo))[0]
        await roster.publish(LocalDirStore(dev.config.store), dev.identity, membership)
        remote = ServerStore(server.location, identity=dev.identity,
                             account=dev.keys.fingerprint(), ca_file=server.ca_file,
                             invite=server.invite())
    await copy_store(cli.home, remote)
    return remote


def configure(cli: Cli, location: str, **options: str) -> None:
    """A `[[stores]]` table, as `store add` writes it (which opens a storage server's store
    as this device once the store-register-demo branch is in)."""
    edit_stores(cli.home, lambda tables: tables + [{"location": location, **options}])


@pytest.fixture
def account(cli: Cli, sample_tree: Path) -> Cli:
    cli("init", "--source", str(sample_tree))
    cli("snapshot")
    return cli


async def test_the_dry_run_lists_every_place_and_deletes_nothing(account: Cli,
                                                                 tmp_path: Path) -> None:
    usb = tmp_path / "usb"
    held = await copy_store(account.home, LocalDirStore(usb))
    account("store", "add", str(usb))
    before_usb, before_home = files_under(usb), files_under(account.home)
    doc = json.loads(account("account", "delete", "--dry-run", "--json").stdout)
    places = {p["kind"]: p for p in doc["places"]}
    assert places["store"]["where"] == str(usb)
    assert places["store"]["objects"] == held
    assert places["store"]["bytes"] == sum((usb / f).stat().st_size for f in before_usb)
    assert places["home"]["where"] == str(account.home)
    assert places["home"]["objects"] == held
    text = account("account", "delete", "--dry-run").stdout
    assert f"store {usb}: {held} objects" in text and f"home {account.home}: " in text
    assert files_under(usb) == before_usb and files_under(account.home) == before_home


async def test_delete_removes_the_account_from_a_store_the_server_and_the_home(
        account: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usb = tmp_path / "usb"
    await copy_store(account.home, LocalDirStore(usb))
    account("store", "add", str(usb))
    with storage_server(tmp_path / "srv") as server:
        remote = await on_server(account, server)
        configure(account, server.location, ca_file=server.ca_file)
        assert [n async for n in remote.list("")]
        out = account("account", "delete", "--yes")
        lines = out.stdout.splitlines()
        assert any(ln.startswith(f"store {usb}: deleted ") for ln in lines), out.stdout
        assert any(ln.startswith(f"store {server.location}: it deleted the account")
                   for ln in lines), out.stdout
        assert lines[-1] == f"home {account.home}: deleted (keys, config, store, cache)"
        assert files_under(usb) == []
        assert not account.home.exists()
        with pytest.raises(NotFound, match="is not registered on this server"):
            [n async for n in remote.list("")]
        await remote.close()
        assert files_under(server.data / "partners") == []


async def test_a_member_device_may_not_delete_the_account(account: Cli, tmp_path: Path) -> None:
    member = Cli(tmp_path / "member")
    await accounts.pair(account.home, member.home, "phone", sources=["src"])
    for args in (["--dry-run"], ["--yes"]):
        proc = member("account", "delete", *args, check=False)
        assert proc.returncode == 15, proc.stderr
        assert proc.stderr.strip() == ("p2pbackup: error: only an owner device of the account "
                                       "can delete it (this device is a member); run "
                                       "`p2pbackup account delete` on an owner device")
    assert (member.home / "keys").is_dir()


async def test_an_unreachable_store_keeps_the_home_and_exits_non_zero(account: Cli,
                                                                      tmp_path: Path) -> None:
    usb = tmp_path / "usb"
    await copy_store(account.home, LocalDirStore(usb))
    account("store", "add", str(usb))
    gone = f"http://127.0.0.1:{free_port()}/"   # nothing listens there
    configure(account, gone)
    proc = account("account", "delete", "--yes", check=False)
    assert proc.returncode == 11, proc.stderr
    assert proc.stderr.count("\n") == 1 and "this device's home is kept" in proc.stderr
    assert f"store {gone}: FAILED: store {gone}: cannot reach the server" in proc.stdout
    assert files_under(usb) == []                  # the reachable store was dealt with
    assert (account.home / "keys").is_dir()        # ... and the command can run again
    assert account("account", "delete", "--dry-run").returncode == 0


def test_without_a_terminal_it_asks_for_yes(account: Cli) -> None:
    proc = account("account", "delete", check=False)
    assert proc.returncode == 10 and "pass --yes" in proc.stderr
    assert (account.home / "keys").is_dir()


def test_a_partner_on_the_lan_forgets_the_account(netlab, tmp_path: Path) -> None:
    from tests.eventually import eventually_sync
    from tests.integration.test_partner import objects, with_partner
    from tests.integration.test_peer_restore import run_in, wait_status
    from tests.integration.test_peers_lan import start_daemon, stop_all

    ha, hf, a, friend, _, kept = with_partner(netlab, tmp_path, "50M")
    partner = start_daemon(hf, friend, tmp_path, "f")
    try:
        owner = start_daemon(ha, a, tmp_path, "a")
        try:
            wait_status(a), wait_status(friend)
            a("snapshot")
            eventually_sync(lambda: objects(a.home / "store") <= objects(kept), timeout=60)
        finally:
            stop_all([owner])
        dry = run_in(ha, a, "account", "delete", "--dry-run").stdout
        assert "peer friends-nas (partner, " in dry
        # A store that cannot be reached keeps the home: the partner is done all the same.
        gone = f"http://127.0.0.1:{free_port()}/"
        configure(a, gone)
        first = run_in(ha, a, "account", "delete", "--yes", check=False)
        assert first.returncode == 11, first.stderr
        assert "it deleted the account's grant and data\n" in first.stdout, first.stdout
        assert not kept.exists() and list((friend.home / "partners").glob("*.grant")) == []
        # The run after it does not ask the partner again (it no longer knows the account).
        a("store", "remove", gone)
        out = run_in(ha, a, "account", "delete", "--yes").stdout
        assert "it deleted the account's grant and data at an earlier run" in out, out
        assert not a.home.exists()
        assert json.loads(friend("status", "--json").stdout)["partner_for"] == []
    finally:
        stop_all([partner])


def test_it_refuses_while_p2pbackupd_runs(account: Cli) -> None:
    from tests.eventually import eventually_sync

    daemon = subprocess.Popen([sys.executable, "-m", "p2pbackup.daemon.main"],
                              env=account.env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        eventually_sync(lambda: account("status", check=False).returncode == 0, timeout=60)
        proc = account("account", "delete", "--yes", check=False)
        assert proc.returncode == 10 and "p2pbackupd is running" in proc.stderr, proc.stderr
    finally:
        daemon.terminate()
        assert daemon.wait(timeout=30) == 0
    assert (account.home / "keys").is_dir()


def test_the_typed_fingerprint_confirms_and_anything_else_deletes_nothing(
        account: Cli, tmp_path: Path) -> None:
    import os
    import pty

    fingerprint = json.loads(account("account", "delete", "--dry-run", "--json").stdout)[
        "account"]

    def typing(line: str) -> subprocess.CompletedProcess:
        """`account delete` at a terminal, `line` typed at its question."""
        master, terminal = pty.openpty()
        try:
            os.write(master, (line + "\n").encode())
            return subprocess.run(account.argv("account", "delete"), env=account.env(),
                                  stdin=terminal, capture_output=True, text=True, timeout=120)
        finally:
            os.close(terminal)
            os.close(master)

    wrong = typing("0123456789abcdef")
    assert wrong.returncode == 1, wrong.stderr
    assert "not confirmed (that is not the account's fingerprint): nothing was deleted" \
        in wrong.stderr
    assert (account.home / "keys").is_dir()
    right = typing(fingerprint)
    assert right.returncode == 0, right.stderr
    assert f"Type the account's fingerprint ({fingerprint})" in right.stdout
    assert not account.home.exists()


async def test_files_that_are_not_the_accounts_objects_stay_in_a_store(account: Cli,
                                                                       tmp_path: Path) -> None:
    usb = tmp_path / "usb"
    await copy_store(account.home, LocalDirStore(usb))
    (usb / "notes.txt").write_text("the user's own file, beside the store")
    account("store", "add", str(usb))
    account("account", "delete", "--yes")
    assert files_under(usb) == ["notes.txt"]


async def test_an_s3_store_is_emptied_of_the_account(account: Cli, tmp_path: Path) -> None:
    from contextlib import contextmanager

    from p2pbackup.blobs import open_store
    from tests.servers import weed_mini

    with contextmanager(weed_mini)(tmp_path / "weed") as weed:
        location = f"s3://{weed.new_bucket()}/backup"
        bucket = open_store(location, options=weed.options())
        held = await copy_store(account.home, bucket)
        configure(account, location, **{k: str(v) for k, v in weed.options().items()})
        doc = json.loads(account("account", "delete", "--dry-run", "--json").stdout)
        assert [p["objects"] for p in doc["places"] if p["where"] == location] == [held]
        out = account("account", "delete", "--yes").stdout
        assert f"store {location}: deleted {held} objects" in out, out
        bucket = open_store(location, options=weed.options())
        try:
            assert [n async for n in bucket.list("")] == []
        finally:
            await bucket.close()
        assert not account.home.exists()


def test_the_home_keeps_what_is_not_this_accounts(account: Cli) -> None:
    # This home also keeps another account's data as its storage partner, and the user put
    # a file in the store's folder: neither is this account's to delete.
    other = account.home / "partners" / "0123456789abcdef.grant"
    other.parent.mkdir()
    other.write_bytes(b"another account's grant")
    (account.home / "store" / "README.txt").write_text("mine")
    out = account("account", "delete", "--yes").stdout
    assert f"left there, not p2pbackup's: {account.home / 'store'}/README.txt, " \
           f"{account.home / 'partners'}" in out, out
    assert sorted(p.name for p in account.home.iterdir()) == ["partners", "store"]
    assert [p.name for p in (account.home / "store").iterdir()] == ["README.txt"]
    assert other.read_bytes() == b"another account's grant"
