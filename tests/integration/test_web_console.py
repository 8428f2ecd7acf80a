"""The web console's API without a browser: a huge folder opens paged, live status is pushed
only when it changes, and `p2pbackup web` without a daemon is a clear error."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.backup.restore import Restorer
from p2pbackup.config import Source
from p2pbackup.repo.snapshots import StoredSnapshot
from p2pbackup.web.app import Backend, Console
from tests.adversary.test_web_console import _login
from tests.conftest import Cli
from tests.unit.backup.conftest import repo  # noqa: F401  (the fixture)

ENTRIES = 100_000


async def _status() -> dict:
    return {"device": "d" * 64, "pid": 1, "peers": [], "errors": []}


async def _snapshot(repo, src: Path, tmp_path: Path) -> StoredSnapshot:
    """A snapshot of `src` as the source named src."""
    return (await take_snapshot(repo, (Source("src", str(src)),),
                                temp_dir=str(tmp_path / "tmp"))).stored


async def _seal(repo, src: Path, tmp_path: Path, *changed: Path) -> None:
    """The changes made to `changed` since the snapshot of `src` (the source named src),
    captured and sealed in one log segment."""
    from p2pbackup.backup.seal import SealState, SegmentSealer
    from p2pbackup.format.log import GENESIS

    sealer = SegmentSealer(repo, repo.identity, (Source("src", str(src)),),
                           str(tmp_path / "t"), SealState(0, GENESIS))
    try:
        for path in changed:
            await sealer.capture(os.fsencode(path))
        assert await sealer.seal() is not None
    finally:
        sealer.close()


def _count_decodes(monkeypatch) -> list[int]:
    """The number of entries of each tree decoded whole from now on."""
    from p2pbackup.format import records

    decoded: list[int] = []
    whole = records.Tree.decode.__func__

    def counted(cls, data, what="tree"):
        tree = whole(cls, data, what)
        decoded.append(len(tree.entries))
        return tree
    monkeypatch.setattr(records.Tree, "decode", classmethod(counted))
    return decoded


@contextlib.asynccontextmanager
async def _signed_in(repo, backend: Backend | None = None
                     ) -> AsyncIterator[tuple[aiohttp.ClientSession, str, dict]]:
    """A console of `repo` (or of `backend`) on a free port, and a client signed in to it
    (its headers, which a change needs too)."""
    c = Console(backend or Backend(repo, (), _status))
    port = await c.start("127.0.0.1", 0)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            cookie, csrf = await _login(c, base, http)
            yield http, base, {"Cookie": cookie, "X-CSRF-Token": csrf, "Origin": base}
    finally:
        await c.close()


async def test_a_folder_of_100000_entries_opens_paged(repo, tmp_path: Path):
    big = tmp_path / "src" / "big"
    big.mkdir(parents=True)
    for i in range(ENTRIES):
        os.close(os.open(big / f"f{i:06d}", os.O_CREAT | os.O_WRONLY, 0o644))
    await _snapshot(repo, tmp_path / "src", tmp_path)
    async with _signed_in(repo) as (http, base, headers):
        started = time.monotonic()
        async with http.get(f"{base}/api/tree?path=src/big", headers=headers) as r:
            first = await r.json()
        took = time.monotonic() - started
        async with http.get(f"{base}/api/tree?path=src/big&offset={ENTRIES - 50}",
                            headers=headers) as r:
            last = await r.json()
        async with http.get(f"{base}/browse?path=src/big&offset=200", headers=headers) as r:
            page = await r.text()
    print(f"first page of {ENTRIES} entries in {took:.2f} s")
    assert first["total"] == ENTRIES and len(first["entries"]) == first["limit"] == 200
    assert first["entries"][0]["name"] == "f000000" and first["entries"][0]["type"] == "file"
    assert [e["name"] for e in last["entries"]] == [f"f{i:06d}" for i in range(ENTRIES - 50,
                                                                                ENTRIES)]
    assert "201–400 of 100000 entries" in page and "f000200" in page and "f000400" not in page
    assert 'rel="next"' in page and 'rel="prev"' in page


async def test_status_is_pushed_when_it_changes_not_as_it_ticks(repo):
    seen = {"seq": 1, "uptime_seconds": 0.0}

    async def status() -> dict:
        seen["uptime_seconds"] += 1.0  # moves at every look: not news on its own
        return {"log": {"seq": seen["seq"], "next_seal_in": seen["uptime_seconds"]},
                "uptime_seconds": seen["uptime_seconds"]}

    looks = 0

    async def sleep(_: float) -> None:
        nonlocal looks
        looks += 1
        if looks == 3:
            seen["seq"] = 2

    c = Console(Backend(repo, (), status), sleep=sleep, event_interval=1.0)
    stream = c.events()
    first = await anext(stream)
    second = await anext(stream)
    await stream.aclose()
    assert first.startswith("event: status\n") and '"seq": 1' in first
    assert '"seq": 2' in second
    assert looks == 3  # the two looks in between changed only ticking counters: nothing sent


def test_web_without_a_daemon_is_a_clear_error(cli: Cli, tmp_path: Path):
    cli("init")
    proc = cli("web", "--no-open", check=False)
    assert proc.returncode == 19 and "not running" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_a_folder_downloads_as_a_tar_of_what_the_snapshot_holds(repo, sample_tree: Path,
                                                                      tmp_path: Path):
    import io
    import tarfile

    await _snapshot(repo, sample_tree, tmp_path)
    async with _signed_in(repo) as (http, base, headers):
        async with http.get(f"{base}/api/archive?path=src", headers=headers) as r:
            assert r.status == 200 and "src.tar" in r.headers["Content-Disposition"]
            body = await r.read()
        async with http.get(f"{base}/api/archive?path=src/big.bin", headers=headers) as r:
            assert r.status == 404 and "not one folder" in (await r.json())["error"]
    base_b = os.fsencode(str(sample_tree))
    expected = {}
    for dirpath, dirnames, filenames in os.walk(base_b):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.join(b"src", os.path.relpath(p, base_b))
            expected[rel] = ("l" if os.path.islink(p) else "d" if os.path.isdir(p) else "f",
                             None if os.path.islink(p) or os.path.isdir(p)
                             else open(p, "rb").read())
    got = {}
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        for m in tar.getmembers():
            kind = "l" if m.issym() else "d" if m.isdir() else "f"
            data = tar.extractfile(m).read() if m.isfile() else None
            got[os.fsencode(m.name)] = (kind, data)
    assert got.pop(b"src")[0] == "d"
    assert got == expected  # non-UTF-8 names, symlinks, empty files and folders included


async def test_a_download_that_meets_damage_is_cut_short_never_whole_looking(
        repo, sample_tree: Path, tmp_path: Path):
    stored = await _snapshot(repo, sample_tree, tmp_path)
    reader = Restorer.reader(repo)
    big = reader.find(stored, "src/big.bin").entry
    assert big is not None and len(big.chunks) > 2
    last = repo.locate(big.chunks[-1])  # its first chunks still read well
    with open(repo.store.path_of(f"packs/{last.pack}"), "r+b") as f:
        f.seek(last.offset + last.length // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    first = repo.locate(big.chunks[0])
    async with _signed_in(repo) as (http, base, headers):
        async with http.get(f"{base}/api/file?path=src/big.bin", headers=headers) as r:
            assert r.status == 200 and int(r.headers["Content-Length"]) == big.size
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
        # Damage at the first byte is an answer in words, with verify's exit code.
        with open(repo.store.path_of(f"packs/{first.pack}"), "r+b") as f:
            f.seek(first.offset + first.length // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        async with http.get(f"{base}/api/file?path=src/big.bin", headers=headers) as r:
            assert r.status == 500
            assert (await r.json())["exit"] == 13


def test_a_taken_port_leaves_the_daemon_running_without_its_console(cli: Cli, tmp_path: Path):
    from tests.integration.test_daemon import Daemon

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cli("init")
        with open(cli.home / "config.toml", "a") as f:
            f.write(f"\n[web]\nport = {port}\n")
        d = Daemon(cli, tmp_path)
        try:
            d.wait_for("READY=1")
            proc = cli("web", "--no-open", check=False)
            assert proc.returncode == 10
            assert f"could not listen on 127.0.0.1:{port}" in proc.stderr
            assert "web console: could not listen" in cli("status").stdout
        finally:
            assert d.stop() == 0


async def test_search_by_name_finds_entries_below_a_folder(repo, sample_tree: Path,
                                                           tmp_path: Path):
    await _snapshot(repo, sample_tree, tmp_path)
    async with _signed_in(repo) as (http, base, headers):
        async with http.get(f"{base}/api/search?q=A.TXT", headers=headers) as r:
            everywhere = await r.json()
        async with http.get(f"{base}/api/search?q=er&path=src/docs", headers=headers) as r:
            below = await r.json()
        async with http.get(f"{base}/browse?q=json&path=src", headers=headers) as r:
            page = await r.text()
        async with http.get(f"{base}/api/search?q=", headers=headers) as r:
            assert r.status == 400
    assert sorted(e["path"] for e in everywhere["entries"]) == [
        "src/docs/a.txt", "src/hardlink-a.txt"]
    assert everywhere["complete"] is True
    assert [e["path"] for e in below["entries"]] == ["src/docs/deep/er"]
    assert "b.json" in page and "1 names hold" in page


async def test_log_segments_are_on_the_timeline_and_a_files_versions_include_the_log(
        repo, tmp_path: Path):
    """Between snapshots the daemon's log holds every change: the timeline shows its sealed
    segments per device and source, and a file's versions list the ones from the log too,
    each downloadable as it was."""
    from p2pbackup.backup.seal import SealState, SegmentSealer
    from p2pbackup.format.log import GENESIS

    src = tmp_path / "src"
    src.mkdir()
    letter = src / "letter.txt"
    letter.write_text("version 1\n")
    (src / "other.txt").write_text("never changes\n")
    await _snapshot(repo, src, tmp_path)
    sources = (Source("src", str(src)),)
    sealer = SegmentSealer(repo, repo.identity, sources, str(tmp_path / "t"),
                           SealState(0, GENESIS))
    try:
        for text in ("version 2\n", "version 3, longer\n"):
            letter.write_text(text)
            await sealer.capture(os.fsencode(letter))
            assert await sealer.seal() is not None
        (src / "other.txt").unlink()
        await sealer.capture(os.fsencode(src / "other.txt"))
        (src / "new.txt").write_text("made after the snapshot\n")
        await sealer.capture(os.fsencode(src / "new.txt"))
        assert await sealer.seal() is not None
    finally:
        sealer.close()
    c = Console(Backend(repo, sources, _status))
    port = await c.start("127.0.0.1", 0)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            cookie, _ = await _login(c, base, http)
            headers = {"Cookie": cookie}
            async with http.get(f"{base}/api/timeline", headers=headers) as r:
                timeline = await r.json()
            async with http.get(f"{base}/timeline", headers=headers) as r:
                page = await r.text()
            async with http.get(f"{base}/api/versions?path=src/letter.txt",
                                headers=headers) as r:
                versions = await r.json()
            got = []
            for v in versions["versions"]:
                async with http.get(f"{base}/api/file", headers=headers,
                                    params={"snapshot": "latest", "path": "src/letter.txt",
                                            "at": v["at"]}) as r:
                    got.append(await r.text())
            async with http.get(f"{base}/api/versions?path=src/other.txt",
                                headers=headers) as r:
                other = await r.json()
            async with http.get(f"{base}/api/versions?path=src/new.txt",
                                headers=headers) as r:
                new = await r.json()
    finally:
        await c.close()
    (device,) = timeline["devices"]
    assert device["device"] == repo.identity.device_id and len(device["snapshots"]) == 1
    assert [(s["seq"], s["changes"]) for s in device["segments"]] == \
        [(1, {"src": 1}), (2, {"src": 1}), (3, {"src": 2})]
    assert page.count('class="segment"') == 3 and "log segment 2" in page
    assert [v["from"] for v in versions["versions"]] == ["snapshot", "log", "log"]
    assert [v.get("seq") for v in versions["versions"]] == [None, 1, 2]
    snapshot_id = versions["versions"][0]["snapshot"]["id"]
    assert [v.get("base") for v in versions["versions"]] == [None, snapshot_id, snapshot_id]
    assert got == ["version 1\n", "version 2\n", "version 3, longer\n"]
    assert [v["from"] for v in other["versions"]] == ["snapshot", "log"]
    assert other["versions"][-1]["deleted"] is True
    assert [(v["from"], v["size"]) for v in new["versions"]] == [("log", 24)]


async def test_a_page_that_stops_waiting_for_a_pairing_withdraws_its_code(repo):
    """The page holds a pairing code as the `pair` command does: when its wait request goes
    (the page closed, reloaded), the daemon's pair_cancel withdraws the code."""
    import asyncio

    ended = asyncio.Event()
    cancelled: list[dict] = []

    async def pair_wait(args: dict) -> dict:
        await ended.wait()
        return {"state": "ended", "ok": False, "message": "withdrawn", "verifier": None}

    async def pair_cancel(args: dict) -> dict:
        cancelled.append(args)
        ended.set()
        return {"withdrawn": True}

    c = Console(Backend(repo, (), _status, account={"pair_wait": pair_wait,
                                                    "pair_cancel": pair_cancel}),
                event_interval=0.05)
    port = await c.start("127.0.0.1", 0)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            cookie, csrf = await _login(c, base, http)
            headers = {"Cookie": cookie, "X-CSRF-Token": csrf, "Origin": base}
            with contextlib.suppress(asyncio.TimeoutError):
                async with http.post(f"{base}/api/pair/wait", json={"code": "7-a-b"},
                                     headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=0.5)) as r:
                    await r.read()
            await asyncio.wait_for(ended.wait(), 10)
    finally:
        await c.close()
    assert cancelled == [{"code": "7-a-b"}]


async def test_a_page_of_a_big_folder_decodes_only_that_page(repo, tmp_path: Path,
                                                             monkeypatch):
    """A folder's page is read from its tree without decoding the whole of it (the first
    page of 100,000 entries took over a second under load); the log replayed on top of a
    folder (a moment) still pages what it changed."""
    big = tmp_path / "src" / "big"
    big.mkdir(parents=True)
    for i in range(3000):
        os.close(os.open(big / f"f{i:05d}", os.O_CREAT | os.O_WRONLY, 0o644))
    await _snapshot(repo, tmp_path / "src", tmp_path)
    (big / "f00000").unlink()   # after the snapshot: in the log only
    await _seal(repo, tmp_path / "src", tmp_path, big / "f00000")
    decoded = _count_decodes(monkeypatch)
    async with _signed_in(repo) as (http, base, headers):
        async with http.get(f"{base}/api/tree?path=src/big&offset=2900", headers=headers) as r:
            page = await r.json()
        assert max(decoded) < 10, decoded   # the source's top folder, never big/ whole
        async with http.get(f"{base}/api/tree", headers=headers,
                            params={"path": "src/big", "at": "now"}) as r:
            now = await r.json()
    assert page["total"] == 3000 and len(page["entries"]) == 100
    assert page["entries"][0]["name"] == "f02900" and page["entries"][-1]["name"] == "f02999"
    assert now["total"] == 2999 and now["entries"][0]["name"] == "f00001"


async def test_the_devices_page_shows_each_path_last_sync_and_the_broker(repo):
    """Devices: each device and partner of the account, online or not, the path to it
    ("data channel (TURN relay)" through the broker's TURN server), bytes behind, when it
    last synced, what a partner holds of ours against its quota; and whether this device
    reaches the broker."""
    import datetime as dt

    me, laptop, partner = "a" * 64, "b" * 64, "c" * 64
    synced = time.time() - 3600

    async def status() -> dict:
        return {"device": me, "pid": 1, "errors": [],
                "broker": {"url": "wss://broker.example.org", "connected": True,
                           "last_error": None},
                "peers": [{"device": laptop, "name": "laptop", "connected": True,
                           "on_lan": False, "path": "data channel", "ice_path": "relay",
                           "objects_behind": 3, "bytes_behind": 3 << 20,
                           "last_sync": synced, "error": None},
                          {"device": partner, "name": "nas", "connected": False,
                           "on_lan": False, "path": None, "ice_path": None,
                           "objects_behind": None, "bytes_behind": None,
                           "held_objects": 120, "held_bytes": 2 << 30,   # (last session)
                           "last_sync": None, "error": None}]}

    async def devices() -> dict:
        member = {"sources": None, "quota": None, "added": None, "this_device": False}
        return {"version": 3, "key_epoch": 1, "removed": [], "devices": [
            {**member, "id": me, "name": "desk", "role": "owner", "this_device": True},
            {**member, "id": laptop, "name": "laptop", "role": "owner"},
            {**member, "id": partner, "name": "nas", "role": "partner", "quota": 50 << 30}]}

    async with _signed_in(repo, Backend(repo, (), status, devices=devices)) as (http, base,
                                                                               headers):
        async with http.get(f"{base}/devices", headers=headers) as r:
            page = await r.text()
    rows = {name: page.split(f"<td>{name}<br>", 1)[1].split("</tr>", 1)[0]
            for name in ("desk", "laptop", "nas")}
    when = dt.datetime.fromtimestamp(synced).astimezone().isoformat(timespec="seconds")
    assert "online, over the data channel (TURN relay)" in rows["laptop"]
    assert "3 objects (3.0 MiB) behind" in rows["laptop"]
    assert f"last sync {when}" in rows["laptop"]
    assert "offline" in rows["nas"] and "never synced" in rows["nas"]
    assert "holds 2.0 GiB of ours (120 objects) of its 50.0 GiB quota" in rows["nas"]
    assert "holds" not in rows["laptop"]   # (not known: no session said it)
    assert 'id="broker"' in page and "broker wss://broker.example.org: connected" in page


async def test_repair_from_the_page_sets_a_damaged_pack_aside_and_says_what_was_lost(
        repo, sample_tree: Path, tmp_path: Path):
    """Repair, started from the Verify page, runs as a job with progress (packs read of all)
    and ends with `repair`'s words: the damaged pack's good blobs kept, the pack quarantined,
    what is lost named with the files that used it."""
    from p2pbackup.backup.repair import repair_packs
    from tests.eventually import eventually

    stored = await _snapshot(repo, sample_tree, tmp_path)
    big = Restorer.reader(repo).find(stored, "src/big.bin").entry
    hit = repo.locate(big.chunks[-1])
    with open(repo.store.path_of(f"packs/{hit.pack}"), "r+b") as f:
        f.seek(hit.offset + hit.length // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    packs = len(repo.index.packs)
    backend = Backend(repo, (), _status,
                      repair=lambda progress: repair_packs(repo, progress=progress))
    async with _signed_in(repo, backend) as (http, base, headers):
        async with http.get(f"{base}/verify", headers=headers) as r:
            assert 'class="repair"' in await r.text()
        async with http.post(f"{base}/api/repair", json={}, headers=headers) as r:
            assert r.status == 200, await r.text()
            job = (await r.json())["job"]

        async def ended() -> bool:
            nonlocal got
            async with http.get(f"{base}/api/jobs", headers=headers) as r:
                got = next(j for j in await r.json() if j["id"] == job)
            return got["state"] != "running"
        got: dict = {}
        await eventually(ended, timeout=60)
    assert got["kind"] == "repair" and got["state"] == "failed"   # something stays lost
    assert got["packs"] == got["total_packs"] == packs
    assert f"pack {hit.pack[:12]}: " in got["result"] and "moved to quarantine/" in got["result"]
    assert "lost: " in got["result"] and "big.bin" in got["result"]
    assert "run `p2pbackup snapshot`" in got["result"]
    assert os.path.exists(repo.store.path_of(f"quarantine/{hit.pack}"))


def test_the_api_answers_the_clis_json_and_a_switch_turns_the_console_off(cli: Cli,
                                                                          tmp_path: Path,
                                                                          monkeypatch):
    """`p2pbackup web` prints the sign-in address and opens it in the browser ($BROWSER
    here); the page's API is the JSON `--json` prints (snapshots, devices, status); with
    `[web] enabled = false` the daemon serves no console and `p2pbackup web` says so."""
    import http.cookiejar
    import json
    import urllib.request

    from tests.integration.test_daemon import Daemon, wait_for_first_snapshot

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a\n")
    cli("init", "--source", str(src))
    d = Daemon(cli, tmp_path)
    try:
        d.wait_for("READY=1")
        wait_for_first_snapshot(cli)
        opened = tmp_path / "opened"
        browser = tmp_path / "browser"
        browser.write_text(f'#!/bin/sh\necho "$1" > {opened}\n')
        browser.chmod(0o755)
        monkeypatch.setenv("BROWSER", str(browser))
        shown = cli("web").stdout.strip()
        assert opened.read_text().strip() == shown and "/login?token=" in shown
        url = cli("web", "--no-open").stdout.strip()
        opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        opener.open(url).read()
        base = url.split("/login", 1)[0]

        def api(path: str):
            with opener.open(base + path) as r:
                return json.load(r)
        assert api("/api/snapshots") == json.loads(cli("snapshots", "--json").stdout)
        devices = api("/api/devices")
        assert devices.pop("broker") is None   # (no broker configured)
        for device in devices["devices"]:
            device.pop("peer")
        assert devices == json.loads(cli("devices", "--json").stdout)
        status = api("/api/status")
        assert status.keys() == json.loads(cli("status", "--json").stdout).keys()
        assert status["web"]["enabled"] is True and status["web"]["port"] == int(
            base.rsplit(":", 1)[1])
    finally:
        assert d.stop() == 0
    with open(cli.home / "config.toml", "a") as f:
        f.write("\n[web]\nenabled = false\n")
    d = Daemon(cli, tmp_path)
    try:
        d.wait_for("READY=1")
        proc = cli("web", "--no-open", check=False)
        assert proc.returncode == 10 and "the web console is off" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert json.loads(cli("status", "--json").stdout)["web"]["enabled"] is False
    finally:
        assert d.stop() == 0


async def test_the_status_page_shows_storage_saved_and_a_chart_of_size_and_changes(
        repo, tmp_path: Path):
    """Status: storage used and saved by deduplication, and a small chart of the snapshots'
    size and of the changes the log sealed over time."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(100_000))
    await _snapshot(repo, src, tmp_path)
    for i in range(3):
        (src / f"new{i}").write_text("x")
    await _seal(repo, src, tmp_path, *(src / f"new{i}" for i in range(3)))
    await _snapshot(repo, src, tmp_path)
    async with _signed_in(repo, Backend(repo, (Source("src", str(src)),), _status)) as (
            http, base, headers):
        async with http.get(f"{base}/", headers=headers) as r:
            page = await r.text()
    assert 'id="storage"' in page and "deduplication and compression save" in page
    assert page.count('<polyline class="series') == 1     # one device's snapshot sizes
    assert page.count('class="changes"') == 1              # one sealed segment, 3 changes
    assert "3 changes" in page
    # And the store's own size over time, as the index noted it after each change to the
    # packs (one point a minute: the repository here grew within one, so two are made up).
    minute = 60 * (int(time.time()) // 60)
    await repo.index._db.execute("INSERT OR REPLACE INTO sizes VALUES (?, 1000, 1)",
                                 ((minute - 3600) // 60,))
    await repo.index._db.commit()
    async with _signed_in(repo, Backend(repo, (Source("src", str(src)),), _status)) as (
            http, base, headers):
        async with http.get(f"{base}/", headers=headers) as r:
            page = await r.text()
        async with http.get(f"{base}/api/storage", headers=headers) as r:
            doc = await r.json()
    assert page.count('<polyline class="stored"') == 1 and "the store&#39;s size" in page
    assert [h["stored_bytes"] for h in doc["history"]][0] == 1000
    assert doc["history"][-1]["stored_bytes"] == doc["stored_bytes"]


async def test_a_big_folder_streams_as_tar_and_is_searched_without_being_decoded_whole(repo, tmp_path: Path,
                                                                      monkeypatch):
    """An archive of (and a search in) a folder of many entries decodes them a batch at a
    time (Tree.page), so
    the daemon's memory holds one batch, not the folder (100,000 entries decoded whole:
    ~36 MiB, kept for later requests); the log replayed on a folder (a moment) still counts."""
    import io
    import tarfile

    big = tmp_path / "src" / "big"
    (big / "sub").mkdir(parents=True)
    for i in range(3000):
        os.close(os.open(big / f"f{i:05d}", os.O_CREAT | os.O_WRONLY, 0o644))
    (big / "sub" / "inner").write_text("inner\n")
    await _snapshot(repo, tmp_path / "src", tmp_path)
    (big / "sub" / "inner").write_text("changed after the snapshot\n")
    await _seal(repo, tmp_path / "src", tmp_path, big / "sub" / "inner")
    decoded = _count_decodes(monkeypatch)

    def members(body: bytes) -> dict[str, bytes | None]:
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            return {m.name: tar.extractfile(m).read() if m.isfile() else None
                    for m in tar.getmembers()}
    async with _signed_in(repo) as (http, base, headers):
        async with http.get(f"{base}/api/archive?path=src/big", headers=headers) as r:
            snapshot = members(await r.read())
        assert max(decoded) < 1500, decoded   # never big/ whole
        async with http.get(f"{base}/api/archive", headers=headers,
                            params={"path": "src/big", "at": "now"}) as r:
            now = members(await r.read())
        async with http.get(f"{base}/api/search", headers=headers,
                            params={"path": "src/big", "q": "f0299"}) as r:
            found = await r.json()
        assert max(decoded) < 1500, decoded   # a search below it neither
    assert [e["name"] for e in found["entries"]] == [f"f0299{i}" for i in range(10)]
    assert len(snapshot) == 1 + 3000 + 2 and snapshot["big/f02999"] == b""
    assert snapshot["big/sub/inner"] == b"inner\n"
    assert len(now) == len(snapshot) and now["big/sub/inner"] == b"changed after the snapshot\n"


async def test_the_page_pairs_a_member_with_its_sources_and_a_partner_with_its_quota(
        tmp_path: Path):
    """POST /api/pair/start with a role: the daemon's pair_start (through the daemon's web
    wiring) gets the member's sources and the partner's quota in bytes; without a role it
    pairs an owner as before. Where and how long the code is offered stays the daemon's
    choice, whatever else the request names."""
    from tests.adversary.accounts import make_owner

    for name in ("docs", "photos"):
        (tmp_path / name).mkdir()
    await make_owner(tmp_path / "home", [tmp_path / "docs", tmp_path / "photos"])
    started: list[dict] = []

    async def pair_start(args: dict) -> dict:
        started.append(args)
        return {"code": "7-orbit-velvet", "port": 4000, "expires_in": 600.0}

    async with _daemon_console(tmp_path / "home", {"pair_start": pair_start}) as (
            dev, http, base, headers):
        answers = []
        for body in ({"role": "member", "sources": ["docs"], "port": 22,
                      "mailbox": "wss://elsewhere.example/v1/mailbox",
                      "expires": 86400, "mdns": not dev.config.peers.lan},
                     {"role": "partner", "quota": "500 MiB"}, {}):
            async with http.post(f"{base}/api/pair/start", json=body, headers=headers) as r:
                answers.append((r.status, await r.json()))
    lan = dev.config.peers.lan
    assert [a for a, _ in answers] == [200, 200, 200], answers
    assert started == [
        {"role": "member", "sources": ["docs"], "quota": None, "expires": 600.0, "mdns": lan},
        {"role": "partner", "sources": None, "quota": 500 << 20, "expires": 600.0,
         "mdns": lan},
        {"role": "owner", "sources": None, "quota": None, "expires": 600.0, "mdns": lan}]
    assert [a["role"] for _, a in answers] == ["member", "partner", "owner"]
    assert all(a["code"] == "7-orbit-velvet" and a["qr"].startswith("data:image/svg+xml")
               for _, a in answers)


def test_a_pairing_the_page_asks_for_wrongly_is_one_line_and_400(cli: Cli, tmp_path: Path):
    """Against the real daemon: an unknown role, a member without sources or with a source
    this account does not have, a partner without a (positive, readable) quota or with
    sources, a quota on an owner: 400, one line, exit 10, and no code is offered. A right
    one (an owner as before, a member with one source) starts the daemon's pairing."""
    import asyncio

    from tests.integration.test_daemon import Daemon

    for name in ("docs", "photos"):
        (tmp_path / name).mkdir()
    cli("init", "--source", str(tmp_path / "docs"), "--source", str(tmp_path / "photos"))
    wrong = [{"role": "admin"}, {"role": "member"}, {"role": "member", "sources": []},
             {"role": "member", "sources": ["music"]}, {"role": "member", "sources": "docs"},
             {"role": "member", "sources": [7]}, {"role": "partner"},
             {"role": "partner", "quota": "0"}, {"role": "partner", "quota": "lots"},
             {"role": "partner", "quota": 5}, {"role": "partner", "quota": "1G",
                                               "sources": ["docs"]},
             {"role": "owner", "quota": "1G"}, {"role": "owner", "sources": ["docs"]},
             {"role": 3}]

    async def ask(url: str) -> tuple[list, list]:
        base = url.split("/login", 1)[0]
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.get(url) as r:   # signs in, then the status page
                page = await r.text()
            csrf = page.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
            headers = {"X-CSRF-Token": csrf, "Origin": base}
            refused = []
            for body in wrong:
                async with http.post(f"{base}/api/pair/start", json=body,
                                     headers=headers) as r:
                    refused.append((body, r.status, await r.json()))
            offered = []
            for body in ({}, {"role": "member", "sources": ["photos"]}):
                async with http.post(f"{base}/api/pair/start", json=body,
                                     headers=headers) as r:
                    got = await r.json()
                    offered.append((r.status, got.get("role")))
                async with http.post(f"{base}/api/pair/cancel", json={"code": got["code"]},
                                     headers=headers) as r:
                    assert r.status == 200 and (await r.json())["withdrawn"] is True
            return refused, offered

    d = Daemon(cli, tmp_path)
    try:
        d.wait_for("READY=1")
        refused, offered = asyncio.run(ask(cli("web", "--no-open").stdout.strip()))
    finally:
        assert d.stop() == 0
    for body, status, answer in refused:
        assert status == 400 and answer["exit"] == 10, (body, status, answer)
        assert "\n" not in answer["error"] and "Traceback" not in answer["error"], body
    assert "no source named 'music'" in refused[3][2]["error"]
    assert offered == [(200, "owner"), (200, "member")]
    log = (tmp_path / "daemon.log").read_text()
    assert "(owner, 600 s)" in log and "(member, 600 s)" in log
    assert log.count("pairing code offered") == 2   # the wrong ones offered none


async def test_a_pairing_a_device_may_not_offer_is_403_in_one_line(tmp_path: Path):
    """A member's console asked to pair: the daemon's refusal (WrongKey, exit 15) reaches
    the page as 403 with its line, not as a 500 that reads like a bug."""
    from p2pbackup.errors import WrongKey
    from tests.adversary.accounts import make_owner

    await make_owner(tmp_path / "home", [tmp_path])
    line = "only an owner device of the account can pair a new device"

    async def pair_start(args: dict) -> dict:
        raise WrongKey(line)

    async with _daemon_console(tmp_path / "home", {"pair_start": pair_start}) as (
            _, http, base, headers):
        async with http.post(f"{base}/api/pair/start", json={}, headers=headers) as r:
            got = (r.status, await r.json())
    assert got == (403, {"error": line, "exit": 15})


@contextlib.asynccontextmanager
async def _daemon_console(home: Path, handlers: dict):
    """The console as the daemon wires it (daemon/web.py WebService) for the device at
    `home`, with the daemon's control `handlers`; the device, a client signed in, the
    console's address and the headers a change needs."""
    from p2pbackup.daemon.web import WebService
    from p2pbackup.device import open_device

    async with open_device(home) as dev:
        web = WebService(dev.config, dev, _status, contextlib.nullcontext, handlers)
        assert web.console is not None
        port = await web.console.start("127.0.0.1", 0)
        base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
                cookie, csrf = await _login(web.console, base, http)
                yield dev, http, base, {"Cookie": cookie, "X-CSRF-Token": csrf,
                                        "Origin": base}
        finally:
            await web.close()
