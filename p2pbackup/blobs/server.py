"""The storage server (`p2pbackup-server`) as a BlobStore: `https://host[:port][/prefix]`.

Every request is signed by this device's key (protocol/store_requests.py); the server admits
only devices of the account's roster. It keeps a partner's rules, which this store declares:
objects are create-only (other bytes under a held name: IntegrityError; a head replaces), and
append-only (a delete succeeds only for what an owner's removal record released after the
server's grace period). Plain `http://` only to a loopback address (a local test server, or a
reverse proxy on this host); anything else must be https.

Options (open_store's `options`, a `[[stores]]` table's keys): `ca_file` (a PEM file that
verifies a self-signed server certificate), `invite` (a one-time token: sent with the
roster, which registers the account on first use), `timeout` (seconds per request). Who signs
is not an option: the device hands open_store its StoreSigner (its identity and account; a
device recovering the account, the recovery signer).

Errors name the store and say what happened in one line: refused requests carry the server's
own line; 507 is StoreFull with the server's words (whose quota, how much is used); a whole
snapshot or removal record whose bytes do not match its content-addressed name is refused as
a wrong object (NameMismatch, an IntegrityError); a pack is examined by the repository.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import blake3

from ..crypto.identity import DeviceIdentity
from ..errors import (ConfigError, IntegrityError, NameMismatch, NotFound, PeerNotPaired,
                      StorageError)
from ..ids import object_kind
from ..protocol import store_requests as req
from .base import (BlobStore, Buffer, ObjectExists, StoreCapabilities, StoreFull,
                   StoreSigner, seconds_option)
from .tls import client_tls

SCHEMES = ("https", "http")
OPTIONS = ("ca_file", "invite", "timeout")
DEFAULT_TIMEOUT = 300.0   # a 16 MiB pack over a slow uplink
# Names that are the BLAKE3 of the content, checked on a whole read. Not packs: the
# repository examines a pack against its name itself, blob by blob, and keeps what still
# authenticates of one damaged on the server's disk (refused whole, none of it would be).
_ADDRESSED = ("snapshot", "removal")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_server(location: str, options: Mapping[str, Any]) -> "ServerStore":
    """open_store's opener for https:// (and loopback http://) locations; open_store then
    hands it the device it signs as (sign_as)."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ConfigError(f"store {location}: unknown option {sorted(unknown)[0]!r} (the "
                          f"storage server's stores take {', '.join(OPTIONS)})")
    return ServerStore(location, ca_file=options.get("ca_file"), invite=options.get("invite"),
                       timeout=seconds_option(location, options, "timeout", DEFAULT_TIMEOUT))


class ServerStore(BlobStore):
    """One account's objects on a p2pbackup storage server."""

    capabilities = StoreCapabilities(create_only=True, cheap_listing=False, append_only=True,
                                     signed_requests=True, partner_rules=True)

    def __init__(self, location: str, *, identity: DeviceIdentity | None = None,
                 account: str = "", ca_file: str | None = None, invite: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, now: Callable[[], float] = time.time) -> None:
        parts = urlsplit(location)
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise ConfigError(f"store {location}: give https://HOST[:PORT][/PATH]")
        if parts.scheme == "http" and not _loopback(parts.hostname):
            raise ConfigError(f"store {location}: plain http:// only to a loopback address; "
                              "use https:// (the server takes --tls-cert, or sits behind a TLS "
                              "proxy)")
        self.location = location
        self.base = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}/"
        self.prefix = parts.path.rstrip("/") + "/"       # the path the server is mounted at
        self.identity, self.account, self.invite = identity, account, invite
        self.ca_file, self.timeout, self.now = ca_file, timeout, now
        self._session: Any = None


    def sign_as(self, signer: StoreSigner) -> None:
        self.identity, self.account = signer.identity, signer.account

    def _client(self) -> Any:
        if self._session is None:
            import aiohttp

            ctx = client_tls(self.location, self.ca_file) if self.base.startswith("https:") \
                else True
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx, limit=16),
                timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def _request(self, method: str, name: str | None, *, body: Buffer = b"",
                       query: str = "", headers: Mapping[str, str] | None = None,
                       ok: tuple[int, ...] = (200,)) -> tuple[int, bytes, Mapping[str, str]]:
        """One signed request; (status, body, headers) for a status in `ok` or 404, else the
        error its status means."""
        import aiohttp

        if self.identity is None or not self.account:
            raise ConfigError(f"store {self.location}: every request to it is signed by a "
                              "device of the account; open it as a store of this device")
        rel = f"{req.API}{self.account}" + (f"/{quote(name, safe='/')}" if name else "")
        signed = req.sign(self.identity.device_id, self.identity.sign, method, rel, query,
                          body, self.now())
        import yarl

        url = yarl.URL(self.base + rel + (f"?{query}" if query else ""), encoded=True)
        what = f"store {self.location}"
        try:
            async with self._client().request(method, url, data=bytes(body) if body else None,
                                              headers={**signed, **(headers or {})}) as resp:
                data = await resp.read()
                status, got = resp.status, resp.headers
        except asyncio.TimeoutError:
            raise StorageError(f"{what}: no answer within {self.timeout:.0f} s") from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise StorageError(f"{what}: its TLS certificate is not trusted "
                               f"({exc.certificate_error}; give ca_file for a self-signed one)"
                               ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise StorageError(f"{what}: cannot reach the server ({exc})") from None
        if status in ok or status == 404:
            return status, data, got
        line = data.decode("utf-8", "replace").strip().splitlines()
        said = f"{what}: {line[0][:300] if line else f'HTTP {status}'}"
        if status == 507:   # the server's line says whose quota and how much is used
            raise StoreFull(self.location, line[0][:300] if line else "HTTP 507")
        if status == 409:
            raise ObjectExists(said)
        if status == 422:
            raise IntegrityError(said)
        if status == 403 and "not a device of account" in said:
            raise PeerNotPaired(said)
        if status in (401, 403):
            raise StorageError(said)
        raise StorageError(f"{said} (HTTP {status})" if line else said)

    def _not_found(self, name: str, data: bytes) -> NotFound:
        line = data.decode("utf-8", "replace").strip()
        if "not registered" in line:   # the account, not the object: say so
            return NotFound(f"store {self.location}: {line}")
        return NotFound(f"{name} is missing from the store at {self.location}")

    async def put(self, name: str, data: Buffer) -> None:
        extra = {req.INVITE: self.invite} if self.invite and name.startswith("roster/") else None
        status, body, _ = await self._request("PUT", name, body=data, headers=extra,
                                              ok=(200, 201))
        if status == 404:
            raise StorageError(f"store {self.location}: "
                               f"{body.decode('utf-8', 'replace').strip()[:200]} (it is "
                               "registered when this device sends its roster with an invite "
                               "token)")

    async def get(self, name: str) -> bytes:
        status, data, _ = await self._request("GET", name)
        if status == 404:
            raise self._not_found(name, data)
        got = object_kind(name)
        if got is not None and got[0] in _ADDRESSED and \
                blake3.blake3(data).hexdigest() != got[1].group(1):
            raise NameMismatch(f"store {self.location} returned a wrong object for {name[:60]} "
                               "(its content does not match its name)")
        return data

    async def get_range(self, name: str, offset: int, length: int) -> bytes:
        if length <= 0:
            await self.size(name)
            return b""
        spec = f"bytes=-{-offset}" if offset < 0 else f"bytes={offset}-{offset + length - 1}"
        status, data, _ = await self._request("GET", name, headers={"Range": spec},
                                              ok=(200, 206, 416))
        if status == 404:
            raise self._not_found(name, data)
        if status == 416:
            return b""
        return data[:length] if status == 206 else data[offset:offset + length] \
            if offset >= 0 else data[offset:][:length]

    async def has(self, name: str) -> bool:
        status, _, _ = await self._request("HEAD", name)
        return status == 200

    async def size(self, name: str) -> int:
        status, data, headers = await self._request("HEAD", name)
        if status == 404:
            raise self._not_found(name, data)
        return int(headers.get("X-P2PB-Size", "0"))

    async def list(self, prefix: str = "") -> AsyncIterator[str]:
        status, data, _ = await self._request("GET", None, query="prefix=" + quote(prefix,
                                                                                  safe=""))
        if status == 404:
            raise self._not_found("", data)
        for line in data.decode().splitlines():
            if line:
                yield line

    async def delete(self, name: str) -> None:
        await self._request("DELETE", name, ok=(200, 204))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
