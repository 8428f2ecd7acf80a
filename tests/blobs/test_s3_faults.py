"""The S3 store behind a fault-injecting proxy (tests/faultproxy.py) in front of weed mini:
every fault is retried where it may pass, and otherwise ends in one line naming the store;
nothing stored is lost or replaced."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pbackup.blobs.base import StoreFull
from p2pbackup.blobs.s3 import S3Store
from p2pbackup.errors import DiskFull, StorageError
from tests import servers
from tests.faultproxy import Fault, FaultProxy


@pytest.fixture(scope="module")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.S3Server]:
    yield from servers.weed_mini(tmp_path_factory.mktemp("weed"))


@pytest.fixture(scope="module")
def module_proxy(weed: servers.S3Server) -> Iterator[FaultProxy]:
    with FaultProxy(weed.endpoint) as proxy:
        yield proxy


@pytest.fixture
def proxy(module_proxy: FaultProxy) -> Iterator[FaultProxy]:
    module_proxy.fault = None
    yield module_proxy
    module_proxy.fault = None


class Sleeps(list):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def store(weed: servers.S3Server, proxy: FaultProxy, sleeps: Sleeps) -> S3Store:
    return S3Store(f"s3://{weed.new_bucket()}/repo", weed.options(endpoint=proxy.url),
                   sleep=sleeps)


def one_line(exc: BaseException, store: S3Store) -> str:
    line = str(exc)
    assert "\n" not in line and line.startswith(f"store {store.location}") or \
        f"store {store.location}" in line, line
    return line


@pytest.mark.parametrize("status, code", [(500, "InternalError"), (503, "SlowDown"),
                                          (429, "SlowDown")])
async def test_a_server_error_that_passes_is_retried_with_backoff(
        store: S3Store, proxy: FaultProxy, sleeps: Sleeps, status: int, code: str) -> None:
    proxy.fault = Fault("status", times=2, status=status, code=code)
    await store.put("heads/" + "0a" * 16, b"head")
    assert proxy.fault.hits == 2 and len(sleeps) == 2 and sleeps[1] > sleeps[0] / 2
    proxy.fault = Fault("status", times=3, method="GET", status=status, code=code)
    assert await store.get("heads/" + "0a" * 16) == b"head"


async def test_a_server_that_keeps_failing_is_one_line_after_bounded_attempts(
        store: S3Store, proxy: FaultProxy, sleeps: Sleeps) -> None:
    proxy.fault = Fault("status", status=500)
    with pytest.raises(StorageError) as got:
        await store.get("config")
    assert one_line(got.value, store) == (f"store {store.location}: the server answered 500 "
                                          "(InternalError) to read config")
    assert proxy.fault.hits == 5 and len(sleeps) == 4


async def test_a_connection_reset_mid_upload_is_retried_and_the_object_is_whole(
        store: S3Store, proxy: FaultProxy) -> None:
    data = os.urandom(3 << 20)
    name = "packs/" + "ab" * 32
    proxy.fault = Fault("reset", times=1, method="PUT")
    await store.put(name, data)
    assert proxy.fault.hits == 1
    proxy.fault = None
    assert await store.get(name) == data


async def test_a_connection_reset_mid_download_is_retried(
        store: S3Store, proxy: FaultProxy) -> None:
    data = os.urandom(1 << 20)
    await store.put("packs/" + "cd" * 32, data)
    proxy.fault = Fault("reset", times=2, method="GET")
    assert await store.get("packs/" + "cd" * 32) == data
    assert await store.get_range("packs/" + "cd" * 32, 1000, 5000) == data[1000:6000]


async def test_a_body_ended_by_a_clean_close_is_read_again(
        store: S3Store, proxy: FaultProxy) -> None:
    """Half the body under the whole one's Content-Length, then FIN (rclone `serve s3` once
    did this right after concurrent puts): read again, and one line if it never passes."""
    data = os.urandom(1 << 20)
    name = "packs/" + "c7" * 32
    await store.put(name, data)
    proxy.fault = Fault("hangup", times=2, method="GET")
    assert await store.get(name) == data
    assert proxy.fault.hits == 2
    proxy.fault = Fault("hangup", method="GET")
    with pytest.raises(StorageError) as got:
        await store.get(name)
    assert "end of file before message length reached" in one_line(got.value, store)
    assert proxy.fault.hits == 5   # every attempt (ATTEMPTS), then the line


async def test_a_connection_reset_every_time_is_one_line(
        store: S3Store, proxy: FaultProxy) -> None:
    await store.put("snapshots/" + "ef" * 32, b"x" * 10000)
    proxy.fault = Fault("reset", method="GET")
    with pytest.raises(StorageError) as got:
        await store.get("snapshots/" + "ef" * 32)
    one_line(got.value, store)


async def test_a_slow_server_times_out_in_one_line(
        weed: servers.S3Server, proxy: FaultProxy, sleeps: Sleeps) -> None:
    store = S3Store(f"s3://{weed.new_bucket()}/repo",
                    weed.options(endpoint=proxy.url, timeout=0.5), sleep=sleeps, attempts=2)
    proxy.fault = Fault("delay", seconds=3)
    with pytest.raises(StorageError) as got:
        await store.get("config")
    assert "timeout" in one_line(got.value, store).lower()


@pytest.mark.parametrize("status, code", [(507, "InsufficientStorage"),
                                          (403, "QuotaExceeded"), (400, "EntityTooLarge")])
async def test_a_full_server_is_one_line_saying_so(
        store: S3Store, proxy: FaultProxy, status: int, code: str) -> None:
    proxy.fault = Fault("status", method="PUT", status=status, code=code)
    with pytest.raises(StoreFull) as got:
        await store.put("heads/" + "0b" * 16, b"x")
    assert isinstance(got.value, DiskFull) and got.value.exit_code == DiskFull.exit_code
    assert str(got.value).startswith(f"The store {store.location} is full (the server "
                                     f"answered {code}")


async def test_small_ranged_reads_of_a_pack_are_a_few_window_requests(
        store: S3Store, proxy: FaultProxy) -> None:
    """A restore reads a pack blob by blob: one GET per blob made it 5x slower than restic
    from the same server (bench/bench_s3.py)."""
    data = os.urandom(16 << 20)
    name = "packs/" + "9a" * 32
    await store.put(name, data)
    proxy.requests.clear()
    blob = 64 << 10
    for start in range(0, len(data), blob):
        assert await store.get_range(name, start, blob) == data[start:start + blob]
    gets = [r for r in proxy.requests if r[0] == "GET"]
    assert len(gets) == 4, len(gets)   # 256 reads, 4 MiB windows


async def test_a_body_cut_short_under_its_own_content_length_is_read_again(
        store: S3Store, proxy: FaultProxy) -> None:
    """A response that says it is whole but is half: where the length is known (ranges;
    whole objects whose size was asked) it is a failed read, tried again."""
    data = os.urandom(200_000)
    name = "packs/" + "7b" * 32
    await store.put(name, data)
    proxy.fault = Fault("truncate", times=1, method="GET")
    assert await store.get_range(name, 1000, 50_000) == data[1000:51_000]
    assert await store.size(name) == len(data)
    proxy.fault = Fault("truncate", times=1, method="GET")
    assert await store.get(name) == data
    proxy.fault = Fault("truncate", method="GET")
    with pytest.raises(StorageError) as got:
        await store.get(name)
    assert one_line(got.value, store) == (f"store {store.location}: read {name}: the server "
                                          f"sent 100000 of its 200000 bytes")


# ---- through the CLI: `--from s3://...` reads a repository that lives in the bucket --------

async def _copy_store(local: Path, to: S3Store) -> list[str]:
    """The objects of a local store, uploaded as they are (what the daemon's uploader does)."""
    from p2pbackup.blobs.local import LocalDirStore

    src = LocalDirStore(local)
    names = [n async for n in src.list("")]
    for name in names:
        await to.put(name, await src.get(name))
    return names


@pytest.fixture
async def s3_repo(cli, tmp_path: Path, weed: servers.S3Server, proxy: FaultProxy,
                  monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[str], Path]:
    """A snapshot of a small tree, in a bucket; the CLI reaches it through the proxy with the
    credentials in the standard environment variables."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "big").write_bytes(os.urandom(300_000))
    (src / "small").write_text("hello\n")
    cli("init", "--source", str(src))
    cli("snapshot")
    location = f"s3://{weed.new_bucket()}/backup"
    names = await _copy_store(cli.home / "store",
                              S3Store(location, weed.options(endpoint=proxy.url)))
    for key, value in {"AWS_ACCESS_KEY_ID": weed.access_key, "AWS_REGION": servers.REGION,
                       "AWS_SECRET_ACCESS_KEY": weed.secret_key,
                       "AWS_ENDPOINT_URL": proxy.url}.items():
        monkeypatch.setenv(key, value)
    return location, names, src


def test_snapshots_restore_and_verify_read_from_s3(cli, s3_repo, tmp_path: Path) -> None:
    location, _, src = s3_repo
    listed = cli("snapshots", "--json", "--from", location)
    assert len(json.loads(listed.stdout)) == 1
    cli("restore", "latest", "--from", location, "--to", str(tmp_path / "out"))
    assert (tmp_path / "out" / "src" / "d" / "big").read_bytes() == \
        (src / "d" / "big").read_bytes()
    cli("verify", "--read-data", "--from", location)


async def test_a_restore_large_enough_for_worker_processes_reads_through_the_parent(
        cli, tmp_path: Path, weed: servers.S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Restores of 32 MiB and more fork worker processes; those can read a local store, but
    an S3 store lives on the parent's event loop (a forked worker waited for it forever)."""
    from p2pbackup.backup.restore import PROCESS_MIN_BYTES

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}").write_bytes(os.urandom(PROCESS_MIN_BYTES // 3 + 1_000_000))
    cli("init", "--source", str(src))
    cli("snapshot")
    location = f"s3://{weed.new_bucket()}/big"
    await _copy_store(cli.home / "store", S3Store(location, weed.options()))
    for key, value in {"AWS_ACCESS_KEY_ID": weed.access_key, "AWS_REGION": servers.REGION,
                       "AWS_SECRET_ACCESS_KEY": weed.secret_key,
                       "AWS_ENDPOINT_URL": weed.endpoint}.items():
        monkeypatch.setenv(key, value)
    cli("restore", "latest", "--from", location, "--to", str(tmp_path / "out"), timeout=120)
    for i in range(3):
        assert (tmp_path / "out" / "src" / f"f{i}").read_bytes() == (src / f"f{i}").read_bytes()


def test_recover_sets_up_a_new_device_from_the_bucket_alone(cli, s3_repo,
                                                            tmp_path: Path) -> None:
    from p2pbackup.crypto import recovery
    from tests.conftest import Cli

    location, _, _ = s3_repo
    (tmp_path / "code").write_text(recovery.encode(
        (cli.home / "keys" / "account.key").read_bytes()))
    new = Cli(tmp_path / "new-home")
    new("recover", "--from", location, "--recovery-code-file", str(tmp_path / "code"))
    assert len(json.loads(new("snapshots", "--json", "--from", location).stdout)) == 1


@pytest.mark.parametrize("kind", ["truncate", "swap"])
def test_a_truncated_or_swapped_object_is_caught_never_restored(
        cli, s3_repo, proxy: FaultProxy, tmp_path: Path, kind: str) -> None:
    location, names, src = s3_repo
    packs = [n for n in names if n.startswith("packs/")]
    other = next(n for n in names if n.startswith("snapshots/"))
    proxy.fault = Fault(kind, method="GET", match=packs[0], swap_with=other)
    got = cli("restore", "latest", "--from", location, "--to", str(tmp_path / "out"),
              check=False)
    assert proxy.fault.hits, "the pack was not read through the proxy"
    # Caught either way: damage (13) when the bytes do not authenticate, or, where the store
    # knows the length (a range), a read that kept coming back short (11, naming the store).
    assert got.returncode in (11, 13), got.stderr
    assert "Traceback" not in got.stderr and "internal error" not in got.stderr
    assert got.stderr.splitlines()[-1].startswith("p2pbackup: error: "), got.stderr
    for restored in (tmp_path / "out").rglob("*"):   # never a file with other bytes
        if restored.is_file():
            assert restored.read_bytes() == (src / restored.relative_to(
                tmp_path / "out" / "src")).read_bytes()
    bad = cli("verify", "--read-data", "--from", location, check=False)
    assert bad.returncode in (11, 13), bad.stdout + bad.stderr
    proxy.fault = None
    # The object in the store was never touched: a clean `verify --read-data` reads the
    # packs the faulty reads noted as damaged again, finds them whole and clears the note
    # (no index rebuild, no deleted cache), so the next verify is clean too.
    cli("verify", "--read-data", "--from", location)
    cli("verify", "--from", location)


def test_wrong_credentials_are_one_line_from_the_cli(cli, s3_repo,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    location, _, _ = s3_repo
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    got = cli("snapshots", "--from", location, check=False)
    assert got.returncode == 11, got.stderr
    assert got.stderr == (f"p2pbackup: error: store {location}: the server refused the credentials "
                          "(SignatureDoesNotMatch): check access_key_id and secret_access_key "
                          "(or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)\n")


async def test_a_listed_object_is_read_without_asking_its_size_first(
        weed: servers.S3Server, store: S3Store, proxy: FaultProxy, sleeps: Sleeps) -> None:
    """The listing says each object's size: reading a listed pack (an index built from
    trailers, a restore) sends no HEAD before its GET."""
    data = os.urandom(300_000)
    name = "packs/" + "5d" * 32
    await store.put(name, data)
    fresh = S3Store(store.location, weed.options(endpoint=proxy.url), sleep=sleeps)
    assert [n async for n in fresh.list("packs/")] == [name]
    proxy.requests.clear()
    assert await fresh.get_range(name, 1000, 1000) == data[1000:2000]
    assert await fresh.get(name) == data
    assert [m for m, _ in proxy.requests] == ["GET", "GET"], proxy.requests


async def test_a_read_from_the_end_fetches_only_that_range(
        store: S3Store, proxy: FaultProxy) -> None:
    """A pack's trailer is read from its end, on its own: not through a 4 MiB window."""
    data = os.urandom(9 << 20)
    name = "packs/" + "6e" * 32
    await store.put(name, data)
    await store.size(name)
    proxy.sent.clear()
    assert await store.get_range(name, -5000, 5000) == data[-5000:]
    assert [n for _, n in proxy.sent] == [5000], proxy.sent
