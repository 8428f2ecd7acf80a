"""Which snapshots a retention policy keeps (restic's semantics, pure: records in, ids out).

--keep-last N keeps the N newest; --keep-hourly/daily/weekly/monthly N keep the newest snapshot
of each of the N most recent hours/days/weeks/months that have one. A snapshot kept by any rule
is kept. Policies apply per group (by default: one device, one set of source paths; see
repo/snapshots.py), so an ad-hoc snapshot of another directory never crowds out the history of
the configured sources, nor one device's history another's.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

from ..repo.snapshots import DEFAULT_GROUP_BY, GroupKey, StoredSnapshot, group_snapshots

RULES = ("last", "hourly", "daily", "weekly", "monthly")


@dataclass(frozen=True, slots=True)
class Policy:
    """How many snapshots to keep by each rule (0 = the rule keeps none), and per what group."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    group_by: tuple[str, ...] = DEFAULT_GROUP_BY

    @property
    def empty(self) -> bool:
        return not (self.last or self.hourly or self.daily or self.weekly or self.monthly)


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """What the policy does to one group: each kept snapshot with the rules that keep it, and
    the forgotten ones; both oldest first."""

    key: GroupKey
    keep: list[tuple[StoredSnapshot, tuple[str, ...]]]
    forget: list[StoredSnapshot]

    @property
    def hostname(self) -> str:
        """The device's name as its newest snapshot in this group gives it."""
        snaps = [s for s, _ in self.keep] + self.forget
        return max(snaps, key=lambda s: s.snapshot.time_ns).snapshot.hostname if snaps else ""


def _buckets(tz: dt.tzinfo | None) -> dict[str, Callable[[int], tuple]]:
    def at(ns: int) -> dt.datetime:
        return dt.datetime.fromtimestamp(ns / 1e9, tz)
    return {
        "hourly": lambda ns: at(ns).timetuple()[:4],
        "daily": lambda ns: at(ns).timetuple()[:3],
        "weekly": lambda ns: at(ns).isocalendar()[:2],
        "monthly": lambda ns: at(ns).timetuple()[:2],
    }


def plan_policy(snaps: list[StoredSnapshot], policy: Policy,
                tz: dt.tzinfo | None = None) -> list[GroupPlan]:
    """Apply `policy` to each group of `snaps` (oldest first); one plan per group."""
    buckets = _buckets(tz)
    plans = []
    for key, group in group_snapshots(snaps, policy.group_by).items():
        newest_first = sorted(group, key=lambda s: s.snapshot.time_ns, reverse=True)
        reasons: dict[str, list[str]] = {s.id: ["last"] for s in newest_first[:policy.last]}
        for rule, key_of in buckets.items():
            wanted = getattr(policy, rule)
            seen: set[tuple] = set()
            for s in newest_first:
                if len(seen) >= wanted:
                    break
                bucket = key_of(s.snapshot.time_ns)
                if bucket not in seen:
                    seen.add(bucket)
                    reasons.setdefault(s.id, []).append(rule)
        plans.append(GroupPlan(key, [(s, tuple(reasons[s.id])) for s in group if s.id in reasons],
                               [s for s in group if s.id not in reasons]))
    return plans

