"""Which S3 client the S3 store uses: opendal, obstore and aiobotocore, measured side by side.

Run from the repository root (after `.venv/bin/pip install obstore aiobotocore`, which the
project does not depend on): `.venv/bin/python bench/s3_clients.py [--servers weed,moto,rclone]`.
Starts each server (tests/servers.py), then for each client: put/get of 16 MiB packs and of
1 KiB objects (concurrent, as the uploader sends them), listing 10k names, 4 KiB ranged reads,
and the correctness points: does a second PUT with If-None-Match: * fail, what a missing object
and a wrong key raise. The figures are quoted in p2pbackup/blobs/s3.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import servers  # noqa: E402

BIG, N_BIG = 16 << 20, 8
SMALL, N_SMALL = 1024, 400
N_LIST = 10_000
N_RANGES, RANGE = 200, 4096
CONCURRENCY = 8


class Client:
    name = ""

    async def put(self, key: str, data: bytes, create_only: bool = False) -> None: ...
    async def get(self, key: str) -> bytes: ...
    async def get_range(self, key: str, offset: int, length: int) -> bytes: ...
    async def list(self, prefix: str) -> list[str]: ...
    async def close(self) -> None: ...


class OpenDAL(Client):
    name = "opendal"

    def __init__(self, srv: servers.S3Server, bucket: str, secret: str | None = None) -> None:
        import opendal

        self.op = opendal.AsyncOperator(
            "s3", bucket=bucket, endpoint=srv.endpoint, region=servers.REGION,
            access_key_id=srv.access_key, secret_access_key=secret or srv.secret_key,
            disable_config_load="true", disable_ec2_metadata="true")

    async def put(self, key: str, data: bytes, create_only: bool = False) -> None:
        await self.op.write(key, data, if_not_exists=create_only or None)

    async def get(self, key: str) -> bytes:
        return bytes(await self.op.read(key))

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        return bytes(await self.op.read(key, offset=offset, size=length))

    async def list(self, prefix: str) -> list[str]:
        return [e.path async for e in await self.op.list(prefix, recursive=True)]


class ObStore(Client):
    name = "obstore"

    def __init__(self, srv: servers.S3Server, bucket: str, secret: str | None = None) -> None:
        from obstore.store import S3Store

        self.store = S3Store(bucket, endpoint=srv.endpoint, region=servers.REGION,
                             access_key_id=srv.access_key,
                             secret_access_key=secret or srv.secret_key,
                             virtual_hosted_style_request=False,
                             client_options={"allow_http": True})

    async def put(self, key: str, data: bytes, create_only: bool = False) -> None:
        import obstore

        await obstore.put_async(self.store, key, data,
                                mode="create" if create_only else "overwrite")

    async def get(self, key: str) -> bytes:
        import obstore

        return bytes(await (await obstore.get_async(self.store, key)).bytes_async())

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        import obstore

        return bytes(await obstore.get_range_async(self.store, key, start=offset,
                                                   length=length))

    async def list(self, prefix: str) -> list[str]:
        import obstore

        out: list[str] = []
        async for batch in obstore.list(self.store, prefix):
            out += [m["path"] for m in batch]
        return out


class AioBotocore(Client):
    name = "aiobotocore"

    def __init__(self, srv: servers.S3Server, bucket: str, secret: str | None = None) -> None:
        self.srv, self.bucket, self.secret = srv, bucket, secret or srv.secret_key
        self.client: Any = None

    async def _c(self) -> Any:
        if self.client is None:
            from aiobotocore.config import AioConfig
            from aiobotocore.session import get_session

            self._cm = get_session().create_client(
                "s3", endpoint_url=self.srv.endpoint, region_name=servers.REGION,
                aws_access_key_id=self.srv.access_key, aws_secret_access_key=self.secret,
                config=AioConfig(s3={"addressing_style": "path"},
                                 max_pool_connections=CONCURRENCY * 2))
            self.client = await self._cm.__aenter__()
        return self.client

    async def put(self, key: str, data: bytes, create_only: bool = False) -> None:
        extra = {"IfNoneMatch": "*"} if create_only else {}
        await (await self._c()).put_object(Bucket=self.bucket, Key=key, Body=data, **extra)

    async def get(self, key: str) -> bytes:
        r = await (await self._c()).get_object(Bucket=self.bucket, Key=key)
        async with r["Body"] as body:
            return await body.read()

    async def get_range(self, key: str, offset: int, length: int) -> bytes:
        r = await (await self._c()).get_object(Bucket=self.bucket, Key=key,
                                               Range=f"bytes={offset}-{offset + length - 1}")
        async with r["Body"] as body:
            return await body.read()

    async def list(self, prefix: str) -> list[str]:
        out: list[str] = []
        pages = (await self._c()).get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix)
        async for page in pages:
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    async def close(self) -> None:
        if self.client is not None:
            await self._cm.__aexit__(None, None, None)


CLIENTS = (OpenDAL, ObStore, AioBotocore)


async def _gather(n: int, make: Callable[[int], Awaitable[object]]) -> None:
    turn = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> None:
        async with turn:
            await make(i)

    await asyncio.gather(*(one(i) for i in range(n)))


async def _timed(what: str, n_bytes: int, run: Callable[[], Awaitable[object]]) -> str:
    t = time.perf_counter()
    await run()
    dt = time.perf_counter() - t
    rate = f" {n_bytes / dt / 2**20:7.1f} MiB/s" if n_bytes else ""
    return f"{what} {dt:6.2f} s{rate}"


async def _outcome(run: Callable[[], Awaitable[object]]) -> str:
    try:
        await run()
    except Exception as exc:   # the point is which class and message each client gives
        return f"{type(exc).__module__}.{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
    return "no error"


async def measure(srv: servers.S3Server, cls: type, list_bucket: str) -> None:
    bucket = srv.new_bucket()
    c = cls(srv, bucket)
    big = os.urandom(BIG)
    small = [os.urandom(SMALL) for _ in range(N_SMALL)]
    rows = [
        await _timed(f"put {N_BIG}x16MiB", N_BIG * BIG,
                     lambda: _gather(N_BIG, lambda i: c.put(f"packs/{i}", big))),
        await _timed(f"get {N_BIG}x16MiB", N_BIG * BIG,
                     lambda: _gather(N_BIG, lambda i: c.get(f"packs/{i}"))),
        await _timed(f"put {N_SMALL}x1KiB", 0,
                     lambda: _gather(N_SMALL, lambda i: c.put(f"small/{i}", small[i]))),
        await _timed(f"get {N_SMALL}x1KiB", 0,
                     lambda: _gather(N_SMALL, lambda i: c.get(f"small/{i}"))),
        await _timed(f"{N_RANGES}x4KiB ranges", 0,
                     lambda: _gather(N_RANGES, lambda i: c.get_range(
                         "packs/0", (i * 7919 * RANGE) % (BIG - RANGE), RANGE))),
    ]
    lister = cls(srv, list_bucket)
    names: list[str] = []

    async def listing() -> None:
        names.extend(await lister.list("names/"))

    rows.append(await _timed(f"list {N_LIST}", 0, listing))
    assert len(names) == N_LIST, len(names)
    part = await c.get_range("packs/0", 1000, 100)
    assert part == big[1000:1100], "ranged read returned other bytes"
    await c.put("once", b"first")
    second = await _outcome(lambda: c.put("once", b"other", create_only=True))
    kept = await c.get("once")
    missing = await _outcome(lambda: c.get("missing"))
    wrong = cls(srv, bucket, secret="wrong-secret")
    denied = await _outcome(lambda: wrong.get("once"))
    for x in (c, lister, wrong):
        await x.close()
    print(f"  {cls.name:12s} " + " | ".join(rows))
    print(f"  {'':12s} create-only 2nd PUT: {second}; object now {kept!r}")
    print(f"  {'':12s} missing: {missing}")
    print(f"  {'':12s} wrong secret: {denied}")


async def fill_listing(srv: servers.S3Server) -> str:
    bucket = srv.new_bucket()
    c = AioBotocore(srv, bucket)
    await _gather(N_LIST, lambda i: c.put(f"names/{i:06d}", b"x"))
    await c.close()
    return bucket


async def main(which: list[str]) -> None:
    starters = {"weed": servers.weed_mini, "moto": servers.moto_server,
                "rclone": servers.rclone_s3}
    for name in which:
        with tempfile.TemporaryDirectory() as tmp:
            gen = starters[name](Path(tmp))
            srv = next(gen)
            try:
                print(f"{name}: filling {N_LIST} names ...", flush=True)
                list_bucket = await fill_listing(srv)
                for cls in CLIENTS:
                    await measure(srv, cls, list_bucket)
            finally:
                gen.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--servers", default="weed,moto,rclone")
    asyncio.run(main(ap.parse_args().servers.split(",")))
