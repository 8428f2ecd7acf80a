"""The local web console against a web page or a process that is not its user: every request
without the session cookie, with a wrong, reused or stale login token, a cross-site change, and
a request under a foreign Host (DNS rebinding) is refused. The real aiohttp app, served on a
free 127.0.0.1 port, over real HTTP."""

from __future__ import annotations

from http.cookies import SimpleCookie

import aiohttp
import pytest

from p2pbackup.web.app import Backend, Console
from p2pbackup.web.security import Gate


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


async def _status() -> dict:
    return {"device": "d" * 64, "pid": 1, "peers": [], "errors": []}


@pytest.fixture
async def console(repo):
    clock = Clock()
    c = Console(Backend(repo, (), _status), Gate(now=clock))
    port = await c.start("127.0.0.1", 0)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        yield c, f"http://127.0.0.1:{port}", http, clock
    await c.close()


async def _login(c: Console, base: str, http: aiohttp.ClientSession) -> tuple[str, str]:
    """Sign in with a fresh token: the session cookie header and the page's CSRF token."""
    token = c.login_url().split("token=", 1)[1]
    async with http.get(f"{base}/login?token={token}", allow_redirects=False) as r:
        assert r.status == 303
        assert ("Secure" in r.headers["Set-Cookie"]) == c.gate.secure  # https: Secure
        morsel = SimpleCookie(r.headers["Set-Cookie"])[c.gate.cookie_name]
    cookie = f"{c.gate.cookie_name}={morsel.value}"
    async with http.get(f"{base}/", headers={"Cookie": cookie}) as r:
        assert r.status == 200
        page = await r.text()
    csrf = page.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]
    return cookie, csrf


async def test_no_token_no_console(console):
    c, base, http, _ = console
    for path in ("/", "/snapshots", "/api/status", "/api/snapshots", "/api/events",
                 "/api/file?path=x", "/static/console.js"):
        async with http.get(base + path) as r:
            assert r.status == 401, path
            assert "p2pbackup web" in await r.text()


async def test_wrong_token_is_refused(console):
    c, base, http, _ = console
    c.login_url()  # a real token exists, but the attacker does not have it
    async with http.get(f"{base}/login?token=guessed-wrong", allow_redirects=False) as r:
        assert r.status == 401 and "Set-Cookie" not in r.headers
    async with http.get(f"{base}/login", allow_redirects=False) as r:
        assert r.status == 401 and "Set-Cookie" not in r.headers


async def test_reused_token_is_refused(console):
    c, base, http, _ = console
    token = c.login_url().split("token=", 1)[1]
    async with http.get(f"{base}/login?token={token}", allow_redirects=False) as r:
        assert r.status == 303
        cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    async with http.get(f"{base}/login?token={token}", allow_redirects=False) as r:
        assert r.status == 401 and "Set-Cookie" not in r.headers


async def test_stale_token_is_refused(console):
    c, base, http, clock = console
    token = c.login_url().split("token=", 1)[1]
    clock.t += c.gate.token_ttl + 1
    async with http.get(f"{base}/login?token={token}", allow_redirects=False) as r:
        assert r.status == 401


async def test_stale_session_is_refused(console):
    c, base, http, clock = console
    cookie, _ = await _login(c, base, http)
    clock.t += c.gate.session_ttl + 1
    async with http.get(f"{base}/api/status", headers={"Cookie": cookie}) as r:
        assert r.status == 401


async def test_forged_session_cookie_is_refused(console):
    c, base, http, _ = console
    await _login(c, base, http)
    async with http.get(f"{base}/api/status",
                        headers={"Cookie": f"{c.gate.cookie_name}=forged"}) as r:
        assert r.status == 401


async def test_cross_site_post_without_csrf_token_is_refused(console, tmp_path):
    c, base, http, _ = console
    cookie, csrf = await _login(c, base, http)
    body = {"snapshot": "latest", "to": str(tmp_path / "out")}
    # A form on another site posts with the user's cookie (were it sent) but has no token.
    async with http.post(f"{base}/api/restore", json=body,
                         headers={"Cookie": cookie, "Origin": base}) as r:
        assert r.status == 403 and "CSRF" in await r.text()
    async with http.post(f"{base}/api/restore", data={"csrf": "guess", **body},
                         headers={"Cookie": cookie, "Origin": base}) as r:
        assert r.status == 403
    assert c.jobs.view() == []
    # The page's own request passes the guard (and is then answered: no snapshot yet).
    async with http.post(f"{base}/api/restore", json=body,
                         headers={"Cookie": cookie, "Origin": base, "X-CSRF-Token": csrf}) as r:
        assert r.status == 404 and "no snapshots" in (await r.json())["error"]


async def test_post_from_a_foreign_origin_is_refused(console, tmp_path):
    c, base, http, _ = console
    cookie, csrf = await _login(c, base, http)
    body = {"snapshot": "latest", "to": str(tmp_path / "out")}
    for origin in ("http://evil.example", "null", None):
        headers = {"Cookie": cookie, "X-CSRF-Token": csrf}
        if origin is not None:
            headers["Origin"] = origin
        async with http.post(f"{base}/api/restore", json=body, headers=headers) as r:
            assert r.status == 403 and "Origin" in await r.text(), origin
    assert c.jobs.view() == []


async def test_foreign_host_header_is_refused(console):
    """DNS rebinding: evil.example resolves to 127.0.0.1 after the page loaded; the browser
    then sends the console's requests with Host: evil.example."""
    c, base, http, _ = console
    cookie, _ = await _login(c, base, http)
    port = c.gate.port
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}",
                 f"localhost.evil.example:{port}"):
        async with http.get(f"{base}/api/status", headers={"Cookie": cookie, "Host": host}) as r:
            assert r.status == 421, host
        token = c.login_url().split("token=", 1)[1]
        async with http.get(f"{base}/login?token={token}", headers={"Host": host},
                            allow_redirects=False) as r:
            assert r.status == 421 and "Set-Cookie" not in r.headers, host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        async with http.get(f"{base}/api/status", headers={"Cookie": cookie, "Host": host}) as r:
            assert r.status == 200, host


async def test_pages_load_nothing_from_elsewhere(console):
    c, base, http, _ = console
    cookie, _ = await _login(c, base, http)
    async with http.get(f"{base}/", headers={"Cookie": cookie}) as r:
        csp = r.headers["Content-Security-Policy"]
        page = await r.text()
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "http://" not in page and "https://" not in page and "//" not in page.replace(
        "<!doctype", "")


async def test_behind_a_reverse_proxy_only_its_address_is_accepted(repo, tmp_path):
    """On a Unix socket for a reverse proxy at https://backup.example.org: another Host
    (rebinding, or a request straight to the socket naming loopback) and a change from another
    origin are refused; the cookie is Secure."""
    c = Console(Backend(repo, (), _status))
    await c.start_proxied(str(tmp_path / "web.sock"), "https://backup.example.org")
    try:
        connector = aiohttp.UnixConnector(path=str(tmp_path / "web.sock"))
        async with aiohttp.ClientSession(connector=connector,
                                         cookie_jar=aiohttp.DummyCookieJar()) as http:
            base = "http://backup.example.org"  # what the proxy forwards: Host as given
            assert c.login_url().startswith("https://backup.example.org/login?token=")
            assert c.gate.secure
            cookie, csrf = await _login(c, base, http)
            async with http.get(f"{base}/", headers={"Cookie": cookie,
                                                     "Host": "127.0.0.1:8765"}) as r:
                assert r.status == 421
            body = {"read_data": False}
            for origin, status in (("http://backup.example.org", 403),
                                   ("https://evil.example", 403),
                                   ("https://backup.example.org", 200)):
                async with http.post(f"{base}/api/verify", json=body, headers={
                        "Cookie": cookie, "X-CSRF-Token": csrf, "Origin": origin}) as r:
                    assert r.status == status, origin
    finally:
        await c.close()
    assert not (tmp_path / "web.sock").exists()


@pytest.mark.parametrize("name", [b"..", b"a/b", b"x\0y", b""])
async def test_a_hostile_name_on_a_page_of_a_folder_is_refused_as_damage(console, name):
    """A folder is listed a page at a time, decoding only that page (Tree.page): a name that
    is not one plain component on it is still refused as damage (exit 13), never shown as a
    path or link."""
    import os
    import time as _time

    from p2pbackup.format.header import Kind
    from p2pbackup.format.records import DIR, FILE, SourceRoot, TreeEntry
    from tests.adversary.hostile import hostile_snapshot, raw_tree, store_blob

    c, base, http, _ = console
    repo = c.backend.repo
    files = [TreeEntry(FILE, b"f%03d" % i, 0o100644, 0, 0, 1) for i in range(300)]
    bad = TreeEntry(FILE, name, 0o100644, 0, 0, 1)
    folder = await store_blob(repo, "src", Kind.TREE, raw_tree(files + [bad]))
    top = await store_blob(repo, "src", Kind.TREE, raw_tree([
        TreeEntry(DIR, b"big", 0o40755, os.geteuid(), os.getegid(), _time.time_ns(),
                  subtree=folder)]))
    await hostile_snapshot(repo, [SourceRoot("src", "/src", top)])
    cookie, _ = await _login(c, base, http)
    async with http.get(f"{base}/api/tree?path=src/big&offset=0",
                        headers={"Cookie": cookie}) as r:
        first = await r.json()
    async with http.get(f"{base}/api/tree?path=src/big&offset=200",
                        headers={"Cookie": cookie}) as r:
        status, last = r.status, await r.json()
    assert first["total"] == 301 and len(first["entries"]) == 200   # none of it hostile
    assert status == 500 and last["exit"] == 13 and "not a plain name" in last["error"]


async def test_a_name_twice_in_a_big_folder_is_refused_in_its_archive(console):
    """A folder's archive decodes it a batch at a time: a name a hostile writer put twice,
    in different batches, is still damage: the download is cut short, never a tar that looks
    whole with two members of one name."""
    import os
    import time as _time

    from p2pbackup.format.header import Kind
    from p2pbackup.format.records import DIR, FILE, SourceRoot, TreeEntry
    from tests.adversary.hostile import hostile_snapshot, raw_tree, store_blob

    c, base, http, _ = console
    repo = c.backend.repo
    files = [TreeEntry(FILE, b"f%04d" % i, 0o100644, 0, 0, 1) for i in range(1500)]
    files.append(TreeEntry(FILE, b"f0003", 0o100644, 0, 0, 1))   # in the second batch
    folder = await store_blob(repo, "src", Kind.TREE, raw_tree(files))
    top = await store_blob(repo, "src", Kind.TREE, raw_tree([
        TreeEntry(DIR, b"big", 0o40755, os.geteuid(), os.getegid(), _time.time_ns(),
                  subtree=folder)]))
    await hostile_snapshot(repo, [SourceRoot("src", "/src", top)])
    cookie, _ = await _login(c, base, http)
    async with http.get(f"{base}/api/archive?path=src/big", headers={"Cookie": cookie}) as r:
        assert r.status == 200   # (the damage is met on the way, in the second batch)
        with pytest.raises(aiohttp.ClientPayloadError):   # cut short: never whole-looking
            await r.read()
