"""Sizes and speeds for people, in one style everywhere: binary units (KiB, MiB, GiB, TiB),
as restic prints them. (Sizes people type, e.g. `--quota 50G`, are binary too.)"""

from __future__ import annotations

from .errors import ConfigError

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_TYPED = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


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


def parse_size(text: str, what: str = "a size") -> int:
    """`50G`, `500M`, `1.5T`, `1024` -> bytes (binary units: 50G, 50GB and 50GiB are all
    50 GiB); ConfigError naming `what` (e.g. `--quota`) for anything else."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in _TYPED else ""
    try:
        value = float(t[:-1] if unit else t)
    except ValueError:
        raise ConfigError(f"{what} {text!r}: give a size such as 50G or 500M") from None
    if not 0 < value < float("inf"):   # (also NaN)
        raise ConfigError(f"{what} {text!r} must be more than zero")
    return int(value * _TYPED[unit])
