"""A device's store on the storage server, read back through the real CLI with --from."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.blobs.server import ServerStore
from p2pbackup.device import open_device
from p2pbackup.repo import membership as store_membership
from p2pbackup.repo import roster
from p2pbackup.repo.replica import transfer_order
from tests.conftest import Cli, tree_state
from tests.servers import storage_server

pytestmark = pytest.mark.timeout(240)


async def test_a_store_copied_to_the_server_lists_verifies_restores_and_recovers_from_it(
        cli: Cli, sample_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = re.search(r"^\s+([0-9A-Z]{5}(?:-[0-9A-Z]{1,5}){10})\s*$",
                     cli("init", "--source", str(sample_tree)).stdout, re.M).group(1)
    cli("snapshot")
    with storage_server(tmp_path / "srv") as server:
        async with open_device(cli.home) as dev:
            # An account without storage partners has no roster yet: the server needs one.
            local = LocalDirStore(dev.config.store)
            membership = (await store_membership.load(dev.repo))[0]
            await roster.publish(local, dev.identity, membership)
            remote = ServerStore(server.location, identity=dev.identity,
                                 account=dev.keys.fingerprint(), ca_file=server.ca_file,
                                 invite=server.invite())
            names = sorted([n async for n in local.list("") if n != "lock"],
                           key=lambda n: (not n.startswith("roster/"), transfer_order(n)))
            for name in names:   # the roster first: it registers the account
                await remote.put(name, await local.get(name))
            await remote.close()
        # The CLI trusts the throwaway certificate the way OpenSSL lets any program do.
        monkeypatch.setenv("SSL_CERT_FILE", server.ca_file)
        listed = json.loads(cli("snapshots", "--json", "--from", server.location).stdout)
        assert len(listed) == 1
        out = cli("verify", "--read-data", "--from", server.location)
        assert out.returncode == 0
        cli("restore", "latest", "--to", str(tmp_path / "out"), "--from", server.location)
        assert tree_state(tmp_path / "out" / "src") == tree_state(sample_tree)
        # A new device holding only the recovery code sets itself up from the server (read
        # as the roster's recovery signer, which brings the roster that makes it an owner),
        # and reads the server as that owner.
        (tmp_path / "code").write_text(code)
        new = Cli(tmp_path / "new-home")
        new("recover", "--from", server.location, "--recovery-code-file",
            str(tmp_path / "code"))
        new("restore", "latest", "--to", str(tmp_path / "new-out"), "--from", server.location)
        assert tree_state(tmp_path / "new-out" / "src") == tree_state(sample_tree)
        # Plain http to the TLS port (loopback, so allowed): the server hangs up; one line.
        wrong = cli("snapshots", "--from", server.location.replace("https", "http"),
                    check=False)
        assert wrong.returncode == 11 and wrong.stderr.count("\n") == 1
        assert f"store {server.location.replace('https', 'http')}: cannot reach the server" \
            in wrong.stderr


@pytest.mark.parametrize("args, says", [
    (["--listen", "nowhere"], "--listen 'nowhere': give HOST:PORT"),
    (["--tls-cert", "/nonexistent.pem"], "--tls-cert and --tls-key go together"),
    (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"],
     "cannot load the TLS certificate /nonexistent.pem"),
    (["--quota", "lots"], "--quota"),
])
def test_server_usage_errors_are_one_line_with_exit_10(tmp_path: Path, args: list[str],
                                                       says: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "p2pbackup.server.main", "serve", "--data",
                           str(tmp_path / "data"), *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 10, proc.stderr
    assert proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr


def test_a_port_in_use_is_one_line_with_exit_10(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "p2pbackup.server.main", "serve",
                               "--data", str(tmp_path / "data"), "--listen",
                               f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 10 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
