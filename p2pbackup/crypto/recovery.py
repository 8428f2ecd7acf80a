"""Recovery codes: the account key as typable groups of Crockford base32 plus a checksum.

Crockford's alphabet has no I, L, O or U, and reading treats I/L as 1 and O as 0, so the
usual misreadings decode to the intended symbol; the 16-bit checksum catches the rest.
"""

from __future__ import annotations

import blake3

from ..errors import WrongKey

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE = {c: i for i, c in enumerate(ALPHABET)}
_DECODE.update({"I": 1, "L": 1, "O": 0})
GROUP = 5
_KEY_BITS = 256
_CHECK_BITS = 16


class RecoveryCodeError(WrongKey, ValueError):
    """{}"""
    # A WrongKey: a mistyped code is a wrong key caught early, by its checksum (exit 15).


def _checksum(key: bytes) -> int:
    return int.from_bytes(blake3.blake3(b"p2pbackup recovery" + key).digest()[:2], "big")


def encode(account_key: bytes) -> str:
    """Return the recovery code for a 32-byte account key, e.g. `7KQ2M-...` (11 groups)."""
    if len(account_key) != 32:
        raise ValueError("the account key must be 32 bytes")
    value = (int.from_bytes(account_key, "big") << _CHECK_BITS) | _checksum(account_key)
    nbits = _KEY_BITS + _CHECK_BITS
    nchars = -(-nbits // 5)
    value <<= nchars * 5 - nbits
    chars = [ALPHABET[(value >> (5 * (nchars - 1 - i))) & 31] for i in range(nchars)]
    text = "".join(chars)
    return "-".join(text[i:i + GROUP] for i in range(0, len(text), GROUP))


def decode(code: str) -> bytes:
    """Return the account key of a recovery code; spaces, dashes and case do not matter."""
    text = "".join(ch for ch in code.upper() if ch not in " -\t\n")
    nbits = _KEY_BITS + _CHECK_BITS
    nchars = -(-nbits // 5)
    if len(text) != nchars:
        raise RecoveryCodeError(
            f"a recovery code has {nchars} characters (not counting dashes); this one has {len(text)}"
        )
    value = 0
    for pos, ch in enumerate(text, 1):
        if ch not in _DECODE:
            raise RecoveryCodeError(f"character {pos} ({ch!r}) cannot appear in a recovery code")
        value = (value << 5) | _DECODE[ch]
    value >>= nchars * 5 - nbits
    key = (value >> _CHECK_BITS).to_bytes(32, "big")
    if value & ((1 << _CHECK_BITS) - 1) != _checksum(key):
        raise RecoveryCodeError("the recovery code has a typo: its checksum does not match")
    return key
