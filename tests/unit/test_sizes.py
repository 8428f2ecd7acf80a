"""Sizes and speeds for people: one style everywhere, binary units (KiB, MiB, GiB) as restic."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from p2pbackup.cli import output
import pytest

from p2pbackup.errors import ConfigError
from p2pbackup.sizes import format_rate, format_size, parse_size

MiB = 1 << 20


def test_sizes_are_binary():
    assert [format_size(n) for n in (0, 1023, 1024, 1536, 5 * MiB, 50 << 30, 3 << 40)] == \
        ["0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 MiB", "50.0 GiB", "3.0 TiB"]
    assert format_size(MiB - 1) == "1.0 MiB"  # never "1024.0 KiB"
    assert output.human_bytes(3 * MiB) == "3.0 MiB"


def test_sizes_people_type_are_binary():
    assert [parse_size(t) for t in ("50G", "50GB", "50GiB", " 500m ", "1.5T", "1024", "2K")] == \
        [50 << 30, 50 << 30, 50 << 30, 500 * MiB, 3 << 39, 1024, 2048]
    for bad in ("", "G", "fifty", "-1G", "0", "nan", "inf", "1X"):
        with pytest.raises(ConfigError, match="--quota"):
            parse_size(bad, "--quota")


def test_speeds_are_binary_per_second():
    assert format_rate(3 * MiB, 1.0) == "3.0 MiB/s"
    assert output.rate(30 * MiB, 2.0) == "15.0 MiB/s"


def test_progress_bar_shows_mib_and_mib_per_second():
    clock = [0.0]
    out = io.StringIO()
    prog = Progress(*output.progress_columns(), get_time=lambda: clock[0],
                    console=Console(file=out, width=200, force_terminal=True, color_system=None))
    task = prog.add_task("restore", total=10 * MiB, files="2 files")
    for _ in range(3):
        clock[0] += 1.0
        prog.advance(task, MiB)
    prog.console.print(prog.make_tasks_table(prog.tasks))
    shown = out.getvalue()
    assert "3.0/10.0 MiB" in shown and "1.0 MiB/s" in shown, shown
    assert "MB" not in shown
