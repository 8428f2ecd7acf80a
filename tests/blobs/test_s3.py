"""The S3 store against real servers: SeaweedFS (`weed mini`), moto's server mode, and rclone
serve s3 (which ignores If-None-Match: the store must still never replace an object there)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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


def _store(server: servers.S3Server, prefix: str = "repo", **options: object) -> S3Store:
    store = open_store(f"s3://{server.new_bucket()}/{prefix}", options=server.options(**options))
    assert isinstance(store, S3Store)
    store._sleep = _no_wait   # tests never wait out a backoff
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
