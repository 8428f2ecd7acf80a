"""Replication over one peer session: the sync protocol between this store and the peer's.

Every object the peer sends is checked by `repo.replica.accept` before it is stored (a
hostile peer plants nothing); what we seal is announced at once, so peers pull it within a
second instead of polling.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from p2pbackup.errors import NotFound, P2PError
from p2pbackup.protocol.sync import (Closed, Event, ObjectAcked, ObjectReceived,
                                     ObjectRejected, ObjectWanted, SyncSession)
from p2pbackup.repo import replica
from p2pbackup.transport.datachannel import MESSAGE_SIZE, PeerLink

if TYPE_CHECKING:
    from .peers import PeerState

log = logging.getLogger("p2pbackupd")


async def local_names(repo) -> set[str]:
    """The objects of this store a peer may ask for."""
    return {n async for n in repo.store.list("") if replica.is_object_name(n)}


class Replicator:
    """Runs sessions and fans announcements out to every open one."""

    def __init__(self, repo, me: str) -> None:
        self.repo, self.me = repo, me
        self.sessions: dict[str, tuple[SyncSession, PeerLink]] = {}

    async def announce_new(self) -> None:
        """Tell every open session what this store holds that it has not been told of."""
        if not self.sessions:
            return
        names = await local_names(self.repo)
        for s, link in list(self.sessions.values()):
            new = sorted(names - s.have, key=replica.transfer_order)
            head = f"heads/{self.me}"
            if head in names and head not in new:
                new.append(head)  # heads change in place
            if new:
                s.announce(new)
                await _flush(s, link)

    async def run(self, device: str, link: PeerLink, st: "PeerState") -> None:
        """One session, until either side closes it."""
        s = SyncSession(self.me, await local_names(self.repo), valid_name=replica.is_object_name)
        self.sessions[device] = (s, link)
        try:
            await _flush(s, link)
            while True:
                msg = await link.recv()
                if msg is None:
                    return
                await self._handle(s, link, st, s.receive_data(msg))
                if s.closed:
                    return
        finally:
            self.sessions.pop(device, None)

    async def _handle(self, s: SyncSession, link: PeerLink, st: "PeerState",
                      events: list[Event]) -> None:
        while True:
            for ev in events:
                if isinstance(ev, ObjectWanted):
                    try:
                        s.send_object(ev.name, bytes(await self.repo.store.get(ev.name)))
                    except NotFound:
                        s.missing(ev.name)
                elif isinstance(ev, ObjectReceived):
                    try:
                        await replica.accept(self.repo, ev.name, ev.data)
                    except P2PError as exc:
                        log.warning("refused %s from peer %s: %s", ev.name[:40], st.device[:12],
                                    exc)
                        s.reject(ev.name, str(exc))
                    else:
                        s.ack(ev.name)
                        st.last_sync = time.time()
                elif isinstance(ev, ObjectAcked):
                    st.last_sync = time.time()
                elif isinstance(ev, ObjectRejected):
                    log.warning("peer %s refused %s: %s", st.device[:12], ev.name[:40],
                                ev.reason)
                elif isinstance(ev, Closed):
                    log.warning("session with %s: %s", st.device[:12], ev.reason)
            st.objects_behind = s.pending
            await _flush(s, link)  # also when no event came: a want or an ack may be queued
            events = s.next_wanted()
            if not events:
                return


async def _flush(s: SyncSession, link: PeerLink) -> None:
    data = s.data_to_send()
    for i in range(0, len(data), MESSAGE_SIZE):
        await link.send(data[i:i + MESSAGE_SIZE])
