"""Formatting for people: sizes, times, one-line errors, and progress on a terminal only."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from p2pbackup import views
from p2pbackup.sizes import format_rate, format_size

if TYPE_CHECKING:
    from p2pbackup.blobs.base import BlobStore

# Every size and speed this CLI prints goes through these (binary units, as restic).
human_bytes = format_size
rate = format_rate


iso_time = views.iso_time
peer_route = views.peer_route


def err(message: str) -> None:
    print(f"p2pbackup: {message}", file=sys.stderr, flush=True)


def note(message: str) -> None:
    """A line about what is going on (stderr, so --json output stays clean)."""
    print(message, file=sys.stderr)


def peer_path(store: BlobStore) -> None:
    """Say which path reads from a peer take (direct lane or data channel)."""
    path = store.read_path()
    if path is not None:
        note(f"reading from {store.location} over the {path}")


def warn(message: str) -> None:
    print(f"p2pbackup: warning: {message}", file=sys.stderr, flush=True)


def notice(message: str) -> None:
    """Worth a line, but not a warning: it does not change the exit code."""
    print(f"p2pbackup: notice: {message}", file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def progress_bar(label: str, counters: object,
                       files_attr: str | None = "files") -> AsyncIterator[None]:
    """Show files, bytes, MiB/s and ETA on stderr while the body runs, if stderr is a TTY."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console
    from rich.progress import Progress

    console = Console(stderr=True)
    prog = Progress(*progress_columns(), console=console, transient=True)
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


def progress_columns() -> list[Any]:
    """The progress bar's columns: label, bar, bytes done/expected, speed, ETA, files."""
    from rich.progress import (BarColumn, DownloadColumn, ProgressColumn, TextColumn,
                               TimeRemainingColumn)
    from rich.text import Text

    class BinarySpeed(ProgressColumn):
        """rich's TransferSpeedColumn prints decimal MB/s only."""

        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text("?" if speed is None else format_rate(speed, 1.0),
                        style="progress.data.speed")

    return [TextColumn("[bold]{task.description}"), BarColumn(),
            DownloadColumn(binary_units=True), BinarySpeed(), TimeRemainingColumn(),
            TextColumn("{task.fields[files]}")]

