"""Which snapshots a retention policy keeps (restic's semantics, pure: records in, ids out).

--keep-last N keeps the N newest; --keep-hourly/daily/weekly/monthly N keep the newest snapshot
of each of the N most recent hours/days/weeks/months that have one. A snapshot kept by any rule
is kept. Policies apply per device, so one device's history never crowds out another's.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from ..repo.repository import StoredSnapshot


@dataclass(frozen=True, slots=True)
class Policy:
    """How many snapshots to keep by each rule (0 = the rule keeps none)."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    @property
    def empty(self) -> bool:
        return not (self.last or self.hourly or self.daily or self.weekly or self.monthly)


def _buckets(tz: dt.tzinfo | None) -> dict[str, Callable[[int], tuple]]:
    def at(ns: int) -> dt.datetime:
        return dt.datetime.fromtimestamp(ns / 1e9, tz)
    return {
        "hourly": lambda ns: at(ns).timetuple()[:4],
        "daily": lambda ns: at(ns).timetuple()[:3],
        "weekly": lambda ns: at(ns).isocalendar()[:2],
        "monthly": lambda ns: at(ns).timetuple()[:2],
    }


def apply_policy(snaps: list[StoredSnapshot], policy: Policy,
                 tz: dt.tzinfo | None = None) -> tuple[list[StoredSnapshot], list[StoredSnapshot]]:
    """Split `snaps` into (keep, forget); each list oldest first."""
    by_device: dict[str, list[StoredSnapshot]] = {}
    for s in snaps:
        by_device.setdefault(s.snapshot.device, []).append(s)
    keep_ids: set[str] = set()
    buckets = _buckets(tz)
    for group in by_device.values():
        newest_first = sorted(group, key=lambda s: s.snapshot.time_ns, reverse=True)
        keep_ids.update(s.id for s in newest_first[:policy.last])
        for rule, key_of in buckets.items():
            wanted = getattr(policy, rule)
            seen: set[tuple] = set()
            for s in newest_first:
                if len(seen) >= wanted:
                    break
                key = key_of(s.snapshot.time_ns)
                if key not in seen:
                    seen.add(key)
                    keep_ids.add(s.id)
    keep = [s for s in snaps if s.id in keep_ids]
    forget = [s for s in snaps if s.id not in keep_ids]
    return keep, forget
