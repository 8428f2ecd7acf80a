"""Signed requests to the storage server (sans-I/O: the client signs, the server checks).

Every request carries four headers: the device id, the time (Unix seconds), a random nonce and
an Ed25519 signature by that device over

    "p2pbackup-server request v1\\n" method \\n path \\n query \\n BLAKE3(body) hex \\n
    device \\n time \\n nonce

where `path` is the API path from `v1/` on (a reverse proxy may mount the server under a
prefix) and `query` the raw query string. The server admits the signature only from a device
the account's roster lists (or its recovery signer, for reads), within `MAX_SKEW` seconds of
its own clock, and each nonce once (`NonceCache`): a request captured from a log or the wire
is worth nothing a few minutes later, and nothing at all a second time. No password or
bearer token exists to leak.
"""

from __future__ import annotations

import base64
import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import blake3

from ..ids import is_device

DOMAIN = b"p2pbackup-server request v1\n"
API = "v1/"
DEVICE = "X-P2PB-Device"
TIME = "X-P2PB-Time"
NONCE = "X-P2PB-Nonce"
SIGNATURE = "X-P2PB-Signature"
INVITE = "X-P2PB-Invite"      # on the roster PUT that registers an account
MAX_SKEW = 300                # seconds a request's time may differ from the server's clock
NONCE_HEX = 32


@dataclass(frozen=True, slots=True)
class RequestSignature:
    """The signature headers of one request, parsed (not yet checked)."""

    device: str
    time: int
    nonce: str
    signature: bytes


def body_digest(body: bytes | bytearray | memoryview) -> str:
    return blake3.blake3(body).hexdigest()


def message(method: str, path: str, query: str, digest: str, device: str, time: int,
            nonce: str, domain: bytes = DOMAIN) -> bytes:
    """The bytes a request's signature covers (`domain`: which service it is for, so that a
    request signed for one is worth nothing at another)."""
    return domain + "\n".join((method.upper(), path, query, digest, device, str(time),
                               nonce)).encode()


def sign(device: str, sign_bytes: Callable[[bytes], bytes], method: str, path: str,
         query: str, body: bytes | bytearray | memoryview, now: float,
         domain: bytes = DOMAIN) -> dict[str, str]:
    """The headers that sign one request as `device` (whose key `sign_bytes` signs with)."""
    nonce = secrets.token_hex(NONCE_HEX // 2)
    t = int(now)
    sig = sign_bytes(message(method, path, query, body_digest(body), device, t, nonce, domain))
    return {DEVICE: device, TIME: str(t), NONCE: nonce,
            SIGNATURE: base64.b64encode(sig).decode()}


def parse(headers: Mapping[str, str]) -> RequestSignature | None:
    """The signature headers, or None if any is missing or malformed."""
    try:
        device, nonce = headers[DEVICE], headers[NONCE]
        t = int(headers[TIME])
        sig = base64.b64decode(headers[SIGNATURE], validate=True)
    except (KeyError, ValueError):
        return None
    if not is_device(device) or len(nonce) != NONCE_HEX or \
            any(c not in "0123456789abcdef" for c in nonce) or len(sig) != 64:
        return None
    return RequestSignature(device, t, nonce, sig)


def stale(t: int, now: float, not_before: float = 0.0) -> str | None:
    """Why a request stamped `t` is refused at `now`, or None. Requests stamped before
    `not_before` (the server's start: its nonce cache is in memory) could be replays."""
    if abs(t - now) > MAX_SKEW:
        return (f"the request is stamped {t}, the server's clock says {int(now)}: more than "
                f"{MAX_SKEW} s apart (check this device's clock)")
    if t < int(not_before):
        return "the request is stamped before the server started: sign it again"
    return None


class NonceCache:
    """The nonces seen within the last `MAX_SKEW` seconds (older requests are stale anyway),
    at most `limit` of them: when full of unexpired nonces, new requests are refused rather
    than an unexpired nonce forgotten (which would let its request be replayed)."""

    def __init__(self, limit: int = 1_000_000) -> None:
        self.limit = limit
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    def add(self, device: str, nonce: str, now: float) -> str | None:
        """Note one request's nonce; why it is refused (a replay, or the cache is full), or
        None when it is new."""
        while self._seen:
            key, at = next(iter(self._seen.items()))
            if now - at <= 2 * MAX_SKEW:
                break
            del self._seen[key]
        if (device, nonce) in self._seen:
            return "a replayed request (its nonce was used already)"
        if len(self._seen) >= self.limit:
            return "the server is busy (too many requests in the last minutes): try again later"
        self._seen[(device, nonce)] = now
        return None
