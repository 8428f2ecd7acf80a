"""`p2pbackupd`: one asyncio process per device that turns every change into the signed log.

Watch the sources (inotify through watchfiles) -> capture each changed path into the open
segment -> seal it every `seal_interval` seconds or `seal_bytes` bytes -> move the head.
Under systemd (Type=notify) it reports READY=1, STATUS= lines and WATCHDOG=1 pings.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from p2pbackup import account, activity, control, ids
from p2pbackup.backup.maintenance import forget_and_prune, policy_of
from p2pbackup.backup.repair import RepairReport, repair_packs
from p2pbackup.backup.seal import SealState, SegmentSealer
from p2pbackup.backup.snapshot import take_snapshot
from p2pbackup.backup.verify import VerifyProgress
from p2pbackup.blobs import StoreSigner, exit_process, open_store
from p2pbackup.buffers import fix_mmap_threshold
from p2pbackup.blobs.base import BlobStore
from p2pbackup.config import (Config, StoreSettings, load_config, load_identity,
                              systemd_settings)
from p2pbackup.device import Device, open_device
from p2pbackup.errors import LocalProtocolError, P2PError, PeerUnreachable
from p2pbackup.format.log import Head, head_time_after
from p2pbackup.format.membership import OWNER
from p2pbackup.ids import is_device
from p2pbackup.repo import membership as store_membership
from p2pbackup.repo import removals, roster
from p2pbackup.repo.index import noted_damage
from p2pbackup.repo.logstore import LogStore
from p2pbackup.repo.partner_store import load_grants
from p2pbackup.repo.upload import StoreUploader, UploadProgress
from p2pbackup.replication.member import Replicator

from .account_ops import AccountOps
from .control import ControlServer
from .gate import WriteGate
from .notify import Notifier
from .peers import PeerManager, connection_limits
from .partner import PartnerService
from .rescan import rescan
from .watches import WatchCoverage, measure, watched_folders
from .web import WebService

log = logging.getLogger("p2pbackupd")


SOURCE_POLL = 1.0  # seconds between looks for a missing source while none is watched
TAKE_BACK_INTERVAL = 0.2  # seconds between tries to take the store back after a pause


def _present(config: Config) -> list[str]:
    return [s.path for s in config.sources if os.path.isdir(s.path)]


async def _watch(d: "DeviceDaemon", stop: asyncio.Event, watching: asyncio.Event) -> None:
    """Watch the sources that exist; when one disappears or comes back, watch the new set
    (a removed directory's watch is gone for good) and catch up with a rescan."""
    config = d.config
    paths = _present(config)
    for s in config.sources:
        if s.path not in paths:
            log.warning("source %s (%s) is missing or not a directory; not watched", s.name,
                        s.path)
    catch_up = False
    while not stop.is_set():
        if not paths:
            watching.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=SOURCE_POLL)
        else:
            try:
                await _watch_inotify(paths, d, stop, watching, catch_up)
            except Exception as exc:  # the Rust watcher gives up on some trees
                await _rescan_instead(d, exc, stop, watching)
                return
        now = _present(config)
        for path in sorted(set(now) - set(paths)):
            log.info("source %s is back; watching it again", path)
            async with d.gate.passing():
                await d.sealer.capture(os.fsencode(path))  # (it is no longer missing)
        paths, catch_up = now, True


async def _rescan_instead(d: "DeviceDaemon", exc: Exception, stop: asyncio.Event,
                          watching: asyncio.Event) -> None:
    """The watcher gave up (it does on some trees: undecodable names): changes are picked up
    by a rescan every seal interval instead."""
    watching.set()
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:  # anyio wraps it
        exc = exc.exceptions[0]
    every = max(5.0, d.config.daemon.seal_interval)
    msg = (f"watching the sources stopped ({type(exc).__name__}: {str(exc)[:200]}); "
           f"changes are picked up by a rescan every {every:.0f} s instead")
    log.warning("%s", msg)
    d.sealer.state.warnings.append(msg)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=every)
        except asyncio.TimeoutError:
            await d.rescan()


async def _watch_inotify(paths: list[str], d: "DeviceDaemon", stop: asyncio.Event,
                         watching: asyncio.Event, catch_up: bool) -> None:
    """Capture what inotify reports under `paths` until the set of present sources changes;
    `catch_up`: once the watches are in place, rescan for what changed before them."""
    import watchfiles

    # No filter: a backup wants editor swap files and .git too. The periodic empty yield
    # (rust_timeout) tells us the inotify watches are in place, so READY=1 is not a lie.
    # (aclosing: leaving the loop for a new set of sources drops these watches at once)
    async with contextlib.aclosing(watchfiles.awatch(
            *paths, stop_event=stop, debounce=50, step=50, recursive=True, force_polling=False,
            ignore_permission_denied=True, watch_filter=None, rust_timeout=500,
            yield_on_timeout=True)) as batches, d.watching_inotify():
        async for changes in batches:
            if not watching.is_set() or catch_up:
                await d.check_watches()  # the watches are in place: count them
            watching.set()
            if catch_up:
                catch_up = False
                await d.rescan()
            by_path: dict[bytes, bool] = {}
            for change, p in changes:
                key = os.fsencode(p)
                by_path[key] = by_path.get(key, False) or change != watchfiles.Change.modified
            if by_path:
                async with d.gate.passing():
                    for path, new in sorted(by_path.items()):
                        try:
                            await d.sealer.capture(path, new)
                        except P2PError as exc:
                            log.error("%s", exc)
            if _present(d.config) != paths or d.rewatch.is_set():
                d.rewatch.clear()
                return


class DeviceDaemon:
    """The daemon's state and the operations the loops and the control socket share."""

    def __init__(self, config: Config, dev: Device, sealer: SegmentSealer,
                 notifier: Notifier) -> None:
        self.config = config
        self.dev = dev
        self.sealer = sealer
        self.notifier = notifier
        self.writing = asyncio.Lock()  # sealing and snapshots take turns
        self.gate = WriteGate()  # change capture and replicated objects pass; a pause closes it
        self.paused_for: dict[str, Any] | None = None  # the command writing while we pause
        self.started = time.time()
        self.next_seal = time.time() + config.daemon.seal_interval
        self.last_snapshot: tuple[str, int] | None = None  # (id, time_ns)
        self.peers: PeerManager | None = None
        self.replicator: Replicator | None = None
        self.partner: PartnerService | None = None
        self.web: WebService | None = None
        self.watch: WatchCoverage | None = None  # how many folders inotify covers
        self.rewatch = asyncio.Event()  # set: start the watcher again (the limit was raised)
        self._inotify = False  # the inotify watcher runs (not the rescans that replace it)
        self.progress: UploadProgress | None = None
        self.uploads: dict[str, tuple[StoreUploader, asyncio.Task[None]]] = {}

    def objects_stored(self, names: Sequence[str] = ()) -> None:
        """New objects are in the store (sealed here, or from a peer; `names` where the
        writer knows them): upload them."""
        for u, _ in self.uploads.values():
            u.notify(names)

    async def start_uploads(self, progress: UploadProgress) -> None:
        """One uploader per `[[stores]]` table, each in its own task (a store that fails
        waits out its backoff without holding up the others)."""
        self.progress = progress
        progress.keep_only(s.location for s in self.config.stores)
        for settings in self.config.stores:
            self._start_upload(settings)

    def _start_upload(self, settings: StoreSettings) -> None:
        def opener() -> BlobStore:   # (the storage server's requests are signed as us)
            return open_store(settings.location, options=settings.options,
                              signer=StoreSigner(self.dev.identity, self.dev.keys.fingerprint()))

        def said(line: str) -> None:
            log.warning("store %s: %s (uploads are retried)", settings.location, line)

        assert self.progress is not None
        u = StoreUploader(self.dev.repo, settings, self.progress, opener, on_error=said)
        task = asyncio.create_task(u.run())
        task.add_done_callback(_report_end)
        self.uploads[settings.location] = (u, task)
        log.info("uploading to store %s", settings.location)

    async def stop_uploads(self, locations: list[str] | None = None) -> None:
        for loc in list(self.uploads) if locations is None else locations:
            _, task = self.uploads.pop(loc)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def reload_grants(self, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """`pair` made this device another account's storage partner: serve it now."""
        if self.partner is None:   # still starting: it reads the grants when it gets there
            return {"accounts": []}
        return await self.partner.reload_grants(args)

    async def reload_stores(self, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """`p2pbackup store add/remove` changed the `[[stores]]` tables: follow them."""
        self.config = replace(self.config, stores=load_config(self.config.home).stores)
        want = {s.location: s for s in self.config.stores}
        await self.stop_uploads([loc for loc, (u, _) in self.uploads.items()
                                 if want.get(loc) != u.settings])
        assert self.progress is not None
        self.progress.keep_only(want)
        for loc, settings in want.items():
            if loc not in self.uploads:
                self._start_upload(settings)
        return {"stores": sorted(self.uploads)}

    async def seal(self) -> None:
        async with self.writing:
            stored = self.sealer.state.seq
            try:
                head = await self._seal_now()
            except P2PError as exc:
                if self.sealer.state.seq > stored:   # the segment went, its head did not
                    log.error("sealing: segment %d is stored, but its head could not be "
                              "moved: %s (the next seal moves it)", self.sealer.state.seq, exc)
                else:
                    log.error("sealing failed: %s (the changes stay pending)", exc)
                return
        if head is not None:
            await self.announce()

    async def membership_changed(self) -> None:
        """A membership version arrived from a peer: take a key epoch it grants this device
        (what is pending is sealed in the old one first, as before a removal), so the
        versions sealed in the new epoch open, then tell the peers."""
        await self.seal()
        try:
            async with self.writing:
                if await account.take_grants(self.dev):
                    log.info("took the keys of key epoch %d", self.dev.keys.epoch)
        except P2PError as exc:
            log.error("%s", exc)
        if self.peers is not None:
            await self.peers.refresh()

    async def _seal_now(self) -> Head | None:
        """Seal what is pending (the caller holds `writing`)."""
        self.next_seal = time.time() + self.config.daemon.seal_interval
        head = await self.sealer.seal()
        if head is not None:
            self.notifier.status(f"sealed segment {head.seq}")
        return head

    async def rescan(self, unwatched_only: bool = False) -> None:
        """Capture what changed without the watcher seeing it (with `unwatched_only`: in the
        folders inotify does not watch)."""
        watched = await asyncio.to_thread(watched_folders) if unwatched_only else ()
        async with self.gate.passing():
            try:
                await rescan(self.dev.repo, self.sealer, watched)
            except P2PError as exc:
                log.error("rescan failed: %s", exc)

    @contextlib.asynccontextmanager
    async def watching_inotify(self) -> AsyncIterator[None]:
        self._inotify = True
        try:
            yield
        finally:
            self._inotify = False

    async def check_watches(self) -> None:
        """Count the folders of the sources and those inotify watches; say once when some
        cannot be watched (the kernel's limit), and when all are again."""
        if not self._inotify:
            self.watch = None  # no watcher, or rescans instead of it: nothing to count
            return
        before = self.watch
        now = await asyncio.to_thread(measure, _present(self.config))
        self.watch = now
        if not now.complete and (before is None or before.complete):
            log.warning("%s", now.message(self.config.daemon.unwatched_rescan_interval))
        elif now.complete and before is not None and not before.complete:
            log.info("inotify watches all %d folders of the sources again", now.folders)
        if not now.complete and before is not None and before.limit is not None \
                and now.limit is not None and now.limit > before.limit:
            log.info("the limit on inotify watches was raised to %d: watching again", now.limit)
            self.rewatch.set()

    @contextlib.asynccontextmanager
    async def pause(self, args: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Hand the store to another process (a command run with p2pbackupd running) until
        the lease ends: stop capturing, replicating in, sealing and snapshotting; seal what
        is pending; close the index and release the writer lock. Changes made meanwhile are
        queued by the watcher and captured once the store is back."""
        who = {"pid": control.arg(args, "pid", int, 0),
               "command": control.arg(args, "command", str, "a command"), "since": time.time()}
        await self.gate.close()
        lent = False  # while the store is the other process's, the gate stays shut
        try:
            async with self.writing:
                try:
                    await self._seal_now()
                except P2PError as exc:  # refused: the command gets the reason, nothing is lost
                    log.error("cannot pause: sealing failed: %s (the changes stay pending)", exc)
                    raise
                await self.dev.lend_store()
                lent = True
                self.paused_for = who
                log.info("paused: %s (pid %d) writes the store", who["command"], who["pid"])
                stopping = False
                try:
                    yield {"pid": os.getpid()}
                except asyncio.CancelledError:
                    stopping = True
                    raise
                finally:
                    lent = not await self._take_store_back(wait=not stopping)
                    self.paused_for = None
        finally:
            if not lent:
                await self.gate.open()
        log.info("resumed after %s (pid %d)", who["command"], who["pid"])
        # What we sealed, and what the command stored (a snapshot, repaired packs).
        await self.announce()

    async def _take_store_back(self, *, wait: bool) -> bool:
        """Take the writer lock and the index back (waiting while the other process still
        holds the lock, unless `wait` is false); True once taken."""
        said = ""
        while True:
            try:
                await self.dev.take_store()
                break
            except P2PError as exc:
                if not wait:
                    log.warning("stopping while the store is lent: %s", exc)
                    return False
                if str(exc) != said:
                    said = str(exc)
                    log.warning("cannot take the store back yet: %s", exc)
                    if self.paused_for is not None:
                        self.paused_for["waiting"] = said
                await asyncio.sleep(TAKE_BACK_INTERVAL)
        self.sealer.refresh_known()  # the command may have dropped blobs (repair, rebuild)
        return True

    async def announce(self) -> None:
        """Push what was just stored to every connected peer and configured store."""
        self.objects_stored()
        if self.replicator is not None:
            try:
                await self.replicator.announce_new()
            except P2PError as exc:
                log.warning("announcing to peers failed: %s", exc)
        if self.peers is not None:   # and to those with no session open, through the broker
            await self.peers.push_new()

    async def snapshot(self, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Seal what is pending, then take a roll-up snapshot that covers it.

        A scheduled one (`{"scheduled": True}`) is skipped when another snapshot was taken while
        it waited (e.g. the user's, at start-up): two in a row would be one too many."""
        scheduled = control.arg(args or {}, "scheduled", bool, False)
        before = self.last_snapshot
        await self.seal()
        async with self.writing:
            # (not after a failed one, which left no id)
            if scheduled and self.last_snapshot is not before \
                    and self.last_snapshot[0]:
                return {"id": self.last_snapshot[0], "skipped": True}
            state = self.sealer.state
            summary = await take_snapshot(self.dev.repo, self.config.sources,
                                          temp_dir=self.dev.temp_dir,
                                          hostname=self.config.device_name,
                                          warn=lambda m: log.warning("%s", m),
                                          note=lambda m: log.info("%s", m),
                                          log_seq=state.seq)
            stored = summary.stored
            self.sealer.refresh_known()
            if state.seq:
                head = Head(self.dev.identity.device_id, state.seq, state.prev, stored.id,
                            head_time_after(state.head, time.time_ns()))
                await LogStore(self.dev.repo).write_head(self.dev.identity, head)
                state.head = head
            self.last_snapshot = (stored.id, stored.snapshot.time_ns)
        log.info("snapshot %s covers log segment %d", stored.short_id, state.seq)
        self.notifier.status(f"snapshot {stored.short_id}")
        await self.announce()
        return {"id": stored.id, "short_id": stored.short_id, "log_seq": state.seq,
                "files_new": summary.files_new, "files_changed": summary.files_changed,
                "files_unchanged": summary.files_unchanged, "bytes_added": summary.bytes_added,
                "seconds": summary.seconds, "warnings": summary.warnings,
                "notes": summary.notes}

    async def forget(self, args: dict[str, Any]) -> dict[str, Any]:
        """Apply a retention policy (and prune, if asked) between two seals."""
        await self.seal()
        async with self.writing:
            result = await forget_and_prune(self.dev.repo, self.dev.identity, policy_of(args),
                                            dry_run=control.arg(args, "dry_run", bool, False),
                                            prune_after=control.arg(args, "prune", bool, False),
                                            protect=lambda: set(self.sealer.sink.stored_packs),
                                            grace=self.config.peers.removal_grace)
            self.sealer.refresh_known()  # pruned blobs must be stored again if they come back
        if self.replicator is not None and result.get("removal"):
            await self.replicator.refresh_removals()
            await self.announce()
        return result

    async def repair(self, progress: VerifyProgress) -> RepairReport:
        """`repair` (no other copies) from the web console, between two seals as `forget`;
        blobs it loses are stored again by the log and the next snapshot."""
        await self.seal()
        async with self.writing:
            report = await repair_packs(self.dev.repo, progress=progress)
            self.sealer.refresh_known()
        await self.announce()
        return report

    async def forget_damaged(self) -> None:
        """A pack was found damaged: blobs of it left the index, so the log stores them again
        (from the sources) instead of naming ones that cannot be read."""
        async with self.writing:
            self.sealer.refresh_known()

    async def broker_signal(self, args: dict[str, Any]) -> dict[str, Any]:
        """{"to": device id, "offer": base64} -> {"answer": base64}: an offer of this device's
        CLI relayed over the daemon's broker socket (peers.relay_signal)."""
        to, offer = control.arg(args, "to", str, ""), control.arg(args, "offer", str, "")
        if not is_device(to):
            raise LocalProtocolError("broker_signal needs a device id in 'to'")
        try:
            data = base64.b64decode(offer, validate=True)
        except (binascii.Error, ValueError):
            raise LocalProtocolError("broker_signal needs the offer in base64") from None
        if self.peers is None:
            raise PeerUnreachable("p2pbackupd has not started its peer connections yet; "
                                  "try again")
        answer = await self.peers.relay_signal(to, data)
        return {"answer": base64.b64encode(answer).decode()}

    async def check_packs(self, args: dict[str, Any]) -> dict[str, Any]:
        """Another process (`verify`) found these packs of this store damaged: check each
        and heal it from a peer, as after a read that failed."""
        names = control.arg(args, "packs", list, [])
        kinds = [ids.object_kind(f"packs/{n}") if isinstance(n, str) else None for n in names]
        if not all(k is not None and k[0] == "pack" for k in kinds):
            raise LocalProtocolError("check_packs: packs must be pack names")
        for name in names:
            if self.replicator is not None:
                self.replicator.check_pack_soon(name)
        return {"checking": len(names)}

    def damaged(self) -> list[dict[str, str]]:
        """Packs of this store listed as damaged: by this process, or in the index file by
        another (`verify`, a restore whose read failed)."""
        index = self.dev.repo.index
        listed = {**noted_damage(index.path),
                  **{name: d.reason for name, d in index.damaged.items()}}
        return [{"pack": name, "reason": reason} for name, reason in sorted(listed.items())]

    async def prune(self, args: dict[str, Any]) -> dict[str, Any]:
        return await self.forget({**args, "prune": True, "policy": None})

    async def status(self, args: dict[str, Any] | None = None) -> dict[str, Any]:
        state = self.sealer.state
        interval = self.config.daemon.snapshot_interval
        last = self.last_snapshot
        missing = [f"source {s.name} ({s.path}) disappeared; its last state stays in the log, "
                   "the other sources are still watched"
                   for s in self.config.sources if not os.path.isdir(s.path)]
        watch = self.watch
        if watch is not None and not watch.complete:
            missing.append(watch.message(self.config.daemon.unwatched_rescan_interval))
        return {
            "device": self.dev.identity.device_id,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 1),
            "sources": [{"name": s.name, "path": s.path, "present": os.path.isdir(s.path)}
                        for s in self.config.sources],
            "log": {"seq": state.seq, "last_sealed": state.sealed_at or None,
                    "pending_changes": self.sealer.change_count,
                    "next_seal_in": max(0.0, round(self.next_seal - time.time(), 1))},
            "last_snapshot": {"id": last[0], "time": last[1] / 1e9} if last else None,
            "next_snapshot_in": round(max(0.0, (last[1] / 1e9 + interval) - time.time()), 1)
            if last else 0.0,
            "watch": watch.status() if watch is not None else None,
            "errors": missing + list(state.warnings[-10:]),
            "paused_for": dict(self.paused_for) if self.paused_for else None,
            "peers": self.peers.status() if self.peers else [],
            "lan": {"enabled": self.config.peers.lan, "signaling_port": self.peers.port
                    if self.peers else 0},
            "broker": self.peers.broker_status() if self.peers else None,
            "partner_for": self.partner.status() if self.partner else [],
            "stores": [u.status.as_dict() for u, _ in self.uploads.values()],
            "damaged": self.damaged(),
            "web": self.web.status() if self.web else None,
            "activities": activity.ACTIVITIES.view(),
        }


def _report_end(task: asyncio.Task[None]) -> None:
    """An uploader ends only when cancelled; anything else is a bug, said with its trace."""
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.error("internal error in an uploader: %s: %s", type(exc).__name__, exc,
                  exc_info=exc)


async def _restate_roster(dev: Device) -> None:
    """An owner writes the next roster version if the newest one no longer states the
    membership (one written before rosters named the recovery signer gains it, so that the
    account's storage partners admit a device recovering it); an account without partners
    (no roster) gets none."""
    try:
        got = await store_membership.load(dev.repo)
        me = got[0].member(dev.identity.device_id) if got else None
        if got is None or me is None or me.role != OWNER or \
                await roster.newest(dev.repo.store) is None:
            return
        if await roster.publish(dev.repo.store, dev.identity, got[0]):
            log.info("the storage partners' roster states the account's devices again")
    except P2PError as exc:
        log.warning("could not state the account's devices to its storage partners: %s", exc)


async def _seal_loop(d: DeviceDaemon, stop: asyncio.Event) -> None:
    settings = d.config.daemon
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=min(0.2, settings.seal_interval))
        except asyncio.TimeoutError:
            pass
        if time.time() >= d.next_seal or d.sealer.pending_bytes >= settings.seal_bytes:
            await d.seal()


async def _rescan_loop(d: DeviceDaemon, stop: asyncio.Event) -> None:
    """At start (to catch up on what happened while the daemon was down) and every
    `rescan_interval`; in between, while inotify cannot watch every folder, the unwatched
    ones every `unwatched_rescan_interval`."""
    settings = d.config.daemon
    full_at = 0.0
    while not stop.is_set():
        if time.monotonic() >= full_at:
            await d.rescan()
            full_at = time.monotonic() + settings.rescan_interval
        else:
            await d.rescan(unwatched_only=True)
        await d.check_watches()  # folders come and go, the limit may be raised
        wait = full_at - time.monotonic()
        if d.watch is not None and not d.watch.complete:
            wait = min(wait, settings.unwatched_rescan_interval)
        try:
            await asyncio.wait_for(stop.wait(), timeout=max(wait, 0.0))
        except asyncio.TimeoutError:
            pass


async def _snapshot_loop(d: DeviceDaemon, stop: asyncio.Event) -> None:
    interval = d.config.daemon.snapshot_interval
    if not d.config.sources:  # e.g. a device that only keeps copies of the others' data
        log.info("no sources configured: no scheduled snapshots")
        await stop.wait()
        return
    while not stop.is_set():
        last = d.last_snapshot[1] / 1e9 if d.last_snapshot else 0.0
        wait = max(0.0, last + interval - time.time())
        try:
            await asyncio.wait_for(stop.wait(), timeout=max(wait, 1.0) if last else 0.5)
            return
        except asyncio.TimeoutError:
            pass
        # Read again: a snapshot may have been taken on request while we waited.
        last = d.last_snapshot[1] / 1e9 if d.last_snapshot else 0.0
        if not d.last_snapshot or time.time() >= last + interval:
            try:
                await d.snapshot({"scheduled": True})
            except P2PError as exc:
                log.error("scheduled snapshot failed: %s", exc)
                d.last_snapshot = ("", time.time_ns())  # retry after one interval, not in a loop


async def _removal_loop(d: DeviceDaemon, stop: asyncio.Event) -> None:
    """Delete the snapshots an owner removed, once the grace period has passed."""
    grace = d.config.peers.removal_grace
    while not stop.is_set():
        try:
            assert d.replicator is not None
            records = await d.replicator.refresh_removals()
            async with d.writing:
                gone = await removals.apply_due(d.dev.repo.store, records, grace,
                                                kinds=("snapshots/",), seen=d.replicator.seen)
            if gone:
                log.info("deleted %d snapshots that an owner device forgot (grace %s s over); "
                         "`prune` frees their data", len(gone), f"{grace:g}")
        except P2PError as exc:
            log.error("applying removals failed: %s", exc)
        try:
            await asyncio.wait_for(stop.wait(), timeout=min(60.0, max(1.0, grace / 2)))
        except asyncio.TimeoutError:
            pass


async def _watchdog(notifier: Notifier, seconds: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        notifier.watchdog()
        try:
            await asyncio.wait_for(stop.wait(), timeout=seconds / 2)
        except asyncio.TimeoutError:
            pass


async def serve(home: Path | None) -> int:
    """Run until SIGTERM/SIGINT; seal what is pending before leaving."""
    config = load_config(home)
    systemd = systemd_settings()
    notifier = Notifier(systemd.notify_socket)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if (config.home / "keys" / "partner-only").exists():
        return await _serve_partner_only(config, notifier, stop)
    async with open_device(config.home, write=True) as dev:
        logstore = LogStore(dev.repo)
        seq, prev = await logstore.recover_tail(dev.identity.device_id)
        state = SealState(seq, prev, await logstore.read_head(dev.identity.device_id))
        os.makedirs(dev.temp_dir, exist_ok=True)
        sealer = SegmentSealer(dev.repo, dev.identity, config.sources, dev.temp_dir, state)
        d = DeviceDaemon(config, dev, sealer, notifier)
        progress = UploadProgress(config.cache_dir / "uploads.sqlite")
        snaps, _ = await dev.repo.list_snapshots()
        mine = [s for s in snaps if s.snapshot.device == dev.identity.device_id]
        if mine:
            d.last_snapshot = (mine[-1].id, mine[-1].snapshot.time_ns)
        ops = AccountOps(d)
        d.web = WebService(config, dev, d.status, d.gate.passing, ops.handlers(), d.repair)
        await d.web.start()
        server = ControlServer(config.control_socket, {"status": d.status,
                                                       "snapshot": d.snapshot,
                                                       "forget": d.forget, "prune": d.prune,
                                                       "reload_stores": d.reload_stores,
                                                       "check_packs": d.check_packs,
                                                       "web": d.web.sign_in,
                                                       "broker_signal": d.broker_signal,
                                                       "reload_grants": d.reload_grants,
                                                       **ops.handlers()},
                               leases={"pause": d.pause, **ops.leases()})
        await server.start()
        d.replicator = Replicator(dev.repo, dev.identity.device_id,
                                  direct_lane=config.peers.lan and config.peers.direct_lane,
                                  stall=config.peers.stall_timeout,
                                  connection_limits=connection_limits(config.peers),
                                  gate=d.gate,
                                  seen=removals.FirstSeen(config.home / removals.FIRST_SEEN))
        d.peers = PeerManager(config, dev, on_session=d.replicator.run,
                              on_fetch=d.replicator.serve)
        d.replicator.on_membership = d.membership_changed
        d.replicator.on_stored = d.objects_stored
        d.peers.on_members = d.replicator.close_unless
        d.replicator.on_damage = d.forget_damaged
        dev.repo.damage_seen = lambda pack: loop.call_soon_threadsafe(
            d.replicator.check_pack_soon, pack)   # a read failed: heal from a peer
        dev.repo.objects_written = d.objects_stored   # a snapshot's packs go up as they land
        await d.replicator.start_lane(d.peers.bind_address)
        await _restate_roster(dev)   # before the broker hears the roster (it names partners)
        await d.peers.start()
        # On the LAN now: aiortc is imported in a thread while mDNS finds the peers, so it is
        # neither before discovery nor in the way of the first connection.
        from p2pbackup.transport import datachannel

        asyncio.get_running_loop().run_in_executor(None, datachannel.preload)
        d.partner = PartnerService(config, dev.identity, load_grants(config.home))
        await d.partner.start()
        watching = asyncio.Event()
        tasks = [asyncio.create_task(_watch(d, stop, watching)),
                 asyncio.create_task(_seal_loop(d, stop))]
        if systemd.watchdog_seconds:
            tasks.append(asyncio.create_task(_watchdog(notifier, systemd.watchdog_seconds, stop)))
        await asyncio.wait([asyncio.create_task(watching.wait()), tasks[0]],
                           return_when=asyncio.FIRST_COMPLETED)
        log.info("watching %d sources; log at segment %d", len(config.sources), seq)
        tasks.append(asyncio.create_task(_snapshot_loop(d, stop)))
        tasks.append(asyncio.create_task(_rescan_loop(d, stop)))
        tasks.append(asyncio.create_task(_removal_loop(d, stop)))
        await d.start_uploads(progress)
        notifier.ready(f"watching {len(config.sources)} sources; log at segment {seq}")
        failed: BaseException | None = None
        try:
            # A loop that ends on its own is a bug: say so and exit non-zero, so systemd
            # restarts the daemon instead of it running on half-blind.
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            if not stop.is_set():
                t = next(t for t in done if t is not stopper)
                failed = t.exception() or RuntimeError(f"{t.get_coro().__name__} ended")
                log.error("internal error, stopping: %s: %s", type(failed).__name__, failed,
                          exc_info=failed)
                stop.set()
            stopper.cancel()
        finally:
            notifier.stopping()
            await server.close()
            await d.web.close()
            await d.peers.close()
            await d.partner.close()
            await d.replicator.close()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await d.stop_uploads()
            await d.seal()
            sealer.close()
            progress.close()
    log.info("stopped")
    return 1 if failed else 0


async def _serve_partner_only(config: Config, notifier: Notifier, stop: asyncio.Event) -> int:
    """A home with no account of its own: only store other accounts' ciphertext."""
    identity = load_identity(config)
    partner = PartnerService(config, identity, load_grants(config.home))
    started = time.time()

    async def status(args: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"device": identity.device_id, "pid": os.getpid(),
                "uptime_seconds": round(time.time() - started, 1), "sources": [], "log": None,
                "peers": [], "partner_for": partner.status(),
                "lan": {"enabled": config.peers.lan, "signaling_port": partner.port}}

    server = ControlServer(config.control_socket, {"status": status,
                                                   "reload_grants": partner.reload_grants})
    await server.start()
    await partner.start()
    notifier.ready(f"storage partner for {len(partner.grants)} accounts")
    try:
        await stop.wait()
    finally:
        notifier.stopping()
        await partner.close()
        await server.close()
    log.info("stopped")
    return 0


def raise_file_limit() -> None:
    """Raise this process's soft limit on open files to its hard limit: sessions, lanes, pack
    workers and (until they are refused) connections to our ports each hold descriptors, and
    the usual soft limit of 1024 ran out under a flood of 1,100 idle connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise the open-files limit from %d to %d: %s", soft, want, exc)
        return
    log.info("open-files limit raised from %d to %d", soft, want)


def run() -> None:
    """Console-script entry point."""
    parser = argparse.ArgumentParser(prog="p2pbackupd", description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, help="the p2pbackup home (default: P2PBACKUP_HOME)")
    parser.add_argument("--debug", action="store_true", help="log more, show tracebacks")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.debug else logging.INFO,
                        format="p2pbackupd: %(levelname)s: %(message)s")
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # one line per batch otherwise
    logging.getLogger("aioice").setLevel(logging.WARNING)      # one line per ICE check
    sys.setswitchinterval(0.0002)
    fix_mmap_threshold()
    raise_file_limit()
    try:
        code = asyncio.run(serve(args.home))
    except P2PError as exc:
        if args.debug:
            raise
        print(f"p2pbackupd: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    exit_process(code)


if __name__ == "__main__":
    run()
