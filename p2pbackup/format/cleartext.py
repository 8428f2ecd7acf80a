"""Objects that are signed but not sealed, so that a device without the key that would open
them can still check who wrote them: removal records and rosters (a storage partner holds no
key but knows the owners' public keys) and keyring envelopes (a member, or a partner, checks
the recovery signer without being able to open the keyring).

    header(kind, flags 0) | Signed{type, body, dev, sig}    (the envelope of records.py)
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import IntegrityError
from .header import FORMAT_VERSION, HEADER_SIZE, ObjectHeader
from .records import Signed


def clear_object(kind: int, signed: Signed) -> bytes:
    """`signed` (made with `Signed.make`) behind an object header of `kind`."""
    body = signed.encode()
    return ObjectHeader(FORMAT_VERSION, kind, 0, len(body)).encode() + body


def open_clear(data: bytes | bytearray | memoryview, kind: int, noun: str, what: str) -> Signed:
    """The signed envelope inside a whole object of `kind` (a `noun`); its signature unchecked."""
    header = ObjectHeader.decode(data, what)
    if header.kind != kind or header.length != len(data) - HEADER_SIZE:
        raise IntegrityError(f"{what} is not a whole {noun}")
    return Signed.decode(bytes(data[HEADER_SIZE:]), what)


def check_owner_signed(signed: Signed, sig_type: str,
                       owner_key: Callable[[str], bytes | None],
                       verify: Callable[[bytes, bytes, bytes], bool], what: str) -> None:
    """IntegrityError unless an owner device (`owner_key(id)` is its key) signed it as a record
    of `sig_type` (a version-1 envelope only for the types records.LEGACY_SIGNED names)."""
    key = owner_key(signed.device)
    if key is None:
        raise IntegrityError(f"{what} is signed by {signed.device[:12]!r}, which is not an owner "
                             "device of the account")
    if not signed.verifies(sig_type, key, verify):
        raise IntegrityError(f"{what} has a bad signature")
