"""Signing in with an OpenID Connect issuer from a terminal: the device authorization grant
(RFC 8628, what `gh auth login` and TV apps do). The CLI asks the issuer for a code, shows the
person where to enter it (in any browser, on any device), and polls until the issuer gives
the ID token the broker asks for when an account registers (`p2pbackup broker register`).

The token is handed to the broker once and kept nowhere. Issuers without a
`device_authorization_endpoint` in their discovery document need `--token-file` instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..errors import ConfigError, PeerUnreachable, RemoteProtocolError

GRANT = "urn:ietf:params:oauth:grant-type:device_code"
TIMEOUT = 30.0           # one request to the issuer
MIN_INTERVAL = 1.0       # seconds between polls, whatever the issuer says
DEFAULT_INTERVAL = 5.0   # RFC 8628 §3.2: when the issuer names none
SLOW_DOWN = 5.0          # RFC 8628 §3.5: added at each slow_down


@dataclass(frozen=True, slots=True)
class UserCode:
    """What the person is shown: where to go and the code to enter there."""

    verification_uri: str
    user_code: str
    verification_uri_complete: str | None   # the same with the code in it (a QR code, a link)


async def device_sign_in(issuer: str, client_id: str, show: Callable[[UserCode], None], *,
                         ssl: Any = None,
                         sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                         now: Callable[[], float] = time.monotonic) -> str:
    """The ID token `issuer` gives for `client_id` once the person has entered the code
    `show` displays."""
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl if ssl is not None else True),
            timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as http:
        config = await _json(http, "GET", f"{issuer.rstrip('/')}"
                                          "/.well-known/openid-configuration", issuer)
        device_url, token_url = (config.get("device_authorization_endpoint"),
                                 config.get("token_endpoint"))
        if not isinstance(device_url, str) or not isinstance(token_url, str):
            raise ConfigError(f"{issuer} offers no sign-in from a terminal (no device "
                              "authorization): give --token-file FILE holding an ID token it "
                              "issued you")
        start = await _json(http, "POST", device_url, issuer,
                            {"client_id": client_id, "scope": "openid"})
        device_code, user_code = start.get("device_code"), start.get("user_code")
        uri = start.get("verification_uri") or start.get("verification_url")   # Google's name
        if not all(isinstance(v, str) for v in (device_code, user_code, uri)):
            raise RemoteProtocolError(f"{issuer} did not answer the sign-in request with a "
                                      "code to enter")
        complete = start.get("verification_uri_complete")
        show(UserCode(uri, user_code, complete if isinstance(complete, str) else None))
        interval = _seconds(start.get("interval"), DEFAULT_INTERVAL)
        deadline = now() + _seconds(start.get("expires_in"), 600.0)
        while now() < deadline:
            await sleep(interval)
            doc = await _json(http, "POST", token_url, issuer,
                              {"grant_type": GRANT, "device_code": device_code,
                               "client_id": client_id}, errors_too=True)
            error = doc.get("error")
            if error is None:
                token = doc.get("id_token")
                if not isinstance(token, str):
                    raise RemoteProtocolError(f"{issuer} signed you in but gave no ID token "
                                              "(is `openid` a scope of this client?)")
                return token
            if error == "slow_down":
                interval += SLOW_DOWN
            elif error != "authorization_pending":
                raise RemoteProtocolError(f"{issuer} refused the sign-in: {str(error)[:80]}"
                                          + (" (the code was not entered in time)"
                                             if error == "expired_token" else ""))
        raise RemoteProtocolError("the sign-in code expired before it was entered: run the "
                                  "command again")


def _seconds(value: object, default: float) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return max(MIN_INTERVAL, float(value))
    return default


async def _json(http: aiohttp.ClientSession, method: str, url: str, issuer: str,
                form: dict[str, str] | None = None, *, errors_too: bool = False
                ) -> dict[str, Any]:
    """The JSON object at `url`; with `errors_too`, an OAuth error answer (400/401) too."""
    try:
        async with http.request(method, url, data=form,
                                headers={"Accept": "application/json"}) as r:
            ok = r.status == 200 or errors_too and r.status in (400, 401)
            doc = await r.json(content_type=None) if ok else None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise PeerUnreachable(f"cannot reach the sign-in issuer {issuer}: "
                              f"{exc or type(exc).__name__}") from None
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise RemoteProtocolError(f"the sign-in issuer {issuer} answered {url} with no JSON "
                                  "object")
    return doc
