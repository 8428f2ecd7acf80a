"""A BlobStore in an S3-compatible bucket: `s3://bucket/prefix`.

The client is Apache OpenDAL's Python binding (one async operator per store). Measured against
obstore and aiobotocore with bench/s3_clients.py on `weed mini`, moto and rclone serve s3 (2
shared cores, 8 requests in flight; figures in MiB/s or seconds):

    weed mini       put 8x16 MiB   get 8x16 MiB   put 400x1 KiB  get 400x1 KiB  200 ranges  list 10k
    opendal          75 MiB/s      478 MiB/s      1.01 s         0.17 s         0.16 s      0.18 s
    obstore          78 MiB/s      686 MiB/s      0.26 s         0.22 s         0.22 s      0.29 s
    aiobotocore      33 MiB/s      568 MiB/s      1.43 s         0.61 s         0.59 s      1.07 s
    moto server
    opendal         176 MiB/s      717 MiB/s      1.18 s         0.98 s         0.95 s      3.45 s
    obstore          86 MiB/s      556 MiB/s      1.08 s         0.97 s         0.84 s      2.77 s
    aiobotocore     148 MiB/s      471 MiB/s      2.03 s         2.02 s         1.00 s      2.77 s

A second weed run (clients in reverse order, busier machine): opendal 70 MiB/s put, 1.01 s for
the 400 small puts; obstore 49 MiB/s, 0.46 s; aiobotocore 28 MiB/s, 1.19 s. opendal and obstore
are close (both Rust) except for many tiny puts, where obstore is 2-4x quicker (few here: packs
dominate); aiobotocore is slower everywhere and drags in botocore. opendal was chosen over obstore because: the same operator serves WebDAV (one
client for both remote backends), obstore refused ranged reads from rclone serve s3 and once from
moto ("received non-partial response") where opendal returned the right bytes, and opendal's errors carry a
kind (NotFound, PermissionDenied, ConditionNotMatch, RateLimited) and a temporary/permanent
flag that map one to one onto ours. Its own RetryLayer is not used: retries here take an
injected `sleep` (tests do not wait) and end in one line naming the store.

Create-only writes: weed and moto answer 412 to a second PUT with If-None-Match: *, rclone
serve s3 replaces the object. The store finds out once (a probe object, written twice, then
deleted) unless the `conditional_writes` option says; where the server ignores the condition,
put asks (HEAD) before writing. The race left there: two writers putting the same immutable
name in the same moment with different bytes, both seeing it missing; the later PUT wins.
Content-addressed names (packs, snapshots, removals) cannot differ, so only sequence-numbered
records written by two devices at once are exposed, and `capabilities.create_only` is False
for such a store, so callers know.

Heads (the names a put replaces) move by compare-and-swap (replace_if): `If-Match` with the
ETag read (`If-None-Match: *` where there was none). weed and moto refuse a stale tag (412);
where a server ignores it (rclone serve s3; found by a second probe) the ETag is compared by a
HEAD just before the write, which leaves only that gap to another device's head.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ..errors import ConfigError, NotFound, StorageError
from .base import (BlobStore, Buffer, ObjectExists, StoreCapabilities, StoreFull,
                   is_mutable_name)
from .windows import RangeWindows

T = TypeVar("T")

ATTEMPTS = 5            # per request, for answers that may pass (500, 503, 429, resets)
BACKOFF = 0.25          # seconds before the second attempt; doubled each time, with jitter
BACKOFF_MAX = 8.0
TIMEOUT = 60.0          # seconds for one request without a byte moving (option `timeout`)

_STATUS = re.compile(r"status: (\d{3})")
_CODE = re.compile(r'code: "(\w+)"')
_FULL_CODES = ("EntityTooLarge", "QuotaExceeded", "XMinioStorageFull", "InsufficientStorage",
               "StorageFull")
_OPTIONS = ("endpoint", "region", "path_style", "access_key_id", "secret_access_key",
            "session_token", "profile", "conditional_writes", "timeout")


class _ShortRead(Exception):
    """The server sent fewer bytes than the object (or range) has: a body cut off."""


def _flag(value: Any, what: str, location: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ConfigError(f"store {location}: {what} must be true or false, not {value!r}")


def parse_location(location: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket/prefix`; the prefix has no leading or trailing `/`."""
    parts = urlsplit(location)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if parts.scheme.lower() != "s3" or not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{0,254}", bucket):
        raise ConfigError(f"store {location}: write an S3 location as s3://BUCKET/PREFIX")
    if parts.query or parts.fragment or any(p in ("", ".", "..") for p in prefix.split("/")
                                             if prefix):
        raise ConfigError(f"store {location}: the prefix must be a plain path")
    return bucket, prefix


def operator_config(location: str, options: Mapping[str, Any],
                    environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """opendal's s3 settings for `location`: each from the options, else from the standard
    AWS environment variables (the config wins, so a `[[stores]]` table means what it says)."""
    unknown = sorted(set(options) - set(_OPTIONS) - {"location"})
    if unknown:
        raise ConfigError(f"store {location}: unknown option {unknown[0]!r} "
                          f"(S3 stores take {', '.join(_OPTIONS)})")
    bucket, prefix = parse_location(location)

    def pick(option: str, *variables: str) -> str | None:
        value = options.get(option)
        if value is None:
            value = next((environ[v] for v in variables if environ.get(v)), None)
        return None if value is None else str(value)

    endpoint = pick("endpoint", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    config = {"bucket": bucket, "root": f"/{prefix}/" if prefix else "/",
              "region": pick("region", "AWS_REGION", "AWS_DEFAULT_REGION") or "us-east-1",
              # no instance-metadata lookup: off EC2 it waits for 169.254.169.254 to time out
              "disable_ec2_metadata": "true"}
    if endpoint:
        config["endpoint"] = endpoint
    # Path-style by default when an endpoint is given (self-hosted servers rarely have
    # wildcard DNS); AWS itself: virtual-hosted, its default.
    path_style = options.get("path_style")
    path_style = (endpoint is not None) if path_style is None \
        else _flag(path_style, "path_style", location)
    config["enable_virtual_host_style"] = "false" if path_style else "true"
    if options.get("access_key_id") is not None:   # a key in the config: all of it from there
        key_id, secret = str(options["access_key_id"]), options.get("secret_access_key")
        token = options.get("session_token")
        if secret is None:
            raise ConfigError(f"store {location}: access_key_id is set but secret_access_key "
                              "is not")
    else:
        key_id, secret = environ.get("AWS_ACCESS_KEY_ID"), pick("secret_access_key",
                                                                "AWS_SECRET_ACCESS_KEY")
        token = pick("session_token", "AWS_SESSION_TOKEN")
    if key_id and secret:
        config |= {"access_key_id": key_id, "secret_access_key": str(secret),
                   "disable_config_load": "true"}   # the key given: no ~/.aws lookups
        if token:
            config["session_token"] = str(token)
    elif profile := pick("profile", "AWS_PROFILE"):
        config["profile"] = profile
    return config


def open_location(location: str, options: Mapping[str, Any]) -> "S3Store":
    """The opener `open_store` calls for `s3://`."""
    return S3Store(location, options)


class S3Store(BlobStore):
    """Blobs as objects under one prefix of one bucket."""

    def __init__(self, location: str, options: Mapping[str, Any] | None = None, *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 attempts: int = ATTEMPTS, environ: Mapping[str, str] = os.environ) -> None:
        import opendal

        options = dict(options or {})
        self.location = location.rstrip("/")
        config = operator_config(location, options, environ)
        self.endpoint = config.get("endpoint", "AWS")
        timeout = options.get("timeout", TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ConfigError(f"store {location}: timeout must be a number of seconds, not "
                              f"{timeout!r}")
        self._op = opendal.AsyncOperator("s3", **config).layer(
            opendal.layers.TimeoutLayer(timeout=float(timeout), io_timeout=float(timeout)))
        self._errors = opendal.exceptions
        self._opendal_errors = (_ShortRead, *(
            v for k, v in vars(opendal.exceptions).items()
            if isinstance(v, type) and issubclass(v, Exception) and not k.startswith("_")))
        cond = options.get("conditional_writes", "auto")
        self._conditional: bool | None = None if cond == "auto" \
            else _flag(cond, "conditional_writes", location)
        self._if_match: bool | None = None   # the server refuses If-Match with a stale tag
        self._probe_lock = asyncio.Lock()
        self._sizes: dict[str, int] = {}   # of immutable objects: a range from the end
        self._windows = RangeWindows(self._read_exact)
        self._sleep, self._attempts = sleep, attempts

    @property
    def capabilities(self) -> StoreCapabilities:  # type: ignore[override]
        # create_only only once the server is known to enforce If-None-Match (see the module
        # docstring); until the first put it is not claimed.
        # conditional_replace always (the module docstring says how far a server keeps it).
        # overwrite: a PUT without a condition replaces an object atomically (S3's model).
        return StoreCapabilities(create_only=self._conditional is True, ranged_reads=True,
                                 cheap_listing=False, blocking=False, local_disk=False,
                                 conditional_replace=True, overwrite=True,
                                 planned_reads=True)

    # ---- errors and retries ------------------------------------------------------------

    def _error(self, exc: Exception, what: str, name: str) -> Exception:
        """One line naming the store for whatever opendal raised."""
        text = str(exc)
        status = int(m.group(1)) if (m := _STATUS.search(text)) else None
        code = m.group(1) if (m := _CODE.search(text)) else None
        where = f"store {self.location}"
        if code == "NoSuchBucket":
            return StorageError(f"{where}: the bucket does not exist at {self.endpoint}")
        if isinstance(exc, self._errors.NotFound):
            return NotFound(f"{name} is missing from the {where}")
        if status == 507 or code in _FULL_CODES:
            return StoreFull(self.location, f"the server answered {code or status} to {what} "
                             f"{name}")
        if isinstance(exc, self._errors.PermissionDenied):
            if code in (None, "AccessDenied", "AllAccessDisabled"):
                return StorageError(f"{where}: the server refused access ({code or status}): "
                                    "check the credentials and their rights on the bucket")
            return StorageError(f"{where}: the server refused the credentials ({code}): check "
                                "access_key_id and secret_access_key (or AWS_ACCESS_KEY_ID/"
                                "AWS_SECRET_ACCESS_KEY)")
        if isinstance(exc, _ShortRead):
            return StorageError(f"{where}: {what} {name}: {exc}")
        if "credential" in text.lower() and "no valid" in text.lower():
            return StorageError(f"{where}: no credentials: set access_key_id and "
                                "secret_access_key in its [[stores]] table or "
                                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        if status is not None:
            return StorageError(f"{where}: the server answered {status}"
                                f"{f' ({code})' if code else ''} to {what} {name}".rstrip())
        return StorageError(f"{where}: {what} {name} at {self.endpoint} failed: {_cause(text)}")

    def _passing(self, exc: Exception) -> bool:
        """Whether another attempt may succeed (opendal marks errors temporary)."""
        if isinstance(exc, (self._errors.RateLimited, _ShortRead)):
            return True
        text = str(exc)
        status = int(m.group(1)) if (m := _STATUS.search(text)) else None
        return "(temporary)" in text.split("\n", 1)[0] or status in (500, 502, 503, 504) \
            or "too little data" in text   # a body cut off: the next attempt may be whole

    async def _call(self, what: str, name: str, op: Callable[[], Awaitable[T]]) -> T:
        """`op()`, again after a backoff while it fails in a way that may pass."""
        for attempt in range(1, self._attempts + 1):
            try:
                return await op()
            except (self._errors.NotFound, self._errors.ConditionNotMatch):
                raise
            except Exception as exc:  # opendal's classes share no base but Exception
                if not isinstance(exc, self._opendal_errors):
                    raise
                if attempt == self._attempts or not self._passing(exc):
                    raise self._error(exc, what, name) from None
            delay = min(BACKOFF_MAX, BACKOFF * 2 ** (attempt - 1))
            await self._sleep(delay * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    # ---- BlobStore ---------------------------------------------------------------------

    async def _conditional_writes(self) -> bool:
        """Whether the server refuses a PUT with If-None-Match: * over an existing object."""
        async with self._probe_lock:
            if self._conditional is None:
                self._conditional = await self._refuses(
                    lambda probe: self._op.write(probe, b"2", if_not_exists=True))
            return self._conditional

    async def _enforces_if_match(self) -> bool:
        """Whether the server refuses a PUT with If-Match and a tag the object lacks."""
        async with self._probe_lock:
            if self._if_match is None:
                self._if_match = await self._refuses(
                    lambda probe: self._op.write(probe, b"2", if_match='"0"'))
            return self._if_match

    async def _refuses(self, conditional: Callable[[str], Awaitable[None]]) -> bool:
        """Whether the server refuses (412) the conditional write `conditional` makes to a
        probe object written just before; found out once per condition, the probe deleted."""
        probe = f".p2pbackup-probe-{uuid.uuid4().hex}"
        await self._call("write", probe, lambda: self._op.write(probe, b"1"))
        try:
            await conditional(probe)
            return False
        except self._errors.ConditionNotMatch:
            return True
        except Exception as exc:
            if not isinstance(exc, self._opendal_errors):
                raise
            return False    # refused the header (501, 400): ask first
        finally:
            await self._call("delete", probe, lambda: self._op.delete(probe))

    async def get_tagged(self, name: str) -> tuple[bytes, str]:
        for _ in range(self._attempts):
            try:
                meta = await self._call("stat", name, lambda: self._op.stat(name))
                tag = meta.etag or ""
                data = await self._call("read", name, lambda: self._op.read(
                    name, if_match=tag) if tag else self._op.read(name))
            except self._errors.NotFound as exc:
                raise self._error(exc, "read", name) from None
            except self._errors.ConditionNotMatch:
                continue   # replaced between the two requests: read the new one
            return bytes(data), tag
        raise StorageError(f"store {self.location}: {name} changed under each of "
                           f"{self._attempts} reads")

    async def replace_if(self, name: str, data: Buffer, tag: str | None) -> bool:
        body = bytes(data)
        # a server that ignores If-Match, or sends no ETag: compare just before the write
        if tag == "" or not await self._enforces_if_match():
            try:
                meta = await self._call("stat", name, lambda: self._op.stat(name))
                if tag is None or (meta.etag or "") != tag:
                    return False
            except self._errors.NotFound:
                if tag is not None:
                    return False
            await self._call("write", name, lambda: self._op.write(name, body))
            return True
        try:
            await self._call("write", name, lambda: self._op.write(
                name, body, if_not_exists=True) if tag is None   # (If-None-Match: *)
                else self._op.write(name, body, if_match=tag))
        except self._errors.ConditionNotMatch:
            return False
        return True

    async def put(self, name: str, data: Buffer) -> None:
        body = bytes(data)
        if is_mutable_name(name):
            await self._call("write", name, lambda: self._op.write(name, body))
            return
        if await self._conditional_writes():
            try:
                await self._call("write", name,
                                 lambda: self._op.write(name, body, if_not_exists=True))
                return
            except self._errors.ConditionNotMatch:
                pass   # there already: fine if it holds these very bytes (a retried upload)
        elif not await self.has(name):
            await self._call("write", name, lambda: self._op.write(name, body))
            return
        if await self.get(name) != body:
            raise ObjectExists(f"store {self.location}: {name} already holds other bytes; "
                               "stored objects are never replaced")

    async def overwrite(self, name: str, data: Buffer) -> None:
        body = bytes(data)
        self._forget(name)   # (what was read of the old bytes)
        await self._call("write", name, lambda: self._op.write(name, body))

    async def get(self, name: str) -> bytes:
        # The length is checked where it is known (verify asks every pack's size first): a
        # body cut off under a Content-Length that says it is whole is then a failed read to
        # try again, not damage in the store.
        want = self._sizes.get(name)

        async def read() -> bytes:
            return _exact(bytes(await self._op.read(name)), want)

        try:
            return await self._call("read", name, read)
        except self._errors.NotFound as exc:
            raise self._error(exc, "read", name) from None

    async def _read_exact(self, name: str, start: int, length: int) -> bytes:
        async def read() -> bytes:
            return _exact(bytes(await self._op.read(name, offset=start, size=length)), length)

        try:
            return await self._call("read", name, read)
        except self._errors.NotFound as exc:
            raise self._error(exc, "read", name) from None

    async def size(self, name: str) -> int:
        try:
            meta = await self._call("stat", name, lambda: self._op.stat(name))
        except self._errors.NotFound as exc:
            raise self._error(exc, "stat", name) from None
        size = int(meta.content_length)
        if not is_mutable_name(name):
            self._sizes[name] = size
        return size

    async def get_range(self, name: str, offset: int, length: int) -> bytes:
        # The size first (once per immutable object): opendal has no suffix ranges, and it
        # takes a range past the end for a short read, which is what a cut-off body is too.
        total = self._sizes.get(name)
        if total is None:
            total = await self.size(name)
        start = max(0, total + offset) if offset < 0 else min(offset, total)
        length = min(length, total - start)
        if length <= 0:
            return b""
        if is_mutable_name(name) or offset < 0:
            # (a read from the end is a pack's trailer, read on its own: a window would
            # fetch 4 MiB of the pack for it)
            return await self._read_exact(name, start, length)
        return await self._windows.read(name, start, length, total)

    async def get_spans(self, name: str, spans: Sequence[tuple[int, int]]) -> list[Buffer]:
        if is_mutable_name(name):
            return await super().get_spans(name, spans)
        total = self._sizes.get(name)
        if total is None:
            total = await self.size(name)
        return await self._windows.spans(name, spans, total)   # type: ignore[return-value]

    def get_spans_held(self, name: str, spans: Sequence[tuple[int, int]]
                       ) -> list[Buffer] | None:
        total = self._sizes.get(name)
        if total is None or is_mutable_name(name):
            return None
        return self._windows.held_spans(name, spans, total)   # type: ignore[return-value]

    async def expect_spans(self, name: str, spans: Sequence[tuple[int, int]]) -> None:
        if not is_mutable_name(name):
            self._windows.expect(name, spans)

    async def forget_expected(self) -> None:
        self._windows.forget_expected()

    async def has(self, name: str) -> bool:
        try:
            await self._call("stat", name, lambda: self._op.stat(name))
        except self._errors.NotFound:
            return False
        return True

    async def list(self, prefix: str = "") -> AsyncIterator[str]:  # type: ignore[override]
        # Listed from the prefix's directory: opendal lists directories, not name prefixes.
        folder = prefix[:prefix.rfind("/") + 1] or "/"

        async def listing() -> list[tuple[str, int | None]]:
            return [(e.path, e.metadata.content_length)
                    async for e in await self._op.list(folder, recursive=True)]

        try:
            entries = await self._call("list", folder, listing)
        except self._errors.NotFound:
            return
        for path, size in entries:
            if not path.endswith("/") and path.startswith(prefix):
                if size and not is_mutable_name(path):
                    # (a listing says each object's size: no HEAD before its first read,
                    # one request per pack less when a restore or an index starts)
                    self._sizes[path] = size
                yield path

    async def delete(self, name: str) -> None:
        self._forget(name)
        await self._call("delete", name, lambda: self._op.delete(name))

    def _forget(self, name: str) -> None:
        """Drop what is cached of `name`'s bytes: they are about to change or go."""
        self._sizes.pop(name, None)
        self._windows.forget(name)


def _exact(data: bytes, want: int | None) -> bytes:
    if want is not None and len(data) != want:
        raise _ShortRead(f"the server sent {len(data)} of its {want} bytes")
    return data


def _cause(text: str) -> str:
    """The innermost reason in an opendal error's text, on one line: its `Source:` (e.g.
    "tcp connect error: Connection refused"), else its first line."""
    source = re.search(r"\nSource:\n\s*(.+)", text)
    if source:
        return ": ".join(source.group(1).strip().split(": ")[-2:])[:200]
    return text.split("\n", 1)[0].split(" => ")[-1].strip()[:200]
