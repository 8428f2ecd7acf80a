"""Pack files: many sealed blobs in one file, with an encrypted list of them at the end.

    pack header (12 bytes, kind PACK) | blob object ... | trailer object | trailer length u32 BE

A pack's name is the BLAKE3 hash of its bytes, so anyone (a storage partner without keys
included) can check a pack's integrity; the trailer lets the index be rebuilt from packs alone.
The trailer is sealed with the record key of the pack's key epoch (epoch 0's is the meta key
every pack used before), so a device removed before that epoch cannot list the pack's blobs.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterable, Iterator, Sequence

import blake3

from ..buffers import aligned_buffer
from ..crypto.keys import blob_id as keyed_blob_id
from ..errors import IntegrityError, P2PError, UnsupportedFormat
from .header import FORMAT_VERSION, HEADER_SIZE, MAGIC, Kind, ObjectHeader
from .objects import open_object, open_with_any, seal_object
from .records import BlobRef, PackTrailer

PACK_HEADER = ObjectHeader(FORMAT_VERSION, Kind.PACK, 0, 0).encode()
_LEN = struct.Struct(">I")


def pack_name(data: bytes | memoryview) -> str:
    """The content address of a pack."""
    return blake3.blake3(data).hexdigest()


class PackBuilder:
    """Accumulates sealed blobs of one scope; not thread-safe (callers hold a lock)."""

    def __init__(self, scope: str, epoch: int, capacity: int = 1 << 20,
                 buffer: bytearray | mmap.mmap | None = None) -> None:
        self.scope = scope
        self.epoch = epoch
        # One buffer allocated up front (or recycled) and handed over as a view: appending to
        # a growing bytearray re-copies it, and joining parts would briefly double a pack.
        self._buf = buffer if buffer is not None else aligned_buffer(capacity + (capacity >> 4))
        self._buf[:len(PACK_HEADER)] = PACK_HEADER
        self.size = len(PACK_HEADER)
        self._refs: list[BlobRef] = []
        # Callers that seal blobs straight into the buffer (see `reserve`) count themselves
        # here while they write; the buffer never grows or moves while this is non-zero.
        self.writers = 0
        self.closed = False  # no more reservations: ship it once the writers are done

    def __len__(self) -> int:
        return len(self._refs)

    def _grow(self, end: int) -> None:
        more = end - len(self._buf) + (len(self._buf) >> 2)
        try:
            if isinstance(self._buf, mmap.mmap):
                self._buf.resize(len(self._buf) + more)
            else:
                self._buf.extend(bytes(more))
        except (BufferError, OSError, SystemError):
            # a view of it is still alive somewhere (or no mremap): move to a new buffer
            buf = aligned_buffer(len(self._buf) + more)
            buf[:self.size] = memoryview(self._buf)[:self.size]
            self._buf = buf

    def _append(self, data: bytes | memoryview) -> None:
        end = self.size + len(data)
        if end > len(self._buf):
            self._grow(end)
        self._buf[self.size:end] = data
        self.size = end

    def add(self, kind: int, blob_id: bytes, sealed: bytes | memoryview, raw_length: int) -> None:
        self._refs.append(BlobRef(kind, blob_id, self.size, len(sealed), raw_length))
        self._append(sealed)

    def reserve(self, kind: int, blob_id: bytes, length: int, raw_length: int) -> int | None:
        """Room for a sealed blob of `length` bytes, written later at the returned offset (into
        `buffer`); None if it does not fit and the buffer cannot grow now (writers)."""
        end = self.size + length
        if end > len(self._buf):
            if self.writers:
                return None
            self._grow(end)
        offset = self.size
        self._refs.append(BlobRef(kind, blob_id, offset, length, raw_length))
        self.size = end
        return offset

    @property
    def buffer_now(self) -> bytearray | mmap.mmap:
        """The buffer reserved blobs are written into (stable while `writers` is non-zero)."""
        return self._buf

    def finish(self, trailer_key: bytes) -> tuple[str, memoryview, PackTrailer]:
        """Return (name, bytes, trailer) of the finished pack; the builder is spent.

        `trailer_key` is the newest epoch's record key when the pack is written (also for a
        pack repair or prune rewrites from an older epoch's blobs), so a device removed before
        then cannot list its blobs; readers try every key they hold. The bytes are a view of `buffer`, which may be recycled once the view is released.
        """
        trailer = PackTrailer(self.scope, self.epoch, tuple(self._refs))
        sealed = seal_object(Kind.PACK_TRAILER, trailer.encode(), trailer_key)
        self._append(sealed)
        self._append(_LEN.pack(len(sealed)))
        self.buffer = self._buf
        data = memoryview(self._buf)[:self.size]
        self._buf = bytearray()
        return pack_name(data), data, trailer


def trailer_length(tail: bytes | memoryview, what: str) -> int:
    """How many bytes from the end of the pack the trailer object and length field take."""
    if len(tail) < _LEN.size:
        raise IntegrityError(f"{what} is truncated: too short to hold a trailer")
    (n,) = _LEN.unpack_from(tail, len(tail) - _LEN.size)
    return n + _LEN.size


def parse_trailer(tail: bytes | memoryview, pack_size: int,
                  keys: bytes | Sequence[tuple[int, bytes]], what: str) -> PackTrailer:
    """Decode a pack's trailer from the last bytes of the pack (at least trailer_length).

    `keys` are the (epoch, record key) pairs this device holds, newest epoch first (as
    AccountKeys.record_keys_newest_first gives them), or the one key that sealed it: the
    trailer is sealed with the record key of the newest epoch when the pack was written, which
    is tried in turn like any record's.
    """
    need = trailer_length(tail, what)
    if need > len(tail) or need > pack_size - HEADER_SIZE:
        raise IntegrityError(f"{what} is truncated or damaged: its trailer length is impossible")
    start = len(tail) - need
    sealed = memoryview(tail)[start:len(tail) - _LEN.size]
    if isinstance(keys, (bytes, bytearray)):
        body = open_object(sealed, keys, expect=Kind.PACK_TRAILER, what=f"{what} trailer")[1]
    else:
        _, body = open_with_any(sealed, keys, expect=Kind.PACK_TRAILER, what=f"{what} trailer",
                                not_held="or sealed in a key epoch this device does not hold")
    trailer = PackTrailer.decode(body, f"{what} trailer")
    limit = pack_size - need
    for ref in trailer.blobs:
        if ref.offset < HEADER_SIZE or ref.offset + ref.length > limit:
            raise IntegrityError(f"{what} trailer points outside the pack")
    return trailer


def check_pack_header(head: bytes | memoryview, what: str) -> None:
    """Check the first bytes of a pack (magic, version, kind)."""
    header = ObjectHeader.decode(head, what)
    if header.kind != Kind.PACK:
        raise IntegrityError(f"{what} is not a pack")


def check_pack_blobs(data: bytes | memoryview,
                     blobs: Iterable[tuple[int, bytes, int, int, int]], data_key: bytes,
                     id_key: bytes, what: str) -> None:
    """Every blob (kind, id, offset, length, raw length) of a pack decrypts to its raw length
    and hashes to its id; raises IntegrityError naming the first that does not."""
    view = memoryview(data)
    size = len(view)
    for kind, blob_id, offset, length, raw_length in blobs:
        label = f"blob {blob_id.hex()[:12]} in {what}"
        if offset < 0 or length < 0 or offset + length > size:
            raise IntegrityError(f"{what}: blob {blob_id.hex()[:12]} lies outside the pack")
        try:
            plain = open_object(view[offset:offset + length], data_key, expect=kind,
                                what=label, raw_length=raw_length)[1]
        except P2PError as exc:
            raise IntegrityError(str(exc)) from None
        if keyed_blob_id(id_key, plain) != blob_id:
            raise IntegrityError(f"{what}: blob {blob_id.hex()[:12]} has content that does not "
                                 "match its id")


def object_candidates(data: bytes | bytearray, start: int, end: int
                      ) -> Iterator[tuple[int, int, int]]:
    """(offset, length, kind) of every place in data[start:end] that begins with a valid
    object header, in order of offset (the length is the header's: it may run past `end`).

    Where the blobs of a pack may be when its trailer is lost: each sealed blob starts with
    the object header. A candidate may still fail to decrypt (four random bytes can read as
    the magic, a damaged header can claim any length): the caller decides by decrypting."""
    pos = start
    while (pos := data.find(MAGIC, pos, end)) >= 0:
        try:
            header = ObjectHeader.decode(memoryview(data)[pos:pos + HEADER_SIZE])
        except (IntegrityError, UnsupportedFormat):
            pos += 1
            continue
        yield pos, HEADER_SIZE + header.length, header.kind
        pos += 1
