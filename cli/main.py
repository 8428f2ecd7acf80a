"""`p2pbackup`: the command-line front end. Errors become one line and a distinct exit code."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import typer

from p2pbackup.blobs import exit_process
from p2pbackup.buffers import fix_mmap_threshold
from p2pbackup.errors import EXIT_PARTIAL, ConfigError, IntegrityError, P2PError
from p2pbackup.views import (activity_line, repair_json, repair_lines, snapshot_json,
                             verify_json, verify_lines)

from . import output
from .account_cmds import account_app, devices_app, pair, recover
from .broker_cmds import broker_app
from .common import home, run_async, via_daemon, writable_device
from .store_cmds import parse_options, store_app

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Peer-to-peer, end-to-end encrypted backup of your own devices.")
index_app = typer.Typer(no_args_is_help=True, help="Maintain the pack index (a cache).")
app.add_typer(index_app, name="index")
app.add_typer(devices_app, name="devices")
app.add_typer(store_app, name="store")
app.add_typer(account_app, name="account")
app.add_typer(broker_app, name="broker")

_state = {"debug": False}


_run = run_async
_home = home


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"p2pbackup {version('p2pbackup')}")
        raise typer.Exit()


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors (also "
                                    "accepted after the command)."),
         _version: bool = typer.Option(False, "--version", is_eager=True,
                                       callback=_print_version,
                                       help="Print the version and exit.")) -> None:
    _state["debug"] = debug or _state["debug"]


# ---- init ----------------------------------------------------------------------------------

@app.command()
def init(source: list[str] = typer.Option([], "--source", "-s",
                                          help="A directory to back up (repeatable).")) -> None:
    """Make this device's keys and account; print the recovery code once."""
    from p2pbackup.config import default_home
    from p2pbackup.device import init_device

    home = default_home()
    config, code = _run(init_device(home, source))
    print(f"Created p2pbackup home {config.home}")
    for s in config.sources:
        print(f"  source {s.name}: {s.path}")
    print()
    print("Recovery code (shown only this once; write it down and keep it safe):")
    print()
    print(f"    {code}")
    print()
    print("Anyone with this code can read your backups; without it, a lost device's data "
          "can only come back from another paired device.")


# ---- snapshot ------------------------------------------------------------------------------

_via_daemon = via_daemon


@app.command()
def snapshot(paths: list[str] = typer.Argument(None, help="Directories (default: the sources)."),
             as_json: bool = typer.Option(False, "--json", help="Print the snapshot as JSON."),
             offline: bool = typer.Option(False, "--offline",
                                          help="Take it in this process, not in p2pbackupd "
                                          "(which pauses meanwhile if it runs)."),
             push: bool = typer.Option(False, "--push",
                                       help="Upload to every configured store while it runs "
                                       "(as p2pbackupd does), and wait for that; without "
                                       "p2pbackupd."),
             ) -> None:
    """Take one snapshot now (of the configured sources by default)."""
    import time

    from p2pbackup.backup.snapshot import SnapshotProgress, take_snapshot
    from p2pbackup.config import load_config, sources_for_paths
    from p2pbackup.device import open_device
    from p2pbackup.errors import NotFound
    from p2pbackup.repo.upload import store_error, upload_alongside

    from .store_cmds import new_uploader, refuse_if_daemon_uploads, say_pushed, upload_progress

    for p in paths or ():
        if not os.path.isdir(p):
            raise NotFound(f"{os.path.abspath(p)}: " + ("not a directory" if os.path.exists(p)
                                                         else "no such directory"))
    config = load_config(_home())   # (its stores, for --push)
    if push:
        if not config.stores:
            raise ConfigError("--push: no store is configured (`p2pbackup store add` one)")
        refuse_if_daemon_uploads()
    if not paths and not offline and not push:
        done = _via_daemon("snapshot")  # the daemon holds the writer lock: never two writers
        if done is not None:
            if as_json:
                async def load() -> Any:
                    async with open_device(_home()) as dev:
                        return await dev.repo.load_snapshot(done["id"])
                print(json.dumps(snapshot_json(_run(load())), indent=2))
            else:
                print(f"snapshot {done['short_id']} saved by p2pbackupd (covers log segment "
                      f"{done['log_seq']})")
                print(f"  files: {done['files_new']} new, {done['files_changed']} changed, "
                      f"{done['files_unchanged']} unchanged; added "
                      f"{output.human_bytes(done['bytes_added'])} in {done['seconds']:.1f} s")
            for n in done.get("notes", []):
                output.notice(n)
            for w in done.get("warnings", []):
                output.warn(w)
            if done.get("warnings"):
                raise typer.Exit(EXIT_PARTIAL)
            return

    async def go() -> Any:
        async with writable_device("snapshot") as dev:
            sources = sources_for_paths(paths) if paths else dev.config.sources
            if not sources:
                raise ConfigError(f"nothing to back up: {dev.config.home / 'config.toml'} lists "
                                  "no sources; pass directories or run init with --source")
            progress = SnapshotProgress()

            async def snap() -> Any:
                async with output.progress_bar("snapshot", progress):
                    return await take_snapshot(dev.repo, tuple(sources), temp_dir=dev.temp_dir,
                                               progress=progress, warn=output.warn,
                                               note=output.notice,
                                               hostname=dev.config.device_name)

            if not push:
                return await snap(), [], 0.0
            with upload_progress(config) as uploads:
                uploaders = [new_uploader(dev.repo, s, uploads) for s in config.stores]
                started = time.monotonic()
                got = await upload_alongside(dev.repo, uploaders, snap())
                return got, uploaders, time.monotonic() - started

    summary, uploaders, took = _run(go())
    if as_json:
        print(json.dumps(snapshot_json(summary.stored), indent=2))
    else:
        s = summary
        print(f"snapshot {s.stored.short_id} saved")
        print(f"  files: {s.files_new} new, {s.files_changed} changed, {s.files_unchanged} "
              f"unchanged; {s.dirs} directories")
        print(f"  read {output.human_bytes(s.bytes_read)}, added "
              f"{output.human_bytes(s.bytes_added)} ({s.blobs_added} blobs, {s.packs_written} "
              f"packs) in {s.seconds:.1f} s")
    failed = [u for u in uploaders if u.failure is not None]
    for u in uploaders:
        if u not in failed and not as_json:
            say_pushed(u, took)
    if summary.warnings:
        print(f"  {len(summary.warnings)} warnings:", file=sys.stderr)
        for w in summary.warnings:
            print(f"    {w}", file=sys.stderr)
    for u in failed:
        error = store_error(u.location, u.failure, "the snapshot is saved here, `p2pbackup "
                            "store push` uploads the rest later")
        if u is not failed[-1]:
            output.warn(str(error))
        else:
            raise error
    if summary.warnings:
        raise typer.Exit(EXIT_PARTIAL)


@app.command()
def snapshots(as_json: bool = typer.Option(False, "--json", help="Print a JSON array."),
              store: Optional[str] = typer.Option(None, "--from", help="Another store.")) -> None:
    """List snapshots (id, time, device, sources, size)."""
    from p2pbackup.device import open_device

    async def go() -> Any:
        async with open_device(_home(), store=store) as dev:
            return await dev.repo.list_snapshots()

    snaps, bad = _run(go())
    for b in bad:
        output.warn(f"snapshot {b.id[:8]} skipped: {b.reason}")
    if as_json:
        print(json.dumps([snapshot_json(s) for s in snaps], indent=2))
        return
    if not snaps:
        print("no snapshots yet")
        return
    print(f"{'ID':<10}{'Time':<27}{'Host':<16}{'Size':>11}  Paths")
    for s in snaps:
        snap = s.snapshot
        paths = ", ".join(r.path for r in snap.sources)
        print(f"{s.short_id:<10}{output.iso_time(snap.time_ns):<27}{snap.hostname[:15]:<16}"
              f"{output.human_bytes(snap.size):>11}  {paths}")
    print(f"{len(snaps)} snapshots")


# ---- restore -------------------------------------------------------------------------------

@app.command()
def restore(snapshot_ref: str = typer.Argument(..., metavar="SNAPSHOT|latest"),
            to: Path = typer.Option(..., "--to", help="Directory to restore into."),
            path: Optional[str] = typer.Option(None, "--path", help="Only this part "
                                               "(source name/sub/path)."),
            overwrite: bool = typer.Option(False, "--overwrite",
                                           help="Replace existing files that differ."),
            store: Optional[str] = typer.Option(None, "--from", help="Restore from this store."),
            at: Optional[str] = typer.Option(None, "--at", help="The moment to restore: ISO 8601, "
                                             "'2 hours ago', 'yesterday 14:00'."),
            keep_damaged: bool = typer.Option(False, "--keep-damaged",
                                              help="Restore files whose data is partly damaged, "
                                              "with the damaged byte ranges zeroed (named)."),
            ) -> None:
    """Restore a snapshot (or the device as it was --at a moment) into DIR/<source name>/..."""
    import datetime as dt

    from p2pbackup.backup.pointintime import plan
    from p2pbackup.backup.restore import RestoreProgress
    from p2pbackup.backup.restore import restore as do_restore
    from p2pbackup.device import open_device
    from p2pbackup.timeparse import TimeFormatError, parse_time

    at_ns = None
    if at is not None:
        try:
            moment = parse_time(at, dt.datetime.now().astimezone())
        except TimeFormatError as exc:
            raise typer.BadParameter(str(exc), param_hint="--at") from None
        at_ns = int(moment.timestamp() * 1e9)

    async def go() -> Any:
        async with open_device(_home(), store=store) as dev:
            output.peer_path(dev.repo.store)
            # `latest` names what holds what is asked for; it says which snapshot that is.
            stored, overlays, replayed = await plan(dev.repo, snapshot_ref, at_ns,
                                                    sources=dev.config.sources, path=path,
                                                    note=output.note)
            progress = RestoreProgress()
            async with output.progress_bar("restore", progress):
                summary = await do_restore(dev.repo, stored, str(to), sub=path,
                                           overwrite=overwrite, progress=progress,
                                           warn=output.warn, note=output.notice,
                                           overlays=overlays, keep_damaged=keep_damaged)
            return stored, summary, overlays, replayed

    stored, s, overlays, replayed = _run(go())
    if overlays is not None:
        n = sum(o.changes for o in overlays.values())
        print(f"state at {output.iso_time(at_ns)}: snapshot {stored.short_id} "
              f"(log segment {stored.snapshot.log_seq}) + {n} logged changes up to segment "
              f"{replayed}")
    damage = (f"; {len(s.failed)} not restored" if s.failed else "") + \
        (f"; {len(s.damaged)} restored with damaged bytes zeroed" if s.damaged else "")
    print(f"restored snapshot {stored.short_id} to {to}: {s.files_restored} files "
          f"({output.human_bytes(s.bytes)}), {s.dirs} directories, {s.links} hard links; "
          f"{s.files_skipped} files already complete{damage}; {s.seconds:.1f} s")
    if s.failed or s.damaged:  # each was named on stderr as it was found
        n = len(s.failed) + len(s.damaged)
        output.err(f"error: {n} {'entry' if n == 1 else 'entries'} could not be restored "
                   "whole: their data in the store is damaged or missing (listed above; "
                   "`p2pbackup verify --read-data` says more)")
        raise typer.Exit(IntegrityError.exit_code)
    if s.warnings:
        raise typer.Exit(EXIT_PARTIAL)


# ---- verify --------------------------------------------------------------------------------

@app.command()
def verify(read_data: bool = typer.Option(False, "--read-data",
                                          help="Also decrypt and check every chunk."),
           store: Optional[str] = typer.Option(None, "--from", help="Verify this store."),
           as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")
           ) -> None:
    """Check structure and signatures (and with --read-data, every chunk)."""
    from p2pbackup.backup.verify import VerifyProgress
    from p2pbackup.backup.verify import verify as do_verify
    from p2pbackup.device import open_device

    async def go() -> Any:
        async with open_device(_home(), store=store) as dev:
            output.peer_path(dev.repo.store)
            progress = VerifyProgress()
            async with output.progress_bar("verify", progress, files_attr=None):
                return await do_verify(dev.repo, read_data=read_data, progress=progress)

    report = _run(go())
    if report.noted and store is None:   # p2pbackupd heals them from its peers
        try:
            _via_daemon("check_packs", {"packs": report.noted}, timeout=30)
        except P2PError:   # (an older one knows no such request; it learns at its start)
            pass
    if as_json:
        print(json.dumps(verify_json(report), indent=2))
    else:
        print("\n".join(verify_lines(report)))
    if not report.ok:
        raise typer.Exit(IntegrityError.exit_code)


@app.command()
def repair(sources: list[str] = typer.Option([], "--from", help="Another copy to heal from: "
                                             "a store's path or peer:DEVICE (repeatable)."),
           as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")
           ) -> None:
    """Heal damaged packs from other copies, else keep every blob that still authenticates."""
    import contextlib

    from p2pbackup.backup.repair import repair_packs
    from p2pbackup.device import open_other_store

    async def go() -> Any:
        async with writable_device("repair") as dev, \
                contextlib.AsyncExitStack() as opened:
            stores = []
            for location in sources:
                store = await open_other_store(dev.config, dev.keys, dev.identity, location)
                opened.push_async_callback(store.close)
                output.peer_path(store)
                stores.append(store)
            return await repair_packs(dev.repo, sources=stores)

    report = _run(go())
    if as_json:
        print(json.dumps(repair_json(report), indent=2))
        return
    for line in repair_lines(report):
        print(line)
    else:
        print(f"no damaged packs ({report.checked} checked)")


def _maintain(args: dict, as_json: bool) -> None:
    """Run forget/prune in the daemon when it runs (it holds the writer lock), else here."""
    from p2pbackup.backup.maintenance import forget_and_prune, policy_of
    from p2pbackup.device import open_device

    result = _via_daemon("forget", args)
    if result is None:
        async def go() -> Any:
            async with open_device(_home(), write=True) as dev:
                return await forget_and_prune(dev.repo, dev.identity, policy_of(args),
                                              dry_run=args["dry_run"], prune_after=args["prune"],
                                              grace=dev.config.peers.removal_grace)
        result = _run(go())
    if as_json:
        for g in result.get("groups", []):
            for snap in g["keep"] + g["forget"]:
                snap["time"] = output.iso_time(snap["time_ns"])
        print(json.dumps(result, indent=2))
        return
    would = "would " if result["dry_run"] else ""
    if args.get("policy") is not None:
        _print_forget(result, would)
    p = result.get("prune")
    if p:
        _print_prune(p, would)


def _print_forget(result: dict, would: str) -> None:
    """Per group, each snapshot (oldest first) and whether it stays (and by which rules)."""
    from p2pbackup.repo.snapshots import GroupKey

    for g in result["groups"]:
        key = GroupKey(g["device"], tuple(g["paths"]) if g["paths"] is not None else None)
        print(f"{key.describe(g.get('hostname') or '')}: keep {len(g['keep'])}, {would}forget "
              f"{len(g['forget'])}")
        rows = sorted([(k["time_ns"], "keep", k["id"], ", ".join(k["reasons"])) for k in g["keep"]]
                      + [(f["time_ns"], f"{would}forget", f["id"], "") for f in g["forget"]])
        for time_ns, action, sid, why in rows:
            print(f"  {action:<13}{sid[:8]}  {output.iso_time(time_ns)}  {why}".rstrip())
    print(f"keep {len(result['kept'])} snapshots; {would}forget {len(result['forgotten'])}")


def _print_prune(p: dict, would: str) -> None:
    unused = (f"{p['blobs_unused_kept']} unused blobs "
              f"({output.human_bytes(p['bytes_unused_kept'])}) stay in packs mostly in use"
              if p.get("blobs_unused_kept") else "")
    if not (p["packs_deleted"] or p["packs_repacked"] or p["segments_folded"]):
        print("prune: nothing to do" + (f"; {unused}" if unused else ""))
    else:
        into = "" if would else f" into {p['packs_written']}"
        print(f"prune: {would}delete {p['packs_deleted']} packs, repack {p['packs_repacked']}"
              f"{into}, drop {p['blobs_dropped']} blobs, fold {p['segments_folded']} log "
              f"segments; {would}free {output.human_bytes(p['bytes_freed'])}")
        if unused:
            print(f"  {unused}")
    if p.get("packs_damaged_kept"):
        print(f"kept {p['packs_damaged_kept']} damaged packs for `p2pbackup repair` (it heals "
              "them from another copy, or keeps what still authenticates)")
    if p.get("packs_held"):
        print(f"kept {p['packs_held']} unused packs that arrived from peers within the "
              "removal grace period (a snapshot using them may still be on its way)")


_PER_GROUP = "In each group of snapshots (see --group-by),"


def _keep_newest_of(periods: str) -> str:
    return f"{_PER_GROUP} keep the newest snapshot of each of the N latest {periods} that have one."


@app.command()
def forget(keep_last: int = typer.Option(0, "--keep-last", min=0, metavar="N",
                                         help=f"{_PER_GROUP} keep the N newest snapshots."),
           keep_hourly: int = typer.Option(0, "--keep-hourly", min=0, metavar="N",
                                           help=_keep_newest_of("hours")),
           keep_daily: int = typer.Option(0, "--keep-daily", min=0, metavar="N",
                                          help=_keep_newest_of("days")),
           keep_weekly: int = typer.Option(0, "--keep-weekly", min=0, metavar="N",
                                           help=_keep_newest_of("weeks (Monday to Sunday)")),
           keep_monthly: int = typer.Option(0, "--keep-monthly", min=0, metavar="N",
                                            help=_keep_newest_of("months")),
           group_by: str = typer.Option(
               "device,paths", "--group-by", metavar="FIELDS",
               help="What makes a group: device,paths (each device's snapshots of one set of "
                    "source paths, so an ad-hoc `snapshot DIR` is a group of its own), device "
                    "(all of a device's snapshots), paths (every device's of the same paths) "
                    "or none (all snapshots as one group)."),
           prune_too: bool = typer.Option(False, "--prune", help="Prune right after."),
           dry_run: bool = typer.Option(False, "--dry-run",
                                        help="Only say, per group, what would stay and go."),
           as_json: bool = typer.Option(False, "--json", help="Print the groups as JSON.")
           ) -> None:
    """Forget the snapshots a retention policy does not keep (a snapshot kept by any rule
    stays); rules apply per group of snapshots. --prune then frees their data."""
    from p2pbackup.repo.snapshots import parse_group_by

    parse_group_by(group_by)  # a mistake is refused here, before the daemon is asked
    policy = {"last": keep_last, "hourly": keep_hourly, "daily": keep_daily,
              "weekly": keep_weekly, "monthly": keep_monthly, "group_by": group_by}
    _maintain({"policy": policy, "prune": prune_too, "dry_run": dry_run}, as_json)


@app.command()
def prune(dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would go."),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Delete data no snapshot or kept log segment needs; repack mostly-unused packs."""
    _maintain({"policy": None, "prune": True, "dry_run": dry_run}, as_json)


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Print the status as JSON.")
           ) -> None:
    """What the daemon is doing: sources, last sealed segment, next snapshot, errors."""
    import time as _time

    from p2pbackup import control
    from p2pbackup.config import load_config

    from p2pbackup.errors import DaemonNotRunning

    config = load_config(_home())
    try:
        st = _run(control.request(config.control_socket, "status", timeout=30))
    except DaemonNotRunning as exc:
        if as_json:  # scripts get an object to read, and still the exit code
            print(json.dumps({"running": False, "home": str(config.home), "error": str(exc)},
                             indent=2))
        raise
    if as_json:
        print(json.dumps({"running": True, **st}, indent=2))
        return
    logi = st.get("log")
    print(f"p2pbackupd running (pid {st['pid']}, up {st['uptime_seconds']:.0f} s), "
          f"device {st['device'][:12]}")
    for g in st.get("partner_for", []):
        quota = output.human_bytes(g["quota"]) if g.get("quota") is not None else "no quota"
        used = output.human_bytes(g["used"]) if g.get("used") is not None else "?"
        print(f"  storage partner for account {g['account']}: {used} of {quota}; "
              f"{len(g['owners_connected'])} owner devices connected"
              + (f"; {g['error']}" if g.get("error") else ""))
        if g.get("broker"):
            b = g["broker"]
            print(f"    broker {b['url']} for it: " + ("connected" if b["connected"] else
                                                     f"not connected ({b['last_error']})"))
    web_console = st.get("web")
    if web_console:
        where = (f"port {web_console['port']}" if web_console["port"]
                 else f"a Unix socket behind {web_console.get('url')}")
        print(f"  web console on {where} (`p2pbackup web` opens it)"
              if web_console["enabled"] else f"  web console: {web_console['error']}")
    paused = st.get("paused_for")
    if paused:
        print(f"  paused: {paused['command']} (pid {paused['pid']}) writes the store; changes "
              "are captured when it ends"
              + (f"; waiting to take the store back: {paused['waiting']}"
                 if paused.get("waiting") else ""))
    if logi is None:
        return  # a storage partner only: no sources, no log
    for s in st["sources"]:
        print(f"  source {s['name']}: {s['path']}{'' if s['present'] else '  (MISSING)'}")
    watch = st.get("watch")
    if watch:
        print(f"  inotify: {watch['watched']} of {watch['folders']} folders watched")
    sealed = (f"sealed {(_time.time() - logi['last_sealed']):.0f} s ago"
              if logi["last_sealed"] else "none sealed since start")
    print(f"  log: segment {logi['seq']} ({sealed}); {logi['pending_changes']} changes pending, "
          f"next seal in {logi['next_seal_in']:.0f} s")
    names = {p["device"]: p["name"] or p["device"][:12] for p in st.get("peers", [])}
    for a in st.get("activities", []):
        if a.get("phase") != "idle":
            print(f"  now: {activity_line(a, names)}")
    last = st.get("last_snapshot")
    print(f"  last snapshot: {last['id'][:8] + ' at ' + output.iso_time(int(last['time'] * 1e9)) if last and last['id'] else 'none'}; "
          f"next in {st['next_snapshot_in']:.0f} s")
    if not st.get("lan", {}).get("enabled", True):
        print("  peers: LAN discovery is off ([peers] lan = false)")
    broker = st.get("broker")
    if broker:
        print(f"  broker {broker['url']}: " + ("connected" if broker["connected"] else
                                               f"not connected ({broker['last_error']})"))
    for p in st.get("peers", []):
        where = (f"connected over the {output.peer_route(p)}" if p["connected"]
                 else "on the LAN, not connected" if p["on_lan"]
                 else f"not connected, dialing {', '.join(p['static_addresses'])}"
                 if p.get("static_addresses") else "not seen")
        extra = ""
        if p.get("objects_behind"):
            extra += (f"; {p['objects_behind']} objects "
                      f"({output.human_bytes(p.get('bytes_behind') or 0)}) behind")
        if p.get("last_sync"):
            extra += f"; last sync {(_time.time() - p['last_sync']):.0f} s ago"
        if p.get("error"):
            extra += f"; {p['error']}"
        print(f"  peer {p['name'] or '?'} ({p['device'][:12]}): {where}{extra}")
    for s in st.get("stores", []):
        print(f"  store {s['location']}: {_store_line(s, _time.time())}")
    for d in st.get("damaged", []):
        print(f"  damaged: pack {d['pack'][:12]}: {d['reason']} (an intact copy from a peer "
              "replaces it; `p2pbackup repair` heals it or sets it aside)")
    for e in st.get("errors", []):
        print(f"  error: {e}")


def _store_line(s: dict, now: float) -> str:
    """One store in `status`: reachable or not, how far behind, last upload, last error."""
    where = ("not contacted yet" if s.get("reachable") is None else
             "reachable" if s["reachable"] else "unreachable")
    parts = [where]
    if s.get("objects_behind"):
        parts.append(f"{s['objects_behind']} objects "
                     f"({output.human_bytes(s.get('bytes_behind') or 0)}) behind")
    elif s.get("reachable"):
        parts.append("up to date")
    parts.append(f"last upload {now - s['last_upload']:.0f} s ago" if s.get("last_upload")
                 else "nothing uploaded yet")
    if s.get("last_error"):
        parts.append(f"error: {s['last_error']}")
    return "; ".join(parts)


# ---- store ---------------------------------------------------------------------------------

def _stores_changed() -> None:
    """Tell a running daemon; it follows the tables at once."""
    if via_daemon("reload_stores", timeout=60) is None:
        output.note("p2pbackupd is not running: it uploads to the stores when it starts")


@store_app.command("add")
def store_add(location: str = typer.Argument(..., help="A path, s3://bucket/prefix, "
                                             "webdavs://host/path, https://server/..."),
              option: list[str] = typer.Option([], "--option", "-o", metavar="KEY=VALUE",
                                               help="A store option (repeatable)."),
              bandwidth: Optional[str] = typer.Option(None, "--bandwidth",
                                                      help="At most this much per second, "
                                                      "e.g. 5MiB."),
              parallel: Optional[int] = typer.Option(None, "--parallel", min=1,
                                                     help="Uploads at once (default 4).")
              ) -> None:
    """Upload this device's store to LOCATION too (in the background, by p2pbackupd)."""
    from p2pbackup.blobs import StoreSigner, open_store
    from p2pbackup.config import STORE_KEYS, edit_stores, load_config, load_keys

    options = parse_options(option, reserved=STORE_KEYS)
    config = load_config(_home())
    keys, identity = load_keys(config)   # a partner's home has no store of its own to upload
    # A location it cannot open stops here; the storage server's requests are signed as us.
    store = open_store(location, options=options,
                       signer=StoreSigner(identity, keys.fingerprint()))
    location = store.location   # (a path becomes absolute)
    _run(store.close())
    table: dict[str, Any] = {"location": location, **options}
    if bandwidth is not None:
        table["bandwidth"] = bandwidth
    if parallel is not None:
        table["parallel"] = parallel
    if location == str(config.store):
        raise ConfigError(f"{location} is this device's own store; give another location")
    if any(s.location == location for s in config.stores):
        raise ConfigError(f"store {location} is already configured (`p2pbackup store remove` "
                          "it first to change it)")
    edit_stores(config.home, lambda tables: tables + [table])
    print(f"added store {location}")
    _stores_changed()


@store_app.command("remove")
def store_remove(location: str = typer.Argument(..., help="As `store list` shows it.")) -> None:
    """Stop uploading to LOCATION (what it holds stays there)."""
    from p2pbackup.config import edit_stores, load_config

    config = load_config(_home())
    known = [s.location for s in config.stores]
    if location not in known:
        absolute = os.path.abspath(location)   # (a path as typed, relative)
        if absolute not in known:
            raise ConfigError(f"no store {location} in {config.home / 'config.toml'}"
                              + (f"; the stores are: {', '.join(known)}" if known else
                                 "; no store is configured"))
        location = absolute
    edit_stores(config.home, lambda tables: [t for t in tables if t.get("location") != location])
    print(f"removed store {location} (what it holds stays there)")
    _stores_changed()


_SECRET_WORDS = ("password", "secret", "token", "key")


@store_app.command("list")
def store_list(as_json: bool = typer.Option(False, "--json", help="Print a JSON array.")) -> None:
    """The configured stores and their settings (secrets shown as ***)."""
    from p2pbackup.config import load_config

    rows = []
    for s in load_config(_home()).stores:
        shown = {k: "***" if any(w in k.lower() for w in _SECRET_WORDS) else v
                 for k, v in s.options.items()}
        rows.append({"location": s.location, "bandwidth": s.bandwidth,
                     "parallel": s.parallel, "options": shown})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print("no stores configured (`p2pbackup store add LOCATION`)")
    for r in rows:
        extra = [f"{output.human_bytes(r['bandwidth'])}/s" if r["bandwidth"] else
                 "no bandwidth cap", f"{r['parallel']} at once"]
        extra += [f"{k}={v}" for k, v in r["options"].items()]
        print(f"{r['location']}  ({', '.join(extra)})")


@app.command()
def web(no_open: bool = typer.Option(False, "--no-open", help="Only print the address.")
        ) -> None:
    """Print (and open in the browser) the address of p2pbackupd's local web console; it
    signs you in once, for a few minutes."""
    from p2pbackup import control
    from p2pbackup.config import load_config

    config = load_config(_home())
    url = _run(control.request(config.control_socket, "web", timeout=30))["url"]
    print(url)
    if not no_open:
        import webbrowser

        if not webbrowser.open(url):
            output.note("no browser found here: open the address above in one")


@index_app.command("rebuild")
def index_rebuild() -> None:
    """Recreate the pack index from the packs' trailers."""
    async def go() -> Any:
        async with writable_device("index rebuild") as dev:
            added, _ = await dev.repo.rebuild_index()
            return added, len(dev.repo.index.blobs), dev.repo.damaged_packs

    packs, blobs, damaged = _run(go())   # (the index said what is damaged, on stderr)
    print(f"index rebuilt: {packs} packs, {blobs} blobs"
          + (f"; {len(damaged)} damaged packs (`p2pbackup repair` heals or sets them aside)"
             if damaged else ""))


app.command()(pair)
app.command()(recover)


# ---- entry point ---------------------------------------------------------------------------

def _take_debug(args: list[str]) -> tuple[list[str], bool]:
    """`--debug` is taken wherever it stands before `--`, so errors that say "run with --debug"
    can be followed by adding it at the end; after `--` it is an argument (a path)."""
    end = args.index("--") if "--" in args else len(args)
    options = [a for a in args[:end] if a != "--debug"]
    return options + args[end:], len(options) < end


def run() -> None:
    """Console-script entry point: one line and a distinct exit code for every error."""
    # Worker threads return from GIL-free C calls (hashing, zstd, encryption, I/O) thousands
    # of times a second; a short switch interval lets them take the GIL back sooner from a
    # thread running Python (measured: snapshot 6%, restore 5% faster on 2 cores).
    sys.setswitchinterval(0.0002)
    fix_mmap_threshold()
    args, _state["debug"] = _take_debug(sys.argv[1:])
    exit_process(_run_app(args))


def _run_app(args: list[str]) -> int:
    """The command's exit code, its error said in one line."""
    try:
        code = app(args=args, standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C in a command into Exit(130), returned here
            raise KeyboardInterrupt
    except P2PError as exc:
        if _state["debug"]:
            traceback.print_exc()
        output.err(f"error: {exc}")
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        output.err("interrupted; nothing already stored was lost")
        return 130
    except Exception as exc:
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):  # usage errors from typer
            exc.show()
            return exc.exit_code
        # a bug: still one line unless --debug
        if _state["debug"]:
            traceback.print_exc()
        output.err(f"internal error: {type(exc).__name__}: {exc} (run with --debug for details)")
        return 70
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    run()
