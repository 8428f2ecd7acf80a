"""Identifiers that arrive from other devices, checked to their exact form before use.

Another device (a pairing host, a peer, a partner's owner, an mDNS neighbour) may send any
string where an id belongs; ids become file names (grants, store objects), so each is checked
here, once, to its one exact form: lowercase hex of the right length, or a fixed-width
decimal sequence number. Nothing else (no "..", "/", upper case, or Unicode digits) passes.
The object name patterns of a store are built from the same pieces.
"""

from __future__ import annotations

import re

ACCOUNT_HEX = 16   # an account fingerprint (crypto.keys.AccountKeys.fingerprint)
DEVICE_HEX = 32    # a device id (crypto.identity.device_id_for)
DIGEST_HEX = 64    # a content address: pack, snapshot and removal names (BLAKE3)
SEQ_DIGITS = 12    # a log segment's or membership version's sequence number in a name
TAG_HEX = 16       # a discovery tag in an mDNS TXT record (crypto.tags.discovery_tag)

ACCOUNT_RX = f"[0-9a-f]{{{ACCOUNT_HEX}}}"
DEVICE_RX = f"[0-9a-f]{{{DEVICE_HEX}}}"
DIGEST_RX = f"[0-9a-f]{{{DIGEST_HEX}}}"
SEQ_RX = f"[0-9]{{{SEQ_DIGITS}}}"
EPOCH_RX = "[0-9]{6}"

# Every name a store holds for the account, by kind, in the order a peer sends them (objects
# later in the list are checked against earlier ones: device records before snapshots, the
# roster before what its members push).
OBJECT_NAMES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(rx)) for kind, rx in (
        ("config", "config"),
        ("membership", f"membership/({SEQ_RX})"),
        ("roster", f"roster/({SEQ_RX})"),
        ("device", f"devices/({DEVICE_RX})"),
        ("keyring", f"keyring/({EPOCH_RX})"),
        ("pack", f"packs/({DIGEST_RX})"),
        ("segment", f"segments/({DEVICE_RX})/({SEQ_RX})"),
        ("anchor", f"segments/({DEVICE_RX})/anchor"),
        ("snapshot", f"snapshots/({DIGEST_RX})"),
        ("head", f"heads/({DEVICE_RX})"),
        ("removal", f"removals/({DIGEST_RX})"),
    ))

_ACCOUNT = re.compile(ACCOUNT_RX)
_DEVICE = re.compile(DEVICE_RX)
_TAG = re.compile(f"[0-9a-f]{{{TAG_HEX}}}")


def is_account(value: object) -> bool:
    """True for an account fingerprint: exactly 16 lowercase hex digits."""
    return isinstance(value, str) and _ACCOUNT.fullmatch(value) is not None


def is_device(value: object) -> bool:
    """True for a device id: exactly 32 lowercase hex digits."""
    return isinstance(value, str) and _DEVICE.fullmatch(value) is not None


def is_tag(value: object) -> bool:
    """True for a discovery tag: exactly 16 lowercase hex digits (anything else in a TXT
    record is a stranger's)."""
    return isinstance(value, str) and _TAG.fullmatch(value) is not None


def object_kind(name: object) -> tuple[str, re.Match[str]] | None:
    """The kind of store object `name` names and its parts (ids, seq), or None if it is not
    exactly a name p2pbackup writes."""
    if not isinstance(name, str):
        return None
    for kind, rx in OBJECT_NAMES:
        m = rx.fullmatch(name)
        if m:
            return kind, m
    return None


def shown(value: object, limit: int = 40) -> str:
    """`value` for a one-line message, however long or odd it is."""
    return repr(value if not isinstance(value, str) else value[:limit])
