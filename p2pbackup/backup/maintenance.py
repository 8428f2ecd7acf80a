"""forget and prune as one operation with a JSON-able result (the CLI and the daemon share it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from ..crypto.identity import DeviceIdentity
from ..errors import ConfigError
from ..repo import removals
from ..repo.repository import Repository
from ..repo.snapshots import DEFAULT_GROUP_BY, parse_group_by
from .prune import prune
from .retention import RULES, Policy, plan_policy

async def _holds_others(repo: Repository, identity: DeviceIdentity | None) -> bool:
    """Whether devices other than this one write to this repository (replicas arrive)."""
    me = identity.device_id if identity else None
    return any([n async for n in repo.store.list("devices/") if n.split("/", 1)[1] != me])


def policy_of(args: dict[str, Any]) -> Policy | None:
    """The retention policy in a request's arguments; None means "forget nothing".

    Its `group_by` is text as --group-by takes it ("device,paths", the default when absent).
    """
    raw = args.get("policy")
    if raw is None:
        return None
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k, 0), int) and raw.get(k, 0) >= 0
                                            for k in RULES):
        raise ConfigError("a retention policy needs whole numbers of 0 or more")
    group_by = raw.get("group_by", ",".join(DEFAULT_GROUP_BY))
    if not isinstance(group_by, str):
        raise ConfigError("a retention policy's group_by is text such as \"device,paths\"")
    return Policy(**{k: raw.get(k, 0) for k in RULES}, group_by=parse_group_by(group_by))


async def forget_and_prune(repo: Repository, identity: DeviceIdentity | None,
                           policy: Policy | None, *, dry_run: bool = False,
                           prune_after: bool = False,
                           protect: Callable[[], set[str]] | None = None,
                           grace: float = 0.0) -> dict[str, Any]:
    """Forget the snapshots `policy` does not keep, then prune if asked.

    `grace` is this device's removal grace period: when the repository also holds other
    devices' data, prune keeps packs that arrived within it (see `prune`'s `hold_new`).
    """
    result: dict[str, Any] = {"kept": [], "forgotten": [], "groups": [], "prune": None,
                              "dry_run": dry_run}
    if policy is not None:
        if policy.empty:
            raise ConfigError("refusing to forget every snapshot: give at least one --keep-* "
                              "rule")
        snaps, _ = await repo.list_snapshots()
        plans = plan_policy(snaps, policy)
        result["group_by"] = list(policy.group_by)
        result["groups"] = [{
            "device": p.key.device, "hostname": p.hostname if p.key.device else None,
            "paths": list(p.key.paths) if p.key.paths is not None else None,
            "keep": [{"id": s.id, "time_ns": s.snapshot.time_ns, "reasons": list(why)}
                     for s, why in p.keep],
            "forget": [{"id": s.id, "time_ns": s.snapshot.time_ns} for s in p.forget],
        } for p in plans]
        forgotten = {s.id for p in plans for s in p.forget}
        result["kept"] = [s.id for s in snaps if s.id not in forgotten]
        result["forgotten"] = [s.id for s in snaps if s.id in forgotten]
        if not dry_run:
            for sid in result["forgotten"]:
                await repo.store.delete(f"snapshots/{sid}")
    removed = [f"snapshots/{i}" for i in result["forgotten"]] if not dry_run else []
    if prune_after:
        hold = grace if await _holds_others(repo, identity) else 0.0
        # A dry run forgot nothing yet: prune is told what would be gone.
        report = await prune(repo, identity, dry_run=dry_run, protect=protect, hold_new=hold,
                             forgotten=set(result["forgotten"]) if dry_run else set())
        removed += report.removed
        result["prune"] = {k: v for k, v in asdict(report).items() if k != "removed"}
    if identity is not None and removed:
        # Peers keep everything until an owner's signed word says otherwise (and a grace
        # period passed); without this record they would also hand it all back to us.
        result["removal"] = await removals.record(repo.store, identity, removed)
    return result
