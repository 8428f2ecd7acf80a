"""A local OpenID Connect issuer for tests: an aiohttp app on a free 127.0.0.1 port, in a thread
of its own (so that tests running the CLI or a broker in a subprocess can block while it
answers), serving the discovery document and the JWKS, and minting tokens with its RSA or EC
keys, or hand-built hostile ones (`alg: none`, HS256 keyed with the public key)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

AUDIENCE = "p2pbackup-broker-test"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class LocalIssuer:
    url: str = ""
    keys: dict[str, Any] = field(default_factory=dict)    # kid -> private key, published
    jwks_fetches: int = 0
    # The device authorization grant (RFC 8628), when `device_flow`: each code is pending at
    # its first poll, then signed in as `signs_in` (a sub), or refused if that is None.
    device_flow: bool = False
    signs_in: str | None = "alice"
    polls: dict[str, int] = field(default_factory=dict)

    def add_key(self, kid: str, kind: str = "RSA") -> Any:
        key = RSAKey.generate_key(2048, {"kid": kid}) if kind == "RSA" else \
            ECKey.generate_key("P-256", {"kid": kid})
        self.keys[kid] = key
        return key

    def claims(self, sub: str = "alice", **over: Any) -> dict[str, Any]:
        now = int(time.time())
        doc = {"iss": self.url, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 600}
        doc.update(over)
        return {k: v for k, v in doc.items() if v is not None}

    def token(self, sub: str = "alice", *, kid: str | None = None, key: Any = None,
              **over: Any) -> str:
        """A token signed by the published key `kid` (the first one by default), or `key`."""
        kid = kid or next(iter(self.keys))
        key = key or self.keys[kid]
        alg = "RS256" if isinstance(key, RSAKey) else "ES256"
        return jwt.encode({"alg": alg, "kid": kid}, self.claims(sub, **over), key)

    def unsigned(self, sub: str = "alice") -> str:
        """`alg: none`: no signature at all."""
        return ".".join([_b64(json.dumps({"alg": "none", "typ": "JWT"}).encode()),
                         _b64(json.dumps(self.claims(sub)).encode()), ""])

    def hmac_with_public_key(self, sub: str = "alice") -> str:
        """HS256 whose secret is the issuer's public key (PEM): anyone can make it; a verifier
        that lets the token pick the algorithm takes it."""
        kid = next(iter(self.keys))
        secret = self.keys[kid].as_pem(private=False)
        head = _b64(json.dumps({"alg": "HS256", "kid": kid, "typ": "JWT"}).encode())
        body = _b64(json.dumps(self.claims(sub)).encode())
        sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
        return f"{head}.{body}.{_b64(sig)}"

    def app(self) -> web.Application:
        async def discovery(request: web.Request) -> web.Response:
            doc = {"issuer": self.url, "jwks_uri": f"{self.url}/jwks",
                   "id_token_signing_alg_values_supported": ["RS256", "ES256"]}
            if self.device_flow:
                doc |= {"device_authorization_endpoint": f"{self.url}/device",
                        "token_endpoint": f"{self.url}/token"}
            return web.json_response(doc)

        async def device(request: web.Request) -> web.Response:
            form = await request.post()
            assert form["client_id"] == AUDIENCE and "openid" in str(form["scope"])
            code = f"dc-{len(self.polls)}"
            self.polls[code] = 0
            return web.json_response({"device_code": code, "user_code": "WDJB-MJHT",
                                      "verification_uri": f"{self.url}/activate",
                                      "expires_in": 600, "interval": 1})

        async def token(request: web.Request) -> web.Response:
            form = await request.post()
            code = str(form["device_code"])
            assert form["grant_type"] == "urn:ietf:params:oauth:grant-type:device_code"
            self.polls[code] += 1
            if self.polls[code] == 1:
                return web.json_response({"error": "authorization_pending"}, status=400)
            if self.signs_in is None:
                return web.json_response({"error": "access_denied"}, status=400)
            return web.json_response({"id_token": self.token(self.signs_in),
                                      "access_token": "opaque", "token_type": "Bearer"})

        async def jwks(request: web.Request) -> web.Response:
            self.jwks_fetches += 1
            return web.json_response({"keys": [k.as_dict(private=False)
                                               for k in self.keys.values()]})

        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/jwks", jwks)
        app.router.add_post("/device", device)
        app.router.add_post("/token", token)
        return app


@contextlib.contextmanager
def local_issuer() -> Iterator[LocalIssuer]:
    """A LocalIssuer with one RSA key ("k1"), served until the block ends."""
    issuer = LocalIssuer()
    issuer.add_key("k1")
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(issuer.app())

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        issuer.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield issuer
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
