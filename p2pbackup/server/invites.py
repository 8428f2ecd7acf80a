"""One-time invitations to register an account on the storage server.

The operator runs `p2pbackup-server invite`, which prints a token once; the server keeps only
its SHA-256 (a leaked data directory registers nobody) with an expiry, in `DIR/invites`:

    msgpack {v: 1, tokens: {sha256 hex: expires (Unix ns)}}

A device registers its account with the token (p2pbackup/server/storage.py), which spends it.
The file is changed under an flock: `invite` may run while the server does.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import msgpack

VERSION = 1
FILE = "invites"


def digest(token: str) -> str:
    """What is kept of a token (the broker keeps its invitations' in its state too)."""
    return hashlib.sha256(token.strip().encode()).hexdigest()


@contextlib.contextmanager
def _tokens(data: Path) -> Iterator[dict[str, int]]:
    """The tokens, locked; changes to the dict are written back atomically."""
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(data / (FILE + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = data / FILE
        try:
            doc = msgpack.unpackb(path.read_bytes(), raw=False)
            tokens = {str(k): int(v) for k, v in doc["tokens"].items()} \
                if doc.get("v") == VERSION else {}
        except FileNotFoundError:
            tokens = {}
        before = dict(tokens)
        yield tokens
        if tokens != before:
            tmp = path.with_name(FILE + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(msgpack.packb({"v": VERSION, "tokens": tokens}))
            os.replace(tmp, path)


def create(data: Path, lifetime_s: float, now_ns: int) -> str:
    """A new token, valid for `lifetime_s` seconds."""
    token = secrets.token_urlsafe(24)
    with _tokens(data) as tokens:
        for k in [k for k, exp in tokens.items() if exp <= now_ns]:
            del tokens[k]
        tokens[digest(token)] = now_ns + int(lifetime_s * 1e9)
    return token


def spend(data: Path, token: str, now_ns: int) -> bool:
    """True (and the token is gone) if `token` is a valid, unexpired invitation."""
    with _tokens(data) as tokens:
        expires = tokens.pop(digest(token), None)
        return expires is not None and expires > now_ns
