"""Wiring of the local web console (p2pbackup.web) into the daemon: `[web]` in config.toml,
and the control request `web` that `p2pbackup web` sends for a sign-in address."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

from p2pbackup import account
from p2pbackup.backup.repair import RepairReport
from p2pbackup.backup.verify import VerifyProgress
from p2pbackup.config import Config
from p2pbackup.device import Device
from p2pbackup.errors import ConfigError
from p2pbackup.views import membership_json
from p2pbackup.web.app import Backend, Console

log = logging.getLogger("p2pbackupd")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class WebService:
    """The console if `[web] enabled`; what went wrong starting it otherwise."""

    def __init__(self, config: Config, dev: Device,
                 status: Callable[[], Awaitable[dict[str, Any]]],
                 reading: Callable[[], AbstractAsyncContextManager[None]],
                 account_ops: Mapping[str, Handler],
                 repair: Callable[[VerifyProgress], Awaitable[RepairReport]] | None = None
                 ) -> None:
        self.config = config
        self.dev = dev
        ops = dict(account_ops)
        if "pair_start" in ops:
            ops["pair_start"] = self._pair_start(ops["pair_start"])
        self.console = Console(Backend(dev.repo, config.sources, status, reading,
                                       devices=self.devices, account=ops, repair=repair)) \
            if config.web.enabled else None
        self.port = 0
        self.error = "" if config.web.enabled else "off ([web] enabled = false in config.toml)"

    async def start(self) -> None:
        if self.console is None:
            return
        web = self.config.web
        if web.socket:
            where = str(self.config.home / web.socket)
            try:
                await self.console.start_proxied(where, web.url)
            except OSError as exc:
                self._failed(f"could not listen on {where}: {exc.strerror or exc}")
                return
            log.info("web console on %s for the reverse proxy of %s", where, web.url)
            return
        try:
            self.port = await self.console.start(web.listen, web.port)
        except OSError as exc:  # the port is taken: the daemon runs on without its console
            self._failed(f"could not listen on {web.listen}:{web.port}: {exc.strerror or exc}")
            return
        log.info("web console on http://%s:%d/ (`p2pbackup web` opens it)",
                 web.listen if ":" not in web.listen else f"[{web.listen}]", self.port)

    def _failed(self, error: str) -> None:
        self.error = error
        log.error("web console: %s; change [web] in config.toml", error)
        self.console = None

    async def close(self) -> None:
        if self.console is not None:
            await self.console.close()

    def status(self) -> dict[str, Any]:
        return {"enabled": self.console is not None, "port": self.port or None,
                "url": self.config.web.url or None, "error": self.error or None}

    async def devices(self) -> dict[str, Any]:
        return membership_json(await account.listed_membership(self.dev),
                               self.dev.identity.device_id)

    def _pair_start(self, start: Handler) -> Handler:
        """A page pairs an owner, a member (its sources) or a storage partner (its quota),
        announced on the LAN if the LAN is on (else the joiner is given this device's port).
        Only those three come from the page: where the code is offered is this daemon's
        configuration, not the page's to choose."""
        lan = self.config.peers.lan

        async def pair_start(args: dict[str, Any]) -> dict[str, Any]:
            started = await start({"role": args.get("role", "owner"),
                                   "sources": args.get("sources"), "quota": args.get("quota"),
                                   "expires": 600.0, "mdns": lan})
            return {**started, "lan": lan}
        return pair_start

    async def sign_in(self, args: dict[str, Any]) -> dict[str, Any]:
        """A fresh sign-in address (its token works once, for a few minutes)."""
        if self.console is None:
            raise ConfigError(f"the web console is {self.error}")
        return {"url": self.console.login_url()}
