"""Content-defined chunking (FastCDC 2020 via pyfastcdc, which runs without the GIL)."""

from .chunker import Chunker

__all__ = ["Chunker"]
