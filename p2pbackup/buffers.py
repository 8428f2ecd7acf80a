"""Large buffers a store can write with O_DIRECT (no page-cache copy of a whole pack)."""

from __future__ import annotations

import mmap
from collections.abc import Iterable

_HUGE = 4 << 20


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
