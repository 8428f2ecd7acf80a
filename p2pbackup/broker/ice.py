"""Short-lived TURN credentials in coturn's REST scheme (`use-auth-secret`), the scheme of
draft-uberti-behave-turn-rest: the broker and the TURN server share a secret; the username is
`<expiry Unix time>:<user>` and the password base64(HMAC-SHA1(secret, username)), which the
TURN server recomputes and refuses once the expiry has passed. No state, nothing to revoke.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..transport.turn import rest_credentials


@dataclass(frozen=True, slots=True)
class IceSettings:
    """The servers the broker hands out (none: host candidates only; no public STUN server
    is ever named unless the operator configures one)."""

    stun_urls: tuple[str, ...] = ()
    turn_urls: tuple[str, ...] = ()
    turn_secret: str = ""
    ttl: int = 3600


def turn_credentials(secret: str, user: str, now: float, ttl: int) -> tuple[str, str]:
    """(username, password) valid for `ttl` seconds from `now` (transport.turn makes them: the
    NAT tests hand the same to coturn without a broker)."""
    cred = rest_credentials(secret, ttl, user, now)
    return cred.username, cred.credential


def ice_servers(settings: IceSettings, user: str, now: float) -> list[dict[str, object]]:
    """The `iceServers` list (the shape of RTCConfiguration's) for device `user`."""
    out: list[dict[str, object]] = []
    if settings.stun_urls:
        out.append({"urls": list(settings.stun_urls)})
    if settings.turn_urls and settings.turn_secret:
        username, credential = turn_credentials(settings.turn_secret, user, now, settings.ttl)
        out.append({"urls": list(settings.turn_urls), "username": username,
                    "credential": credential})
    return out
