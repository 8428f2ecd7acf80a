"""Objects that are signed but not sealed, so that a storage partner (which holds no key but
knows the owners' public keys) can check them: removal records and rosters.

    header(kind, flags 0) | Signed{body, dev, sig}
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import IntegrityError
from .header import FORMAT_VERSION, HEADER_SIZE, ObjectHeader
from .records import Signed


def clear_object(kind: int, body: bytes, device: str, sign: Callable[[bytes], bytes]) -> bytes:
    """`body` signed by `device`, behind an object header of `kind`."""
    signed = Signed(body, device, sign(body)).encode()
    return ObjectHeader(FORMAT_VERSION, kind, 0, len(signed)).encode() + signed


def open_clear(data: bytes | bytearray | memoryview, kind: int, noun: str, what: str) -> Signed:
    """The signed record inside a whole object of `kind` (a `noun`); its signature unchecked."""
    header = ObjectHeader.decode(data, what)
    if header.kind != kind or header.length != len(data) - HEADER_SIZE:
        raise IntegrityError(f"{what} is not a whole {noun}")
    return Signed.decode(bytes(data[HEADER_SIZE:]), what)


def check_owner_signed(signed: Signed, owner_key: Callable[[str], bytes | None],
                       verify: Callable[[bytes, bytes, bytes], bool], what: str) -> None:
    """IntegrityError unless an owner device (`owner_key(id)` is its key) signed it."""
    key = owner_key(signed.device)
    if key is None:
        raise IntegrityError(f"{what} is signed by {signed.device[:12]!r}, which is not an owner "
                             "device of the account")
    if not verify(key, signed.body, signed.signature):
        raise IntegrityError(f"{what} has a bad signature")
