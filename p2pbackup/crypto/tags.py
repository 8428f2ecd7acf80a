"""Rotating discovery tags: members of one account recognise each other's mDNS adverts,
nobody else can link two adverts to one account or device over time.
"""

from __future__ import annotations

import hashlib
import hmac

TAG_PERIOD = 300  # seconds a tag stays valid


def discovery_tag(tag_key: bytes, now: float, period: int = TAG_PERIOD) -> str:
    """The tag for the time window holding `now` (16 hex characters)."""
    window = int(now // period)
    return hmac.new(tag_key, b"p2pbackup discovery " + str(window).encode(),
                    hashlib.sha256).hexdigest()[:16]


def recognises(tag_key: bytes, tag: str, now: float, period: int = TAG_PERIOD) -> bool:
    """True if `tag` is this account's for the current window or a neighbouring one (clock skew)."""
    return any(hmac.compare_digest(tag, discovery_tag(tag_key, now + d * period, period))
               for d in (-1, 0, 1))
