"""Versioned, typed records and their binary encoding (sans-I/O: no asyncio, no files)."""

from .header import HEADER_SIZE, MAGIC, SUPPORTED_VERSIONS, Kind, ObjectHeader
from .objects import open_object, seal_object

__all__ = ["HEADER_SIZE", "MAGIC", "SUPPORTED_VERSIONS", "Kind", "ObjectHeader",
           "open_object", "seal_object"]
