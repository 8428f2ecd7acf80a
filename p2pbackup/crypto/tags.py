"""Rotating discovery tags: members of one account recognise each other's mDNS adverts (and
which device each is), while nobody else can link two adverts to one account or device.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

TAG_PERIOD = 300  # seconds a tag stays valid


def partner_tag_key(meta_id_key: bytes) -> bytes:
    """The key a storage partner's adverts are tagged with: given to the partner at pairing,
    it lets the account's devices recognise the partner and teaches the partner nothing else."""
    return hmac.new(meta_id_key, b"p2pbackup partner tags", hashlib.sha256).digest()


def discovery_tag(tag_key: bytes, device_id: str, now: float, period: int = TAG_PERIOD) -> str:
    """The tag device `device_id` advertises in the time window holding `now` (16 hex chars)."""
    window = int(now // period)
    msg = b"p2pbackup discovery\x00" + device_id.encode() + b"\x00" + str(window).encode()
    return hmac.new(tag_key, msg, hashlib.sha256).hexdigest()[:16]


def which_device(tag_key: bytes, tag: str, devices: Iterable[str], now: float,
                 period: int = TAG_PERIOD) -> str | None:
    """The device among `devices` whose tag `tag` is (this window or a neighbouring one)."""
    for device in devices:
        for d in (-1, 0, 1):
            if hmac.compare_digest(tag, discovery_tag(tag_key, device, now + d * period, period)):
                return device
    return None
