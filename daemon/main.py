"""`p2pbackupd`: one asyncio process per device that turns every change into the signed log.

Watch the sources (inotify through watchfiles) -> capture each changed path into the open
segment -> seal it every `seal_interval` seconds or `seal_bytes` bytes -> move the head.
Under systemd (Type=notify) it reports READY=1, STATUS= lines and WATCHDOG=1 pings.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from p2pbackup.config import Config, load_config, systemd_settings
from p2pbackup.device import open_device
from p2pbackup.errors import P2PError
from p2pbackup.repo.logstore import LogStore

from .capture import SealState, SegmentSealer
from .notify import Notifier

log = logging.getLogger("p2pbackupd")


async def _watch(config: Config, sealer: SegmentSealer, stop: asyncio.Event,
                 watching: asyncio.Event) -> None:
    import watchfiles

    paths = [s.path for s in config.sources if os.path.isdir(s.path)]
    for s in config.sources:
        if s.path not in paths:
            log.warning("source %s (%s) is missing or not a directory; not watched", s.name,
                        s.path)
    if not paths:
        watching.set()
        await stop.wait()
        return
    # No filter: a backup wants editor swap files and .git too. The periodic empty yield
    # (rust_timeout) tells us the inotify watches are in place, so READY=1 is not a lie.
    async for changes in watchfiles.awatch(*paths, stop_event=stop, debounce=50, step=20,
                                           recursive=True, force_polling=False,
                                           ignore_permission_denied=True, watch_filter=None,
                                           rust_timeout=500, yield_on_timeout=True):
        watching.set()
        for path in sorted({os.fsencode(p) for _, p in changes}):
            try:
                await sealer.capture(path)
            except P2PError as exc:
                log.error("%s", exc)


async def _seal_loop(config: Config, sealer: SegmentSealer, notifier: Notifier,
                     stop: asyncio.Event) -> None:
    interval = config.daemon.seal_interval
    loop = asyncio.get_running_loop()
    next_seal = loop.time() + interval
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=min(0.2, interval))
        except asyncio.TimeoutError:
            pass
        if loop.time() >= next_seal or sealer.pending_bytes >= config.daemon.seal_bytes:
            next_seal = loop.time() + interval
            try:
                head = await sealer.seal()
            except P2PError as exc:
                log.error("sealing failed: %s (the changes stay pending)", exc)
                continue
            if head is not None:
                notifier.status(f"sealed segment {head.seq}")


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
    async with open_device(config.home, write=True) as dev:
        logstore = LogStore(dev.repo)
        seq, prev = await logstore.recover_tail(dev.identity.device_id)
        state = SealState(seq, prev, await logstore.read_head(dev.identity.device_id))
        os.makedirs(dev.temp_dir, exist_ok=True)
        sealer = SegmentSealer(dev.repo, dev.identity, config.sources, dev.temp_dir, state)
        watching = asyncio.Event()
        tasks = [asyncio.create_task(_watch(config, sealer, stop, watching)),
                 asyncio.create_task(_seal_loop(config, sealer, notifier, stop))]
        if systemd.watchdog_seconds:
            tasks.append(asyncio.create_task(_watchdog(notifier, systemd.watchdog_seconds, stop)))
        await asyncio.wait([asyncio.create_task(watching.wait()), tasks[0]],
                           return_when=asyncio.FIRST_COMPLETED)
        log.info("watching %d sources; log at segment %d", len(config.sources), seq)
        notifier.ready(f"watching {len(config.sources)} sources; log at segment {seq}")
        try:
            await stop.wait()
        finally:
            notifier.stopping()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await sealer.seal()
            sealer.close()
    log.info("stopped")
    return 0


def run() -> None:
    """Console-script entry point."""
    parser = argparse.ArgumentParser(prog="p2pbackupd", description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, help="the p2pbackup home (default: P2PBACKUP_HOME)")
    parser.add_argument("--debug", action="store_true", help="log more, show tracebacks")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.debug else logging.INFO,
                        format="p2pbackupd: %(levelname)s: %(message)s")
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # one line per batch otherwise
    sys.setswitchinterval(0.0002)
    try:
        code = asyncio.run(serve(args.home))
    except P2PError as exc:
        if args.debug:
            raise
        print(f"p2pbackupd: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    sys.exit(code)


if __name__ == "__main__":
    run()
