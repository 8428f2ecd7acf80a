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
