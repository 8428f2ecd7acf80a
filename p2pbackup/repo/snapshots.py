"""Snapshots as listed: which belong together, and which one `latest` names (pure).

A group is one line of history: the snapshots one device took of one set of source paths.
The device is named by its id, which never changes (its name, stored in each snapshot as
`hostname`, may), and sources by their paths (a source's name is only its base name, and an
ad-hoc `snapshot DIR` of another directory can carry the same one). Retention applies per
group, as restic's does per host and paths, so an ad-hoc snapshot never crowds out the
history of the configured sources.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import ConfigError, NotFound
from ..format.records import Snapshot


@dataclass(frozen=True, slots=True)
class StoredSnapshot:
    """A snapshot as listed: its id (the hash of its stored object) and its record."""

    id: str
    snapshot: Snapshot

    @property
    def short_id(self) -> str:
        return self.id[:8]


GROUP_FIELDS = ("device", "paths")
DEFAULT_GROUP_BY = GROUP_FIELDS


def parse_group_by(text: str) -> tuple[str, ...]:
    """`device,paths` (the default), `device`, `paths`, or `none` / `` (one group)."""
    words = [w.strip().lower() for w in text.split(",") if w.strip()]
    if words == ["none"]:
        return ()
    unknown = [w for w in words if w not in GROUP_FIELDS]
    if unknown:
        raise ConfigError(f"--group-by {text!r}: give device, paths, device,paths or none")
    return tuple(f for f in GROUP_FIELDS if f in words)


@dataclass(frozen=True, slots=True)
class GroupKey:
    """What the snapshots of a group share; None where the grouping does not look."""

    device: str | None
    paths: tuple[str, ...] | None

    def describe(self, hostname: str = "") -> str:
        parts = []
        if self.device is not None:
            parts.append(f"device {hostname + ' ' if hostname else ''}({self.device[:8]})")
        if self.paths is not None:
            parts.append(f"sources {', '.join(self.paths) or '(none)'}")
        return ", ".join(parts) or "all snapshots"


def group_key(stored: StoredSnapshot, by: Sequence[str] = DEFAULT_GROUP_BY,
              source: str | None = None) -> GroupKey:
    """The group of `stored`; with `source`, only that source's path counts among its paths."""
    snap = stored.snapshot
    paths = {r.path for r in snap.sources if source is None or r.name == source}
    return GroupKey(snap.device if "device" in by else None,
                    tuple(sorted(paths)) if "paths" in by else None)


def group_snapshots(snaps: Sequence[StoredSnapshot], by: Sequence[str] = DEFAULT_GROUP_BY,
                    source: str | None = None) -> dict[GroupKey, list[StoredSnapshot]]:
    """The snapshots by group, each group in the order given; groups sorted by key."""
    groups: dict[GroupKey, list[StoredSnapshot]] = {}
    for s in snaps:
        groups.setdefault(group_key(s, by, source), []).append(s)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0].device or "", kv[0].paths or ())))


class SourceLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def path(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Latest:
    """The snapshot `latest` names, and why, in words."""

    stored: StoredSnapshot
    why: str


def source_asked(snaps: Sequence[StoredSnapshot], path: str | None) -> str | None:
    """The source a `--path` names: its first component, when some snapshot has a source so
    named (else the path lies inside the only source of single-source snapshots)."""
    first = (path or "").strip("/").split("/", 1)[0]
    if first and any(r.name == first for s in snaps for r in s.snapshot.sources):
        return first
    return None


def choose_latest(snaps: Sequence[StoredSnapshot], *, device: str | None,
                  sources: Sequence[SourceLike] = (), source: str | None = None) -> Latest:
    """The newest snapshot that holds what is asked for (`snaps` oldest first).

    Without `source`: the newest snapshot this device took of exactly its configured sources'
    paths (what `snapshot` and the daemon take). With `source` (`--path SOURCE/...`): the
    newest snapshot this device took of that source at its configured path. When there is none
    (an ad-hoc source, no configured sources, a new device reading another one's store): the
    newest of the only group that holds it, looking at this device's groups first; with
    several groups to choose from, `latest` is ambiguous and refused, naming them.
    """
    if source is None:
        candidates = list(snaps)
        wanted = tuple(sorted({s.path for s in sources}))
        what = "its configured sources"
    else:
        candidates = [s for s in snaps if any(r.name == source for r in s.snapshot.sources)]
        wanted = tuple(s.path for s in sources if s.name == source)
        what = f"source {source}"
    groups = group_snapshots(candidates, DEFAULT_GROUP_BY, source)
    if not groups:
        raise NotFound(f"no snapshot holds {what}" if source else "there are no snapshots yet")
    own = GroupKey(device, wanted)
    if wanted and own in groups:
        return Latest(groups[own][-1], f"the newest this device took of {what} "
                                       f"({', '.join(wanted)})")
    mine = {k: v for k, v in groups.items() if k.device == device}
    pool = mine or groups
    if len(pool) == 1:
        ((key, group),) = pool.items()
        newest = group[-1]
        whose = "this device" if key.device == device else \
            f"device {newest.snapshot.hostname} ({newest.snapshot.device[:8]})"
        among = "this device's snapshots" if mine else "snapshots"
        holding = f" holding {what}" if source else ""
        return Latest(newest, f"the newest of {', '.join(key.paths or ())} taken by {whose}: "
                              f"the only group of {among}{holding}")
    listed = "; ".join(f"{k.describe(g[-1].snapshot.hostname)}: newest {g[-1].short_id}"
                       for k, g in sorted(pool.items(), reverse=True,
                                          key=lambda kg: kg[1][-1].snapshot.time_ns))
    if source:
        raise NotFound(f"`latest --path {source}` is ambiguous: {len(pool)} groups of snapshots "
                       f"hold source {source} ({listed}); give a snapshot id")
    reason = ("none of them is of this device's configured sources" if wanted
              else "this device has no configured sources")
    raise NotFound(f"`latest` is ambiguous: there are {len(pool)} groups of snapshots and "
                   f"{reason} ({listed}); give a snapshot id or --path SOURCE")
