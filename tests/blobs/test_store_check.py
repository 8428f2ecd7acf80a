"""`p2pbackup store check LOCATION` through the real CLI, against a directory and WebDAV."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pbackup.errors import ConfigError, DiskFull, StorageError
from tests.conftest import Cli
from tests.servers import DavServer, nginx_dav, wsgidav

from .test_webdav import dav_proxy, fail_first

STEPS = ["put", "get", "range", "list", "overwrite", "latency", "delete"]


def _steps(stdout: str) -> list[str]:
    return [line.split()[0] for line in stdout.splitlines() if line.split()[0] in STEPS]


def test_a_directory_is_usable_and_says_overwrites_are_checked(cli: Cli, tmp_path: Path) -> None:
    store = tmp_path / "usb"
    done = cli("store", "check", str(store))
    assert _steps(done.stdout) == STEPS
    assert all(line.split()[1] == "ok" for line in done.stdout.splitlines()[1:-1])
    assert done.stderr == ""
    assert "create-only: not enforced: p2pbackup checks before each write" in done.stdout
    assert "MiB/s" in done.stdout and "ms per request" in done.stdout
    assert done.stdout.rstrip().endswith("the store is usable")
    assert os.listdir(store / "check") == []   # the test object is gone


def test_wsgidav_enforces_create_only_with_an_app_password_from_the_environment(
        cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with wsgidav(tmp_path, username="alice", password="app-pass") as server:
        monkeypatch.setenv("P2PBACKUP_STORE_PASSWORD", "app-pass")
        location = server.url.replace("http://", "webdav://") + "/dav/p2pbackup"
        done = cli("store", "check", location, "--username", "alice", "--size", "2")
        assert _steps(done.stdout) == STEPS
        assert "overwrite ok      create-only: enforced" in done.stdout
        assert "2.0 MiB in" in done.stdout

        monkeypatch.setenv("P2PBACKUP_STORE_PASSWORD", "wrong")
        refused = cli("store", "check", location, "--username", "alice", check=False)
    assert refused.returncode == StorageError.exit_code
    assert refused.stdout.splitlines()[-1] == "put       FAILED"
    assert refused.stderr.startswith(f"p2pbackup: error: WebDAV store {location}: the server "
                                     "refused the credentials (HTTP 401)")
    assert len(refused.stderr.splitlines()) == 1


def test_credentials_in_the_location_exit_10_without_echoing_them(cli: Cli) -> None:
    refused = cli("store", "check", "webdavs://bob:hunter2@cloud.example.org/dav", check=False)
    assert refused.returncode == ConfigError.exit_code
    assert "credentials in the location are refused" in refused.stderr
    assert "hunter2" not in refused.stderr + refused.stdout


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[DavServer]:
    with nginx_dav(tmp_path) as server:
        yield server


async def test_a_full_server_fails_the_put_step_with_exit_12(cli: Cli, nginx: DavServer) -> None:
    async with dav_proxy(nginx.url, fail_first(1, 507, method="PUT")) as (url, _):
        full = await asyncio.to_thread(
            cli, "store", "check", url.replace("http://", "webdav://") + "/s", check=False)
    assert full.returncode == DiskFull.exit_code
    assert full.stdout.splitlines()[-1] == "put       FAILED"
    assert full.stderr.startswith("p2pbackup: error: The store webdav://")
    assert "is full" in full.stderr and len(full.stderr.splitlines()) == 1


async def test_a_server_that_ignores_overwrite_f_is_not_usable(cli: Cli, nginx: DavServer) -> None:
    def ignore_overwrite_f(headers: dict[str, str]) -> None:
        if headers.get("Overwrite") == "F":
            headers["Overwrite"] = "T"

    async with dav_proxy(nginx.url, lambda request: None, ignore_overwrite_f) as (url, _):
        weak = await asyncio.to_thread(
            cli, "store", "check", url.replace("http://", "webdav://") + "/s", check=False)
    assert weak.returncode == StorageError.exit_code
    assert _steps(weak.stdout) == STEPS[:5]
    assert weak.stdout.splitlines()[-1] == "overwrite FAILED"
    assert "does not honour create-only writes" in weak.stderr
