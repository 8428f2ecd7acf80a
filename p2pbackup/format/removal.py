"""Removal records: an owner device's signed word that objects were forgotten or pruned.

Peers never delete on request; they delete what a removal record lists once it is older than
their grace period, and they stop fetching what it lists from other peers. The record is
signed but not encrypted, so a storage partner (which holds no key but knows the owners'
public keys) can check it: it names objects the partner holds anyway and nothing else.

    header(kind REMOVAL, flags 0) | Signed{type removal, body: msgpack {v, device, time, names,
                                                                    [account]}}

`account` (added within version 1, so readers before it skip it and hold the record as one
that lists nothing) is the fingerprint of an account the owner deleted (`p2pbackup account
delete`): a keeper of its objects that reads it (a storage partner, the storage server)
forgets the whole account at once, grant and data.

Records written before envelope version 2 (no type) are still read (records.LEGACY_SIGNED).

Stored as `removals/<BLAKE3 of the object>`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import blake3
import msgpack

from ..errors import IntegrityError
from ..ids import is_account, object_kind
from .cleartext import check_owner_signed, clear_object, open_clear
from .header import Kind
from .records import REMOVAL_SIG, Signed

VERSION = 1
PREFIX = "removals/"
REMOVABLE = ("packs/", "snapshots/", "segments/")
_REMOVABLE_KINDS = ("pack", "snapshot", "segment")
MAX_NAMES = 1_000_000


@dataclass(frozen=True, slots=True)
class Removal:
    device: str
    time_ns: int
    names: tuple[str, ...]
    account: str = ""      # set: the whole account is deleted (its keepers forget it)


def removal_object(r: Removal, sign: Callable[[bytes], bytes]) -> bytes:
    """The signed object for `r`."""
    doc = {"v": VERSION, "device": r.device, "time": r.time_ns, "names": list(r.names)}
    if r.account:
        doc["account"] = r.account
    body = msgpack.packb(doc, use_bin_type=True)
    return clear_object(Kind.REMOVAL, Signed.make(REMOVAL_SIG, body, r.device, sign))


def removal_name(data: bytes) -> str:
    return PREFIX + blake3.blake3(data).hexdigest()


def read_removal(data: bytes, key_of: Callable[[str], bytes | None],
                 verify: Callable[[bytes, bytes, bytes], bool], what: str = "removal record"
                 ) -> Removal:
    """Check and decode a removal record; `key_of(device)` is an owner's key or None."""
    signed = open_clear(data, Kind.REMOVAL, "removal record", what)
    check_owner_signed(signed, REMOVAL_SIG, key_of, verify, what)
    try:
        doc = msgpack.unpackb(signed.body, raw=False, max_array_len=MAX_NAMES)
        names = tuple(str(n) for n in doc["names"])
        r = Removal(str(doc["device"]), int(doc["time"]), names, doc.get("account", ""))
    except Exception as exc:  # signed, yet malformed: a bug or a newer writer
        raise IntegrityError(f"{what} is malformed ({exc})") from None
    if r.device != signed.device or doc.get("v") != VERSION:
        raise IntegrityError(f"{what} is of another version or device than its signature")
    if r.account and not is_account(r.account):
        raise IntegrityError(f"{what} deletes an account that is not an account fingerprint")
    # Only data can be removed: never the config, membership, keys, devices or heads; and
    # only by its exact object name (a name from a record becomes a file name to delete).
    return Removal(r.device, r.time_ns, tuple(n for n in names if _removable(n)), r.account)


def _removable(name: str) -> bool:
    got = object_kind(name)
    return got is not None and got[0] in _REMOVABLE_KINDS
