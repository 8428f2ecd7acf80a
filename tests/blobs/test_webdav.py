"""The WebDAV backend against real servers (wsgidav, nginx dav-ext), and its faults driven by a
small aiohttp proxy in front of a real server."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pbackup.blobs import open_store
from p2pbackup.blobs.webdav import WebDavStore, logical_name, physical_path
from p2pbackup.blobs.base import StoreFull
from p2pbackup.errors import ConfigError, DiskFull, StorageError
from p2pbackup.ids import OBJECT_NAMES
from tests.conftest import Cli
from tests.servers import DavServer, nginx_dav, serving, wsgidav

from .conformance import BlobStoreConformance

DEVICE = "d0" * 16
DIGEST = "ab" * 32


def _location(server: DavServer, path: str = "/p2pbackup") -> str:
    return server.url.replace("http://", "webdav://") + path


@pytest.fixture(scope="module")
def shared_wsgidav(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DavServer]:
    # one server for the module's conformance cases: starting it is most of a case's time
    with wsgidav(tmp_path_factory.mktemp("wsgidav"), username="alice",
                 password="app-pass") as server:
        yield server


@pytest.fixture(scope="module")
def shared_nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DavServer]:
    with nginx_dav(tmp_path_factory.mktemp("nginx")) as server:
        yield server


@pytest.fixture(scope="module")
def shared_nginx_locks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DavServer]:
    with nginx_dav(tmp_path_factory.mktemp("nginx-locks"), locks=True) as server:
        yield server


class TestWsgidav(BlobStoreConformance):

    @pytest.fixture
    async def store(self, shared_wsgidav: DavServer, request: pytest.FixtureRequest
                    ) -> AsyncIterator[WebDavStore]:
        # each case its own folder on the one server
        store = open_store(_location(shared_wsgidav, f"/dav/{request.node.name}"),
                           options={"username": "alice", "password": "app-pass"})
        yield store
        await store.close()


class TestNginxDavExt(BlobStoreConformance):
    # without and with LOCK (heads are then replaced under a lock)
    @pytest.fixture(params=["shared_nginx", "shared_nginx_locks"])
    async def store(self, request: pytest.FixtureRequest) -> AsyncIterator[WebDavStore]:
        server = request.getfixturevalue(request.param)
        store = open_store(_location(server, f"/{request.node.name}"))
        yield store
        await store.close()


# ---- location and layout -------------------------------------------------------------------

def test_credentials_in_the_location_are_refused_without_echoing_them() -> None:
    with pytest.raises(ConfigError) as refused:
        open_store("webdavs://bob:hunter2@cloud.example.org/remote.php/dav/files/bob/p2pbackup")
    assert "credentials in the location are refused" in str(refused.value)
    assert "hunter2" not in str(refused.value)
    assert "cloud.example.org/remote.php/dav/files/bob/p2pbackup" in str(refused.value)


def test_unknown_options_and_bad_locations_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown option"):
        open_store("webdav://h/p", options={"user": "x"})
    with pytest.raises(ConfigError, match="webdav://host/path"):
        open_store("webdav:///nohost")
    with pytest.raises(ConfigError, match="password must be a string"):
        open_store("webdav://h/p", options={"username": "u", "password": 1234})
    with pytest.raises(ConfigError, match="a password without a username"):
        open_store("webdav://h/p", options={"password": "p"})


def test_every_growing_prefix_is_sharded_and_maps_back() -> None:
    examples = {
        "pack": (f"packs/{DIGEST}", f"packs/ab/{DIGEST}"),
        "snapshot": (f"snapshots/{DIGEST}", f"snapshots/a/{DIGEST}"),
        "removal": (f"removals/{DIGEST}", f"removals/a/{DIGEST}"),
        "segment": (f"segments/{DEVICE}/000001234567", f"segments/{DEVICE}/000001234/000001234567"),
        "anchor": (f"segments/{DEVICE}/anchor", f"segments/{DEVICE}/anchor"),
        "head": (f"heads/{DEVICE}", f"heads/{DEVICE}"),
        "config": ("config", "config"),
    }
    for kind, (name, path) in examples.items():
        assert physical_path(name) == path, kind
        assert logical_name(path) == name, kind
    growing = {"pack", "snapshot", "removal", "segment"}
    assert growing <= {kind for kind, _ in OBJECT_NAMES}
    assert logical_name(f"packs/ab/{DIGEST}.1f2e.tmp") is None        # an upload under way
    assert logical_name(f"packs/cd/{DIGEST}") is None                 # not where it belongs


# ---- faults, through a proxy in front of a real server -------------------------------------

@contextlib.asynccontextmanager
async def dav_proxy(upstream: str, fault: Callable[[object], object | None],
                    edit: Callable[[dict[str, str]], None] = lambda headers: None,
                    ) -> AsyncIterator[tuple[str, list]]:
    """An aiohttp proxy to `upstream`; `fault(request)` may answer instead of the server, and
    `edit` changes the headers passed on. Yields its URL and the (method, path, headers) it
    saw."""
    import aiohttp
    from aiohttp import web

    seen: list = []
    session = aiohttp.ClientSession(auto_decompress=False)

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append((request.method, request.path, dict(request.headers)))
        answer = fault(request)
        if inspect.isawaitable(answer):
            answer = await answer
        if answer is not None:
            return answer
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length", "transfer-encoding")}
        if "Destination" in headers:
            headers["Destination"] = headers["Destination"].replace(proxy_url, upstream)
        edit(headers)
        async with session.request(request.method, upstream + request.path_qs,
                                   headers=headers, data=await request.read()) as resp:
            body = await resp.read()
            out = {k: v for k, v in resp.headers.items()
                   if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                        "content-encoding")}
            return web.Response(status=resp.status, headers=out, body=body)

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", handle)
    try:
        async with serving(app) as proxy_url:
            yield proxy_url, seen
    finally:
        await session.close()


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[DavServer]:
    with nginx_dav(tmp_path) as server:
        yield server


def fail_first(n: int, status: int, headers: dict[str, str] | None = None,
                method: str | None = None) -> Callable[[object], object | None]:
    from aiohttp import web

    left = [n]

    def fault(request: object) -> object | None:
        if left[0] and (method is None or request.method == method):  # type: ignore[attr-defined]
            left[0] -= 1
            return web.Response(status=status, headers=headers or {})
        return None
    return fault


async def _store(url: str, path: str = "/s", **kwargs: Any) -> tuple[WebDavStore, list[float]]:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    return WebDavStore(url.replace("http://", "webdav://") + path, sleep=sleep,
                       **kwargs), waits


async def test_429_waits_as_long_as_retry_after_says(nginx: DavServer) -> None:
    async with dav_proxy(nginx.url, fail_first(2, 429, {"Retry-After": "7"}, "PUT")) as (url, _):
        store, waits = await _store(url)
        await store.put(f"packs/{DIGEST}", b"pack")
        assert waits == [7.0, 7.0]
        assert await store.get(f"packs/{DIGEST}") == b"pack"
        await store.close()


async def test_retry_after_is_bounded_and_an_http_date_is_read(nginx: DavServer) -> None:
    far = "Wed, 21 Oct 2099 07:28:00 GMT"
    async with dav_proxy(nginx.url, fail_first(1, 503, {"Retry-After": far})) as (url, _):
        store, waits = await _store(url)
        assert not await store.has("config")
        assert waits == [60.0]
        await store.close()


async def test_503_without_retry_after_backs_off_then_says_so_in_one_line(
        nginx: DavServer) -> None:
    async with dav_proxy(nginx.url, fail_first(100, 503)) as (url, _):
        store, waits = await _store(url)
        with pytest.raises(StorageError) as failed:
            await store.put("config", b"c")
        await store.close()
    assert len(waits) == 5 and all(0 < w <= 60 for w in waits)
    assert waits[-1] > waits[0]   # exponential: the last wait is longer than the first
    message = str(failed.value)
    assert "\n" not in message and url.replace("http://", "webdav://") in message
    assert "503" in message and "nothing already stored was lost" in message


async def test_507_is_the_server_is_full(nginx: DavServer) -> None:
    async with dav_proxy(nginx.url, fail_first(1, 507, method="PUT")) as (url, _):
        store, _waits = await _store(url)
        with pytest.raises(StoreFull) as full:
            await store.put(f"packs/{DIGEST}", b"pack")
        await store.close()
    assert isinstance(full.value, DiskFull) and full.value.exit_code == DiskFull.exit_code
    assert "is full (HTTP 507 Insufficient Storage)" in str(full.value) and "/s" in str(full.value)


async def test_wrong_password_is_one_line_naming_the_store(tmp_path: Path) -> None:
    with wsgidav(tmp_path, username="alice", password="right") as server:
        store = open_store(_location(server, "/dav/x"),
                           options={"username": "alice", "password": "wrong"})
        with pytest.raises(StorageError) as refused:
            await store.put("config", b"c")
        await store.close()
    message = str(refused.value)
    assert "refused the credentials" in message and _location(server, "/dav/x") in message


async def test_listings_are_depth_1_and_only_of_the_folders_asked_for(nginx: DavServer) -> None:
    async with dav_proxy(nginx.url, lambda request: None) as (url, seen):
        store, _ = await _store(url)
        await store.put(f"packs/{DIGEST}", b"p")
        await store.put(f"snapshots/{DIGEST}", b"s")
        await store.put(f"segments/{DEVICE}/000000000001", b"1")
        await store.put(f"segments/{DEVICE}/000000001001", b"2")
        seen.clear()
        assert sorted([n async for n in store.list(f"segments/{DEVICE}/")]) == [
            f"segments/{DEVICE}/000000000001", f"segments/{DEVICE}/000000001001"]
        listed = [(path, headers.get("Depth")) for method, path, headers in seen
                  if method == "PROPFIND"]
        assert {depth for _, depth in listed} == {"1"}
        assert sorted(path for path, _ in listed) == [
            f"/s/segments/{DEVICE}/", f"/s/segments/{DEVICE}/000000000/",
            f"/s/segments/{DEVICE}/000000001/"]
        seen.clear()
        assert [n async for n in store.list(f"packs/{DIGEST[:3]}")] == [f"packs/{DIGEST}"]
        assert [path for method, path, _ in seen if method == "PROPFIND"] == [
            "/s/packs/", "/s/packs/ab/"]
        await store.close()


async def test_immutable_names_move_with_overwrite_f_and_heads_with_t(nginx: DavServer) -> None:
    async with dav_proxy(nginx.url, lambda request: None) as (url, seen):
        store, _ = await _store(url)
        await store.put(f"snapshots/{DIGEST}", b"s")
        await store.put(f"heads/{DEVICE}", b"h1")
        await store.put(f"heads/{DEVICE}", b"h2")
        moves = [(path.split("/")[2], headers.get("Overwrite")) for method, path, headers
                 in seen if method == "MOVE"]
        assert moves == [("snapshots", "F"), ("heads", "T"), ("heads", "T")]
        assert await store.get(f"heads/{DEVICE}") == b"h2"
        await store.close()


@pytest.fixture(params=["nginx", "wsgidav"])
def either_server(request: pytest.FixtureRequest) -> DavServer:
    return request.getfixturevalue(f"shared_{request.param}")


async def test_a_move_whose_answer_was_lost_is_retried_and_found_done(
        either_server: DavServer, request: pytest.FixtureRequest) -> None:
    """The server moved the object but its answer never came (a 503 here): the retried MOVE
    finds no temporary file (wsgidav: 404; nginx: 412, it looks at the target first), and
    the object in place holds the bytes put."""
    server = either_server
    import aiohttp
    from aiohttp import web

    lost = [1]

    async def move_then_lose_the_answer(request: web.Request) -> web.Response | None:
        if request.method != "MOVE" or not lost[0]:
            return None
        lost[0] = 0
        target = request.headers["Destination"].replace(str(request.url.origin()), server.url)
        async with aiohttp.ClientSession(headers={
                "Authorization": request.headers.get("Authorization", "")}) as session:
            async with session.request("MOVE", server.url + request.path, headers={
                    "Destination": target, "Overwrite": request.headers["Overwrite"]}) as done:
                assert done.status in (201, 204)
        return web.Response(status=503)

    async with dav_proxy(server.url, move_then_lose_the_answer) as (url, seen):
        store, waits = await _store(url, f"/dav/{request.node.name}" if server.username
                                    else f"/{request.node.name}",
                                    username=server.username, password=server.password)
        await store.put(f"snapshots/{DIGEST}", memoryview(b"snapshot"))
        assert [m for m, _, _ in seen].count("MOVE") == 2 and len(waits) == 1
        assert await store.get(f"snapshots/{DIGEST}") == b"snapshot"
        assert [n async for n in store.list("")] == [f"snapshots/{DIGEST}"]   # no leftovers
        await store.close()


async def test_a_repository_copied_to_webdav_lists_verifies_and_restores_from_it(
        cli: Cli, tmp_path: Path, shared_nginx: DavServer) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "small.txt").write_text("hello")
    (source / "big.bin").write_bytes(os.urandom(3 << 20))
    await asyncio.to_thread(cli, "init", "--source", str(source))
    await asyncio.to_thread(cli, "snapshot", "--offline")
    location = _location(shared_nginx, "/copied")
    local, remote = open_store(str(cli.home / "store")), open_store(location)
    for name in [n async for n in local.list("")]:
        if name != "lock":
            await remote.put(name, await local.get(name))
    await remote.close()
    listed = await asyncio.to_thread(cli, "snapshots", "--from", location)
    assert "1 snapshots" in listed.stdout
    verified = await asyncio.to_thread(cli, "verify", "--read-data", "--from", location)
    assert "no problems found" in verified.stdout
    await asyncio.to_thread(cli, "restore", "latest", "--from", location,
                            "--to", str(tmp_path / "out"))
    restored = tmp_path / "out" / "src"
    assert (restored / "big.bin").read_bytes() == (source / "big.bin").read_bytes()
    assert (restored / "small.txt").read_text() == "hello"


async def test_a_self_signed_server_is_refused_at_once_unless_its_ca_file_is_given(
        tmp_path: Path) -> None:
    with wsgidav(tmp_path, tls=True) as server:
        location = server.url.replace("https://", "webdavs://") + "/dav/s"
        waits: list[float] = []

        async def sleep(seconds: float) -> None:
            waits.append(seconds)

        untrusted = WebDavStore(location, sleep=sleep)
        with pytest.raises(StorageError) as refused:
            await untrusted.put("config", b"c")
        await untrusted.close()
        assert "TLS certificate is not trusted" in str(refused.value)
        assert "ca_file" in str(refused.value) and waits == []   # no retries: none would help
        trusted = open_store(location, options={"ca_file": str(server.ca_file)})
        await trusted.put("config", b"c")
        assert await trusted.get("config") == b"c"
        await trusted.close()


@pytest.mark.parametrize("kind", ["nginx-locks", "wsgidav"])
async def test_two_devices_replacing_one_head_from_one_version_never_both_win(
        kind: str, shared_nginx_locks: DavServer, shared_wsgidav: DavServer,
        request: pytest.FixtureRequest) -> None:
    """Device B replaces the head while device A is between reading it and moving its own
    into place (B's whole replace runs as A's MOVE reaches the server): one of them wins,
    never both (A would silently put its head over B's). wsgidav evaluates the If header;
    nginx dav-ext ignores it but, with a lock zone (DAV class 2), refuses any write to a
    resource A holds an exclusive LOCK on, compared and moved under that lock."""
    server = shared_nginx_locks if kind == "nginx-locks" else shared_wsgidav
    folder = f"{'/dav' if kind == 'wsgidav' else ''}/{request.node.name}"
    auth = {"username": "alice", "password": "app-pass"} if kind == "wsgidav" else {}
    head = f"heads/{DEVICE}"
    b = WebDavStore(_location(server, folder), **auth)
    results: dict[str, bool] = {}

    async def b_first(request: Any) -> None:
        if request.method == "MOVE" and request.headers["Destination"].endswith(head) \
                and "b" not in results:
            results["b"] = await b.replace_if(head, b"from B", tag)
        return None

    try:
        assert await b.replace_if(head, b"v1", None)
        _, tag = await b.get_tagged(head)
        async with dav_proxy(server.url, b_first) as (url, _):
            a = WebDavStore(url.replace("http://", "webdav://") + folder, **auth)
            try:
                results["a"] = await a.replace_if(head, b"from A", tag)
            finally:
                await a.close()
        assert "b" in results, "A never moved its head into place"
        assert sorted(results.values()) == [False, True], results
        winner = b"from A" if results["a"] else b"from B"
        assert (await b.get_tagged(head))[0] == winner
    finally:
        await b.close()
