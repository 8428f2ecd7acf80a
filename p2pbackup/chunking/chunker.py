"""Cut byte buffers into content-defined chunks of ~64 KiB on average.

64 KiB halves daily churn on the benchmark data versus 1 MiB chunks: an edit in the middle of
a large file or a changed SQLite page re-stores one small chunk, not a megabyte.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyfastcdc

DEFAULT_AVG = 64 * 1024


class Chunker:
    """A FastCDC cutter with a secret gear seed; one instance per thread."""

    def __init__(self, avg_size: int = DEFAULT_AVG, seed: int = 0) -> None:
        self.avg_size = avg_size
        # pyfastcdc's avg is min+avg; min = avg/4, max = avg*4 follows FastCDC's paper.
        self._cdc = pyfastcdc.FastCDC(avg_size, min_size=avg_size // 4, max_size=avg_size * 4,
                                      normalized_chunking=1, seed=seed)

    @property
    def max_size(self) -> int:
        return self._cdc.max_size

    @property
    def min_size(self) -> int:
        """Inputs of at most this many bytes are always a single chunk."""
        return self._cdc.min_size

    def cut(self, buf: bytes | bytearray | memoryview) -> Iterator[tuple[int, int]]:
        """Yield (offset, length) of each chunk of `buf`, the last one possibly short."""
        return ((c.offset, c.length) for c in self._cdc.cut_buf(buf))
