"""p2pbackupd uploading to a real S3 server (SeaweedFS's `weed mini`), and a new device set
up and restored from the bucket alone with the recovery code (credentials from the AWS
environment variables there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Cli, tree_state
from tests.eventually import eventually_sync
from tests.integration.test_daemon import Daemon, wait_for_first_snapshot
from tests.integration.test_stores import _device, _store_status

servers = pytest.importorskip("tests.servers", reason="the S3 test servers (tests/servers.py)")


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    yield from servers.weed_mini(tmp_path_factory.mktemp("weed"))


def test_the_daemon_uploads_to_s3_and_a_new_device_recovers_from_the_bucket(
        cli: Cli, tmp_path: Path, weed, monkeypatch):
    src, code = _device(cli, tmp_path, 2 * 1024 * 1024)
    location = f"s3://{weed.new_bucket()}/backup"
    options = [a for k, v in weed.options().items() for a in ("-o", f"{k}={v}")]
    cli("store", "add", location, *options)
    assert json.loads(cli("store", "list", "--json").stdout)[0]["options"][
        "secret_access_key"] == "***"
    d = Daemon(cli, tmp_path)
    try:
        d.wait_for("READY=1")
        wait_for_first_snapshot(cli)
        eventually_sync(lambda: (st := _store_status(cli))["reachable"] and
                        st["last_upload"] and not st["objects_behind"], timeout=60)
        expected = tree_state(src)
        before = _store_status(cli)["uploaded"]
        (src / "later.txt").write_text("sealed into the log\n")   # a segment and a head
        eventually_sync(lambda: _store_status(cli)["uploaded"] >= before + 2 and
                        not _store_status(cli)["objects_behind"], timeout=60)
        assert f"store {location}: reachable; up to date" in cli("status").stdout
    finally:
        assert d.stop() == 0
    assert len(json.loads(cli("snapshots", "--from", location, "--json").stdout)) == 1
    assert "no problems found" in cli("verify", "--read-data", "--from", location).stdout
    # A new device has no config: the AWS environment variables reach the bucket.
    for var, value in (("AWS_ENDPOINT_URL", weed.endpoint), ("AWS_REGION", "us-east-1"),
                       ("AWS_ACCESS_KEY_ID", weed.access_key),
                       ("AWS_SECRET_ACCESS_KEY", weed.secret_key)):
        monkeypatch.setenv(var, value)
    new = Cli(tmp_path / "home-new")
    new("recover", "--from", location, "--recovery-code-file", str(code))
    new("restore", "latest", "--from", location, "--to", str(tmp_path / "out"))
    assert tree_state(tmp_path / "out" / "src") == expected
