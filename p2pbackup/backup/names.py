"""Showing raw file-system names to people."""

from __future__ import annotations

import os


def show_path(path: bytes) -> str:
    """A printable form of a raw path: undecodable bytes appear as \\xNN escapes."""
    return os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")
