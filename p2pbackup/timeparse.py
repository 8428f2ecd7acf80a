"""Reading a moment the way people write it: ISO 8601, or "2 hours ago", "yesterday 14:00"."""

from __future__ import annotations

import datetime as dt
import re

_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600,
          "hour": 3600, "d": 86400, "day": 86400, "w": 604800, "week": 604800}
_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-z]+?)s?\s+ago$")
_DAY_AT = re.compile(r"^(today|yesterday)(?:\s+(?:at\s+)?(\d{1,2}):(\d{2})(?::(\d{2}))?)?$")
_CLOCK = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$")


class TimeFormatError(ValueError):
    """The text is not a moment this parser understands."""


def parse_time(text: str, now: dt.datetime) -> dt.datetime:
    """Return the moment `text` names, relative to `now` (an aware datetime)."""
    t = " ".join(text.strip().lower().split())
    if t == "now":
        return now
    m = _AGO.match(t)
    if m and m.group(2) in _UNITS:
        return now - dt.timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    m = _DAY_AT.match(t)
    if m:
        day = now.date() - dt.timedelta(days=1 if m.group(1) == "yesterday" else 0)
        if m.group(2) is None:
            clock = dt.time(0, 0) if m.group(1) == "yesterday" else now.timetz().replace(tzinfo=None)
        else:
            clock = _clock(m.group(2), m.group(3), m.group(4), text)
        return dt.datetime.combine(day, clock, tzinfo=now.tzinfo)
    m = _CLOCK.match(t)
    if m:
        return dt.datetime.combine(now.date(), _clock(*m.groups(), text), tzinfo=now.tzinfo)
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise TimeFormatError(
            f"cannot read the time {text!r}: use ISO 8601 (2026-11-23T14:00), "
            "'2 hours ago', 'yesterday 14:00' or 'now'") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=now.tzinfo)


def _clock(h: str, m: str, s: str | None, text: str) -> dt.time:
    try:
        return dt.time(int(h), int(m), int(s or 0))
    except ValueError:
        raise TimeFormatError(f"cannot read the time {text!r}: no such time of day") from None
