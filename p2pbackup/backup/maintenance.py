"""forget and prune as one operation with a JSON-able result (the CLI and the daemon share it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from ..crypto.identity import DeviceIdentity
from ..errors import ConfigError
from ..repo import removals
from ..repo.repository import Repository
from .prune import prune
from .retention import Policy, apply_policy

async def _holds_others(repo: Repository, identity: DeviceIdentity | None) -> bool:
    """Whether devices other than this one write to this repository (replicas arrive)."""
    me = identity.device_id if identity else None
    return any([n async for n in repo.store.list("devices/") if n.split("/", 1)[1] != me])


_RULES = ("last", "hourly", "daily", "weekly", "monthly")


def policy_of(args: dict[str, Any]) -> Policy | None:
    """The retention policy in a request's arguments; None means "forget nothing"."""
    raw = args.get("policy")
    if raw is None:
        return None
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k, 0), int) and raw.get(k, 0) >= 0
                                            for k in _RULES):
        raise ConfigError("a retention policy needs whole numbers of 0 or more")
    return Policy(**{k: raw.get(k, 0) for k in _RULES})


async def forget_and_prune(repo: Repository, identity: DeviceIdentity | None,
                           policy: Policy | None, *, dry_run: bool = False,
                           prune_after: bool = False,
                           protect: Callable[[], set[str]] | None = None,
                           grace: float = 0.0) -> dict[str, Any]:
    """Forget the snapshots `policy` does not keep, then prune if asked.

    `grace` is this device's removal grace period: when the repository also holds other
    devices' data, prune keeps packs that arrived within it (see `prune`'s `hold_new`).
    """
    result: dict[str, Any] = {"kept": [], "forgotten": [], "prune": None, "dry_run": dry_run}
    if policy is not None:
        if policy.empty:
            raise ConfigError("refusing to forget every snapshot: give at least one --keep-* "
                              "rule")
        snaps, _ = await repo.list_snapshots()
        keep, forget = apply_policy(snaps, policy)
        result["kept"] = [s.id for s in keep]
        result["forgotten"] = [s.id for s in forget]
        if not dry_run:
            for s in forget:
                await repo.store.delete(f"snapshots/{s.id}")
    removed = [f"snapshots/{i}" for i in result["forgotten"]] if not dry_run else []
    if prune_after:
        hold = grace if await _holds_others(repo, identity) else 0.0
        report = await prune(repo, identity, dry_run=dry_run, protect=protect, hold_new=hold)
        removed += report.removed
        result["prune"] = {k: v for k, v in asdict(report).items() if k != "removed"}
    if identity is not None and removed:
        # Peers keep everything until an owner's signed word says otherwise (and a grace
        # period passed); without this record they would also hand it all back to us.
        result["removal"] = await removals.record(repo.store, identity, removed)
    return result
