"""Who may register an account on the broker (`Registration`, one per broker):

- `OpenRegistration` (the default): any owner device, first come first served;
- `InviteRegistration` (`--invites`): with a one-time invitation of the operator's
  (`p2pbackup-broker invite`, kept in the broker's state), in X-P2PB-Invite;
- `SignInRegistration` (`--oidc-issuer`): with a token of that OpenID Connect issuer
  (broker/oidc.py) in `Authorization: Bearer`; the account is then tied to the person, whose
  accounts are counted (`--max-accounts-per-person`).

Only registration asks: the next rosters of an account are signed by its owners, as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from ..protocol import store_requests as req
from ..server import invites
from ..server.refusals import Refused
from .oidc import OidcVerifier, SignInRefused
from .state import BrokerState


class Registration(Protocol):
    def describe(self) -> dict[str, Any]:
        """What a device must bring (GET /v1/registration), for the CLI's messages."""
        ...

    async def admit(self, request: web.Request) -> str | None:
        """The person registering an account with `request` (None: this broker does not
        know persons), or Refused. Called once the request is known to be signed by an
        owner of the roster it brings, so that an invitation is spent only then."""
        ...

    async def close(self) -> None: ...


class OpenRegistration:
    def describe(self) -> dict[str, Any]:
        return {"open": True}

    async def admit(self, request: web.Request) -> str | None:
        return None

    async def close(self) -> None:
        pass


class InviteRegistration:
    """Invitations kept in the broker's state (their SHA-256 and expiry, as the storage
    server keeps its), so that one made for a fleet is spent once on any of its processes.
    `legacy`: the broker's directory, where brokers before the state held them (files, one
    process's): an invitation made there before the upgrade still registers once."""

    def __init__(self, state: BrokerState, legacy: Path | None = None,
                 now: Callable[[], float] = time.time) -> None:
        self.state, self.legacy, self.now = state, legacy, now

    def describe(self) -> dict[str, Any]:
        return {"invites": True}

    async def admit(self, request: web.Request) -> str | None:
        token = request.headers.get(req.INVITE, "")
        if not token:
            raise Refused(403, "registering an account on this broker needs an invitation "
                               "(`p2pbackup-broker invite` on the broker; then `p2pbackup "
                               "broker register --invite TOKEN`)")
        if not await self.state.spend_invitation(invites.digest(token), self.now()) and not (
                self.legacy is not None and (self.legacy / invites.FILE).exists()
                and invites.spend(self.legacy, token, int(self.now() * 1e9))):
            raise Refused(403, "this invitation is not valid (used, expired or mistyped)")
        return None

    async def close(self) -> None:
        pass


class SignInRegistration:
    def __init__(self, verifier: OidcVerifier) -> None:
        self.verifier = verifier

    def describe(self) -> dict[str, Any]:
        return {"oidc": {"issuer": self.verifier.issuer, "audience": self.verifier.audience}}

    async def admit(self, request: web.Request) -> str | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Refused(401, f"registering an account on this broker needs a sign-in with "
                               f"{self.verifier.issuer} (`p2pbackup broker register`)")
        try:
            return await self.verifier.person(token)
        except SignInRefused as exc:
            raise Refused(exc.status, exc.line) from None

    async def close(self) -> None:
        await self.verifier.close()
