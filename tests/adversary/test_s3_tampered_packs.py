"""Whoever holds the bucket cuts a pack short or flips a byte in it after the restoring device
indexed it: the restore from S3 names the file whose data it was and restores every other one
(exit 13), and never writes the altered bytes out.

A restore reads an S3 pack's blobs as views of the 4 MiB windows it fetched (RangeWindows.spans)
and the index's pack sizes are those of before the change: these follow the bytes that way."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import Cli, tree_state

servers = pytest.importorskip("tests.servers", reason="the S3 test servers (tests/servers.py)")

PREFIX = "backup"


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    yield from servers.moto_server(tmp_path_factory.mktemp("moto"))


@pytest.fixture
def pushed(cli: Cli, tmp_path: Path, moto):
    """A tree whose big file fills a pack of its own (the bucket's largest), pushed to a
    bucket and indexed from there; (source, location, S3 client, bucket, that pack's key)."""
    import boto3

    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(20 << 20))   # 16 MiB packs: one is only its data
    for i in range(10):
        (src / f"small-{i}.txt").write_text(f"small file {i}\n" * 40)
    cli("init", "--source", str(src))
    cli("snapshot")
    bucket = moto.new_bucket()
    location = f"s3://{bucket}/{PREFIX}"
    cli("store", "add", location, *[a for k, v in moto.options().items()
                                    for a in ("-o", f"{k}={v}")])
    cli("store", "push", location)
    cli("snapshots", "--from", location)   # the index of the bucket, with each pack's size
    s3 = boto3.client("s3", endpoint_url=moto.endpoint, region_name=servers.REGION,
                      aws_access_key_id=moto.access_key, aws_secret_access_key=moto.secret_key)
    packs = s3.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/packs/")["Contents"]
    largest = max(packs, key=lambda o: o["Size"])
    assert largest["Size"] > 12 << 20
    return src, location, s3, bucket, largest["Key"]


def _restore_names_big_bin_only(cli: Cli, src: Path, location: str, out: Path) -> None:
    proc = cli("restore", "latest", "--from", location, "--to", str(out), check=False)
    assert proc.returncode == 13, proc.stderr
    assert "big.bin: not restored" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "src" / "big.bin").exists()
    restored = tree_state(out / "src")
    assert {k: v for k, v in tree_state(src).items() if b"big.bin" not in k} == restored


def test_a_pack_cut_short_in_the_bucket_is_refused_for_its_file_only(cli: Cli, tmp_path: Path,
                                                                      pushed):
    src, location, s3, bucket, key = pushed
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    s3.put_object(Bucket=bucket, Key=key, Body=body[:len(body) // 2])
    _restore_names_big_bin_only(cli, src, location, tmp_path / "out")


def test_a_byte_flipped_in_the_bucket_is_refused_for_its_file_only(cli: Cli, tmp_path: Path,
                                                                   pushed):
    src, location, s3, bucket, key = pushed
    body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0x40   # in a blob of big.bin, in the middle of a window
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))
    _restore_names_big_bin_only(cli, src, location, tmp_path / "out")
