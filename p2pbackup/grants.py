"""What a storage partner keeps about the accounts it stores for, in its home.

    partners/<account>.grant          one per account: msgpack {v: 1, account, quota, since,
                                      host, roster, owners}
    partners/<account>/store/         the account's ciphertext
    partners/<account>/removals-first-seen   when each removal record was first held here
    partners/tag.key                  this partner's own discovery tag key: one for every
                                      account, so its one advert says nothing of how many

`roster` is the newest roster object the partner took (format/roster.py): who may connect and
push, and who may remove. `owners` ([device id, key] pairs) is still written for versions
before rosters; it is read only from a grant without a roster (then every device listed may
connect and push, and none may remove: pair again to get a roster).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import msgpack

from . import ids

log = logging.getLogger("p2pbackup.grants")
VERSION = 1
TAG_KEY_FILE = "tag.key"
TAG_KEY_SIZE = 32


@dataclass(slots=True)
class GrantFile:
    """One account a partner stores for, as its file says."""

    account: str
    quota: int | None
    roster: bytes                              # b"": a grant from before rosters
    owners: list[tuple[str, bytes]]
    since: int
    host: str

    def encode(self) -> bytes:
        return msgpack.packb({"v": VERSION, "account": self.account, "quota": self.quota,
                              "since": self.since, "host": self.host, "roster": self.roster,
                              "owners": [[d, k] for d, k in self.owners]}, use_bin_type=True)


def since_ns(grant: GrantFile) -> int:
    """When the grant was made, in ns (the storage server wrote seconds before it wrote ns:
    a number too small to be ns is seconds)."""
    return grant.since if grant.since >= 10**14 else grant.since * 10**9


def partners_dir(home: Path) -> Path:
    return home / "partners"


def account_dir(home: Path, account: str) -> Path:
    """Where an account's store and notes live; ValueError for anything but a fingerprint
    (the account comes from another device)."""
    if not ids.is_account(account):
        raise ValueError(f"{ids.shown(account)} is not an account fingerprint")
    return partners_dir(home) / account


def write_grant(home: Path, grant: GrantFile) -> None:
    """Write (or replace) the grant's file atomically."""
    account_dir(home, grant.account)   # the check, before any path is made of it
    directory = partners_dir(home)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = directory / f"{grant.account}.tmp"
    tmp.write_bytes(grant.encode())
    os.replace(tmp, directory / f"{grant.account}.grant")


def remove_grant(home: Path, account: str) -> None:
    """Forget an account: its grant file first (so a crash part-way leaves no grant pointing
    at half a store), then its folder (store, notes)."""
    where = account_dir(home, account)
    (partners_dir(home) / f"{account}.grant").unlink(missing_ok=True)
    shutil.rmtree(where, ignore_errors=True)


def read_grants(home: Path) -> list[GrantFile]:
    """The grants in `home/partners`, one per account; damaged, misnamed or newer ones are
    logged and skipped."""
    out = []
    for path in sorted(partners_dir(home).glob("*.grant")):
        try:
            doc = msgpack.unpackb(path.read_bytes(), raw=False)
            if not isinstance(doc, dict) or doc.get("v") != VERSION:
                log.warning("%s: a grant of another version; skipped (upgrade p2pbackup)", path)
                continue
            g = GrantFile(doc["account"], doc.get("quota"), bytes(doc.get("roster", b"")),
                          [(str(d), bytes(k)) for d, k in doc.get("owners", [])],
                          int(doc.get("since", 0)), str(doc.get("host", "")))
        except (OSError, ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            log.warning("%s is damaged (%s); skipped", path, exc)
            continue
        if not ids.is_account(g.account) or path.name != f"{g.account}.grant":
            log.warning("%s names account %s, not its own file name; skipped", path,
                        ids.shown(g.account))
            continue
        if g.quota is not None and not isinstance(g.quota, int):
            log.warning("%s has a malformed quota; skipped", path)
            continue
        out.append(g)
    return out


def tag_key(home: Path, *, create: bool = False) -> bytes | None:
    """This partner's own discovery tag key (made on first use when `create`)."""
    path = partners_dir(home) / TAG_KEY_FILE
    try:
        key = path.read_bytes()
        if len(key) == TAG_KEY_SIZE:
            return key
        log.warning("%s is damaged; a new one is made (pair again to be found)", path)
    except FileNotFoundError:
        pass
    if not create:
        return None
    key = secrets.token_bytes(TAG_KEY_SIZE)
    save_tag_key(home, key)
    return key


def save_tag_key(home: Path, key: bytes) -> None:
    directory = partners_dir(home)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = directory / (TAG_KEY_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    os.replace(tmp, directory / TAG_KEY_FILE)
