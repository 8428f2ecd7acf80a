"""A hostile WebDAV server answers PROPFIND with hrefs meant to lead the listing walk out of the
store's folder (`..`, another folder) or down forever (every folder holds a deeper one)."""

from __future__ import annotations

import pytest

from p2pbackup.blobs.webdav import WebDavStore
from tests.servers import serving

DIGEST = "ab" * 32


def _multistatus(entries: list[tuple[str, bool]]) -> str:
    parts = []
    for href, folder in entries:
        kind = "<D:collection/>" if folder else ""
        parts.append(f"<D:response><D:href>{href}</D:href><D:propstat><D:prop><D:resourcetype>"
                     f"{kind}</D:resourcetype></D:prop><D:status>HTTP/1.1 200 OK</D:status>"
                     "</D:propstat></D:response>")
    return f'<?xml version="1.0"?><D:multistatus xmlns:D="DAV:">{"".join(parts)}</D:multistatus>'


async def test_a_listing_cannot_lead_the_walk_out_of_the_folder_or_on_forever() -> None:
    from aiohttp import web

    asked: list[str] = []

    async def propfind(request: web.Request) -> web.Response:
        path = request.path
        asked.append(path)
        if len(asked) > 50:
            return web.Response(status=403)   # a walk that went on: the test fails with it
        entries = [(path, True), (path + "deeper/", True), ("/s/../escape/", True),
                   ("/elsewhere/", True), ("/s/%2e%2e/", True)]
        if path == "/s/packs/ab/":
            entries.append((f"/s/packs/ab/{DIGEST}", False))
        if path == "/s/":
            entries += [("/s/packs/", True), ("/s/config", False)]
        if path == "/s/packs/":
            entries.append(("/s/packs/ab/", True))
        return web.Response(status=207, text=_multistatus(entries),
                            content_type="application/xml")

    app = web.Application()
    app.router.add_route("PROPFIND", "/{tail:.*}", propfind)
    async with serving(app) as url:
        store = WebDavStore(url.replace("http://", "webdav://") + "/s")
        try:
            names = sorted([n async for n in store.list("")])
        finally:
            await store.close()
    assert names == ["config", f"packs/{DIGEST}"]
    assert all(path.startswith("/s/") and ".." not in path for path in asked)
    assert len(asked) <= 12, asked   # the folders there are, each at most a few levels down
