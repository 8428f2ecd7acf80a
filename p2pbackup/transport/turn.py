"""Short-lived TURN credentials in coturn's REST scheme (`--use-auth-secret`).

The broker hands these out so that no long-term TURN password ever reaches a device: the
username is `EXPIRY:ID` (EXPIRY in Unix seconds), the password base64(HMAC-SHA1(secret,
username)); coturn, sharing the secret (`--static-auth-secret`), recomputes it and refuses the
name once EXPIRY is past (draft-uberti-behave-turn-rest-00, coturn's README.turnserver).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TurnCredentials:
    """A username/credential pair for an RTCIceServer, valid until `expires` (Unix seconds)."""

    username: str
    credential: str
    expires: int


def rest_credentials(secret: bytes | str, ttl: int, id: str, now: float) -> TurnCredentials:
    """Credentials for `id` (a device id, say) valid for `ttl` seconds from `now`."""
    if ttl <= 0:
        raise ValueError("ttl must be a positive number of seconds")
    if not id or ":" in id:
        # coturn takes the part before the first ':' as the expiry: an id must not hold one.
        raise ValueError("the id must be non-empty and without ':'")
    key = secret.encode() if isinstance(secret, str) else secret
    expires = int(now) + int(ttl)
    username = f"{expires}:{id}"
    digest = hmac.new(key, username.encode(), hashlib.sha1).digest()
    return TurnCredentials(username, base64.b64encode(digest).decode("ascii"), expires)
