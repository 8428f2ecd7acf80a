"""Large buffers a store can write with O_DIRECT (no page-cache copy of a whole pack)."""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterable, Sequence

_HUGE = 4 << 20
_M_TRIM_THRESHOLD = -1   # mallopt's parameter numbers (glibc's malloc.h)
_M_MMAP_THRESHOLD = -3
# Above a restore's S3 window (4 MiB and the bytes object's header), below a pack (16 MiB).
MMAP_THRESHOLD = 8 << 20
# Free room a heap keeps at its top instead of giving it back. Fixing the mmap threshold fixes
# this one too, at glibc's 128 KiB: each decoded chunk or S3 window freed at the top of a
# heap went back to the kernel and the next one took the pages again, each a fault and a
# zeroed page (150,000-170,000 faults for a 300 MiB restore from weed, a sixth of its CPU).
TRIM_THRESHOLD = 32 << 20


def aligned_buffer(size: int) -> mmap.mmap | bytearray:
    """A zeroed buffer of `size` bytes: an anonymous mapping where possible, which is
    page-aligned (so a store can write it with O_DIRECT, without copying it into the page
    cache) and whose pages are only touched when written (bytearray(n) zeroes them all)."""
    try:
        # Private: a shared anonymous mapping is a tmpfs object of fixed size, and growing it
        # with resize (mremap) would leave the new pages unbacked (SIGBUS).
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError, AttributeError):  # pragma: no cover - no anonymous mappings
        return bytearray(size)
    if size >= _HUGE and hasattr(mmap, "MADV_HUGEPAGE"):
        try:  # 2 MiB pages where the kernel has them: 8 page faults per pack instead of 4,000
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return buf


def fill(view: memoryview, parts: Iterable[bytes | bytearray | memoryview]) -> None:
    """Copy `parts`, one after the other, into `view`, which they must fill exactly."""
    at = 0
    for part in parts:
        n = len(part)
        view[at:at + n] = part
        at += n
    if at != len(view):
        raise ValueError(f"parts hold {at} bytes, not {len(view)}")


def views_of(data: bytes | bytearray | memoryview, start: int,
             spans: Sequence[tuple[int, int]]) -> list[memoryview]:
    """Views of `data`, the bytes of an object from `start` on, at each (offset, length) of
    `spans` (a span past the end of `data` is cut short)."""
    view = memoryview(data)
    return [view[offset - start:offset - start + length] for offset, length in spans]


def fix_mmap_threshold() -> None:
    """Have glibc's malloc map every block of MMAP_THRESHOLD bytes or more anew and unmap it
    when freed, and keep up to TRIM_THRESHOLD bytes freed at a heap's top for the next
    blocks, for the whole process (its entry points call this).

    By default glibc raises that threshold to the size of each mapped block freed, up to
    32 MiB: after the first 16 MiB pack read for an upload and freed, the next ones come
    from the heaps of the threads that read them, whose freed room stays in the process.
    `store push` peaked at 230 MiB (1 GiB tree, 4 uploads at once) and `snapshot --push` at
    341 MiB; with the threshold fixed, 133 and 212 MiB, no slower (bench/bench_s3.py)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):   # not glibc (musl, macOS): its own allocator's way
        pass
