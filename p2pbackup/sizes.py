"""Sizes and speeds for people, in one style everywhere: binary units (KiB, MiB, GiB, TiB),
as restic prints them. (Sizes people type, e.g. `--quota 50G`, are binary too.)"""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_size(n: float) -> str:
    """`1536` -> `1.5 KiB`; whole bytes below 1 KiB, one decimal above."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    exp = 1
    # 1023.96 KiB would print as "1024.0 KiB": it is 1.0 MiB
    while exp < len(_UNITS) - 1 and abs(n) / 1024 ** exp >= 1023.95:
        exp += 1
    return f"{n / 1024 ** exp:.1f} {_UNITS[exp]}"


def format_rate(nbytes: float, seconds: float) -> str:
    """`3.0 MiB/s`."""
    return f"{format_size(nbytes / max(seconds, 1e-6))}/s"
