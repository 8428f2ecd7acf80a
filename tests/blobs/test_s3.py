"""The S3 store against real servers: SeaweedFS (`weed mini`), moto's server mode, and rclone
serve s3 (which ignores If-None-Match: the store must still never replace an object there)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from p2pbackup.blobs import open_store
from p2pbackup.blobs.base import ObjectExists
from p2pbackup.blobs.s3 import S3Store
from p2pbackup.errors import ConfigError, NotFound, StorageError
from tests import servers

from .conformance import BlobStoreConformance


@pytest.fixture(scope="module", params=["weed", "moto", "rclone"])
def s3_server(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.S3Server]:
    start = {"weed": servers.weed_mini, "moto": servers.moto_server,
             "rclone": servers.rclone_s3}[request.param]
    yield from start(tmp_path_factory.mktemp(request.param))


async def _no_wait(_seconds: float) -> None:
    return None


async def _short_wait(seconds: float) -> None:
    # rclone `serve s3` once served a body cut short (under the whole Content-Length) to a
    # read right after 40 concurrent puts, five reads in a row: its files lag its answers.
    # The store's backoff absorbs that in use; here it is a tenth as long, not skipped.
    await asyncio.sleep(seconds / 10)


def _store(server: servers.S3Server, prefix: str = "repo", **options: object) -> S3Store:
    store = open_store(f"s3://{server.new_bucket()}/{prefix}", options=server.options(**options))
    assert isinstance(store, S3Store)
    # tests never wait out a whole backoff
    store._sleep = _short_wait if server.name == "rclone" else _no_wait
    return store


class TestS3Store(BlobStoreConformance):
    @pytest.fixture
    def store(self, s3_server: servers.S3Server) -> S3Store:
        return _store(s3_server)


async def test_create_only_is_claimed_only_where_the_server_enforces_it(
        s3_server: servers.S3Server) -> None:
    store = _store(s3_server)
    assert not store.capabilities.create_only   # not claimed before it is known
    await store.put("snapshots/" + "ab" * 32, b"x")
    assert store.capabilities.create_only == s3_server.conditional_put
    assert [n async for n in store.list("")] == ["snapshots/" + "ab" * 32]  # probe removed


async def test_an_object_is_never_replaced_even_where_the_server_ignores_the_condition(
        s3_server: servers.S3Server) -> None:
    store = _store(s3_server)
    name = "packs/" + "cd" * 32
    await store.put(name, b"the pack")
    with pytest.raises(ObjectExists, match=f"store s3://.*: {name} already holds other bytes"):
        await store.put(name, b"another pack")
    assert await store.get(name) == b"the pack"


async def test_two_stores_under_one_bucket_do_not_see_each_other(
        s3_server: servers.S3Server) -> None:
    bucket = s3_server.new_bucket()
    a = open_store(f"s3://{bucket}/a", options=s3_server.options())
    b = open_store(f"s3://{bucket}/a-b/c", options=s3_server.options())
    await a.put("config", b"a")
    await b.put("config", b"b")
    assert [n async for n in a.list("")] == ["config"]
    assert await b.get("config") == b"b" and await a.get("config") == b"a"


# ---- locations, options and credentials ------------------------------------------------

def _only_where_keys_are_checked(server: servers.S3Server) -> None:
    if server.name == "moto":
        pytest.skip("moto accepts any key")


async def test_credentials_from_the_standard_environment_variables(
        s3_server: servers.S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3_server.new_bucket()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_REGION", servers.REGION)
    store = open_store(f"s3://{bucket}/p")
    await store.put("config", b"c")
    assert await store.get("config") == b"c"


async def test_credentials_in_the_config_win_over_the_environment(
        s3_server: servers.S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    _only_where_keys_are_checked(s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone-else")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-this-one")
    store = _store(s3_server)
    await store.put("config", b"c")
    assert await store.get("config") == b"c"


async def test_wrong_credentials_are_one_line_naming_the_store(
        s3_server: servers.S3Server) -> None:
    _only_where_keys_are_checked(s3_server)
    store = _store(s3_server, secret_access_key="wrong")
    with pytest.raises(StorageError) as got:
        await store.get("config")
    line = str(got.value)
    assert line.startswith(f"store {store.location}: the server refused the credentials")
    assert "\n" not in line


async def test_a_missing_bucket_is_one_line_naming_the_store(
        s3_server: servers.S3Server) -> None:
    store = open_store("s3://no-such-bucket-p2p/x", options=s3_server.options())
    with pytest.raises(StorageError, match="store s3://no-such-bucket-p2p/x: the bucket does "
                                           "not exist") as got:
        await store.get("config")
    assert not isinstance(got.value, NotFound)


async def test_an_unreachable_endpoint_is_one_line_after_bounded_retries() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    port = servers.free_port()   # nothing listens there
    store = S3Store("s3://b/p", {"endpoint": f"http://127.0.0.1:{port}", "access_key_id": "k",
                                 "secret_access_key": "s"}, sleep=sleep)
    with pytest.raises(StorageError) as got:
        await store.get("config")
    assert str(got.value).startswith(f"store s3://b/p: read config at http://127.0.0.1:{port} "
                                  "failed: tcp connect error: Connection refused")
    assert "\n" not in str(got.value)
    assert len(slept) == 4 and slept == sorted(slept)   # 5 attempts, growing backoff


def test_options_come_first_then_the_environment() -> None:
    from p2pbackup.blobs.s3 import operator_config

    env = {"AWS_ACCESS_KEY_ID": "env-id", "AWS_SECRET_ACCESS_KEY": "env-secret",
           "AWS_ENDPOINT_URL": "http://env:1", "AWS_REGION": "eu-env-1", "AWS_PROFILE": "p"}
    got = operator_config("s3://b/a/b", {"access_key_id": "cfg-id", "secret_access_key": "cfg",
                                         "region": "eu-cfg-1"}, env)
    assert (got["access_key_id"], got["secret_access_key"], got["region"], got["endpoint"],
            got["root"], got["bucket"]) == ("cfg-id", "cfg", "eu-cfg-1", "http://env:1",
                                            "/a/b/", "b")
    assert got["enable_virtual_host_style"] == "false"   # an endpoint: path-style
    from_env = operator_config("s3://b", {}, env)
    assert (from_env["access_key_id"], from_env["secret_access_key"]) == ("env-id",
                                                                          "env-secret")
    assert operator_config("s3://b", {}, {"AWS_PROFILE": "work"})["profile"] == "work"
    aws = operator_config("s3://b", {"path_style": "false"}, {})
    assert aws["enable_virtual_host_style"] == "true" and "endpoint" not in aws


@pytest.mark.parametrize("location, options, message", [
    ("s3://", {}, "write an S3 location as s3://BUCKET/PREFIX"),
    ("s3://Bad_Bucket/x", {}, "write an S3 location"),
    ("s3://b/../x", {}, "the prefix must be a plain path"),
    ("s3://b/x", {"acess_key_id": "k"}, "unknown option 'acess_key_id'"),
    ("s3://b/x", {"access_key_id": "k"}, "access_key_id is set but secret_access_key is not"),
    ("s3://b/x", {"path_style": "maybe"}, "path_style must be true or false"),
    ("s3://b/x", {"timeout": "soon"}, "timeout must be a number of seconds"),
])
def test_a_bad_location_or_option_is_one_config_error(location: str, options: dict,
                                                       message: str) -> None:
    with pytest.raises(ConfigError, match=f"store {location}.*: .*{message}"):
        open_store(location, options=options)
