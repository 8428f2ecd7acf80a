"""The web console in a real browser (Debian's chromium, driven by Playwright) against a real
p2pbackupd: sign in with the address `p2pbackup web` prints, see the status, browse a snapshot,
download a file and restore one (both compared with the original), and browse the device as it
was at a moment picked in the timeline."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from tests.conftest import Cli
from tests.eventually import eventually_sync
from tests.integration.test_daemon import Daemon, wait_for_first_snapshot

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                reason="chromium is not installed (`make sysdeps` as root "
                                "installs it: apt-get install chromium)")


@pytest.fixture(scope="module")
def playwright():
    """One Playwright for the module (a second one in the same thread is refused)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright, tmp_path_factory):
    """One browser for the module (each launch costs seconds), a fresh profile."""
    context = playwright.chromium.launch_persistent_context(
        str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM,
        headless=True, args=ARGS, accept_downloads=True, viewport={"width": 390,
                                                                     "height": 844})
    yield context
    context.close()


@contextlib.contextmanager
def _running_device(tmp_path: Path, *more_sources: str):
    """A home with the source `src` (and empty sources named `more_sources`), its daemon
    running and its first snapshot taken."""
    cli = Cli(tmp_path / "home")
    src = tmp_path / "src"
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "letter.txt").write_text("version 1\n")
    (src / "photo.bin").write_bytes(os.urandom(300_000))
    sources = [src]
    for name in more_sources:
        (tmp_path / name).mkdir()
        sources.append(tmp_path / name)
    cli("init", *(a for s in sources for a in ("--source", str(s))))
    with open(cli.home / "config.toml", "a") as f:
        f.write("\n[daemon]\nseal_interval = 1\n")
    d = Daemon(cli, tmp_path)
    try:
        d.wait_for("READY=1")
        wait_for_first_snapshot(cli)
        yield cli, src, d
    finally:
        assert d.stop() == 0


@pytest.fixture
def device(tmp_path: Path):
    with _running_device(tmp_path) as running:
        yield running


def _sign_in(browser, cli: Cli):
    url = cli("web", "--no-open").stdout.strip()
    assert url.startswith("http://127.0.0.1:") and "/login?token=" in url
    page = browser.new_page()
    page.goto(url)
    assert "token" not in page.url  # redirected at once: the token leaves the address bar
    return page


def test_status_browse_download_and_restore(browser, device, tmp_path: Path):
    cli, src, _ = device
    page = _sign_in(browser, cli)
    # Every request the pages make goes to the console itself (nothing from elsewhere), and
    # live status is one event stream, not polling.
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    # Status: live over server-sent events.
    page.wait_for_selector("#activity")
    assert "last snapshot:" in page.inner_text("#activity")
    assert f"source src: {src}" in page.inner_text("#activity")
    # Snapshots -> browse the newest -> into docs/.
    page.click("nav >> text=Snapshots")
    snap = json.loads(cli("snapshots", "--json").stdout)[-1]
    page.click(f"text={snap['short_id']}")
    assert _fits_the_width(page), "Snapshots"
    page.click("text=docs/")
    assert "letter.txt" in page.inner_text("#entries")
    assert _fits_the_width(page), "Browse"
    with page.expect_download() as got:
        page.click("tr:has-text('letter.txt') >> a.download")
    saved = tmp_path / "downloaded"
    got.value.save_as(saved)
    assert saved.read_bytes() == (src / "docs" / "letter.txt").read_bytes()
    # docs/ as a tar archive, streamed: the same files.
    page.click(".crumbs >> text=src")
    with page.expect_download() as got:
        page.click("tr:has-text('docs/') >> a.archive")
    got.value.save_as(tmp_path / "docs.tar")
    with tarfile.open(tmp_path / "docs.tar") as tar:
        tar.extractall(tmp_path / "untarred", filter="data")
    assert (tmp_path / "untarred" / "docs" / "letter.txt").read_bytes() == \
        (src / "docs" / "letter.txt").read_bytes()
    # Back up to the source's top: restore photo.bin into a folder, with progress, compare.
    page.click(".crumbs >> text=src")
    page.click("tr:has-text('photo.bin') >> button.restore")
    target = tmp_path / "restored"
    page.fill("#restore-to", str(target))
    page.click("#restore-go")
    page.wait_for_selector("#restore-state.done", timeout=60_000)
    assert (target / "src" / "photo.bin").read_bytes() == (src / "photo.bin").read_bytes()
    # A restore into a relative folder is refused in words, nothing started.
    page.click("#restore-dialog >> text=Cancel")
    page.click("tr:has-text('photo.bin') >> button.restore")
    page.fill("#restore-to", "relative/folder")
    page.click("#restore-go")
    page.wait_for_selector("#restore-state.failed")
    assert "absolute path" in page.inner_text("#restore-state")
    # Verify, reading every blob, with the result in words.
    page.click("#restore-dialog >> text=Cancel")
    page.click("nav >> text=Verify")
    page.click("button.verify[data-read='true']")
    page.wait_for_selector("#verify-state.done", timeout=60_000)
    assert "no problems found" in page.inner_text("#verify-state")
    assert "blobs read" in page.inner_text("#verify-state")
    assert _fits_the_width(page), "Verify"
    # Repair, run by the daemon between two seals: nothing damaged, said in words.
    page.click("button.repair")
    page.wait_for_selector("#verify-state.done:has-text('no damaged packs')", timeout=60_000)
    for name in ("Timeline", "Devices", "Status"):
        page.click(f"nav >> text={name}")
        assert _fits_the_width(page), name
    page.close()
    origin = page.url.split("/", 3)[:3]
    assert requested and all(u.split("/", 3)[:3] == origin for u in requested), requested
    assert any(u.endswith("/api/events") for u in requested)
    assert not any("/api/status" in u or "/api/jobs" in u for u in requested)


def _head_seq(cli: Cli) -> int:
    return json.loads(cli("status", "--json").stdout)["log"]["seq"]


def test_a_moment_picked_in_the_timeline_shows_that_version(browser, device, tmp_path: Path):
    cli, src, _ = device
    letter = src / "docs" / "letter.txt"
    seq = _head_seq(cli)
    letter.write_text("version 2, after the snapshot\n")
    eventually_sync(lambda: _head_seq(cli) > seq, timeout=30, interval=0.2)
    time.sleep(1.1)  # the moment is given to the second: it must fall between the versions
    moment = dt.datetime.now().replace(microsecond=0)
    time.sleep(1.1)
    seq = _head_seq(cli)
    letter.write_text("version 3\n")
    eventually_sync(lambda: _head_seq(cli) > seq, timeout=30, interval=0.2)

    page = _sign_in(browser, cli)
    page.click("nav >> text=Timeline")
    # The log segments sealed since the snapshot are on its time axis.
    assert page.locator(".lane li.segment").count() >= 2
    page.fill("#moment-at", moment.isoformat(timespec="seconds"))
    page.select_option("#moment-source", "src")
    page.click("form#moment >> button")
    assert "as it was at" in page.inner_text("main")
    page.click("text=docs/")
    with page.expect_download() as got:
        page.click("tr:has-text('letter.txt') >> a.download")
    saved = tmp_path / "then"
    got.value.save_as(saved)
    assert saved.read_text() == "version 2, after the snapshot\n"
    # A second snapshot: the file's versions, newest first, each downloadable.
    cli("snapshot")
    page.click("nav >> text=Snapshots")
    assert "deduplication and compression save" in page.inner_text("#storage")
    # one device's series (the store's own size line joins it once its history spans two
    # minutes, which a run crossing a minute's end does)
    assert page.locator("svg.chart polyline.series").count() == 1
    # Status draws it too, with a bar for each sealed log segment's changes.
    page.click("nav >> text=Status")
    assert "deduplication and compression save" in page.inner_text("#storage")
    assert page.locator("svg.chart rect.changes").count() >= 2
    page.go_back()
    page.go_back()
    page.click("tr:has-text('letter.txt') >> a.versions")
    rows = page.locator("#versions tbody tr")
    # Newest first: version 3 from the log (the second snapshot holds the same), version 2
    # from the log, version 1 from the first snapshot.
    assert rows.count() == 3
    assert [rows.nth(i).get_attribute("class") for i in range(3)] == ["log", "log", "snapshot"]
    with page.expect_download() as got:
        rows.nth(1).locator("a.download").click()
    got.value.save_as(tmp_path / "second")
    assert (tmp_path / "second").read_text() == "version 2, after the snapshot\n"
    with page.expect_download() as got:
        rows.nth(0).locator("a.download").click()
    got.value.save_as(tmp_path / "newest")
    assert (tmp_path / "newest").read_text() == "version 3\n"
    page.close()


def _pair_from_the_page(page, joiner: Cli, name: str) -> str:
    """Show a code on the Devices page (as its form is filled in), join it with `p2pbackup
    pair CODE` in `joiner`'s home, and say yes to the verification number; returns what
    the joiner printed."""
    page.click("#pair-start")
    page.wait_for_selector("#pair-qr[src^='data:']")  # (the page's CSP forbids eval)
    shown = page.inner_text("#pair-code")  # CODE --peer 127.0.0.1:PORT (the LAN is off here)
    assert page.get_attribute("#pair-qr", "src").startswith("data:image/svg+xml;base64,")
    code, _, peer = shown.split()
    joining = joiner.popen("pair", code, "--peer", peer, "--name", name)
    try:
        page.wait_for_selector("#pair-question:not([hidden])", timeout=60_000)
        verifier = page.inner_text("#pair-verifier")
        page.click("#pair-yes")
        page.wait_for_selector("#pair-state.done", timeout=60_000)
        out, err = joining.communicate(timeout=60)
    finally:
        if joining.poll() is None:
            joining.kill()
            joining.wait()
    assert joining.returncode == 0, err
    assert f"Verification: {verifier}" in out
    return out


def test_pair_a_device_from_the_page_then_remove_it(browser, device, tmp_path: Path):
    cli, _, _ = device
    page = _sign_in(browser, cli)
    page.click("nav >> text=Devices")
    assert "this device" in page.inner_text("#devices")
    _pair_from_the_page(page, Cli(tmp_path / "home-phone"), "phone")
    assert "joined as owner" in page.inner_text("#pair-state")
    page.reload()
    row = page.locator("#devices tr:has-text('phone')")
    assert "offline" in row.inner_text()  # paired, its daemon not running
    # Remove it, after saying yes to the confirmation.
    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button.remove").click()
    page.wait_for_selector("#remove-state.done")
    assert "recovery code" in page.inner_text("#remove-state")
    after = json.loads(cli("devices", "--json").stdout)
    assert [d["this_device"] for d in after["devices"]] == [True] and len(after["removed"]) == 1
    page.close()


def test_pair_a_member_scoped_to_one_source_and_a_partner_with_a_quota_from_the_page(
        browser, tmp_path: Path):
    """The Devices page's form: a household member's device granted only the source music
    (not src), then a storage partner giving 500 MiB; each joins with `p2pbackup pair CODE`
    in its own home, and both sides' membership says what it was granted."""
    with _running_device(tmp_path, "music") as (cli, _, _):
        page = _sign_in(browser, cli)
        page.click("nav >> text=Devices")
        assert page.is_hidden("#pair-sources") and page.is_hidden("#pair-quota-box")
        page.check("input[name='pair-role'][value='member']")
        page.check("input[name='pair-source'][value='music']")
        tablet = Cli(tmp_path / "home-tablet")
        out = _pair_from_the_page(page, tablet, "tablet")
        assert "as member (sources music)" in out
        assert "joined as member of sources music" in page.inner_text("#pair-state")
        page.check("input[name='pair-role'][value='partner']")
        assert page.is_hidden("#pair-sources") and page.is_visible("#pair-quota-box")
        page.fill("#pair-quota", "500 MiB")
        out = _pair_from_the_page(page, Cli(tmp_path / "home-nas"), "nas")
        assert "Paired as a storage partner" in out and "500.0 MiB" in out
        assert "joined as partner with a quota of 500.0 MiB" in page.inner_text("#pair-state")
        page.close()
        here = {d["name"]: d for d in json.loads(cli("devices", "--json").stdout)["devices"]}
        there = {d["name"]: d for d in json.loads(tablet("devices", "--json").stdout)["devices"]}
    assert (here["tablet"]["role"], here["tablet"]["sources"]) == ("member", ["music"])
    assert (there["tablet"]["role"], there["tablet"]["sources"]) == ("member", ["music"])
    assert there["tablet"]["this_device"] is True
    assert (here["nas"]["role"], here["nas"]["quota"]) == ("partner", 500 << 20)


def test_a_code_shown_in_the_page_is_withdrawn_by_cancel_and_by_closing_the_page(
        browser, device, tmp_path: Path):
    cli, _, _ = device
    log = tmp_path / "daemon.log"

    def withdrawn() -> int:
        return log.read_text().count("pairing code withdrawn")

    page = _sign_in(browser, cli)
    page.click("nav >> text=Devices")
    page.click("#pair-start")
    page.wait_for_selector("#pair-qr[src^='data:']")
    page.click("#pair-cancel")
    page.wait_for_selector("#pair-state.failed:has-text('withdrawn')")
    assert withdrawn() == 1
    # Withdrawn, not left waiting: the next pairing starts at once (one may wait at a time).
    page.click("#pair-start")
    page.wait_for_selector("#pair-state:has-text('the code works once')")
    page.close()   # the page goes away while its code waits for a device
    eventually_sync(lambda: withdrawn() == 2, timeout=30, interval=0.2)
    page = _sign_in(browser, cli)
    page.click("nav >> text=Devices")
    page.click("#pair-start")
    page.wait_for_selector("#pair-state:has-text('the code works once')")
    page.click("#pair-cancel")
    page.wait_for_selector("#pair-state.failed")
    page.close()


@contextlib.contextmanager
def _console_of(status):
    """A console on a free port whose daemon status is `status()` (what the test changes),
    in a thread of its own; yields its sign-in address."""
    import asyncio
    import tempfile
    import threading

    from p2pbackup.blobs.local import LocalDirStore
    from p2pbackup.crypto.identity import DeviceIdentity
    from p2pbackup.crypto.keys import AccountKeys
    from p2pbackup.repo.repository import Repository
    from p2pbackup.web.app import Backend, Console

    async def current() -> dict:
        return status()

    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict = {}
    work = tempfile.TemporaryDirectory(prefix="console-")

    def serve() -> None:
        asyncio.set_event_loop(loop)
        repo = loop.run_until_complete(Repository.create(
            LocalDirStore(Path(work.name) / "store"), AccountKeys(os.urandom(32)),
            DeviceIdentity.generate(), str(Path(work.name) / "cache"), "test"))
        console = Console(Backend(repo, (), current), event_interval=0.1)
        box["console"], box["port"] = console, loop.run_until_complete(
            console.start("127.0.0.1", 0))
        started.set()
        loop.run_forever()
        loop.run_until_complete(console.close())
        loop.run_until_complete(repo.close())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(30)
    try:
        yield asyncio.run_coroutine_threadsafe(
            asyncio.sleep(0, box["console"].login_url()), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        work.cleanup()


def _status(**fields) -> dict:
    return {"device": "a" * 64, "pid": 1, "sources": [], "log": None, "last_snapshot": None,
            "peers": [], "errors": [], **fields}


def test_a_peer_going_offline_and_back_is_pushed_to_the_open_page(playwright, netlab,
                                                                   tmp_path: Path):
    """Two paired daemons on a LAN of network namespaces (real mDNS, real sessions); the
    browser runs in the first one's namespace (its console listens on that loopback). The
    other daemon stops: the open page shows it offline without a reload (server-sent events);
    it starts again: online."""
    from tests.integration.test_peers_lan import start_daemon, two_paired_devices, \
        wait_connected

    ha, hb, a, b, _src, _a_id = two_paired_devices(netlab, tmp_path, lambda p: p.mkdir())
    laptop = next(d["id"] for d in json.loads(a("devices", "--json").stdout)["devices"]
                  if d["name"] == "laptop")
    # Chromium in a's namespace: Playwright drives it over a pipe, which crosses namespaces.
    wrapper = tmp_path / "chromium-in-a"
    wrapper.write_text(f'#!/bin/sh\nexec {" ".join(ha.exec_prefix())} {CHROMIUM} "$@"\n')
    wrapper.chmod(0o755)
    da = start_daemon(ha, a, tmp_path, "a")
    db = start_daemon(hb, b, tmp_path, "b")
    try:
        wait_connected(a, laptop, 60)
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(wrapper), headless=True, args=ARGS)
        try:
            page = context.new_page()
            page.goto(a("web", "--no-open").stdout.strip())
            page.wait_for_selector("#peers li.online:has-text('laptop')", timeout=60_000)
            db.terminate()
            assert db.wait(timeout=30) == 0
            page.wait_for_selector("#peers li.offline:has-text('laptop')", timeout=60_000)
            assert "connected" not in page.inner_text("#peers li:has-text('laptop')")
            db = start_daemon(hb, b, tmp_path, "b")
            page.wait_for_selector("#peers li.online:has-text('laptop')", timeout=90_000)
            assert "connected over the" in page.inner_text("#peers")
        finally:
            context.close()
    finally:
        for proc in (da, db):
            proc.terminate()
        for proc in (da, db):
            proc.wait(timeout=30)


def test_the_daemons_work_is_drawn_as_live_progress_bars(browser):
    """status.activities (p2pbackup.activity) as the page shows it: a bar per piece of work
    whose end is known, moving as the pushed status moves, gone when the work ends."""
    snapshot = {"kind": "snapshot", "name": "src", "phase": "reading", "done": 1 << 20,
                "total": 4 << 20, "unit": "bytes", "files": 12}
    replication = {"kind": "replication", "name": "b" * 64, "phase": "receiving",
                   "done": 300, "total": 1200, "unit": "bytes", "sent_bytes": 0,
                   "sent_objects": 0, "received_bytes": 300, "received_objects": 3}
    peer = {"device": "b" * 64, "name": "laptop", "connected": True, "on_lan": True,
            "path": "direct lane", "objects_behind": 9, "last_sync": None, "error": None}
    work = [snapshot, replication]
    with _console_of(lambda: _status(peers=[peer], activities=[dict(a) for a in work])) as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#work li[data-kind='snapshot'] progress")
        assert page.get_attribute("#work li[data-kind='snapshot'] progress", "value") == \
            str(1 << 20)
        assert "25%" in page.inner_text("#work li[data-kind='snapshot']")
        assert "replication with laptop: receiving 25%" in page.inner_text("#work")
        snapshot["done"] = 3 << 20
        page.wait_for_selector("#work li[data-kind='snapshot']:has-text('75%')")
        work.clear()
        page.wait_for_selector("#work:has-text('idle')")
        page.close()


def _fits_the_width(page) -> bool:
    """Nothing wider than the window: no sideways scrolling at phone width."""
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_the_status_page_says_each_path_the_broker_and_the_stores_at_phone_width(browser):
    """The pushed status in words, at a phone's width (390 px, the context's viewport): a peer
    reached through the broker's TURN server is "over the data channel (TURN relay)", the
    broker connection, each store's upload state (behind, its last error), packs noted damaged
    and the daemon's warnings are said."""
    peer = {"device": "b" * 64, "name": "laptop", "connected": True, "on_lan": False,
            "path": "data channel", "ice_path": "relay", "objects_behind": None,
            "last_sync": None, "error": None}
    broker = {"url": "wss://broker.example.org", "connected": False,
              "last_error": "connection refused"}
    store = {"location": "s3://bucket/backup", "reachable": False, "objects_behind": 4,
             "bytes_behind": 5 << 20, "last_upload": None,
             "last_error": "the store cannot be reached: timed out", "uploaded": 0,
             "uploaded_bytes": 0}
    gone = "source photos (/home/me/Photos) disappeared; its last state stays in the log"
    damaged = {"pack": "ab" * 32, "reason": "blob 3f2a… does not authenticate"}
    with _console_of(lambda: _status(peers=[peer], broker=broker, stores=[store],
                                     errors=[gone], damaged=[damaged])) as url:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("#peers li.online")
        assert "laptop (bbbbbbbbbbbb): connected over the data channel (TURN relay)" in \
            page.inner_text("#peers")
        assert "broker wss://broker.example.org: not connected (connection refused)" in \
            page.inner_text("#broker")
        stores = page.inner_text("#stores")
        assert "s3://bucket/backup: not reachable; 4 objects (5.0 MiB) to upload" in stores
        assert "the store cannot be reached: timed out" in stores
        assert page.inner_text("#errors").splitlines() == [   # warnings in words
            "damaged: pack abababababab: blob 3f2a… does not authenticate (an intact copy "
            "from a peer replaces it; Repair heals it or sets it aside)", gone]
        assert _fits_the_width(page)
        page.close()


def test_the_browser_is_refused_without_a_token_with_a_wrong_one_cross_site_and_rebound(
        browser, playwright, tmp_path: Path):
    """In the browser: no token, a wrong token, a page of another origin that posts a form to
    the signed-in console (the cookie goes with it: same site, another port), and the console
    reached under a foreign name resolving to 127.0.0.1 (DNS rebinding) are all refused."""
    with _console_of(lambda: _status()) as url:
        base = url.split("/login", 1)[0]
        page = browser.new_page()
        assert page.goto(base + "/").status == 401
        assert "p2pbackup web" in page.inner_text("body")
        assert page.goto(base + "/login?token=" + "A" * 43).status == 401
        assert "not valid" in page.inner_text("body")
        assert page.goto(url).status == 200   # signed in: the session cookie is set
        # Another origin's page (127.0.0.1 on another port) posts a form to the console.
        evil = "http://127.0.0.1:9/evil.html"
        page.route(evil, lambda route: route.fulfill(content_type="text/html", body=(
            f'<form id="f" method="post" action="{base}/api/verify" '
            'enctype="text/plain"><input name=\'{"read_data": true, "x": "\' '
            'value=\'"}\'></form><script>document.getElementById("f").submit()</script>')))
        with page.expect_response(f"{base}/api/verify") as posted:
            page.goto(evil)
        assert posted.value.status == 403
        assert "refused" in posted.value.text()
        assert page.goto(base + "/api/jobs").status == 200
        assert json.loads(page.inner_text("body")) == []   # nothing was started
        page.close()
        # The console under another name (a rebinding attacker's domain) is refused.
        port = base.rsplit(":", 1)[1]
        rebound = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            args=ARGS + ["--host-resolver-rules=MAP rebind.example 127.0.0.1"])
        try:
            page = rebound.new_page()
            assert page.goto(f"http://rebind.example:{port}/").status == 421
            assert "its own address" in page.inner_text("body")
            token = url.split("token=", 1)[1]
            assert page.goto(f"http://rebind.example:{port}/login?token={token}").status == 421
        finally:
            rebound.close()
