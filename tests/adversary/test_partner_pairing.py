"""A hostile pairing host names the account in its welcome with a path: the joining partner
refuses it in one line (exit 24) and creates nothing, inside or outside its home."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from p2pbackup.crypto.identity import DeviceIdentity
from tests.adversary.hostile_pairing import hostile_host
from tests.conftest import Cli

pytestmark = pytest.mark.timeout(120)
HOST = DeviceIdentity.generate()


def partner_welcome(account: str) -> bytes:
    return msgpack.packb({"v": 1, "role": "partner", "account": account,
                          "host": {"id": HOST.device_id, "pk": HOST.public_key, "name": "evil"},
                          "owners": [[HOST.device_id, HOST.public_key]], "quota": None,
                          "tag_key": bytes(32)}, use_bin_type=True)


def files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("account", ["..", "../x", "/abs", "a/b", "0123456789abcdef0",
                                     "0123456789abcdeg", "0123456789ABCDEF", ""])
def test_a_welcome_whose_account_is_not_a_fingerprint_is_refused(tmp_path: Path, account: str):
    joiner = Cli(tmp_path / "home")
    if account == "/abs":
        account = str(tmp_path / "abs")   # absolute, and still inside what the test watches
    before = files(tmp_path)
    with hostile_host(lambda request: partner_welcome(account)) as (code, peer):
        proc = joiner("pair", code, "--peer", peer, "--name", "friends-nas", check=False)
    assert proc.returncode == 24, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pairing failed" in lines[0] and "account" in lines[0], lines
    assert "Traceback" not in proc.stderr
    assert files(tmp_path) == before, sorted(map(str, files(tmp_path) - before))


def test_a_stranger_naming_an_account_this_partner_holds_cannot_replace_its_roster(
        tmp_path: Path):
    """An account's fingerprint is no secret. A stranger who gets this partner's user to pair
    with it (a friend, a second account) names in its welcome an account the partner stores
    for, with a roster of its own: the held grant must stay (else the stranger's owner would
    decide who reads and removes that account's data here, and refuse its devices). The
    account's own owner pairing again is taken."""
    from tests.servers import StorageAccount

    victim, stranger = StorageAccount(), StorageAccount()
    joiner = Cli(tmp_path / "home")

    def welcome(host: DeviceIdentity, roster: bytes) -> bytes:
        return msgpack.packb({"v": 1, "role": "partner", "account": victim.fingerprint,
                              "host": {"id": host.device_id, "pk": host.public_key,
                                       "name": "a friend"},
                              "owners": [[host.device_id, host.public_key]], "quota": None,
                              "roster": roster}, use_bin_type=True)

    first = victim.roster()[1]
    with hostile_host(lambda request: welcome(victim.owner, first)) as (code, peer):
        joiner("pair", code, "--peer", peer, "--name", "friends-nas")
    grant = tmp_path / "home" / "partners" / f"{victim.fingerprint}.grant"
    held = grant.read_bytes()

    forged = stranger.roster()[1]
    with hostile_host(lambda request: welcome(stranger.owner, forged)) as (code, peer):
        proc = joiner("pair", code, "--peer", peer, "--name", "friends-nas", check=False)
    assert proc.returncode == 24, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pairing failed" in lines[0], lines
    assert grant.read_bytes() == held

    newer = victim.roster()[1]
    with hostile_host(lambda request: welcome(victim.owner, newer)) as (code, peer):
        joiner("pair", code, "--peer", peer, "--name", "friends-nas")
    assert msgpack.unpackb(grant.read_bytes())["roster"] == newer
