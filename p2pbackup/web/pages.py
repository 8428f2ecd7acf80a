"""The console's pages, rendered on the server as plain HTML (console.js adds live status,
restores and the moment picker). Every value shown is escaped."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any
from urllib.parse import urlencode

from ..sizes import format_size
from ..views import iso_time, peer_route

NAV = (("/", "Status"), ("/snapshots", "Snapshots"), ("/timeline", "Timeline"),
       ("/devices", "Devices"), ("/verify", "Verify"))


def layout(title: str, body: str, csrf: str) -> str:
    nav = "".join(f'<a href="{href}">{escape(name)}</a>' for href, name in NAV)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf-token" content="{escape(csrf)}">
<title>{escape(title)} · p2pbackup</title>
<link rel="stylesheet" href="/static/console.css">
<script src="/static/console.js" defer></script>
</head><body>
<header><strong>p2pbackup</strong><nav>{nav}</nav></header>
<main><h1>{escape(title)}</h1>
{body}
</main></body></html>
"""


def status(storage_part: str) -> str:
    # Filled and kept current by console.js from the event stream (/api/events); the storage
    # part (and its chart) is drawn here.
    return f"""<section id="status" data-live="status"><p class="muted">connecting…</p></section>
<h2>Jobs</h2><section id="jobs"><p class="muted">none yet</p></section>
<h2>Storage</h2>{storage_part}"""


def problem(message: str) -> str:
    return f'<p class="error">{escape(message)}</p>'


def _browse_link(snapshot: str, path: str, at: str = "", text: str | None = None) -> str:
    query = {"snapshot": snapshot, "path": path}
    if at:
        query["at"] = at
    return f'<a href="/browse?{escape(urlencode(query))}">{escape(text or path or "/")}</a>'


def snapshots(snaps: list[dict[str, Any]]) -> str:
    if not snaps:
        return "<p>No snapshots yet.</p>"
    rows = "".join(
        f"<tr><td>{_browse_link(s['id'], '', text=s['short_id'])}</td>"
        f"<td>{escape(s['time'])}</td><td>{escape(s['hostname'])}</td>"
        f"<td class=num>{escape(format_size(s['size']))}</td>"
        f"<td>{escape(', '.join(s['paths']))}</td></tr>"
        for s in reversed(snaps))
    return (f'<table class="list"><thead><tr><th>ID</th><th>Time</th><th>Host</th>'
            f'<th>Size</th><th>Paths</th></tr></thead><tbody>{rows}</tbody></table>'
            f"<p>{len(snaps)} snapshots</p>")


def browse(listing: dict[str, Any], at: str) -> str:
    snap = listing["snapshot"]
    sid, path = snap["id"], listing["path"]
    ref = sid   # with `at`: the log after this snapshot, up to then (the base `at` chose)
    crumbs = [_browse_link(ref, "", at, "/")]
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        crumbs.append(_browse_link(ref, "/".join(parts[:i + 1]), at, part))
    when = (f"as it was at <strong>{escape(at)}</strong> (snapshot {escape(snap['short_id'])} "
            "and the log after it)" if at else
            f"snapshot <strong>{escape(snap['short_id'])}</strong> of {escape(snap['time'])}")
    rows = []
    for e in listing["entries"]:
        if e["type"] == "dir":
            q = {"snapshot": ref, "path": e["path"], **({"at": at} if at else {})}
            name = (_browse_link(ref, e["path"], at, e["name"] + "/") +
                    f' <a class="download archive" download '
                    f'href="/api/archive?{escape(urlencode(q))}">.tar</a>')
        elif e["type"] == "file":
            q = {"snapshot": ref, "path": e["path"], **({"at": at} if at else {})}
            name = (f'{escape(e["name"])} <a class="download" download '
                    f'href="/api/file?{escape(urlencode(q))}">download</a> '
                    f'<a class="versions" href="/versions?'
                    f'{escape(urlencode({"path": e["path"]}))}">versions</a>')
        else:
            name = escape(e["name"]) + (f" → {escape(e['target'])}" if e.get("target") else "")
        size = format_size(e["size"]) if e["size"] is not None else ""
        restore = (f'<button class="restore" data-snapshot="{escape(ref)}" '
                   f'data-path="{escape(e["path"])}" data-at="{escape(at)}">restore…</button>')
        rows.append(f"<tr><td>{name}</td><td class=num>{escape(size)}</td>"
                    f"<td>{escape(e['mtime'] or '')}</td><td>{restore}</td></tr>")
    pager = []
    base = {"snapshot": ref, "path": path, **({"at": at} if at else {})}
    if "q" in listing:  # search results: no pages
        n = len(listing["entries"])
        pager.append(f'<span class="count">{n} names hold “{escape(listing["q"])}”'
                     + ("" if listing["complete"] else " (the first found; say more)")
                     + "</span>")
    else:
        offset, limit, total = listing["offset"], listing["limit"], listing["total"]
        if offset > 0:
            q = urlencode({**base, "offset": max(0, offset - limit)})
            pager.append(f'<a rel="prev" href="/browse?{escape(q)}">← previous</a>')
        shown = f"{offset + 1 if total else 0}–{min(total, offset + limit)} of {total} entries"
        pager.append(f'<span class="count">{shown}</span>')
        if offset + limit < total:
            q = urlencode({**base, "offset": offset + limit})
            pager.append(f'<a rel="next" href="/browse?{escape(q)}">next →</a>')
    hidden = "".join(f'<input type="hidden" name="{k}" value="{escape(v)}">'
                     for k, v in base.items())
    search = (f'<form class="search" action="/browse" method="get">{hidden}'
              f'<input type="search" name="q" placeholder="find by name below here" '
              f'value="{escape(listing.get("q", ""))}"><button>Find</button></form>')
    return (f'<p>{when}</p><p class="crumbs">{" / ".join(crumbs)}</p>{search}'
            f'<table class="list" id="entries"><thead><tr><th>Name</th><th>Size</th>'
            f'<th>Modified</th><th></th></tr></thead><tbody>{"".join(rows)}</tbody></table>'
            f'<p class="pager">{" ".join(pager)}</p>'
            '<dialog id="restore-dialog"><form method="dialog">'
            '<p>Restore <code id="restore-what"></code> into the folder (on this device):</p>'
            '<input id="restore-to" name="to" placeholder="/home/me/restored" required>'
            '<label><input type="checkbox" id="restore-overwrite"> replace files that differ'
            '</label><p><button value="ok" id="restore-go">Restore</button> '
            '<button value="cancel" formnovalidate>Cancel</button></p>'
            '<p id="restore-state" role="status"></p></form></dialog>')


def timeline(doc: dict[str, Any], sources: list[str]) -> str:
    """Per device and source, its snapshots and the log segments sealed between them on one
    time axis; each opens Browse as it was then. A moment picker browses any other moment
    (the snapshot before it plus the log after that, as `restore --at`)."""
    import datetime as dt

    options = "".join(f'<option value="{escape(n)}">{escape(n)}</option>' for n in sources)
    picker = ('<form id="moment" action="/browse" method="get">'
              '<label>Moment <input type="datetime-local" step="1" name="at" id="moment-at" '
              'required></label>'
              f'<label>Source <select name="path" id="moment-source">{options}</select></label>'
              '<input type="hidden" name="snapshot" value="latest">'
              '<button type="submit">Browse as it was</button></form>'
              if sources else "<p>This device has no sources of its own.</p>")
    if not doc["devices"]:
        return picker + "<p>No snapshots yet.</p>"
    times = [s["time"] for d in doc["devices"] for s in d["snapshots"]]
    lanes = []
    for d in doc["devices"]:
        names: dict[str, None] = {}
        for s in d["snapshots"]:
            names.update((r["name"], None) for r in s["sources"])
        for seg in d["segments"]:
            names.update((n, None) for n in seg["changes"])
        for name in names:
            marks: list[tuple[dt.datetime, str]] = []
            for s in d["snapshots"]:
                if any(r["name"] == name for r in s["sources"]):
                    marks.append((dt.datetime.fromisoformat(s["time"]),
                                  f'<li class="snapshot" data-time="{escape(s["time"])}">'
                                  + _browse_link(s["id"], name, text=s["time"][:19]
                                                 .replace("T", " ") + " snapshot "
                                                 + s["short_id"]) + "</li>"))
            held = [s for s in d["snapshots"] if any(r["name"] == name for r in s["sources"])]
            for seg in d["segments"]:
                n = seg["changes"].get(name)
                if not n:
                    continue
                when = seg["last_change"] or seg["sealed"]
                # Browsed on the snapshot the segment's log follows (of this device).
                base = next((s["id"] for s in reversed(held) if s["log_seq"] < seg["seq"]),
                            "latest")
                marks.append((dt.datetime.fromisoformat(seg["at"]),
                              f'<li class="segment" data-time="{escape(when)}">'
                              + _browse_link(base, name, seg["at"],
                                             f'{when[:19].replace("T", " ")} log segment '
                                             f'{seg["seq"]}: {n} change{"s" * (n != 1)}')
                              + "</li>"))
            marks.sort(key=lambda m: m[0])
            lanes.append(f'<section class="lane"><h2>{escape(d["hostname"])} '
                         f'<small>{escape(d["device"][:12])}</small> · {escape(name)}</h2>'
                         f'<ol class="axis">{"".join(m for _, m in marks)}</ol></section>')
    return (picker + f'<p class="muted">snapshots from {escape(min(times))} to '
            f'{escape(max(times))}; between them the log holds every change (its sealed '
            "segments are marked), so any moment can be browsed</p>" + "".join(lanes))


def devices(doc: dict[str, Any], can_change: bool, sources: Sequence[str] = ()) -> str:
    """The account's devices and partners with their state; remove one; pair a new one (an
    owner, a member granted some of `sources`, or a storage partner with a quota)."""
    rows = []
    for d in doc["devices"]:
        peer = d.get("peer")
        if d["this_device"]:
            state = "this device"
        elif peer is None:
            state = "offline"
        elif peer.get("connected"):
            state = f"online, over the {peer_route(peer)}"
        else:
            state = "on the LAN, not connected" if peer.get("on_lan") else "offline"
        extra = []
        if peer and peer.get("objects_behind"):
            extra.append(f"{peer['objects_behind']} objects "
                         f"({format_size(peer.get('bytes_behind') or 0)}) behind")
        if not d["this_device"]:
            last = peer.get("last_sync") if peer else None
            extra.append(f"last sync {iso_time(int(last * 1e9))}" if last else "never synced")
        if d["sources"] is not None:
            extra.append("sources " + ", ".join(d["sources"]))
        held = peer.get("held_bytes") if peer else None
        quota = f"{format_size(d['quota'])} quota" if d["quota"] is not None else ""
        if held is not None:   # (as its last session with this device said)
            extra.append(f"holds {format_size(held)} of ours ({peer['held_objects']} objects)"
                         + (f" of its {quota}" if quota else ""))
        elif quota:
            extra.append(quota)
        remove = (f'<button class="remove" data-device="{escape(d["id"])}" '
                  f'data-name="{escape(d["name"])}">remove…</button>'
                  if can_change and not d["this_device"] else "")
        cls = "online" if state.startswith("online") or d["this_device"] else "offline"
        rows.append(f'<tr data-device="{escape(d["id"])}"><td>{escape(d["name"])}<br>'
                    f'<small>{escape(d["id"][:12])}</small></td><td>{escape(d["role"])}</td>'
                    f'<td class="{cls} state">{escape(state)}</td>'
                    f'<td>{escape("; ".join(extra))}</td><td>{remove}</td></tr>')
    pair = ('<h2>Add a device</h2>' + _pair_form(sources) +
            '<p><button id="pair-start" type="button">Show a pairing code</button></p>'
            '<section id="pair" hidden><p>On the new device run '
            '<code>p2pbackup pair <span id="pair-code"></span></code>, or scan:</p>'
            '<img id="pair-qr" alt="QR code of the pairing code" width="180" height="180">'
            '<p id="pair-state" role="status">waiting for the new device…</p>'
            '<p><button id="pair-cancel">Cancel (withdraw the code)</button></p>'
            '<p id="pair-question" hidden>Does the other device show <strong '
            'id="pair-verifier"></strong>? <button id="pair-yes">Yes, the same</button> '
            '<button id="pair-no">No</button></p></section>' if can_change else "")
    removed = (f'<p class="muted">removed: {escape(", ".join(r[:12] for r in doc["removed"]))}'
               "</p>" if doc["removed"] else "")
    return (f'<p>membership version {doc["version"]}, key epoch {doc["key_epoch"]}</p>'
            + _broker(doc.get("broker")) +
            '<table class="list" id="devices"><thead><tr><th>Device</th><th>Role</th>'
            f'<th>State</th><th></th><th></th></tr></thead><tbody>{"".join(rows)}</tbody>'
            f'</table>{removed}<p id="remove-state" role="status"></p>{pair}')


def _pair_form(sources: Sequence[str]) -> str:
    """Who the new device is: the role decides what it gets (p2pbackup pair's --sources and
    --partner --quota)."""
    ticks = "".join(f'<label><input type="checkbox" name="pair-source" value="{escape(s)}"> '
                    f"{escape(s)}</label>" for s in sources)
    return ('<fieldset id="pair-role"><legend>The new device is</legend>'
            '<label><input type="radio" name="pair-role" value="owner" checked> '
            "<strong>a device of mine</strong>: it gets every source and the keys, and can add "
            "and remove devices too</label>"
            '<label><input type="radio" name="pair-role" value="member"> '
            "<strong>a household member's device</strong>: it gets the keys of the sources "
            "ticked below only, backs up and restores those, and cannot read the others' "
            "files</label>"
            f'<div id="pair-sources" hidden><p class="muted">Sources it gets:</p>{ticks}</div>'
            '<label><input type="radio" name="pair-role" value="partner"> '
            "<strong>a storage partner</strong> (a friend's machine, a NAS): it keeps our data "
            "encrypted, within the space it gives us, and can read none of it</label>"
            '<label id="pair-quota-box" hidden>Space it gives us (e.g. 50G or 500 MiB) '
            '<input id="pair-quota" name="pair-quota" inputmode="text" autocomplete="off" '
            'placeholder="50G"></label></fieldset>')


def _broker(broker: dict[str, Any] | None) -> str:
    """Whether this device reaches the broker (devices off the LAN are found through it)."""
    if broker is None:
        return '<p id="broker" class="muted">no broker ([broker] url in config.toml): ' \
               "devices are found on the LAN and at their static addresses</p>"
    state = "connected" if broker["connected"] else \
        "not connected" + (f" ({broker['last_error']})" if broker.get("last_error") else "")
    return (f'<p id="broker" class="{"online" if broker["connected"] else "offline"}">'
            f'broker {escape(broker["url"])}: {escape(state)}</p>')


def verify(can_repair: bool) -> str:
    repair = ('<p>Repair reads every pack: a damaged one keeps the blobs that still '
              "authenticate and is moved to quarantine/; what is lost is named with the files "
              "that used it (the next snapshot stores it again from the sources).</p>"
              '<p><button class="repair">Repair</button></p>' if can_repair else "")
    return ('<p>Check that every snapshot, tree and pack is there and signed; reading the '
            "data also decrypts and checks every blob (slower).</p>"
            '<p><button class="verify" data-read="false">Verify</button> '
            '<button class="verify" data-read="true">Verify and read all data</button></p>'
            f'{repair}<pre id="verify-state" role="status"></pre>')


def versions(doc: dict[str, Any]) -> str:
    rows = []
    for v in reversed(doc["versions"]):
        q = urlencode({"snapshot": v["snapshot"]["id"], "path": doc["path"]}
                      if v["from"] == "snapshot" else
                      {"snapshot": v["base"], "path": doc["path"], "at": v["at"]})
        seen = f" (unchanged until {escape(v['last_seen'])})" if v.get("last_seen") else ""
        folder = doc["path"].rpartition("/")[0]
        if v["from"] == "snapshot":
            snap = v["snapshot"]
            when = snap["time"]
            where = "snapshot " + _browse_link(snap["id"], folder, text=snap["short_id"])
        else:
            when = v["time"]
            where = "log " + _browse_link(v["base"], folder, v["at"], f"segment {v['seq']}")
        if v.get("deleted"):
            size, mtime, get = "", "deleted", ""
        else:
            size, mtime = format_size(v["size"]), v["mtime"]
            get = f'<a class="download" download href="/api/file?{escape(q)}">download</a>'
        rows.append(f'<tr class="{escape(v["from"])}"><td>{escape(when)}{seen}</td>'
                    f"<td>{where}</td><td class=num>{escape(size)}</td>"
                    f"<td>{escape(mtime)}</td><td>{get}</td></tr>")
    return (f"<p><code>{escape(doc['path'])}</code>: {len(doc['versions'])} versions in the "
            "snapshots and the log between them (newest first)</p>"
            '<table class="list" id="versions"><thead><tr><th>Time</th><th>From</th>'
            f'<th>Size</th><th>Modified</th><th></th></tr></thead><tbody>{"".join(rows)}'
            "</tbody></table>")


def storage(st: dict[str, Any], snaps: list[dict[str, Any]],
            changes: Sequence[tuple[str, int]] = (),
            history: Sequence[dict[str, Any]] = ()) -> str:
    """Storage used and saved, and a small chart (SVG, drawn here) of the store's size over
    time (`history`: the index's notes after each change to the packs), each device's
    snapshot sizes and, as bars, the changes each sealed log segment holds (`changes`:
    (when, how many))."""
    words = (f'<p id="storage">The store holds {escape(format_size(st["stored_bytes"]))} in '
             f'{st["packs"]} packs for {escape(format_size(st["snapshot_bytes"]))} of files in '
             f"{len(snaps)} snapshots: deduplication and compression save "
             f'{escape(format_size(st["saved_bytes"]))}.</p>')
    if len(snaps) < 2 and len(history) < 2:
        return words
    import datetime as dt

    def seconds(when: str) -> float:
        return dt.datetime.fromisoformat(when).timestamp()

    times = [seconds(s["time"]) for s in snaps]
    marks = [(seconds(when), n) for when, n in changes]
    stored = [(seconds(h["time"]), h["stored_bytes"]) for h in history]
    every = times + [t for t, _ in marks] + [t for t, _ in stored]
    t0, t1 = min(every), max(every)
    top = max([s["size"] for s in snaps] + [b for _, b in stored]) or 1
    w, h = 600, 120

    def x(t: float) -> float:
        return (t - t0) / ((t1 - t0) or 1) * (w - 10) + 5

    def line(points: list[tuple[float, int]]) -> str:
        return " ".join(f"{x(t):.1f},{h - 5 - size / top * (h - 10):.1f}"
                        for t, size in sorted(points))

    lines = []
    if len(stored) >= 2:
        lines.append(f'<polyline class="stored" points="{line(stored)}"/>')
    by_device: dict[str, list[tuple[float, int]]] = {}
    for t, s in zip(times, snaps):
        by_device.setdefault(s["device"], []).append((t, s["size"]))
    if len(snaps) >= 2:
        for i, points in enumerate(by_device.values()):
            lines.append(f'<polyline class="series s{i % 4}" points="{line(points)}"/>')
    most = max((n for _, n in marks), default=1) or 1
    for (t, n), (when, _) in zip(marks, changes):
        bar = max(2.0, n / most * (h - 10) / 3)   # a third of the height: under the lines
        lines.append(f'<rect class="changes" x="{x(t) - 1:.1f}"'
                     f' y="{h - 5 - bar:.1f}" width="2" height="{bar:.1f}"><title>'
                     f'{escape(when)}: {n} change{"s" * (n != 1)}</title></rect>')
    when = sorted([s["time"] for s in snaps] + [h["time"] for h in history])
    return (words + f'<svg class="chart" viewBox="0 0 {w} {h}" role="img" '
            f'aria-label="the store&#39;s size and snapshot sizes over time, up to '
            f'{escape(format_size(top))}">{"".join(lines)}</svg><p class="muted">'
            + ("dashed: the store&#39;s size; " if len(stored) >= 2 else "")
            + f"from {escape(when[0])} to {escape(when[-1])}, snapshot sizes up to "
            f"{escape(format_size(top))}"
            + (f"; bars: the changes in each of {len(marks)} sealed log segments (up to "
               f"{most})" if marks else "") + "</p>")
