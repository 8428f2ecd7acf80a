"""Who may use the console: a one-time token for a session cookie, CSRF, Origin and Host.

The console listens on loopback, but every web page the user opens can send requests there
and any name can be made to resolve to 127.0.0.1 (DNS rebinding), so:
- a request whose Host is not this console's own address is refused (rebinding);
- nothing but the login is served without the session cookie, which is HttpOnly and
  SameSite=Strict and is only given for a login token: random, kept only as its hash,
  good once and for a few minutes (`p2pbackup web` asks the daemon for a fresh one);
- a request that changes anything must carry the session's CSRF token (a header or a form
  field) and an Origin that is the console's own.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

TOKEN_TTL = 300.0          # seconds a login token is good for
SESSION_TTL = 12 * 3600.0  # seconds a session lasts
MAX_TOKENS = 64            # outstanding login tokens kept (the oldest go first)
MAX_SESSIONS = 64
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOGIN_PATH = "/login"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf"
# Everything the pages load comes from the console itself: no third-party request, no inline
# script, and no framing (clickjacking).
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(slots=True)
class Session:
    csrf: str
    expires: float


SESSION = web.RequestKey("session", Session)


class Gate:
    """Login tokens and sessions, kept in memory only as hashes; `now` is injectable."""

    def __init__(self, *, now: Callable[[], float] = time.time, token_ttl: float = TOKEN_TTL,
                 session_ttl: float = SESSION_TTL) -> None:
        self.now = now
        self.token_ttl = token_ttl
        self.session_ttl = session_ttl
        self._tokens: dict[bytes, float] = {}
        self._sessions: dict[bytes, Session] = {}
        self.hosts: frozenset[str] = frozenset()
        self.port = 0
        self.base_url = ""  # set behind a reverse proxy: the only origin changes come from

    def bind(self, listen: str, port: int) -> None:
        """The address the console answers on: the Host headers it accepts."""
        self.port = port
        names = {"127.0.0.1", "localhost"} if listen == "127.0.0.1" else {"[::1]", "localhost"}
        self.hosts = frozenset(f"{n}:{port}" for n in names)

    def bind_proxied(self, base_url: str) -> None:
        """Behind a reverse proxy (a Unix socket): the proxy's address is the only Host and
        origin, as the browser sees it."""
        from urllib.parse import urlsplit

        self.base_url = base_url.rstrip("/")
        self.hosts = frozenset({urlsplit(self.base_url).netloc})

    @property
    def secure(self) -> bool:
        return self.base_url.startswith("https://")

    @property
    def cookie_name(self) -> str:
        # Cookies ignore ports: two consoles on one machine (two homes) must not share one.
        return f"p2pbackup_session_{self.port}"

    def _expire(self) -> None:
        now = self.now()
        self._tokens = {h: t for h, t in self._tokens.items() if t > now}
        self._sessions = {h: s for h, s in self._sessions.items() if s.expires > now}

    def issue_token(self) -> str:
        self._expire()
        token = secrets.token_urlsafe(32)
        self._tokens[_digest(token)] = self.now() + self.token_ttl
        while len(self._tokens) > MAX_TOKENS:
            del self._tokens[next(iter(self._tokens))]
        return token

    def redeem(self, token: str) -> tuple[str, Session] | None:
        """A new session for a valid token, which is spent; None for any other."""
        self._expire()
        if self._tokens.pop(_digest(token), None) is None:
            return None
        sid = secrets.token_urlsafe(32)
        session = Session(secrets.token_urlsafe(32), self.now() + self.session_ttl)
        self._sessions[_digest(sid)] = session
        while len(self._sessions) > MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        return sid, session

    def session(self, request: web.Request) -> Session | None:
        sid = request.cookies.get(self.cookie_name)
        if not sid:
            return None
        self._expire()
        return self._sessions.get(_digest(sid))

    def own_origin(self, request: web.Request) -> str:
        return self.base_url or f"http://{request.host}"


def _refuse(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", content_type="text/plain",
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"})


def middleware(gate: Gate) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def guard(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if request.host not in gate.hosts:
            return _refuse(421, "this console answers only at its own address "
                           "(open it with `p2pbackup web`)")
        if request.path == LOGIN_PATH and request.method == "GET":
            response = await _login(gate, request)
        else:
            session = gate.session(request)
            if session is None:
                return _refuse(401, "not signed in: open the console with `p2pbackup web`, "
                               "which prints a fresh address to sign in with")
            if request.method not in SAFE_METHODS:
                refused = await _check_change(gate, request, session)
                if refused is not None:
                    return refused
            request[SESSION] = session
            response = await handler(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    return guard


async def _check_change(gate: Gate, request: web.Request, session: Session
                        ) -> web.Response | None:
    """A state-changing request must come from the console's own page (Origin) and carry the
    session's CSRF token; a cross-site form or fetch has neither."""
    origin = request.headers.get("Origin")
    if origin != gate.own_origin(request):
        return _refuse(403, f"refused: a change must come from the console's own page "
                       f"(Origin {origin or 'missing'})")
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.content_type in ("application/x-www-form-urlencoded",
                                                 "multipart/form-data"):
        sent = str((await request.post()).get(CSRF_FIELD, ""))
    if not sent or not hmac.compare_digest(sent.encode(), session.csrf.encode()):
        return _refuse(403, "refused: the request has no valid CSRF token (reload the page)")
    return None


async def _login(gate: Gate, request: web.Request) -> web.StreamResponse:
    got = gate.redeem(request.query.get("token", ""))
    if got is None:
        return _refuse(401, "this sign-in address is not valid (each works once, for "
                       f"{int(gate.token_ttl // 60)} minutes): run `p2pbackup web` for a new one")
    sid, _ = got
    # Redirected at once, so the token leaves the address bar and the history.
    response = web.Response(status=303, headers={"Location": "/"})
    response.set_cookie(gate.cookie_name, sid, httponly=True, samesite="Strict", path="/",
                        max_age=int(gate.session_ttl), secure=gate.secure)
    return response
