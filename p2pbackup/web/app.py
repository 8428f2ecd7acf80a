"""The local web console: pages, the JSON API they use, and live status (server-sent events).

The API answers with the JSON the CLI's `--json` prints (p2pbackup.views) and reads the
repository with the restore code path (Restorer.find/content, pointintime.plan), so the page
and the command line never disagree. Everything it serves comes from the daemon: no CDN.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import datetime as dt
import json
import logging
import os
import stat as statmod
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from aiohttp import web

from ..backup.names import show_path
from ..backup.pointintime import Overlay, SegmentSummary, changes_of, log_summaries, plan
from ..backup.repair import RepairReport
from ..backup.restore import Restorer, RestoreProgress, restore
from ..backup.verify import VerifyProgress, verify
from ..config import Source
from ..errors import ConfigError, IntegrityError, NotFound, P2PError, WrongKey
from ..format.records import DIR, FILE, SYMLINK
from ..repo.logstore import LogStore
from ..repo.repository import Repository
from ..repo.snapshots import StoredSnapshot
from ..sizes import parse_size
from ..timeparse import TimeFormatError, parse_time
from ..views import iso_time, moment_after, repair_lines, snapshot_json, verify_lines
from . import pages
from .archive import tar_stream
from .security import SESSION, Gate, middleware

log = logging.getLogger("p2pbackup.web")

PAGE_SIZE = 200        # entries per page of a folder
MAX_PAGE_SIZE = 1000
SEARCH_RESULTS = 200       # names found, at most
SEARCH_ENTRIES = 1_000_000  # entries looked at, at most (a search never walks forever)
EVENT_INTERVAL = 0.5   # seconds between looks at the status for a change to push
KEEPALIVE = 15.0       # seconds of no change before a comment keeps the stream open
PLAN_CACHE = 4         # recent (snapshot, moment) plans kept for paging
TIMELINE_SEGMENTS = 500  # newest log segments per device on the timeline
# Counters that move every second: a change in them alone is not news worth pushing.
_TICKING = ("uptime_seconds", "next_snapshot_in", "next_seal_in")
_STATIC = ("console.js", "console.css")

Status = Callable[[], Awaitable[dict[str, Any]]]
AccountHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(slots=True)
class Backend:
    """What the daemon lends the console."""

    repo: Repository
    sources: Sequence[Source]
    status: Status
    # Held while the repository is read: the daemon's gate, so a pause (another process
    # writing the store) waits for reads in progress and later reads wait for it.
    reading: Callable[[], AbstractAsyncContextManager[None]] = contextlib.nullcontext
    # `devices --json`; None where there is no account (the Devices page says so).
    devices: Callable[[], Awaitable[dict[str, Any]]] | None = None
    # The daemon's account handlers (pair_start, pair_wait, pair_answer, pair_cancel,
    # devices_remove), the ones `p2pbackup pair` and `devices remove` use over the control
    # socket.
    account: Mapping[str, AccountHandler] = field(default_factory=dict)
    # `repair` in the daemon, between two seals (it holds the store); None: not offered.
    repair: Callable[[VerifyProgress], Awaitable[RepairReport]] | None = None


@dataclass(slots=True)
class Job:
    id: int
    kind: str
    what: str
    counters: Callable[[], dict[str, int]]  # its progress: bytes, expected_bytes, ...
    state: str = "running"     # running, done, failed
    result: str = ""
    started: float = field(default_factory=time.time)

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "what": self.what, "state": self.state,
                **self.counters(), "result": self.result}


class Jobs:
    """Work started from the page (restores), with progress the event stream pushes."""

    KEEP = 20

    def __init__(self) -> None:
        self._jobs: dict[int, Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._next = 1

    def start(self, kind: str, what: str, counters: Callable[[], dict[str, int]],
              work: Callable[[], Awaitable[str]]) -> Job:
        job = Job(self._next, kind, what, counters)
        self._next += 1
        self._jobs[job.id] = job
        while len(self._jobs) > self.KEEP:
            oldest = next(iter(self._jobs))
            if self._jobs[oldest].state == "running":
                break
            del self._jobs[oldest]

        async def run() -> None:
            try:
                job.result = await work()
                job.state = "done"
            except P2PError as exc:
                job.result, job.state = str(exc), "failed"
        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    def view(self) -> list[dict[str, Any]]:
        return [j.view() for j in self._jobs.values()]

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _entry_json(e: Any, path: str) -> dict[str, Any]:
    name = show_path(e.name)
    kind = {FILE: "file", DIR: "dir", SYMLINK: "symlink"}.get(e.type, "special")
    out = {"name": name, "path": f"{path}/{name}" if path else name, "type": kind,
           "size": e.size if e.type == FILE else None, "mtime": iso_time(e.mtime_ns),
           "mode": statmod.filemode(e.mode) if e.mode else None}
    if e.type == SYMLINK and e.target is not None:
        out["target"] = show_path(e.target)
    return out


class Console:
    """The aiohttp application and what it keeps: sessions, plans being paged, jobs."""

    def __init__(self, backend: Backend, gate: Gate | None = None, *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 now: Callable[[], dt.datetime] = lambda: dt.datetime.now().astimezone(),
                 event_interval: float = EVENT_INTERVAL) -> None:
        self.backend = backend
        self.gate = gate or Gate()
        self.sleep = sleep
        self.now = now
        self.event_interval = event_interval
        self.jobs = Jobs()
        self._plans: collections.OrderedDict[tuple, tuple[StoredSnapshot,
                                                          dict[str, Overlay] | None]] = \
            collections.OrderedDict()
        self._segments: dict[tuple[str, int], SegmentSummary] = {}   # (segments never change)
        self.app = web.Application(middlewares=[middleware(self.gate)],
                                   client_max_size=64 * 1024)
        reads = self._reading
        self.app.add_routes([
            web.get("/", reads(self.status_page)),
            web.get("/snapshots", reads(self.snapshots_page)),
            web.get("/browse", reads(self.browse_page)),
            web.get("/timeline", reads(self.timeline_page)),
            web.get("/static/{name}", self.static),
            web.get("/api/status", self.api_status),
            web.get("/api/snapshots", reads(self.api_snapshots)),
            web.get("/api/tree", reads(self.api_tree)),
            web.get("/api/file", reads(self.api_file)),
            web.get("/api/archive", reads(self.api_archive)),
            web.get("/api/versions", reads(self.api_versions)),
            web.get("/api/search", reads(self.api_search)),
            web.get("/api/timeline", reads(self.api_timeline)),
            web.get("/api/storage", reads(self.api_storage)),
            web.get("/versions", reads(self.versions_page)),
            web.post("/api/restore", reads(self.api_restore)),
            web.get("/api/jobs", self.api_jobs),
            web.get("/verify", self.verify_page),
            web.post("/api/verify", self.api_verify),
            web.post("/api/repair", self.api_repair),
            web.get("/devices", reads(self.devices_page)),
            web.get("/api/devices", reads(self.api_devices)),
            web.post("/api/devices/remove", self.account_call("devices_remove")),
            web.post("/api/pair/start", self.api_pair_start),
            web.post("/api/pair/wait", self.api_pair_wait),
            web.post("/api/pair/cancel", self.account_call("pair_cancel")),
            web.post("/api/pair/answer", self.account_call("pair_answer")),
            web.get("/api/events", self.api_events),
        ])
        self.app.on_shutdown.append(lambda _app: self.jobs.close())
        self._runner: web.AppRunner | None = None
        self._socket_path = ""

    def _reading(self, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                 ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            async with self.backend.reading():
                return await handler(request)
        return guarded

    # ---- serving -------------------------------------------------------------------------

    async def start(self, listen: str, port: int) -> int:
        """Listen on `listen`:`port` (0: any free port); return the port."""
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, listen, port).start()
        bound = int(self._runner.addresses[0][1])
        self.gate.bind(listen, bound)
        return bound

    async def start_proxied(self, socket_path: str, base_url: str) -> None:
        """Listen on a Unix socket (mode 0660: the reverse proxy's group reaches it) for a
        reverse proxy that serves it at `base_url`."""
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)  # left by a daemon that was killed
        old = os.umask(0o117)  # made 0660: no moment in which others could connect
        try:
            await web.UnixSite(self._runner, socket_path).start()
        finally:
            os.umask(old)
        self._socket_path = socket_path
        self.gate.bind_proxied(base_url)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._socket_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._socket_path)

    def login_url(self) -> str:
        token = self.gate.issue_token()
        if self.gate.base_url:
            return f"{self.gate.base_url}/login?token={token}"
        host = "127.0.0.1" if "127.0.0.1:%d" % self.gate.port in self.gate.hosts else "[::1]"
        return f"http://{host}:{self.gate.port}/login?token={token}"

    # ---- reading the repository ----------------------------------------------------------

    def _at_ns(self, request: web.Request) -> int | None:
        at = request.query.get("at", "").strip()
        if not at:
            return None
        try:
            return int(parse_time(at, self.now()).timestamp() * 1e9)
        except TimeFormatError as exc:
            raise web.HTTPBadRequest(text=json.dumps({"error": str(exc), "exit": 2}),
                                     content_type="application/json") from None

    async def _plan(self, ref: str, at_ns: int | None, path: str
                    ) -> tuple[StoredSnapshot, dict[str, Overlay] | None]:
        # `latest` moves with each new snapshot; a moment's plan (a log replay) does not.
        key = (ref, at_ns, path.split("/", 1)[0])
        got = self._plans.get(key) if (ref, at_ns) != ("latest", None) else None
        if got is None:
            stored, overlays, _ = await plan(self.backend.repo, ref, at_ns,
                                             sources=self.backend.sources, path=path or None)
            got = self._plans[key] = (stored, overlays)
            while len(self._plans) > PLAN_CACHE:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return got

    async def _read(self, request: web.Request
                    ) -> tuple[StoredSnapshot, Restorer, str, int | None]:
        """The snapshot (and log) the request's snapshot, path and at name, a reader of it,
        the path and the moment."""
        q = request.query
        ref = q.get("snapshot", "latest") or "latest"
        path = q.get("path", "").strip("/")
        at_ns = self._at_ns(request)
        stored, overlays = await self._plan(ref, at_ns, path)
        return stored, Restorer.reader(self.backend.repo, overlays), path, at_ns

    async def _find(self, request: web.Request) -> tuple[StoredSnapshot, Restorer, Any, str]:
        """What the request's path names, found as restore finds it (a file's folder is
        decoded on the way, not kept: folders are paged, searched and archived a batch of
        entries at a time)."""
        stored, reader, path, _ = await self._read(request)
        if not path and len(stored.snapshot.sources) > 1:
            return stored, reader, None, path
        return stored, reader, await asyncio.to_thread(reader.find, stored, path or None), path

    async def tree(self, request: web.Request) -> dict[str, Any]:
        """One page of a folder: only its entries are decoded (Restorer.page)."""
        try:
            offset = max(0, int(request.query.get("offset", "0")))
            limit = min(MAX_PAGE_SIZE, max(1, int(request.query.get("limit", str(PAGE_SIZE)))))
        except ValueError:
            raise web.HTTPBadRequest(text='{"error": "offset and limit must be numbers", '
                                     '"exit": 2}', content_type="application/json") from None
        stored, reader, path, _ = await self._read(request)
        if not path and len(stored.snapshot.sources) > 1:  # the sources are its top level
            entries = [{"name": r.name, "path": r.name, "type": "dir", "size": r.size,
                        "mtime": None, "mode": None} for r in stored.snapshot.sources]
            total = len(entries)
            entries = entries[offset:offset + limit]
        else:
            found, total, page = await asyncio.to_thread(reader.page, stored, path or None,
                                                         offset, limit)
            if not path and found.entry is not None:
                path = found.scope
            entries = [_entry_json(e, path or found.scope) for e in page.entries]
        return {"snapshot": snapshot_json(stored), "path": path, "offset": offset,
                "limit": limit, "total": total, "entries": entries}

    async def versions(self, request: web.Request) -> dict[str, Any]:
        """The versions of one file, oldest first: from the snapshots that hold it (a new
        one where its contents changed) and from the log between them (each change sealed
        in a segment; a deletion too). Each has the `at` that shows it (as `restore --at`)."""
        path = request.query.get("path", "").strip("/")
        snaps, _ = await self.backend.repo.list_snapshots()
        reader = Restorer.reader(self.backend.repo)
        source, _, rel = path.partition("/")
        found_in: list[tuple[int, dict[str, Any], Any]] = []   # (time, version, contents)
        # Per device, its snapshots of the source (log seq, id), oldest first: the log after
        # each is replayed on it.
        bases: dict[str, list[tuple[int, str]]] = {}
        for stored in snaps:
            if source not in (r.name for r in stored.snapshot.sources):
                continue
            bases.setdefault(stored.snapshot.device, []).append((stored.snapshot.log_seq,
                                                                 stored.id))
            try:
                found = await asyncio.to_thread(reader.find, stored, path)
            except NotFound:
                continue
            e = found.entry
            if e is None or e.type != FILE:
                continue
            snap = stored.snapshot
            found_in.append((snap.time_ns, {"from": "snapshot", "snapshot": snapshot_json(stored),
                                            "size": e.size, "mtime": iso_time(e.mtime_ns),
                                            "at": moment_after(snap.time_ns)},
                             (e.size, e.chunks, e.offset)))
        logstore = LogStore(self.backend.repo)
        for device, held in bases.items():
            held.sort()
            for c in await changes_of(logstore, device, source, os.fsencode(rel), held[0][0]):
                e = c.entry
                if e is not None and e.type != FILE:
                    continue
                base = held[bisect.bisect_left(held, (c.seq, "")) - 1][1]
                v = {"from": "log", "device": device, "seq": c.seq, "base": base,
                     "time": iso_time(c.time_ns), "at": moment_after(c.time_ns)}
                if e is None:
                    found_in.append((c.time_ns, {**v, "deleted": True}, None))
                else:
                    found_in.append((c.time_ns, {**v, "size": e.size,
                                                 "mtime": iso_time(e.mtime_ns)},
                                     (e.size, e.chunks, e.offset)))
        out: list[dict[str, Any]] = []
        last: Any = ()
        for _t, version, contents in sorted(found_in, key=lambda f: f[0]):
            if contents == last and out:
                out[-1]["last_seen"] = version.get("time") or version["snapshot"]["time"]
                continue
            last = contents
            out.append(version)
        if not out:
            raise NotFound(f"no snapshot or log holds a file {path}")
        return {"path": path, "versions": out}

    async def timeline(self) -> dict[str, Any]:
        """Per device: its snapshots and its newest sealed log segments (when, and how many
        changes per source), for the Timeline page."""
        snaps = await self.snapshot_list()
        devices: dict[str, dict[str, Any]] = {}
        for s in snaps:
            devices.setdefault(s["device"], {"device": s["device"], "hostname": s["hostname"],
                                             "snapshots": [], "segments": []})
            devices[s["device"]]["snapshots"].append(s)
        logstore = LogStore(self.backend.repo)
        for device, doc in devices.items():
            doc["hostname"] = doc["snapshots"][-1]["hostname"]
            for seg in await log_summaries(logstore, device, TIMELINE_SEGMENTS, self._segments):
                doc["segments"].append({
                    "seq": seg.seq, "sealed": iso_time(seg.time_ns),
                    "first_change": iso_time(seg.first_ns) if seg.first_ns else None,
                    "last_change": iso_time(seg.last_ns) if seg.last_ns else None,
                    "at": moment_after(seg.last_ns or seg.time_ns),
                    "changes": dict(seg.changes)})
        return {"devices": list(devices.values())}

    async def search(self, request: web.Request) -> dict[str, Any]:
        """Entries whose name holds `q` (any case) in the folder `path` of a snapshot and
        below it, in tree order; at most SEARCH_RESULTS, and SEARCH_ENTRIES looked at."""
        words = request.query.get("q", "").strip().lower()
        if not words:
            raise web.HTTPBadRequest(text='{"error": "give a name to look for (q)", "exit": 2}',
                                     content_type="application/json")
        stored, reader, path, _ = await self._read(request)
        hits: list[dict[str, Any]] = []
        looked = 0

        # Each folder a batch of entries at a time (Restorer.entries): a folder of 100,000
        # entries is never held decoded whole.
        def walk(scope: str, parts: tuple[bytes, ...], shown: str, tree: bytes | None) -> None:
            nonlocal looked
            for e in reader.entries(scope, parts, tree):
                looked += 1
                if len(hits) >= SEARCH_RESULTS or looked > SEARCH_ENTRIES:
                    return
                if words in show_path(e.name).lower():
                    hits.append(_entry_json(e, shown))
                if e.type == DIR:
                    walk(scope, parts + (e.name,), f"{shown}/{show_path(e.name)}", e.subtree)

        def below(sub: str | None) -> None:
            found, tree = reader.folder(stored, sub)
            walk(found.scope, found.parts, sub or found.scope, tree)

        def run() -> None:
            if not path and len(stored.snapshot.sources) > 1:  # every source
                for r in stored.snapshot.sources:
                    below(r.name)
            else:
                below(path or None)
        await asyncio.to_thread(run)
        return {"snapshot": snapshot_json(stored), "path": path, "q": words, "entries": hits,
                "complete": len(hits) < SEARCH_RESULTS and looked <= SEARCH_ENTRIES}

    # ---- API -----------------------------------------------------------------------------

    async def api_status(self, request: web.Request) -> web.Response:
        return _json({"running": True, **await self.backend.status()})

    async def snapshot_list(self) -> list[dict[str, Any]]:
        snaps, _ = await self.backend.repo.list_snapshots()
        return [snapshot_json(s) for s in snaps]

    async def api_snapshots(self, request: web.Request) -> web.Response:
        return _json(await self.snapshot_list())

    async def api_tree(self, request: web.Request) -> web.Response:
        return await _answer(self.tree(request))

    async def api_file(self, request: web.Request) -> web.StreamResponse:
        try:
            _, reader, found, path = await self._find(request)
            if found is None or found.entry is None or found.entry.type != FILE:
                raise NotFound(f"{path or '/'} is not a file in this snapshot")
            entry = found.entry
            return await _stream(request, reader.content(found.scope, entry),
                                 show_path(entry.name), "application/octet-stream",
                                 size=entry.size)
        except P2PError as exc:
            return _error(exc)

    async def api_archive(self, request: web.Request) -> web.StreamResponse:
        """A folder as a tar archive, streamed from the repository."""
        try:
            stored, reader, path, _ = await self._read(request)
            if not path and len(stored.snapshot.sources) > 1:
                raise NotFound("/ is not one folder of this snapshot (give a source or a "
                               "folder in one)")
            try:
                found, tree = await asyncio.to_thread(reader.folder, stored, path or None)
            except NotFound:
                raise NotFound(f"{path or '/'} is not one folder of this snapshot (give a "
                               "source or a folder in one)") from None
            # (not read whole, nor kept: a folder of 100,000 entries decoded is ~36 MiB)
            pieces = tar_stream(reader, found.scope, found.parts, found.entry, tree)
            return await _stream(request, pieces, show_path(found.parts[-1]) + ".tar",
                                 "application/x-tar")
        except P2PError as exc:
            return _error(exc)

    async def api_search(self, request: web.Request) -> web.Response:
        return await _answer(self.search(request))

    async def api_timeline(self, request: web.Request) -> web.Response:
        return await _answer(self.timeline())

    async def api_versions(self, request: web.Request) -> web.Response:
        return await _answer(self.versions(request))

    async def versions_page(self, request: web.Request) -> web.Response:
        try:
            doc = await self.versions(request)
        except P2PError as exc:
            return self._page(request, "Versions", pages.problem(str(exc)))
        return self._page(request, "Versions", pages.versions(doc))

    async def api_restore(self, request: web.Request) -> web.Response:
        try:
            args = await request.json()
        except ValueError:
            return _json({"error": "the request is not JSON", "exit": 2}, status=400)
        if not isinstance(args, dict) or not isinstance(args.get("to"), str) \
                or not os.path.isabs(args["to"]):
            return _json({"error": "give the folder to restore into as an absolute path "
                          "(\"to\")", "exit": 2}, status=400)
        ref = str(args.get("snapshot") or "latest")
        path = str(args.get("path") or "").strip("/")
        at = str(args.get("at") or "")
        try:
            at_ns = int(parse_time(at, self.now()).timestamp() * 1e9) if at else None
            stored, overlays = await self._plan(ref, at_ns, path)
        except TimeFormatError as exc:
            return _json({"error": str(exc), "exit": 2}, status=400)
        except P2PError as exc:
            return _error(exc)
        to, overwrite = args["to"], bool(args.get("overwrite", False))
        progress = RestoreProgress()

        async def work() -> str:
            # Threads, not forked workers: the daemon's process holds sockets and threads.
            async with self.backend.reading():
                s = await restore(self.backend.repo, stored, to, sub=path or None,
                                  overwrite=overwrite, progress=progress, overlays=overlays,
                                  processes=False)
            problems = len(s.failed) + len(s.damaged) + len(s.warnings)
            return (f"restored {s.files_restored} files, {s.dirs} folders to {to}"
                    + (f"; {problems} entries not restored whole (see the daemon's log)"
                       if problems else ""))
        job = self.jobs.start("restore", f"{stored.short_id}:{path or '/'} to {to}",
                              lambda: {"files": progress.files, "bytes": progress.bytes,
                                       "expected_bytes": progress.expected_bytes}, work)
        return _json({"job": job.id})

    async def api_verify(self, request: web.Request) -> web.Response:
        try:
            args = await request.json()
        except ValueError:
            args = None
        if not isinstance(args, dict) or not isinstance(args.get("read_data", False), bool):
            return _json({"error": "give {\"read_data\": true or false}", "exit": 2},
                         status=400)
        read_data = args.get("read_data", False)
        progress = VerifyProgress()

        async def work() -> str:
            async with self.backend.reading():
                report = await verify(self.backend.repo, read_data=read_data,
                                      progress=progress)
            if not report.ok:  # the job fails, and says what is damaged
                raise IntegrityError("\n".join(verify_lines(report)))
            return "\n".join(verify_lines(report))
        job = self.jobs.start("verify", "with --read-data" if read_data else "",
                              lambda: {"packs": progress.packs,
                                       "total_packs": progress.total_packs,
                                       "bytes": progress.bytes,
                                       "expected_bytes": progress.expected_bytes}, work)
        return _json({"job": job.id})

    async def api_repair(self, request: web.Request) -> web.Response:
        repair = self.backend.repair
        if repair is None:
            return _json({"error": "not available here", "exit": 1}, status=404)
        progress = VerifyProgress()

        async def work() -> str:
            report = await repair(progress)
            lines = repair_lines(report) or [f"no damaged packs ({report.checked} packs read)"]
            if report.lost:   # the job fails, and says what is lost and what to do
                raise IntegrityError("\n".join(lines))
            return "\n".join(lines)
        job = self.jobs.start("repair", "", lambda: {"packs": progress.packs,
                                                     "total_packs": progress.total_packs,
                                                     "bytes": progress.bytes,
                                                     "expected_bytes": progress.expected_bytes},
                              work)
        return _json({"job": job.id})

    async def verify_page(self, request: web.Request) -> web.Response:
        return self._page(request, "Verify", pages.verify(self.backend.repair is not None))

    # ---- devices -------------------------------------------------------------------------

    async def device_list(self) -> dict[str, Any]:
        if self.backend.devices is None:
            raise NotFound("this home has no account devices (a storage partner only)")
        doc = await self.backend.devices()
        status = await self.backend.status()
        peers = {p["device"]: p for p in status.get("peers", [])}
        for d in doc["devices"]:
            d["peer"] = peers.get(d["id"])
        doc["broker"] = status.get("broker")
        return doc

    async def api_devices(self, request: web.Request) -> web.Response:
        return await _answer(self.device_list())

    async def devices_page(self, request: web.Request) -> web.Response:
        try:
            doc = await self.device_list()
        except P2PError as exc:
            return self._page(request, "Devices", pages.problem(str(exc)))
        return self._page(request, "Devices",
                          pages.devices(doc, can_change="devices_remove" in self.backend.account,
                                        sources=[s.name for s in self.backend.sources]))

    def account_call(self, name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        """A POST that hands its JSON object to the daemon's control handler `name`."""
        async def call(request: web.Request) -> web.Response:
            return await self._account(request, name, lambda handler, args: handler(args))
        return call

    async def _account(self, request: web.Request, name: str,
                       call: Callable[[AccountHandler, dict[str, Any]],
                                      Awaitable[dict[str, Any]]]) -> web.Response:
        """What `call` makes of control handler `name` and the request's JSON object."""
        handler = self.backend.account.get(name)
        if handler is None:
            return _json({"error": "not available here", "exit": 1}, status=404)
        try:
            args = await request.json()
        except ValueError:
            args = None
        if not isinstance(args, dict):
            return _json({"error": "the request is not a JSON object", "exit": 20},
                         status=400)
        try:
            return _json(await call(handler, args))
        except P2PError as exc:
            return _error(exc)

    async def api_pair_wait(self, request: web.Request) -> web.Response:
        """pair_wait, while the page holds the code: a page that goes away during the wait
        (closed, reloaded, navigated off) withdraws the code, as the end of the `pair`
        command that shows one does. (aiohttp does not cancel a handler whose client left:
        the connection is looked at.)"""
        cancel = self.backend.account.get("pair_cancel")

        async def held(handler: AccountHandler, args: dict[str, Any]) -> dict[str, Any]:
            nonlocal cancel
            wait = asyncio.ensure_future(handler(args))
            try:
                while not wait.done():
                    await asyncio.wait({wait}, timeout=self.event_interval)
                    transport = request.transport
                    if not wait.done() and cancel is not None and \
                            (transport is None or transport.is_closing()):
                        log.info("the page waiting for a pairing went away")
                        await cancel({"code": args.get("code")})
                        cancel = None   # (the wait ends with the withdrawal)
                return wait.result()
            finally:
                wait.cancel()
        return await self._account(request, "pair_wait", held)

    async def api_pair_start(self, request: web.Request) -> web.Response:
        """A pairing code for a new device of this account: an owner (the default), a member
        with the sources it is granted, or a storage partner with its quota; and the code's
        QR code (an SVG made here: nothing is fetched from elsewhere)."""
        import base64

        import qrcode
        import qrcode.image.svg

        from ..crypto.pairing import qr_text

        async def start(handler: AccountHandler, args: dict[str, Any]) -> dict[str, Any]:
            asked = _pairing_asked(args)
            started = await handler(asked)
            svg = qrcode.make(qr_text(started["code"]),
                              image_factory=qrcode.image.svg.SvgPathImage).to_string()
            return {**started, "role": asked["role"],
                    "qr": "data:image/svg+xml;base64," + base64.b64encode(svg).decode()}
        return await self._account(request, "pair_start", start)

    async def api_jobs(self, request: web.Request) -> web.Response:
        return _json(self.jobs.view())

    async def events(self) -> collections.abc.AsyncIterator[str]:
        """The status and jobs, each time they change (ticking counters aside)."""
        last, quiet = None, 0.0
        while True:
            status = await self.backend.status()
            news = {"status": status, "jobs": self.jobs.view()}
            steady = json.dumps({"status": _without_ticking(status), "jobs": news["jobs"]},
                                sort_keys=True, default=str)
            if steady != last:
                last, quiet = steady, 0.0
                yield f"event: status\ndata: {json.dumps(news, default=str)}\n\n"
            elif quiet >= KEEPALIVE:
                quiet = 0.0
                yield ": keepalive\n\n"
            await self.sleep(self.event_interval)
            quiet += self.event_interval

    async def api_events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-store"})
        await response.prepare(request)
        try:
            async for message in self.events():
                await response.write(message.encode())
        except ConnectionError:
            pass  # the page was closed
        return response

    # ---- pages ---------------------------------------------------------------------------

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC:
            raise web.HTTPNotFound()
        body = resources.files(__package__).joinpath("static", name).read_bytes()
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        return web.Response(body=body, content_type=kind, headers={"Cache-Control": "no-cache"})

    def _page(self, request: web.Request, title: str, body: str) -> web.Response:
        return web.Response(text=pages.layout(title, body, request[SESSION].csrf),
                            content_type="text/html")

    async def status_page(self, request: web.Request) -> web.Response:
        doc = await self.timeline()
        snaps = sorted((s for d in doc["devices"] for s in d["snapshots"]),
                       key=lambda s: s["time"])
        changes = sorted((seg["last_change"] or seg["sealed"], sum(seg["changes"].values()))
                         for d in doc["devices"] for seg in d["segments"])
        return self._page(request, "Status",
                          pages.status(pages.storage(self.storage(snaps), snaps, changes,
                                                     await self.size_history())))

    def storage(self, snaps: list[dict[str, Any]]) -> dict[str, Any]:
        """What the store holds against what the snapshots hold: deduplication and
        compression save the difference."""
        used = sum(size for _scope, _epoch, size in self.backend.repo.index.packs.values())
        logical = sum(s["size"] for s in snaps)
        return {"packs": len(self.backend.repo.index.packs), "stored_bytes": used,
                "snapshot_bytes": logical, "saved_bytes": max(0, logical - used)}

    async def size_history(self) -> list[dict[str, Any]]:
        """The store's size after each change to its packs (the index notes it)."""
        return [{"time": iso_time(when * 1_000_000_000), "stored_bytes": stored, "packs": packs}
                for when, stored, packs in await self.backend.repo.index.size_history()]

    async def api_storage(self, request: web.Request) -> web.Response:
        return _json({**self.storage(await self.snapshot_list()),
                      "history": await self.size_history()})

    async def snapshots_page(self, request: web.Request) -> web.Response:
        snaps = await self.snapshot_list()
        return self._page(request, "Snapshots",
                          pages.storage(self.storage(snaps), snaps, (),
                                        await self.size_history()) + pages.snapshots(snaps))

    async def browse_page(self, request: web.Request) -> web.Response:
        try:
            listing = await (self.search(request) if request.query.get("q", "").strip()
                             else self.tree(request))
        except P2PError as exc:
            return self._page(request, "Browse", pages.problem(str(exc)))
        return self._page(request, "Browse", pages.browse(listing, request.query.get("at", "")))

    async def timeline_page(self, request: web.Request) -> web.Response:
        try:
            doc = await self.timeline()
        except P2PError as exc:
            return self._page(request, "Timeline", pages.problem(str(exc)))
        return self._page(request, "Timeline",
                          pages.timeline(doc, [s.name for s in self.backend.sources]))


def _pairing_asked(args: dict[str, Any]) -> dict[str, Any]:
    """The role, sources and quota a page asks to pair with, in the shapes pair_start takes.
    Which role takes sources or a quota, and which sources this account has, the daemon's
    pairing decides (account.invitation), for the page as for `p2pbackup pair`."""
    role = args.get("role", "owner")
    if not isinstance(role, str):
        raise ConfigError("the role is owner, member or partner")
    sources = args.get("sources")
    if sources is not None and not (isinstance(sources, list)
                                    and all(isinstance(s, str) for s in sources)):
        raise ConfigError("the sources are a list of this account's source names")
    quota = args.get("quota")
    if quota is not None and not isinstance(quota, str):
        raise ConfigError("give the quota as a size such as 50G or 500 MiB")
    quota = parse_size(quota, "quota") if quota and quota.strip() else None
    if role == "partner" and quota is None:
        # (`pair --partner` may leave it unset; on the page the partner's space is asked)
        raise ConfigError("a storage partner needs a quota, such as 50G: the space it gives "
                          "this account")
    return {"role": role, "sources": sources, "quota": quota}


def _without_ticking(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_ticking(v) for k, v in obj.items() if k not in _TICKING}
    if isinstance(obj, list):
        return [_without_ticking(v) for v in obj]
    return obj


async def _stream(request: web.Request, pieces: Iterator[bytes | bytearray | memoryview],
                  name: str, kind: str, size: int | None = None) -> web.StreamResponse:
    """Send what `pieces` (blocking: read, authenticated and decoded from the store) yields,
    one piece at a time from a worker thread, so that any size streams in the memory of one
    read batch and the event loop never waits on the store. A P2PError before the first
    byte is the answer; one after it ends the download short (the browser says it failed)."""
    first = await asyncio.to_thread(next, pieces, None)
    headers = {"Content-Type": kind, "Content-Disposition": _attachment(name)}
    if size is not None:
        headers["Content-Length"] = str(size)
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    piece = first
    try:
        while piece is not None:
            await response.write(bytes(piece))
            piece = await asyncio.to_thread(next, pieces, None)
    except P2PError as exc:
        log.error("download of %s ended short: %s", name, exc)
        if request.transport is not None:
            request.transport.close()  # cut short: never a file that looks whole
        return response
    await response.write_eof()
    return response


def _attachment(name: str) -> str:
    from urllib.parse import quote

    ascii_name = name.encode("ascii", "replace").decode().replace('"', "_").replace("\\", "_")
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name)}"


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(obj, indent=1), status=status,
                        content_type="application/json")


_HTTP_STATUS = {NotFound.exit_code: 404, 2: 400, 10: 400, WrongKey.exit_code: 403, 18: 409}


def _error(exc: P2PError) -> web.Response:
    """A P2PError as the page sees it: its one line and its exit code, as the CLI says them."""
    return _json({"error": str(exc), "exit": exc.exit_code},
                 status=_HTTP_STATUS.get(exc.exit_code, 500))


async def _answer(work: Awaitable[dict[str, Any]]) -> web.Response:
    try:
        return _json(await work)
    except P2PError as exc:
        return _error(exc)
