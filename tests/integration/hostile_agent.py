"""A paired device gone bad: opens real signed sessions to a daemon and sends it garbage.

    python -m tests.integration.hostile_agent HOME HOST PORT PEER_ID

Each attack is its own session (random bytes; valid sync frames carrying wrong content; a
fetch session with malformed requests and a forged object to store; objects sent part-way and
never finished, in a sync session and as puts). Prints one JSON line per attack with what
came back.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from p2pbackup import session
from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.config import load_config, load_keys
from p2pbackup.protocol import fetch
from p2pbackup.protocol.framing import Limits, encode
from p2pbackup.repo import membership as store_membership


def sync(msg: dict) -> bytes:
    return encode(1, msg)


PARTIAL = [f"packs/{os.urandom(32).hex()}" for _ in range(Limits().partial_objects + 2)]
ATTACKS = {
    "random bytes": [os.urandom(3000)],
    "wrong content": [sync({"t": "hello", "versions": [1], "device": "x"}),
                      sync({"t": "inv", "names": ["packs/" + "a" * 64], "last": True}),
                      sync({"t": "obj", "name": "packs/" + "a" * 64, "off": 0, "total": 5,
                            "data": b"evil!", "last": True})],
    "fetch abuse": [encode(fetch.VERSION, {"t": fetch.HELLO, "versions": [1], "device": "x"}),
                    encode(fetch.VERSION, {"t": "put", "id": 1, "name": "packs/" + "b" * 64,
                                           "off": 0, "total": 6, "data": b"forged",
                                           "last": True}),
                    encode(fetch.VERSION, {"t": "req", "id": 2, "op": "get",
                                           "name": "../keys/account.key"})],
    # More objects in parts at once than a session may hold (framing.Limits.partial_objects).
    "objects sent part-way": [sync({"t": "hello", "versions": [1], "device": "x"}),
                              sync({"t": "inv", "names": PARTIAL, "last": True})] +
                             [sync({"t": "obj", "name": n, "off": 0, "total": 100_000,
                                    "data": os.urandom(1000), "last": False}) for n in PARTIAL],
    "unfinished puts": [encode(fetch.VERSION, {"t": fetch.HELLO, "versions": [1], "device": "x"})]
                       + [encode(fetch.VERSION, {"t": "put", "id": i, "name": n, "off": 0,
                                                 "total": 100_000, "data": os.urandom(1000),
                                                 "last": False})
                          for i, n in enumerate(PARTIAL, 1)],
}


async def main(home: str, host: str, port: int, peer: str) -> None:
    config = load_config(Path(home))
    keys, identity = load_keys(config)
    got = await store_membership.load_from(LocalDirStore(config.store), keys)
    assert got is not None
    for name, messages in ATTACKS.items():
        link = await session.connect(identity, peer, got[0], session.LanSignaling(host, port))
        replies = []
        try:
            for m in messages:
                await link.send(m)
            while True:
                msg = await asyncio.wait_for(link.recv(), 5)
                if msg is None:
                    break
                replies.append(msg)
        except Exception as exc:  # the daemon closing on us is the expected end
            replies.append(repr(exc).encode())
        finally:
            await link.close()
        print(json.dumps({"attack": name, "replies": b"".join(replies).hex()[:40000]}),
              flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
