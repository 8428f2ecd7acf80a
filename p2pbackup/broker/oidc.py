"""Sign-in with an OpenID Connect issuer, to register an account on the broker
(`p2pbackup-broker --oidc-issuer URL --oidc-audience ID`).

A device that registers an account brings a token the issuer signed (an ID token, or an
access token that is a JWT) in `Authorization: Bearer`. It is checked here against the
issuer's published keys: the discovery document (`ISSUER/.well-known/openid-configuration`,
whose `issuer` must be ISSUER exactly) names the JWKS; the keys are cached, and fetched again
when a token names a key id (`kid`) they lack (key rotation), at most once per
`refetch_every` seconds so that tokens with made-up key ids cannot make the broker hammer the
issuer. The signature (asymmetric algorithms only: never `none`, never an HMAC whose secret
would be the public key), `iss`, `aud`, `exp` (required) and `nbf`, with `LEEWAY` seconds of
clock skew, and a `sub`.

The account is tied to the person as `person_id(issuer, sub)`: a SHA-256 of both, so the
broker's state names no identifier of the issuer's (an operator given a `sub` in an abuse
report computes it). Nothing else from the token is kept or logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from joserfc import jws, jwt
from joserfc.errors import (BadSignatureError, ClaimError, ExpiredTokenError, InvalidKeyIdError,
                            JoseError, MissingClaimError)
from joserfc.jwk import KeySet

# Asymmetric only: `none` signs nothing, and an HMAC (HS*) checked with a public key would
# take a token "signed" with that public key, which anyone has.
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
              "ES512", "EdDSA")
LEEWAY = 60                 # seconds of clock skew between the issuer and the broker
REFETCH_EVERY = 60.0        # seconds: the most often an unknown kid makes the JWKS be fetched
RETRY_FAILED = 10.0         # seconds before keys that could not be fetched are tried again
FETCH_TIMEOUT = 10.0
MAX_TOKEN = 16 * 1024       # an ID token is a few KiB
MAX_DOCUMENT = 1024 * 1024  # a discovery document or a JWKS


class SignInRefused(Exception):
    """A token refused: the one line the device is told and the broker logs."""

    def __init__(self, line: str, status: int = 401) -> None:
        super().__init__(line)
        self.line, self.status = line, status


def person_id(issuer: str, sub: str) -> str:
    return hashlib.sha256(f"{issuer}\n{sub}".encode()).hexdigest()


def check_issuer_url(issuer: str) -> str:
    """`issuer` if it is an https URL (http only on loopback, for tests); ValueError else."""
    parts = urlsplit(issuer)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or \
            parts.fragment:
        raise ValueError(f"--oidc-issuer {issuer!r}: give the issuer's https:// URL")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError(f"--oidc-issuer {issuer!r}: use https:// (http only on loopback)")
    return issuer


class OidcVerifier:
    """Checks sign-in tokens of one issuer for one audience; `person(token)` is the person's
    id or SignInRefused."""

    def __init__(self, issuer: str, audience: str, *, now: Callable[[], float] = time.time,
                 ssl: Any = None, refetch_every: float = REFETCH_EVERY,
                 leeway: int = LEEWAY) -> None:
        self.issuer, self.audience = check_issuer_url(issuer), audience
        self.now, self.ssl = now, ssl
        self.refetch_every, self.leeway = refetch_every, leeway
        self.fetches = 0              # JWKS fetches so far (the refetch bound is tested)
        self._keys: KeySet | None = None
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    async def person(self, token: str) -> str:
        token = token.strip()
        if not token or len(token) > MAX_TOKEN:
            raise SignInRefused(f"the sign-in token is empty or longer than {MAX_TOKEN} bytes")
        try:
            header = jws.extract_compact(token.encode()).headers()
        except (JoseError, ValueError, TypeError):
            raise SignInRefused("the sign-in token is not a signed JWT") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise SignInRefused(f"the sign-in token's algorithm {str(alg)[:20]!r} is not one "
                                f"this broker takes ({', '.join(ALGORITHMS)})")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise SignInRefused("the sign-in token's key id is not a string")
        key = await self._key(kid, alg)
        try:
            claims = jwt.decode(token, key, algorithms=[alg]).claims
        except BadSignatureError:
            raise SignInRefused("the sign-in token's signature does not verify") from None
        except (JoseError, ValueError, TypeError) as exc:
            raise SignInRefused(f"the sign-in token is malformed ({type(exc).__name__})"
                                ) from None
        return self._person(claims)

    def _person(self, claims: dict[str, Any]) -> str:
        registry = jwt.JWTClaimsRegistry(
            now=lambda: int(self.now()), leeway=self.leeway,
            iss={"essential": True, "value": self.issuer},
            aud={"essential": True, "value": self.audience},
            sub={"essential": True}, exp={"essential": True})
        try:
            registry.validate(claims)
        except ExpiredTokenError:
            raise SignInRefused("the sign-in token has expired: sign in again") from None
        except MissingClaimError as exc:
            raise SignInRefused(f"the sign-in token has no {exc.claim!r} claim") from None
        except ClaimError as exc:
            what = {"iss": f"was not issued by {self.issuer}",
                    "aud": f"is not for this broker (audience {self.audience!r})",
                    "nbf": "is not valid yet", "iat": "was issued in the future"}
            raise SignInRefused("the sign-in token " + what.get(
                exc.claim, f"has an invalid {exc.claim!r} claim")) from None
        return person_id(self.issuer, claims["sub"])

    async def _key(self, kid: str | None, alg: str) -> Any:
        keys = await self._key_set(refresh=False)
        found = _find(keys, kid, alg)
        if found is None:
            keys = await self._key_set(refresh=True)   # the issuer may have rotated its keys
            found = _find(keys, kid, alg)
        if found is None:
            raise SignInRefused(f"the sign-in token names a key the issuer does not publish "
                                f"(kid {str(kid)[:40]!r})")
        return found

    async def _key_set(self, *, refresh: bool) -> KeySet:
        async with self._lock:
            since = self.now() - self._fetched_at
            if self._keys is None and since >= RETRY_FAILED or \
                    refresh and since >= self.refetch_every:
                self._fetched_at = self.now()
                self._keys = await self._fetch_keys()
            if self._keys is None:   # the last fetch failed, moments ago: not again so soon
                raise SignInRefused("the sign-in issuer's keys could not be fetched: try again "
                                    f"in {RETRY_FAILED:.0f} s", 503)
            return self._keys

    async def _fetch_keys(self) -> KeySet:
        config = await self._get_json(f"{self.issuer.rstrip('/')}"
                                      "/.well-known/openid-configuration")
        if config.get("issuer") != self.issuer:
            raise SignInRefused(f"the sign-in issuer's discovery document names issuer "
                                f"{str(config.get('issuer'))[:80]!r}, not {self.issuer}", 503)
        uri = config.get("jwks_uri")
        if not isinstance(uri, str) or urlsplit(uri).scheme not in ("http", "https"):
            raise SignInRefused("the sign-in issuer's discovery document has no jwks_uri", 503)
        self.fetches += 1
        try:
            return KeySet.import_key_set(await self._get_json(uri))   # type: ignore[arg-type]
        except (JoseError, ValueError, TypeError, KeyError):
            raise SignInRefused("the sign-in issuer's key set (JWKS) is not one this broker "
                                "reads", 503) from None

    async def _get_json(self, url: str) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.ssl if self.ssl is not None else True),
                timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT))
        try:
            async with self._session.get(url) as r:
                body = await r.content.read(MAX_DOCUMENT + 1)
                status = r.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise SignInRefused(f"cannot reach the sign-in issuer at {url}: "
                                f"{exc or type(exc).__name__}", 503) from None
        if status != 200 or len(body) > MAX_DOCUMENT:
            raise SignInRefused(f"the sign-in issuer answered {url} with {status}", 503)
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            doc = None
        if not isinstance(doc, dict):
            raise SignInRefused(f"the sign-in issuer's {url} is not a JSON object", 503)
        return doc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _find(keys: KeySet, kid: str | None, alg: str) -> Any:
    try:
        return keys.get_by_kid(kid, {"alg": alg}) if kid is not None else \
            keys.get_by_kid(None)
    except (InvalidKeyIdError, JoseError):
        return None
