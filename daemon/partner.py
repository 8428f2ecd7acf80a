"""The storage partner's process side: its signaling port, its one mDNS advert, its broker
sockets, the removal timer. What it does over each session is
p2pbackup/replication/partner.py's (`StoragePartner`, whose docstring says what a partner
checks).

The advert carries one tag, keyed by the partner's own tag key (which each account got at
pairing): the accounts' devices recognise it, and nobody learns how many accounts it stores for.

With `[broker] url`, the partner opens one broker socket per account it holds a grant for, as
that account's storage partner (the broker admits it if the account's roster names it: both
sides agree), so the account's devices reach it off the LAN. Offers relayed there are checked
as on the signaling port (session.OfferAnswerer, against the grants' rosters), with the
broker's STUN/TURN servers first.
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
from p2pbackup.discovery.broker import BrokerClient, BrokerIce
from p2pbackup.logthrottle import ThrottledLog
from p2pbackup.peer_fetch import PEER_SERVICE, ice_for
from p2pbackup.replication.partner import StoragePartner
from p2pbackup.repo.partner_store import Grant, load_grants
from p2pbackup.transport.datachannel import IceConfig

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
        self.brokers: dict[str, BrokerClient] = {}   # account -> its socket, as its partner
        self.refusals = ThrottledLog(log)   # offers refused: one line a minute per kind
        self._serving = False

    def advert_txt(self, now: float) -> dict[str, str]:
        """The TXT record of this partner's one advert: one tag, whatever the accounts."""
        return {"v": "1", "port": str(self.port), "tag": discovery_tag(self.tag_key, self.me,
                                                                       now)}

    async def start(self) -> None:
        """Listen for sessions and advertise on the LAN (when the LAN is on), once this
        device holds a grant (see `reload_grants`)."""
        if self.grants:
            await self._serve()

    async def reload_grants(self, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """`pair` made this device the storage partner of another account while the daemon
        runs (a control request): serve that account now, not after a restart."""
        new = self.add_grants(load_grants(self.config.home,
                                          skip={g.account for g in self.grants}))
        if new and not self._serving:
            await self._serve()
        elif self.config.broker.url:
            for g in new:
                self._start_broker(g.account)
        for g in new:
            log.info("storage partner for account %s now", g.account)
        return {"accounts": [g.account for g in self.grants]}

    async def _serve(self) -> None:
        self._serving = True
        if not self.tag_key:   # a home that became a partner after the daemon started
            self.tag_key = grant_files.tag_key(self.config.home) or b""
        self._tasks.append(asyncio.create_task(self._apply_removals()))
        if self.config.broker.url:
            for g in self.grants:
                self._start_broker(g.account)
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
            ice=ice_for(self.config.peers, host), on_refused=self.refusals.warning,
            limits=connection_limits(self.config.peers), recovery=self.recovery_signers)
        self.port = await self._signaling.start(host, port)
        return self.port

    def _start_broker(self, account: str) -> None:
        """Keep a broker socket for `account`, answering its devices' offers."""
        ice = ice_for(self.config.peers)
        client: BrokerClient

        async def ice_now() -> IceConfig:
            return await broker_ice.current()

        async def here() -> None:
            # The account's devices dial a partner: tell them it is reachable now (else they
            # would find out at their next round).
            await client.push(b"")

        answerer = session.OfferAnswerer(self.identity, lambda: self.membership, ice=ice,
                                         recovery=self.recovery_signers, ice_source=ice_now)
        client = BrokerClient(self.config.broker.url, self.identity, account,
                              answerer=answerer, on_link=self.answer, on_ready=here,
                              on_refused=self.refusals.warning)
        broker_ice = BrokerIce(client, ice)
        self.brokers[account] = client
        client.start()

    def status(self) -> list[dict[str, Any]]:
        """StoragePartner.status, with each account's broker socket (None: no broker)."""
        out = super().status()
        for doc in out:
            client = self.brokers.get(doc["account"])
            doc["broker"] = None if client is None else {
                "url": client.base, "connected": client.connected.is_set(),
                "last_error": client.last_error}
        return out

    async def _apply_removals(self) -> None:
        while True:
            await self.apply_removals()
            await self._close_forgotten()
            await asyncio.sleep(min(60.0, max(1.0, self.config.peers.removal_grace / 2)))

    async def _close_forgotten(self) -> None:
        """Close the broker sockets of accounts whose grant is gone (an owner deleted the
        account). Not at once: the session that brought the deletion runs on that socket's
        tasks and is still to be answered."""
        for account in set(self.brokers) - {g.account for g in self.grants}:
            await self.brokers.pop(account).close()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._signaling is not None:
            await self._signaling.close()
        for client in self.brokers.values():
            await client.close()
        with contextlib.suppress(Exception):
            await self._stack.aclose()
