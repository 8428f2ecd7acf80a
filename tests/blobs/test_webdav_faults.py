"""The WebDAV store behind a fault-injecting proxy (tests/faultproxy.py) in front of wsgidav
(issue 17 §4): a fault that passes is retried and the object is whole; one that does not is
one line naming the store; a slow server is given up on after the store's `timeout`."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from p2pbackup.blobs import open_store
from p2pbackup.blobs.webdav import WebDavStore
from p2pbackup.errors import StorageError
from tests.faultproxy import Fault, FaultProxy
from tests.servers import DavServer, wsgidav

from .conformance import addressed


@pytest.fixture(scope="module")
def dav(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DavServer]:
    with wsgidav(tmp_path_factory.mktemp("wsgidav")) as server:
        yield server


@pytest.fixture
def proxy(dav: DavServer) -> Iterator[FaultProxy]:
    with FaultProxy(dav.url) as proxy:
        yield proxy


async def _no_wait(_seconds: float) -> None:
    pass


def _store(proxy: FaultProxy, folder: str, **options: object) -> WebDavStore:
    store = open_store(f"webdav://{proxy.url.split('://')[1]}/dav/{folder}", options=options)
    assert isinstance(store, WebDavStore)
    store._sleep = _no_wait   # (the retries' pauses: the test does not wait them out)
    return store


@pytest.mark.parametrize("fault", [Fault("status", times=2, status=500),
                                   Fault("reset", times=1, method="PUT"),
                                   Fault("reset", times=1, method="GET")],
                         ids=["500-passes", "reset-mid-upload", "reset-mid-download"])
async def test_a_fault_that_passes_is_retried_and_the_object_is_whole(
        proxy: FaultProxy, fault: Fault, request: pytest.FixtureRequest) -> None:
    store = _store(proxy, request.node.name.replace("[", "-").rstrip("]"))
    data = os.urandom(300_000)
    name = addressed("packs", data)
    try:
        proxy.fault = fault
        await store.put(name, data)
        assert await store.get(name) == data
        assert fault.hits
        assert [n async for n in store.list("")] == [name]
    finally:
        proxy.fault = None
        await store.close()


async def test_a_server_that_keeps_failing_is_one_line_naming_the_store(
        proxy: FaultProxy) -> None:
    store = _store(proxy, "failing")
    data = b"a pack"
    try:
        proxy.fault = Fault("status", status=500)
        with pytest.raises(StorageError) as got:
            await store.put(addressed("packs", data), data)
        line = str(got.value)
        assert "\n" not in line and line.startswith(f"WebDAV store {store.location}: ")
        assert "failed 6 times, last: the server answered 500" in line
    finally:
        proxy.fault = None
        await store.close()


async def test_a_slow_server_is_given_up_on_after_the_timeout_in_one_line(
        proxy: FaultProxy) -> None:
    store = _store(proxy, "slow", timeout="0.5")
    try:
        proxy.fault = Fault("delay", seconds=3, method="GET")
        with pytest.raises(StorageError) as got:
            await store.get("config")
        line = str(got.value)
        assert "\n" not in line and line.startswith(f"WebDAV store {store.location}: ")
        assert "last: no answer within 0.5 s (the store's timeout option)" in line, line
    finally:
        proxy.fault = None
        await store.close()
