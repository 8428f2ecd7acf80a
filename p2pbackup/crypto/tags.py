"""Rotating discovery tags: members of one account recognise each other's mDNS adverts (and
which device each is), while nobody else can link two adverts to one account or device.

Members tag with a key derived from the newest key epoch's record key, which every current
member holds (a scoped member too) and a device removed before that epoch does not: after a
removal, the removed device no longer recognises anyone's adverts. A member that has not taken
the newest epoch yet still advertises with its older key, so members recognise with every
epoch's key, newest first. A storage partner tags with its own key, one for all the accounts
it stores for, which it gave each account at pairing (so its one advert does not say how many
accounts it serves).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from ..ids import is_tag
from .kdf import hkdf_sha256

TAG_PERIOD = 300  # seconds a tag stays valid


def member_tag_key(record_key: bytes) -> bytes:
    """The key members tag their adverts with in the epoch whose record key is `record_key`."""
    return hkdf_sha256(record_key, salt=b"p2pbackup discovery", info=b"member tags v1")


def member_tag_keys(record_keys: dict[int, bytes]) -> list[bytes]:
    """Every epoch's member tag key, newest first: the first is the one to advertise with."""
    return [member_tag_key(record_keys[e]) for e in sorted(record_keys, reverse=True)]


def discovery_tag(tag_key: bytes, device_id: str, now: float, period: int = TAG_PERIOD) -> str:
    """The tag device `device_id` advertises in the time window holding `now` (16 hex chars)."""
    window = int(now // period)
    msg = b"p2pbackup discovery\x00" + device_id.encode() + b"\x00" + str(window).encode()
    return hmac.new(tag_key, msg, hashlib.sha256).hexdigest()[:16]


def which_device(tag_key: bytes, tag: str, devices: Iterable[str], now: float,
                 period: int = TAG_PERIOD) -> str | None:
    """The device among `devices` whose tag `tag` is (this window or a neighbouring one)."""
    if not tag_key or not is_tag(tag):   # a stranger's TXT may hold anything
        return None
    for device in devices:
        for d in (-1, 0, 1):
            if hmac.compare_digest(tag, discovery_tag(tag_key, device, now + d * period, period)):
                return device
    return None
