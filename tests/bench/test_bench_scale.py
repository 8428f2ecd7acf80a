"""bench/bench_scale.py's command line and its growth figures (the benchmark itself is not a
test: it needs root, minutes and GiB of tmpfs)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import bench_scale
from bench_scale import Growth, parse_args


def test_sizes_steps_and_tools_can_be_chosen_and_come_in_the_benchmarks_order():
    args = parse_args(["--files", "100k,300_000,1M", "--steps", "restore,initial",
                       "--tools", "p2pbackup"])
    assert args.files == [100_000, 300_000, 1_000_000]
    assert args.steps == ["initial", "restore"]
    assert args.tools == ["p2pbackup"]
    assert bench_scale.repeat_for(1_000_000, args) == 2
    assert bench_scale.repeat_for(300_000, args) == 3


@pytest.mark.parametrize(("argv", "says"), [
    (["--steps", "initial,backup"], "unknown: backup"), (["--tools", "borg"], "unknown: borg"),
    (["--files", "many"], "not a number of files"), (["--files", "0"], "at least 1")])
def test_an_unknown_step_tool_or_count_is_a_usage_error(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


def test_help_describes_the_steps_without_needing_root():
    proc = subprocess.run([sys.executable, bench_scale.__file__, "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "--steps" in proc.stdout and "restic check --read-data" in proc.stdout


def test_growth_gives_the_slope_per_100k_files_and_the_exponent():
    linear = Growth({100_000: 10.0, 300_000: 30.0, 1_000_000: 100.0})
    assert linear.slope_per_100k == pytest.approx(10.0)
    assert linear.exponent == pytest.approx(1.0)
    flat = Growth({100_000: 80.0, 1_000_000: 80.0})
    assert flat.slope_per_100k == pytest.approx(0.0) and flat.exponent == pytest.approx(0.0)


def test_a_size_whose_tmpfs_would_not_fit_in_memory_is_skipped_before_mounting(monkeypatch):
    monkeypatch.setattr(bench_scale, "mem_available_kib", lambda: 8 << 20)  # 8 GiB
    assert bench_scale.tmpfs_size(100_000) == f"{2 * 1_100_000 + (1 << 20)}k"
    assert bench_scale.tmpfs_size(500_000) == f"{6 << 20}k"  # capped: 2 GiB stay free
    with pytest.raises(bench_scale.BenchError, match="skipped"):
        bench_scale.tmpfs_size(1_000_000)
