"""Formatting for people: sizes, times, one-line errors, and progress on a terminal only."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import sys
from collections.abc import AsyncIterator


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def iso_time(ns: int) -> str:
    """ISO 8601 in local time with its UTC offset, to the second."""
    return dt.datetime.fromtimestamp(ns / 1e9).astimezone().isoformat(timespec="seconds")


def err(message: str) -> None:
    print(f"p2pbackup: {message}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    """A line about what is going on (stderr, so --json output stays clean)."""
    print(message, file=sys.stderr)


def peer_path(store: object) -> None:
    """Say which path reads from a peer take (direct lane or data channel)."""
    path = getattr(store, "path", None)
    if path is not None and hasattr(store, "use_lane"):
        note(f"reading from {getattr(store, 'location', 'the peer')} over the {path}")


def warn(message: str) -> None:
    print(f"p2pbackup: warning: {message}", file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def progress_bar(label: str, counters: object,
                       files_attr: str | None = "files") -> AsyncIterator[None]:
    """Show files, bytes, MB/s and ETA on stderr while the body runs, if stderr is a TTY."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    console = Console(stderr=True)
    prog = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                    DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                    TextColumn("{task.fields[files]}"), console=console, transient=True)
    expected = getattr(counters, "expected_bytes", 0) or None
    task = prog.add_task(label, total=expected, files="")

    def refresh() -> None:
        done = getattr(counters, "bytes", 0)
        files = getattr(counters, files_attr, 0) if files_attr else 0
        total = getattr(counters, "expected_bytes", 0) or None
        if total is not None and done > total:
            total = None
        prog.update(task, completed=done, total=total,
                    files=f"{files} files" if files_attr else "")

    async def tick() -> None:
        while True:
            refresh()
            await asyncio.sleep(0.1)

    with prog:
        ticker = asyncio.create_task(tick())
        try:
            yield
        finally:
            ticker.cancel()
            refresh()


def rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / max(seconds, 1e-6) / 1e6:.0f} MB/s"

