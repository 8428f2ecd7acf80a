"""A peer-session endpoint for tests, run inside a namespace; prints JSON lines.

  serve HOME PORT               answers offers from members, echoes each message back
  connect HOME HOST PORT PEER   opens a session to PEER, sends b"ping", prints the reply
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from p2pbackup.config import load_config, load_keys
from p2pbackup.errors import P2PError
from p2pbackup.repo import membership as store_membership
from p2pbackup.repo.repository import Repository
from p2pbackup.blobs.local import LocalDirStore
from p2pbackup import session


def emit(obj: object) -> None:
    print(json.dumps(obj), flush=True)


async def membership_of(home: Path):
    config = load_config(home)
    keys, identity = load_keys(config)
    repo = await Repository.open(LocalDirStore(config.store), keys, identity,
                                 str(config.cache_dir))
    try:
        got = await store_membership.load(repo)
    finally:
        await repo.close()
    assert got is not None
    return identity, got[0]


async def serve(home: Path, port: int) -> None:
    identity, members = await membership_of(home)

    async def echo(sender: str, link) -> None:
        emit({"connected": sender})
        while (msg := await link.recv()) is not None:
            await link.send(msg)

    server = session.SignalingServer(identity, lambda: members, echo,
                                     on_refused=lambda why: emit({"refused": why}))
    emit({"ready": await server.start("0.0.0.0", port)})
    await asyncio.Event().wait()


async def connect(home: Path, host: str, port: int, peer: str) -> None:
    identity, members = await membership_of(home)
    try:
        link = await session.connect(identity, peer, members,
                                     session.LanSignaling(host, port))
    except P2PError as exc:
        emit({"error": str(exc), "type": type(exc).__name__})
        return
    await link.send(b"ping")
    reply = await asyncio.wait_for(link.recv(), 20)
    emit({"reply": reply.decode() if reply else None})
    await link.close()


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    if cmd == "serve":
        asyncio.run(serve(Path(rest[0]), int(rest[1])))
    else:
        asyncio.run(connect(Path(rest[0]), rest[1], int(rest[2]), rest[3]))
