"""`p2pbackup broker register` through the real CLI against a real `p2pbackup-broker` that asks
for a sign-in with a local OpenID Connect issuer, or for an invitation."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pbackup.broker.oidc import person_id
from tests.adversary.accounts import pair
from tests.conftest import Cli
from tests.eventually import eventually_sync
from tests.oidc_issuer import AUDIENCE, local_issuer
from tests.servers import broker_server

pytestmark = pytest.mark.timeout(180)


def two_devices(cli: Cli, tmp_path: Path) -> None:
    """An account of two devices (a single device has no roster to register)."""
    cli("init")
    asyncio.run(pair(cli.home, tmp_path / "other", "desktop"))


def with_broker(cli: Cli, url: str) -> None:
    with open(cli.home / "config.toml", "a") as f:
        f.write(f'\n[broker]\nurl = "{url}"\n')


def test_broker_register_signs_in_with_an_id_token(cli: Cli, tmp_path: Path) -> None:
    cli("init")
    no_broker = cli("broker", "register", check=False)
    assert no_broker.returncode == 10 and "no broker: set [broker] url" in no_broker.stderr
    with local_issuer() as issuer, broker_server(tmp_path / "broker", "--oidc-issuer",
                                                 issuer.url, "--oidc-audience",
                                                 AUDIENCE) as broker:
        with_broker(cli, broker.url)
        alone = cli("broker", "register", check=False)
        assert alone.returncode == 10 and "has one device: there is nothing" in alone.stderr
        asyncio.run(pair(cli.home, tmp_path / "other", "desktop"))
        bare = cli("broker", "register", check=False)   # an issuer with no device sign-in
        assert bare.returncode == 10
        assert bare.stderr.strip() == (
            f"p2pbackup: error: {issuer.url} offers no sign-in from a terminal (no device "
            "authorization): give --token-file FILE holding an ID token it issued you")
        token = tmp_path / "id_token"
        token.write_text(issuer.token("erin", exp=int(time.time()) - 3600) + "\n")
        expired = cli("broker", "register", "--token-file", str(token), check=False)
        assert expired.returncode == 21
        assert expired.stderr.strip() == ("p2pbackup: error: the broker refused the roster: "
                                          "401 the sign-in token has expired: sign in again")
        token.write_text(issuer.token("erin") + "\n")
        done = cli("broker", "register", "--token-file", str(token))
        assert "is registered on the broker at" in done.stdout
        eventually_sync(lambda: f"(person {person_id(issuer.url, 'erin')[:12]})" in
                        broker.log_text(), 30)
        # again (the token has done its work: an owner follows the account's rosters)
        assert cli("broker", "register", "--token-file", str(token)).returncode == 0


def test_broker_register_signs_in_with_a_code_entered_in_a_browser(cli: Cli,
                                                                   tmp_path: Path) -> None:
    two_devices(cli, tmp_path)
    with local_issuer() as issuer, broker_server(tmp_path / "broker", "--oidc-issuer",
                                                 issuer.url, "--oidc-audience",
                                                 AUDIENCE) as broker:
        issuer.device_flow, issuer.signs_in = True, "grace"
        with_broker(cli, broker.url)
        done = cli("broker", "register")
        assert f"To sign in, open {issuer.url}/activate and enter the code WDJB-MJHT" in \
            done.stdout
        assert "is registered on the broker at" in done.stdout
        eventually_sync(lambda: f"(person {person_id(issuer.url, 'grace')[:12]})" in
                        broker.log_text(), 30)
        issuer.signs_in = None      # the person refuses at the issuer: nothing registers
        other = Cli(tmp_path / "third")
        two_devices(other, tmp_path / "t")
        with_broker(other, broker.url)
        refused = other("broker", "register", check=False)
        assert refused.returncode == 21 and refused.stderr.strip() == (
            f"p2pbackup: error: {issuer.url} refused the sign-in: access_denied")


def test_broker_register_with_an_invitation(cli: Cli, tmp_path: Path) -> None:
    two_devices(cli, tmp_path)
    with broker_server(tmp_path / "broker", "--invites") as broker:
        with_broker(cli, broker.url)
        bare = cli("broker", "register", check=False)
        assert bare.returncode == 10 and "give --invite TOKEN" in bare.stderr
        invite = subprocess.run([sys.executable, "-m", "p2pbackup.broker.main", "invite",
                                 "--data", str(tmp_path / "broker" / "data")], check=True,
                                capture_output=True, text=True).stdout.strip()
        assert "is registered" in cli("broker", "register", "--invite", invite).stdout
        eventually_sync(lambda: "registered by device" in broker.log_text(), 30)


def test_the_broker_refuses_conflicting_registration_flags(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "p2pbackup.broker.main", "--data",
                        str(tmp_path), "--invites", "--oidc-issuer", "https://a.example",
                        "--oidc-audience", "x"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 10 and r.stderr.strip().splitlines() == [
        "p2pbackup-broker: give --oidc-issuer or --invites, not both"]
