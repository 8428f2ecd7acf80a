"""A paired device whose copy of one object is lost on the way, for the daemon's re-request.

    python -m tests.integration.withholding_agent HOME HOST PORT PEER_ID

Opens a real signed session to the daemon at HOST:PORT, offers everything in HOME's store
through the real sync protocol and sends what the daemon asks for, except that the parts of
the first pack it asks for are dropped instead of sent (the session thinks they went). Prints JSON lines: the pack it
withheld, when the daemon asked again and the pack was sent, and when it was acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from p2pbackup import session
from p2pbackup.blobs.local import LocalDirStore
from p2pbackup.config import load_config, load_keys
from p2pbackup.replication.driver import flush
from p2pbackup.protocol.sync import ObjectAcked, ObjectWanted, SyncSession
from p2pbackup.repo import membership as store_membership
from p2pbackup.repo.replica import is_object_name


def emit(obj: object) -> None:
    print(json.dumps(obj), flush=True)


async def main(home: str, host: str, port: int, peer: str) -> None:
    config = load_config(Path(home))
    keys, identity = load_keys(config)
    store = LocalDirStore(config.store)
    got = await store_membership.load_from(store, keys)
    assert got is not None
    names = {n for n in store.list_sync("") if is_object_name(n)}
    sizes = {n: len(store.get_sync(n)) for n in names}
    s = SyncSession(identity.device_id, names, valid_name=is_object_name, sizes=sizes,
                    wants=lambda name: False)  # this side only gives
    link = await session.connect(identity, peer, got[0], session.LanSignaling(host, port))
    withheld: str | None = None
    withheld_at = 0.0
    asks = 0
    try:
        await flush(s, link)
        while (msg := await asyncio.wait_for(link.recv(), 120)) is not None:
            events = s.receive_data(msg)
            while events:
                for ev in events:
                    if isinstance(ev, ObjectWanted):
                        if ev.name == withheld:
                            asks += 1
                            emit({"sent_again": ev.name, "after": time.monotonic() - withheld_at})
                        elif withheld is None and ev.name.startswith("packs/"):
                            withheld, withheld_at = ev.name, time.monotonic()
                            emit({"withheld": ev.name})
                            await flush(s, link)  # what is queued before it still goes
                            s.send_object(ev.name, store.get_sync(ev.name))
                            s.data_to_send()      # its parts are lost on the way
                            continue
                        s.send_object(ev.name, store.get_sync(ev.name))
                    elif isinstance(ev, ObjectAcked) and ev.name == withheld:
                        emit({"acked": ev.name, "asks": asks})
                        return
                await flush(s, link)
                events = s.next_wanted()
    finally:
        await link.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
