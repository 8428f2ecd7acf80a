"""The storage partner's process side: its signaling port, its one mDNS advert, the removal
timer. What it does over each session is p2pbackup/replication/partner.py's (`StoragePartner`,
whose docstring says what a partner checks).

The advert carries one tag, keyed by the partner's own tag key (which each account got at
pairing): the accounts' devices recognise it, and nobody learns how many accounts it stores for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from p2pbackup import grants as grant_files
from p2pbackup import session
from p2pbackup.config import Config
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.crypto.tags import TAG_PERIOD, discovery_tag
from p2pbackup.peer_fetch import PEER_SERVICE, ice_for
from p2pbackup.replication.partner import StoragePartner
from p2pbackup.repo.partner_store import Grant

from .peers import connection_limits

log = logging.getLogger("p2pbackupd")


class PartnerService(StoragePartner):
    """A `StoragePartner` reachable on the LAN, applying removals as their grace ends."""

    def __init__(self, config: Config, identity: DeviceIdentity, grants: list[Grant], *,
                 tag_key: bytes | None = None) -> None:
        super().__init__(identity, grants, removal_grace=config.peers.removal_grace)
        self.config = config
        self.tag_key = tag_key if tag_key is not None else \
            grant_files.tag_key(config.home) or b""
        self.port = 0
        self._signaling: session.SignalingServer | None = None
        self._stack = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task[Any]] = []

    def advert_txt(self, now: float) -> dict[str, str]:
        """The TXT record of this partner's one advert: one tag, whatever the accounts."""
        return {"v": "1", "port": str(self.port), "tag": discovery_tag(self.tag_key, self.me,
                                                                       now)}

    async def start(self) -> None:
        """Listen for sessions and advertise on the LAN (when the LAN is on)."""
        if not self.grants:
            return
        self._tasks.append(asyncio.create_task(self._apply_removals()))
        if not self.config.peers.lan:
            return
        from p2pbackup.discovery import mdns

        interfaces = list(self.config.peers.interfaces) or None
        await self.listen("127.0.0.1" if interfaces == ["lo"] else "0.0.0.0")
        log.info("storage partner for %d accounts, signaling on port %d", len(self.grants),
                 self.port)
        if not self.tag_key:
            log.warning("partner: no tag key (a home paired before partners made their own): "
                        "not advertised on the LAN; pair again")
            return
        try:
            ad = await self._stack.enter_async_context(mdns.advertise(
                PEER_SERVICE, self.port, self.advert_txt(time.time()), interfaces=interfaces))
        except (OSError, ValueError) as exc:
            log.warning("partner: LAN discovery is off: %s", exc)
            return
        self._tasks.append(asyncio.create_task(mdns.keep_rotating(ad, self.advert_txt,
                                                                  period=TAG_PERIOD)))

    async def listen(self, host: str, port: int = 0) -> int:
        """Answer the devices' signed offers on `host` (`start` advertises the port)."""
        self._signaling = session.SignalingServer(
            self.identity, lambda: self.membership, self.answer,
            ice=ice_for(self.config.peers, host), on_refused=lambda why: log.warning("%s", why),
            limits=connection_limits(self.config.peers), recovery=self.recovery_signers)
        self.port = await self._signaling.start(host, port)
        return self.port

    async def _apply_removals(self) -> None:
        while True:
            await self.apply_removals()
            await asyncio.sleep(min(60.0, max(1.0, self.config.peers.removal_grace / 2)))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._signaling is not None:
            await self._signaling.close()
        with contextlib.suppress(Exception):
            await self._stack.aclose()
