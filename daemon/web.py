"""Wiring of the local web console (p2pbackup.web) into the daemon: `[web]` in config.toml,
and the control request `web` that `p2pbackup web` sends for a sign-in address."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from p2pbackup.config import Config
from p2pbackup.errors import ConfigError
from p2pbackup.repo.repository import Repository
from p2pbackup.web.app import Backend, Console

log = logging.getLogger("p2pbackupd")


class WebService:
    """The console if `[web] enabled`; what went wrong starting it otherwise."""

    def __init__(self, config: Config, repo: Repository,
                 status: Callable[[], Awaitable[dict[str, Any]]],
                 reading: Callable[[], AbstractAsyncContextManager[None]]) -> None:
        self.config = config
        self.console = Console(Backend(repo, config.sources, status, reading)) \
            if config.web.enabled else None
        self.port = 0
        self.error = "" if config.web.enabled else "off ([web] enabled = false in config.toml)"

    async def start(self) -> None:
        if self.console is None:
            return
        web = self.config.web
        try:
            self.port = await self.console.start(web.listen, web.port)
        except OSError as exc:  # the port is taken: the daemon runs on without its console
            self.error = f"could not listen on {web.listen}:{web.port}: {exc.strerror or exc}"
            log.error("web console: %s; set another [web] port in config.toml", self.error)
            self.console = None
            return
        log.info("web console on http://%s:%d/ (`p2pbackup web` opens it)",
                 web.listen if ":" not in web.listen else f"[{web.listen}]", self.port)

    async def close(self) -> None:
        if self.console is not None:
            await self.console.close()

    def status(self) -> dict[str, Any]:
        return {"enabled": self.console is not None, "port": self.port or None,
                "error": self.error or None}

    async def sign_in(self, args: dict[str, Any]) -> dict[str, Any]:
        """A fresh sign-in address (its token works once, for a few minutes)."""
        if self.console is None:
            raise ConfigError(f"the web console is {self.error}")
        return {"url": self.console.login_url()}
