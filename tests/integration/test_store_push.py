"""`p2pbackup store push`: the daemon's upload pass, once, from the command line, against a
real S3 server (SeaweedFS's `weed mini`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import Cli
from tests.faultproxy import Fault, FaultProxy
from tests.integration.test_daemon import Daemon
from tests.integration.test_stores import _device, _local_objects

servers = pytest.importorskip("tests.servers", reason="the S3 test servers (tests/servers.py)")


@pytest.fixture(scope="module")
def weed(tmp_path_factory):
    yield from servers.weed_mini(tmp_path_factory.mktemp("weed"))


@pytest.fixture(scope="module")
def weed_proxy(weed):
    with FaultProxy(weed.endpoint) as proxy:
        yield proxy


@pytest.fixture
def proxy(weed_proxy):
    weed_proxy.fault = None
    yield weed_proxy
    weed_proxy.fault = None


def _bucket_names(weed, bucket: str, prefix: str) -> set[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=weed.endpoint, region_name=servers.REGION,
                          aws_access_key_id=weed.access_key,
                          aws_secret_access_key=weed.secret_key)
    names = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                Prefix=prefix + "/"):
        names |= {o["Key"][len(prefix) + 1:] for o in page.get("Contents", ())}
    return names


def _objects(cli: Cli) -> set[str]:
    """The names of the objects in this device's store (packs without the fan-out folder)."""
    return {re.sub(r"^packs/../", "packs/", n) for n in _local_objects(cli)}


def _options(weed, **more: object) -> list[str]:
    return [a for k, v in weed.options(**more).items() for a in ("-o", f"{k}={v}")]


def test_push_uploads_every_object_once_and_a_second_push_nothing(cli: Cli, tmp_path: Path,
                                                                 weed):
    _device(cli, tmp_path, 3 * 1024 * 1024)
    cli("snapshot")
    bucket = weed.new_bucket()
    location = f"s3://{bucket}/backup"
    cli("store", "add", location, *_options(weed))
    out = cli("store", "push").stdout
    objects = _objects(cli)
    assert f"pushed {len(objects)} objects" in out and location in out
    assert _bucket_names(weed, bucket, "backup") == objects
    assert cli("store", "push", location).stdout.strip() == \
        f"{location} is up to date (nothing to push)"
    # New objects only: one more snapshot is a snapshot object, its tree and a pack or so.
    (tmp_path / "src" / "new.txt").write_text("one more file\n")
    cli("snapshot")
    added = _objects(cli) - objects
    assert f"pushed {len(added)} objects" in cli("store", "push").stdout
    assert "no problems found" in cli("verify", "--read-data", "--from", location).stdout


def test_push_with_wrong_credentials_fails_in_one_line_naming_the_store(cli: Cli,
                                                                        tmp_path: Path, weed):
    _device(cli, tmp_path, 1024)
    cli("snapshot")
    location = f"s3://{weed.new_bucket()}/backup"
    proc = cli("store", "push", location, *_options(weed, secret_access_key="wrong"),
               check=False)
    assert proc.returncode == 11, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"store {location}: the server refused the credentials" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_push_is_refused_while_the_daemon_runs(cli: Cli, tmp_path: Path, weed):
    _device(cli, tmp_path, 1024)
    d = Daemon(cli, tmp_path)
    try:
        d.wait_for("READY=1")
        proc = cli("store", "push", f"s3://{weed.new_bucket()}/backup", *_options(weed),
                   check=False)
    finally:
        assert d.stop() == 0
    assert proc.returncode == 16, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"p2pbackupd (pid {d.proc.pid}) is running and uploads to the stores itself" \
        in proc.stderr


def test_snapshot_push_takes_the_snapshot_and_uploads_it_in_one_command(cli: Cli,
                                                                       tmp_path: Path, weed):
    _device(cli, tmp_path, 3 * 1024 * 1024)
    bucket = weed.new_bucket()
    location = f"s3://{bucket}/backup"
    cli("store", "add", location, *_options(weed))
    out = cli("snapshot", "--push").stdout
    objects = _objects(cli)
    assert re.search(r"^snapshot [0-9a-f]{8} saved$", out, re.M), out   # both summaries
    assert f"pushed {len(objects)} objects" in out and location in out, out
    assert _bucket_names(weed, bucket, "backup") == objects
    assert cli("store", "push").stdout.strip() == f"{location} is up to date (nothing to push)"
    assert "no problems found" in cli("verify", "--read-data", "--from", location).stdout


def test_snapshot_push_to_a_failing_store_saves_the_snapshot_says_one_line_and_a_push_resumes(
        cli: Cli, tmp_path: Path):
    _device(cli, tmp_path, 1024 * 1024)
    target = tmp_path / "usb"
    cli("store", "add", str(target))
    if target.is_dir():
        target.rmdir()
    target.write_text("not a directory: every put fails (even as root)\n")
    proc = cli("snapshot", "--push", check=False)
    assert proc.returncode == 11, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"store {target}:" in proc.stderr and "the snapshot is saved here" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "1 snapshots" in cli("snapshots").stdout
    target.unlink()   # the disk is back
    assert f"pushed {len(_objects(cli))} objects" in cli("store", "push").stdout
    assert "no problems found" in cli("verify", "--read-data", "--from", str(target)).stdout


def _push_fails_keeping_the_snapshot(cli: Cli, code: int) -> str:
    """`snapshot --push` against a store that fails: exit `code` and one line, the snapshot
    saved here all the same (the local repository verifies); that line."""
    proc = cli("snapshot", "--push", check=False)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert "the snapshot is saved here" in proc.stderr, proc.stderr
    assert re.search(r"^snapshot [0-9a-f]{8} saved$", proc.stdout, re.M), proc.stdout
    assert len(json.loads(cli("snapshots", "--json").stdout)) == 1
    assert "no problems found" in cli("verify", "--read-data").stdout
    return proc.stderr


def test_snapshot_push_to_a_full_s3_store_exits_12_naming_the_store_and_keeps_the_snapshot(
        cli: Cli, tmp_path: Path, weed, proxy: FaultProxy):
    _device(cli, tmp_path, 1024 * 1024)
    bucket = weed.new_bucket()
    location = f"s3://{bucket}/backup"
    cli("store", "add", location, *_options(weed, endpoint=proxy.url))
    proxy.fault = Fault("status", method="PUT", match="/packs/", status=507,
                        code="InsufficientStorage")
    line = _push_fails_keeping_the_snapshot(cli, 12)
    assert proxy.fault.hits, "no pack was put through the proxy"
    assert line.startswith(f"p2pbackup: error: The store {location} is full (the server "
                           "answered InsufficientStorage"), line
    proxy.fault = None   # space was made: the push resumes and the store is whole
    assert f"pushed " in cli("store", "push").stdout
    assert _bucket_names(weed, bucket, "backup") == _objects(cli)
    assert "no problems found" in cli("verify", "--read-data", "--from", location).stdout


def test_snapshot_push_with_rejected_credentials_exits_11_in_one_line_naming_the_store(
        cli: Cli, tmp_path: Path, weed):
    _device(cli, tmp_path, 1024)
    location = f"s3://{weed.new_bucket()}/backup"
    cli("store", "add", location, *_options(weed, secret_access_key="wrong"))
    line = _push_fails_keeping_the_snapshot(cli, 11)
    assert line.startswith(f"p2pbackup: error: store {location}: the server refused the "
                           "credentials (SignatureDoesNotMatch)"), line


def test_snapshot_push_over_a_storage_server_quota_exits_12_with_the_server_line(
        cli: Cli, tmp_path: Path):
    _device(cli, tmp_path, 1024 * 1024)
    with servers.storage_server(tmp_path / "srv", "--quota", "256K") as server:
        cli("store", "add", server.location, "-o", f"invite={server.invite()}",
            "-o", f"ca_file={server.ca_file}")
        line = _push_fails_keeping_the_snapshot(cli, 12)
    assert line.startswith(f"p2pbackup: error: The store {server.location} is full ("), line


def test_snapshot_push_is_refused_while_the_daemon_runs(cli: Cli, tmp_path: Path):
    _device(cli, tmp_path, 1024)
    cli("store", "add", str(tmp_path / "usb"))
    d = Daemon(cli, tmp_path)
    try:
        d.wait_for("READY=1")
        proc = cli("snapshot", "--push", check=False)
    finally:
        assert d.stop() == 0
    assert proc.returncode == 16, proc.stderr
    assert f"p2pbackupd (pid {d.proc.pid}) is running" in proc.stderr


def test_snapshot_push_registers_on_a_storage_server_and_uploads_there(cli: Cli,
                                                                       tmp_path: Path):
    # (its requests are signed as this device, as the daemon's are)
    _device(cli, tmp_path, 1024 * 1024)
    with servers.storage_server(tmp_path / "srv") as server:
        cli("store", "add", server.location, "-o", f"invite={server.invite()}",
            "-o", f"ca_file={server.ca_file}")
        out = cli("snapshot", "--push").stdout
        assert f"to {server.location} in" in out, out
        listed = json.loads(cli("snapshots", "--json", "--from", server.location).stdout)
        assert [s["id"] for s in listed] == \
            [s["id"] for s in json.loads(cli("snapshots", "--json").stdout)]
