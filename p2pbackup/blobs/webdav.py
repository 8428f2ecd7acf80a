"""A BlobStore in a WebDAV folder: ownCloud, Nextcloud, nginx dav-ext, Apache mod_dav, wsgidav.

`webdav://host[:port]/path` speaks http, `webdavs://host[:port]/path` https. Credentials come
as options (username, password: a Nextcloud/ownCloud app password works through basic auth),
never in the location, which shows in logs and config listings.

The client is aiohttp; PROPFIND answers are parsed by webdav4's multistatus parser. Measured
on this machine against nginx dav-ext on 127.0.0.1, 8 x 16 MiB: aiohttp put 250-490 MiB/s,
get 570-800 MiB/s, 0.15 s client CPU per 256 MiB; httpx put 205-320, get 210-220 MiB/s,
0.35-0.42 s CPU; OpenDAL's webdav operator put 250-300, get 610-660 MiB/s, 0.1-0.15 s CPU.
OpenDAL is not used though: its webdav service (core.rs, webdav_move) always sends
`Overwrite: T`, so no create-only write can be built on it, and a recursive list is one
Depth: infinity PROPFIND, which many servers refuse or time out on.

What WebDAV providers make users of restic, kopia and duplicati stumble on, and the answer:
- Writes are create-only: PUT to a temporary name beside the target, then MOVE it with
  `Overwrite: F`, which RFC 4918 (10.6) says must fail with 412 when the target exists; only
  the names that are written again (base.is_mutable_name: heads, log anchors) move with
  `Overwrite: T`. The MOVE is atomic, so readers never see half an object.
- Folders stay small: names that grow without bound are spread over sub-folders named by a
  prefix of the name (packs/ab/ab..., snapshots/a/a..., removals/a/a...,
  segments/<device>/<first 9 digits>/<seq>): at most a few thousand entries per folder.
- Listings are Depth: 1 PROPFINDs of only the folders that can hold the prefix asked for.
- 429 and 503 are retried after the server's Retry-After (bounded), other 5xx and lost
  connections with exponential backoff and jitter; 507 is StoreFull; 401/403 one line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from ..errors import ConfigError, NotFound, StorageError
from .base import (BlobStore, Buffer, ObjectExists, StoreCapabilities, StoreFull,
                   is_mutable_name, seconds_option)
from .tls import client_tls

SCHEMES = {"webdav": "http", "webdavs": "https"}
OPTIONS = ("username", "password", "ca_file", "timeout")
_TIMEOUT = 300.0      # seconds a request may go without a byte before it is retried
_TMP_SUFFIX = ".tmp"
# Sub-folder of each prefix whose names grow without bound: the folder is the first
# `width` characters of the name's last part (hex digest or 12-digit seq). Packs are
# ~16 MiB: 256 folders hold 65 536 packs (1 TiB) at 256 each. Snapshots and removal records
# are few per day: 16 folders keep a listing at 17 requests. A segment is sealed at most
# once a minute: 1000 seqs per folder, 525 folders a year.
_SHARDS = {"packs/": 2, "snapshots/": 1, "removals/": 1}
_SEGMENT_SHARD = 9
_MAX_DEPTH = 3         # folders below the store's: segments/<device>/<shard>/ is the deepest
_ATTEMPTS = 6          # tries of one request before its error is the caller's
_BACKOFF = 0.5         # first wait after a lost connection or a 5xx, doubled each time
_MAX_WAIT = 60.0       # longest wait between tries, whatever Retry-After asks
# An exclusive write lock held while a head is compared and moved into place, on a server
# that ignores the If header but takes LOCKs (nginx dav-ext with a lock zone): it refuses
# every other write to the head meanwhile (423). The whole replace takes a few requests;
# a lock left by a writer that died expires after this, and other writers are refused
# until then (their uploader tries again later).
_LOCK_SECONDS = 60
_LOCKINFO = ('<?xml version="1.0" encoding="utf-8"?><D:lockinfo xmlns:D="DAV:"><D:lockscope>'
             '<D:exclusive/></D:lockscope><D:locktype><D:write/></D:locktype><D:owner>'
             'p2pbackup</D:owner></D:lockinfo>')
_PROPFIND_TYPE = ('<?xml version="1.0" encoding="utf-8"?>'
                  '<propfind xmlns="DAV:"><prop><resourcetype/></prop></propfind>')
_PROPFIND_TYPE_TIME = ('<?xml version="1.0" encoding="utf-8"?>'
                       '<propfind xmlns="DAV:"><prop><resourcetype/><getlastmodified/></prop>'
                       '</propfind>')
_PROPFIND_LENGTH = ('<?xml version="1.0" encoding="utf-8"?>'
                    '<propfind xmlns="DAV:"><prop><getcontentlength/></prop></propfind>')


def _check_name(name: str) -> None:
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) \
            or name.endswith(_TMP_SUFFIX):
        raise StorageError(f"invalid blob name {name!r}")


def physical_path(name: str) -> str:
    """Where `name` lives under the store's folder (sharded, see _SHARDS)."""
    _check_name(name)
    parts = name.split("/")
    for prefix, width in _SHARDS.items():
        if name.startswith(prefix) and len(parts) == 2 and len(parts[1]) > width:
            return f"{parts[0]}/{parts[1][:width]}/{parts[1]}"
    if parts[0] == "segments" and len(parts) == 3 and parts[2].isdigit() \
            and len(parts[2]) > _SEGMENT_SHARD:
        return f"segments/{parts[1]}/{parts[2][:_SEGMENT_SHARD]}/{parts[2]}"
    return name


def logical_name(path: str) -> str | None:
    """The name stored at `path` (the inverse of physical_path), None for temporary files
    and for files that physical_path would not have put there."""
    if path.endswith(_TMP_SUFFIX):
        return None
    parts = path.split("/")
    if len(parts) == 3 and f"{parts[0]}/" in _SHARDS:
        name = f"{parts[0]}/{parts[2]}"
    elif len(parts) == 4 and parts[0] == "segments":
        name = f"segments/{parts[1]}/{parts[3]}"
    else:
        name = path
    try:
        return name if physical_path(name) == path else None
    except StorageError:
        return None


def _retry_after(value: str | None, now: float) -> float | None:
    """Seconds the server asked to wait (delta-seconds or an HTTP date), None if it did not."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def parse_location(location: str) -> tuple[str, str]:
    """(base URL ending in '/', the folder's decoded path) of a webdav(s):// location."""
    parts = urlsplit(location)
    if parts.scheme not in SCHEMES or not parts.hostname:
        raise ConfigError(f"store {location!r}: a WebDAV location is webdav://host/path or "
                          "webdavs://host/path")
    if parts.username is not None or parts.password is not None:
        shown = f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"
        raise ConfigError(f"store {shown}{parts.path}: credentials in the location are refused "
                          "(they would show in logs and config listings); give username and "
                          "password as the store's options")
    if parts.query or parts.fragment:
        raise ConfigError(f"store {location!r}: a WebDAV location has no ?query or #fragment")
    folder = unquote(parts.path).rstrip("/") + "/"
    base = f"{SCHEMES[parts.scheme]}://{parts.netloc}{quote(folder)}"
    return base, folder


class WebDavStore(BlobStore):
    """Blobs as files under one WebDAV folder."""

    # create_only: MOVE with Overwrite: F (RFC 4918 10.6 makes the 412 a MUST); wsgidav and
    # nginx dav-ext enforce it in tests/blobs/test_webdav.py, and `p2pbackup store check`
    # shows whether a user's server does.
    # conditional_replace: a head moves with `If: <path> (["etag"])` (RFC 4918 10.4, tagged
    # to the destination), which wsgidav and Nextcloud's sabre/dav evaluate; for a server
    # that ignores the If header (nginx dav-ext, found by a probe) the ETag is compared just
    # before the MOVE, which narrows the race to that gap, unless the server takes LOCKs
    # (DAV class 2 in its OPTIONS, nginx dav-ext with a lock zone): then the comparison and
    # the MOVE happen under an exclusive lock, which makes the server refuse other writers.
    # overwrite: the same temporary file, MOVEd with `Overwrite: T` (atomic, like every MOVE).
    capabilities = StoreCapabilities(create_only=True, ranged_reads=True, cheap_listing=False,
                                     conditional_replace=True, overwrite=True)

    def __init__(self, location: str, *, username: str | None = None,
                 password: str | None = None, ca_file: str | None = None,
                 timeout: float = _TIMEOUT,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 now: Callable[[], float] = time.time, attempts: int = _ATTEMPTS) -> None:
        self.location = location
        self._base, self._folder = parse_location(location)
        if password is not None and username is None:
            raise ConfigError(f"store {location}: a password without a username")
        self._auth = (username, password or "") if username is not None else None
        self._sleep, self._now, self._attempts = sleep, now, attempts
        self._ca_file = ca_file
        self._timeout = timeout
        self._session: Any = None
        self._folders_made: set[str] = set()
        self._if_enforced: bool | None = None   # the server honours If on MOVE (a probe)
        self._lockable: bool | None = None      # it takes LOCKs (DAV class 2 in OPTIONS)
        self._probe_lock = asyncio.Lock()

    # ---- HTTP ----------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return self._base + quote(path)

    def _client(self) -> Any:
        import aiohttp

        if self._session is None:
            headers = {}
            if self._auth:
                pair = base64.b64encode(":".join(self._auth).encode()).decode("ascii")
                headers["Authorization"] = f"Basic {pair}"
            tls = client_tls(self.location, self._ca_file)
            self._session = aiohttp.ClientSession(
                headers=headers, connector=aiohttp.TCPConnector(limit=16, ssl=tls),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=min(30.0, self._timeout),
                                              sock_read=self._timeout),
                auto_decompress=False)
        return self._session

    async def _request(self, method: str, path: str, *, data: Buffer | str | None = None,
                       headers: Mapping[str, str] | None = None,
                       ) -> tuple[int, Mapping[str, str], bytes]:
        """(status, headers, body) of one request, after the retries that transient failures
        earn. Statuses that mean the same for every request become errors here: 507,
        401/403, and a 429/5xx or lost connection that outlived the retries."""
        import aiohttp

        where = f"WebDAV store {self.location}"
        failure = ""
        for attempt in range(self._attempts):
            wait = min(_MAX_WAIT, _BACKOFF * 2 ** attempt) * random.uniform(0.5, 1.0)
            try:
                async with self._client().request(method, self._url(path), data=data,
                                                  headers=headers) as resp:
                    status = resp.status
                    if status not in (429, 500, 502, 503, 504):
                        body = await resp.read()
                        if status == 507:
                            raise StoreFull(self.location, "HTTP 507 Insufficient Storage")
                        if status == 401:
                            raise StorageError(
                                f"{where}: the server refused the credentials (HTTP 401); check "
                                "the username and password (Nextcloud/ownCloud: an app password)")
                        if status == 403:
                            raise StorageError(
                                f"{where}: the server refused access (HTTP 403); check the "
                                "username and password, and that this user may write there")
                        return status, resp.headers, body
                    asked = _retry_after(resp.headers.get("Retry-After"), self._now())
                    if asked is not None and status in (429, 503):
                        wait = min(_MAX_WAIT, asked)
                    failure = f"the server answered {status} {resp.reason or ''}".rstrip()
            except aiohttp.ClientSSLError as exc:   # trying again changes nothing
                raise StorageError(f"{where}: the server's TLS certificate is not trusted "
                                   f"({exc}); for a certificate of your own give its CA as "
                                   "the store's ca_file option") from None
            except (aiohttp.ServerTimeoutError, asyncio.TimeoutError):
                failure = f"no answer within {self._timeout:g} s (the store's timeout option)"
            except (aiohttp.ClientError, OSError) as exc:
                failure = f"cannot reach the server ({type(exc).__name__}: {exc})"
            if attempt + 1 < self._attempts:
                await self._sleep(wait)
        raise StorageError(f"{where}: {method} {path or '/'} failed {self._attempts} times, "
                           f"last: {failure}; nothing already stored was lost, try again later")

    async def _make_folders(self, path: str) -> None:
        """MKCOL the folder holding `path` and every missing folder above it (from the store's
        own folder down; a folder that exists answers 405)."""
        parts = path.split("/")[:-1]
        for depth in range(len(parts) + 1):
            folder = "/".join(parts[:depth])
            if folder in self._folders_made:
                continue
            status, _, _ = await self._request("MKCOL", folder + "/" if folder else "")
            if status == 409 and not folder:
                raise StorageError(f"WebDAV store {self.location}: the folder above it does not "
                                   "exist on the server (HTTP 409); check the path")
            if status not in (200, 201, 301, 405):
                raise StorageError(f"WebDAV store {self.location}: cannot make the folder "
                                   f"{folder or '/'} (HTTP {status})")
            self._folders_made.add(folder)

    # ---- BlobStore -------------------------------------------------------------------------

    async def _put_temporary(self, name: str, data: Buffer) -> tuple[str, str]:
        """Upload `data` under a temporary name beside `name`'s place: (that place, the
        temporary name), for a MOVE into place."""
        path = physical_path(name)
        tmp = f"{path}.{secrets.token_hex(8)}{_TMP_SUFFIX}"
        # Folders are made before the first write into them (once per process): servers
        # answer a PUT into a missing folder with 409 (RFC 4918 9.7.1), or 500 (nginx).
        await self._make_folders(path)
        status, _, _ = await self._request("PUT", tmp, data=data)
        if status == 409:   # a folder was removed behind our back
            self._folders_made.clear()
            await self._make_folders(path)
            status, _, _ = await self._request("PUT", tmp, data=data)
        if status not in (200, 201, 204):
            raise StorageError(f"WebDAV store {self.location}: cannot write {name} "
                               f"(HTTP {status})")
        return path, tmp

    async def _move(self, tmp: str, path: str, headers: Mapping[str, str]) -> int:
        """MOVE `tmp` to `path`; the status. The temporary file is gone unless it moved."""
        try:
            status, _, _ = await self._request(
                "MOVE", tmp, headers={"Destination": self._url(path), **headers})
        except BaseException:
            await self._drop(tmp)
            raise
        if status not in (200, 201, 204):
            await self._drop(tmp)
        return status

    async def put(self, name: str, data: Buffer) -> None:
        await self._place(name, data, replace=is_mutable_name(name))

    async def overwrite(self, name: str, data: Buffer) -> None:
        await self._place(name, data, replace=True)

    async def _place(self, name: str, data: Buffer, *, replace: bool) -> None:
        """Upload `data` under a temporary name and MOVE it to `name`; `replace`: over what
        is there (else a name that holds other bytes is ObjectExists)."""
        path, tmp = await self._put_temporary(name, data)
        status = await self._move(tmp, path, {"Overwrite": "T" if replace else "F"})
        if status in (200, 201, 204):
            return
        # 412: the name exists (create-only). 404: a MOVE whose answer was lost was retried
        # and the temporary name is gone. Either way the object is fine if it holds our bytes.
        if status == 404 or (status == 412 and not replace):
            try:   # the size first: another size needs no download to tell
                if await self.size(name) == len(data) and await self.get(name) == data:
                    return
            except NotFound:
                pass
            if status == 412:
                raise ObjectExists(f"WebDAV store {self.location}: {name} already exists with "
                                   "other content; stored objects are never replaced")
        raise StorageError(f"WebDAV store {self.location}: cannot move {name} into place "
                           f"(HTTP {status})")

    async def get_tagged(self, name: str) -> tuple[bytes, str]:
        status, headers, body = await self._request("GET", physical_path(name))
        if status == 404:
            raise self._missing(name)
        if status != 200:
            raise StorageError(f"WebDAV store {self.location}: cannot read {name} "
                               f"(HTTP {status})")
        return body, headers.get("ETag", "")

    def _if_tagged(self, path: str, tag: str) -> dict[str, str]:
        """The headers of a MOVE onto `path` only while it holds version `tag`: the If header
        tagged to the destination (the source, the temporary file, has no such tag)."""
        tag = tag.removeprefix("W/")
        tag = tag if tag.startswith('"') else f'"{tag}"'
        return {"Overwrite": "T", "If": f"<{urlsplit(self._url(path)).path}> ([{tag}])"}

    async def _enforces_if(self) -> bool:
        """Whether the server refuses a MOVE whose If header names a version the destination
        does not hold (wsgidav, sabre/dav do; nginx dav-ext ignores it): found out once with a
        probe object, then deleted."""
        async with self._probe_lock:
            if self._if_enforced is None:
                probe = f".p2pbackup-probe-{secrets.token_hex(8)}"
                await self.put(probe, b"1")
                try:
                    path, tmp = await self._put_temporary(probe, b"2")
                    self._if_enforced = await self._move(
                        tmp, path, self._if_tagged(path, '"0"')) == 412
                finally:
                    await self.delete(probe)
            return self._if_enforced

    async def _takes_locks(self) -> bool:
        """Whether the server says it takes LOCKs (DAV compliance class 2 in the answer to
        OPTIONS on the store's folder); asked once."""
        async with self._probe_lock:
            if self._lockable is None:
                status, headers, _ = await self._request("OPTIONS", "")
                classes = {c.strip() for c in headers.get("DAV", "").split(",")}
                self._lockable = status < 300 and "2" in classes
            return self._lockable

    async def replace_if(self, name: str, data: Buffer, tag: str | None) -> bool:
        checked = tag is not None and tag != "" and await self._enforces_if()
        if tag and not checked and await self._takes_locks():
            return await self._replace_locked(name, data, tag)
        if tag is not None and not checked:
            # the server ignores the condition (or sends no ETag): compare the tag just
            # before (a narrower race)
            status, headers, _ = await self._request("HEAD", physical_path(name))
            if status != 200 or headers.get("ETag", "") != tag:
                return False
        path, tmp = await self._put_temporary(name, data)
        condition = {"Overwrite": "F"} if tag is None else \
            self._if_tagged(path, tag) if checked else {"Overwrite": "T"}
        status = await self._move(tmp, path, condition)
        if status in (200, 201, 204):
            return True
        if status == 412:
            return False
        if status == 404:   # a MOVE whose answer was lost, retried: did ours land?
            try:
                return (await self.get_tagged(name))[0] == data
            except NotFound:
                return False
        raise StorageError(f"WebDAV store {self.location}: cannot move {name} into place "
                           f"(HTTP {status})")

    async def _replace_locked(self, name: str, data: Buffer, tag: str) -> bool:
        """replace_if where the server ignores If but takes LOCKs: the new version is
        uploaded, the name locked (exclusive: the server refuses every other writer, 423),
        its ETag compared with `tag`, the new version moved in with the lock's token, and
        the lock released. False if another writer holds the lock or changed the name."""
        path, tmp = await self._put_temporary(name, data)
        status, headers, _ = await self._request(
            "LOCK", path, data=_LOCKINFO,
            headers={"Timeout": f"Second-{_LOCK_SECONDS}", "Depth": "0",
                     "Content-Type": 'application/xml; charset="utf-8"'})
        token = headers.get("Lock-Token", "")
        if status not in (200, 201) or not token:
            await self._drop(tmp)
            if status == 423:   # another writer is replacing it now
                return False
            raise StorageError(f"WebDAV store {self.location}: cannot lock {name} to replace it "
                               f"(HTTP {status})")
        tagged = f"<{urlsplit(self._url(path)).path}> ({token})"
        moved = False
        try:
            if status == 201:   # it was missing: the LOCK made an empty placeholder
                await self._request("DELETE", path, headers={"If": tagged})
                return False
            status, headers, _ = await self._request("HEAD", path)
            if status != 200 or headers.get("ETag", "") != tag:
                return False
            status = await self._move(tmp, path, {"Overwrite": "T", "If": tagged})
            moved = status in (200, 201, 204)
            if status == 404:   # a MOVE whose answer was lost, retried: did ours land?
                with contextlib.suppress(NotFound):
                    moved = (await self.get_tagged(name))[0] == data
            elif not moved:
                raise StorageError(f"WebDAV store {self.location}: cannot move {name} into "
                                   f"place (HTTP {status})")
            return moved
        finally:
            if not moved:
                await self._drop(tmp)
            with contextlib.suppress(StorageError):   # (else it expires)
                await self._request("UNLOCK", path, headers={"Lock-Token": token})

    async def _drop(self, tmp: str) -> None:
        try:
            await self._request("DELETE", tmp)
        except StorageError:
            pass   # a leftover temporary file is invisible to list() and harmless

    def _missing(self, name: str) -> NotFound:
        return NotFound(f"{name} is missing from the store at {self.location}")

    async def get(self, name: str) -> bytes:
        return (await self.get_tagged(name))[0]

    async def get_range(self, name: str, offset: int, length: int) -> bytes:
        if length <= 0:
            await self.size(name)   # NotFound for a missing blob, as for any range
            return b""
        spec = f"-{-offset}" if offset < 0 else f"{offset}-{offset + length - 1}"
        status, _, body = await self._request("GET", physical_path(name),
                                           headers={"Range": f"bytes={spec}"})
        if status == 404:
            raise self._missing(name)
        if status == 416:   # the range starts past the end: nothing there, as pread says
            return b""
        if status == 200:   # the server ignored the range and sent the whole blob
            start = max(0, len(body) + offset) if offset < 0 else offset
            return body[start:start + length]
        if status != 206:
            raise StorageError(f"WebDAV store {self.location}: cannot read {name} "
                               f"(HTTP {status})")
        return body[:length]

    async def has(self, name: str) -> bool:
        status, _, _ = await self._request("HEAD", physical_path(name))
        return status == 200

    async def size(self, name: str) -> int:
        path = physical_path(name)
        status, headers, _ = await self._request("HEAD", path)
        if status == 404:
            raise self._missing(name)
        length = headers.get("Content-Length", "")
        if status == 200 and length.isdigit():
            return int(length)
        # a HEAD without its length (some proxies drop it): the server's own property
        for entry in await self._propfind(path, depth="0", props=_PROPFIND_LENGTH):
            if entry.properties.content_length is not None:
                return entry.properties.content_length
        raise StorageError(f"WebDAV store {self.location}: cannot tell the size of {name}")

    async def _propfind(self, path: str, *, depth: str, props: str) -> list[Any]:
        """The multistatus entries of a PROPFIND (none when `path` is missing)."""
        from webdav4.multistatus import MultiStatusResponse

        status, _, body = await self._request(
            "PROPFIND", path, data=props,
            headers={"Depth": depth, "Content-Type": "application/xml; charset=utf-8"})
        if status == 404:
            return []
        if status != 207:
            raise StorageError(f"WebDAV store {self.location}: cannot list {path or '/'} "
                               f"(HTTP {status})")
        try:
            return list(MultiStatusResponse(body.decode("utf-8", "replace")).responses.values())
        except Exception as exc:   # the parser's errors are ElementTree's and asserts
            raise StorageError(f"WebDAV store {self.location}: the listing of {path or '/'} "
                               f"is malformed ({exc})") from None

    async def _files(self, prefix: str, props: str = _PROPFIND_TYPE
                     ) -> AsyncIterator[tuple[str, Any]]:
        """(path below the store's folder, multistatus entry) of every file in the folders
        that can hold names starting with `prefix`, by Depth: 1 PROPFINDs."""
        if prefix.startswith(("/", "./", "../")) or prefix in (".", ".."):
            return
        todo = [prefix[:prefix.rfind("/") + 1]]
        while todo:
            folder = todo.pop()
            for entry in await self._propfind(folder, depth="1", props=props):
                full = entry.path   # decoded by the parser
                if not full.startswith(self._folder):
                    continue
                rel = full[len(self._folder):].strip("/")
                parent, _, leaf = rel.rpartition("/")
                # only the folder's own children (Depth: 1), and only names we could have
                # made: an answer cannot lead the walk out of the folder or on forever
                if parent != folder.rstrip("/") or leaf in ("", ".", "..") \
                        or entry.status_code not in (None, 200):
                    continue
                if entry.properties.collection:
                    # a folder's path without its '/' starts every name it can hold
                    if rel.count("/") < _MAX_DEPTH and (rel.startswith(prefix)
                                                        or prefix.startswith(rel)):
                        todo.append(rel + "/")
                    continue
                yield rel, entry

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        async for rel, _ in self._files(prefix):
            name = logical_name(rel)   # (None for a temporary file)
            if name is not None and name.startswith(prefix):
                yield name

    async def remove_stale_temporaries(self, before: float) -> int:
        # A whole walk of the folder: the uploader calls it rarely (STALE_SWEEP_INTERVAL).
        stale = [rel async for rel, entry in self._files("", _PROPFIND_TYPE_TIME)
                 if rel.endswith(_TMP_SUFFIX) and entry.properties.modified is not None
                 and entry.properties.modified.timestamp() < before]
        for rel in stale:
            status, _, _ = await self._request("DELETE", rel)
            if status not in (200, 202, 204, 404):
                raise StorageError(f"WebDAV store {self.location}: cannot delete the "
                                   f"leftover {rel} (HTTP {status})")
        return len(stale)

    async def delete(self, name: str) -> None:
        status, _, _ = await self._request("DELETE", physical_path(name))
        if status not in (200, 202, 204, 404):
            raise StorageError(f"WebDAV store {self.location}: cannot delete {name} "
                               f"(HTTP {status})")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def open_webdav(location: str, options: Mapping[str, Any]) -> WebDavStore:
    """The opener open_store registers for webdav:// and webdavs://."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ConfigError(f"store {location}: unknown option(s) {', '.join(sorted(unknown))} "
                          f"(a WebDAV store takes {', '.join(OPTIONS)})")
    for key in ("username", "password", "ca_file"):
        if not isinstance(options.get(key, ""), str):
            raise ConfigError(f"store {location}: {key} must be a string")
    return WebDavStore(location, timeout=seconds_option(location, options, "timeout", _TIMEOUT),
                       **{key: options.get(key) for key in ("username", "password", "ca_file")})
