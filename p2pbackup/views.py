"""The JSON shapes of what the CLI's `--json` prints; the web console's API serves the same."""

from __future__ import annotations

import datetime as dt
from typing import Any

from .repo.snapshots import StoredSnapshot
from .sizes import format_size


# How a data channel crosses the network (transport.datachannel.IcePath.kind), in status.
ICE_PATH_WORDS = {"host": "LAN", "reflexive": "hole punched", "relay": "TURN relay"}


def ice_path_words(kind: str | None) -> str | None:
    """"TURN relay" for "relay", and so on; None when the path is not known."""
    return ICE_PATH_WORDS.get(kind or "", kind)


def peer_route(peer: dict[str, Any]) -> str:
    """What a connected peer's session runs over, as status and the console say it:
    "direct lane", or "data channel" with how ICE crossed the network ("data channel (TURN
    relay)"), and ", signaled through the broker" when the broker set it up."""
    path = peer.get("path") or "data channel"
    words = ice_path_words(peer.get("ice_path"))
    route = f"{path} ({words})" if words and path == "data channel" else path
    return route + (", signaled through the broker" if peer.get("signaled") == "broker" else "")


def iso_time(ns: int) -> str:
    """ISO 8601 in local time with its UTC offset, to the second."""
    return dt.datetime.fromtimestamp(ns / 1e9).astimezone().isoformat(timespec="seconds")


def moment_after(ns: int) -> str:
    """A moment `--at` takes (ISO 8601, local time, to the microsecond) that falls just after
    `ns`: what was done at `ns` is in the state it names, rounding aside."""
    us = -(-ns // 1000) + 1
    t = dt.datetime.fromtimestamp(us // 1_000_000).astimezone()
    return (t + dt.timedelta(microseconds=us % 1_000_000)).isoformat(timespec="microseconds")


def snapshot_json(stored: StoredSnapshot) -> dict[str, Any]:
    snap = stored.snapshot
    return {
        "id": stored.id,
        "short_id": stored.short_id,
        "time": iso_time(snap.time_ns),
        "paths": [s.path for s in snap.sources],
        "device": snap.device,
        "hostname": snap.hostname,
        "size": snap.size,
        "sources": [{"name": s.name, "path": s.path, "files": s.files, "dirs": s.dirs,
                     "size": s.size} for s in snap.sources],
        "parent": snap.parent,
        "log_seq": snap.log_seq,
        "warnings": snap.warnings,
    }


def damage_json(d: Any) -> dict[str, Any]:
    return {"object": d.what, "reason": d.reason, "affects": d.affects, "blob": d.blob,
            "pack": d.pack}


def verify_json(report: Any) -> dict[str, Any]:
    return {"ok": report.ok, "read_data": report.read_data, "snapshots": report.snapshots,
            "segments": report.segments, "trees": report.trees, "packs": report.packs,
            "blobs_read": report.blobs_read,
            "damage": [damage_json(d) for d in report.damage]}


def verify_lines(report: Any) -> list[str]:
    """`verify`'s result in words: each damage, then the summary line."""
    lines = [f"damaged: {d.line()}" for d in report.damage]
    checked = (f"{report.snapshots} snapshots, {report.trees} trees, {report.packs} packs"
               + (f", {report.segments} log segments" if report.segments else "")
               + (f", {report.blobs_read} blobs read" if report.read_data else ""))
    unread = "" if report.read_data else \
        "; data not read (`verify --read-data` decrypts and checks every blob)"
    n = len(report.damage)
    lines.append(f"{'no problems found' if report.ok else f'{n} problem' + 's' * (n != 1)} "
                 f"({checked}){unread}")
    return lines


def repair_json(report: Any) -> dict[str, Any]:
    """`repair --json`."""
    return {"checked": report.checked,
            "packs": [{"pack": r.pack, "reason": r.reason, "kept": r.salvaged, "lost": r.lost,
                       "healed_from": r.healed_from} for r in report.repaired],
            "copied": report.copied,
            "lost": [damage_json(d) for d in report.lost]}


def repair_lines(report: Any) -> list[str]:
    """`repair`'s result in words: each pack repaired, what was copied, what is lost."""
    lines = []
    for r in report.repaired:
        if r.healed_from:
            lines.append(f"pack {r.pack[:12]}: {r.reason}; replaced by the intact copy from "
                         f"{r.healed_from} (the damaged copy is in quarantine/)")
        else:
            lines.append(f"pack {r.pack[:12]}: {r.reason}; kept {r.salvaged} blobs, lost "
                         f"{r.lost}; moved to quarantine/")
    for location, n in report.copied.items():
        lines.append(f"copied {n} blob{'s' * (n != 1)} from {location}")
    lines += [f"lost: {d.line()}" for d in report.lost]
    if report.lost:
        lines.append("run `p2pbackup snapshot` to store lost data again from the source "
                     "files, then `p2pbackup verify`")
    elif report.copied:
        lines.append("every blob lost is back, copied from the other copies")
    elif report.repaired:
        lines.append("nothing was lost")
    return lines


def member_json(m: Any, me: str) -> dict[str, Any]:
    return {"id": m.device_id, "name": m.name, "role": m.role,
            "sources": list(m.scopes) if m.scopes is not None else None,
            "quota": m.quota, "added": iso_time(m.added_ns) if m.added_ns else None,
            "this_device": m.device_id == me}


def membership_json(current: Any, me: str) -> dict[str, Any]:
    """`devices --json`."""
    return {"version": current.seq, "key_epoch": current.epoch,
            "devices": [member_json(m, me) for m in current.members],
            "removed": list(current.removed)}


_WORK = {"snapshot": "snapshot of", "seal": "sealing the log segment",
         "replication": "replication with", "upload": "upload to"}


def activity_line(a: dict[str, Any], names: dict[str, str]) -> str:
    """One activity of `status --json`'s `activities` in words (`names`: device -> name);
    the page's console.js says the same."""
    who = names.get(a["name"], a["name"][:12]) if a["kind"] == "replication" else a["name"]
    line = f"{_WORK.get(a['kind'], a['kind'])} {who or ''}".rstrip()
    if a.get("phase"):
        line += f": {a['phase']}"
    if a.get("total"):
        line += (f" {min(100, round(100 * a['done'] / a['total']))}% "
                 f"({format_size(a['done'])} of {format_size(a['total'])})")
    elif a.get("done"):
        line += f" ({format_size(a['done'])})"
    if a["kind"] == "replication":
        line += (f"; sent {a['sent_objects']} objects ({format_size(a['sent_bytes'])}), "
                 f"received {a['received_objects']} ({format_size(a['received_bytes'])})")
    if a.get("files") is not None:
        line += f"; {a['files']} files"
    return line
