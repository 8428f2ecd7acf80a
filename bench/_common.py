"""What the benchmark scripts share: their sections of RESULTS.md, one lock for all of them,
and a process's CPU seconds.

bench/RESULTS.md holds bench_restic.py's report (its title and several "## " sections) and
one section per other script, each from its heading to the next "## " heading. Each script
rewrites only its own part, so a run of one keeps the others' results.
"""

from __future__ import annotations

import fcntl
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DAEMON_HEADING = "## Daemon"  # bench_daemon.py
REPLICATION_HEADING = "## Replication"  # bench_replication.py
SCALE_HEADING = "## Scale"  # bench_scale.py
S3_HEADING = "## S3"  # bench_s3.py
SCRIPT_HEADINGS = (DAEMON_HEADING, REPLICATION_HEADING, SCALE_HEADING, S3_HEADING)

# One benchmark at a time on the machine (they measure time and memory, and the scale one
# needs several GiB of tmpfs): every script that takes it waits for the others.
LOCK = Path("/tmp/p2pbackup-bench.lock")


def section_span(text: str, heading: str) -> tuple[int, int] | None:
    """Where the section under `heading` is in `text`: from its heading line to the next
    "## " heading (or the end); None if there is none."""
    m = re.search(rf"^{re.escape(heading)}[ \t]*$", text, flags=re.MULTILINE)
    if m is None:
        return None
    nxt = re.search(r"^## ", text[m.end():], flags=re.MULTILINE)
    return m.start(), (m.end() + nxt.start() if nxt else len(text))


def replace_section(text: str, heading: str, section: str) -> str:
    """`text` with the section under `heading` replaced by `section` (appended if absent)."""
    section = section.strip("\n") + "\n"
    span = section_span(text, heading)
    if span is None:
        return text.rstrip("\n") + "\n\n" + section if text.strip() else section
    start, end = span
    rest = text[end:]
    return text[:start] + section + ("\n" + rest if rest else "")


def script_sections(text: str) -> list[str]:
    """The other scripts' sections in `text`, in the order they appear."""
    spans = sorted(span for heading in SCRIPT_HEADINGS
                   if (span := section_span(text, heading)) is not None)
    return [text[start:end].strip("\n") + "\n" for start, end in spans]


def write_section(out: Path, heading: str, section: str) -> None:
    """Replace (or append) one script's section of the results file `out`."""
    out.write_text(replace_section(out.read_text() if out.exists() else "", heading, section))


def write_main_report(out: Path, report: str) -> None:
    """Write bench_restic.py's report to `out`, keeping the other scripts' sections after it."""
    kept = script_sections(out.read_text()) if out.exists() else []
    out.write_text("\n".join([report.rstrip("\n") + "\n", *kept]))


@contextmanager
def bench_lock() -> Iterator[None]:
    """Hold the machine-wide benchmark lock (waiting, with a message, if another has it)."""
    with open(LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {LOCK} (another benchmark runs)", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
