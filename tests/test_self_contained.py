"""Everything the project needs is inside the repository: a fresh clone has nothing beside it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis",
             ".mypy_cache", ".ruff_cache"}
SKIP_PATHS = {Path("bench") / "work"}  # a benchmark's generated data (ignored by git)
# The workshop directory next to the checkout, however a file would name it: "../<name>/...",
# "<name>/bench/...", or a path built from a "<name>" component. (Spelled in pieces so this
# file does not match itself.)
WORKSHOP = "sha" + "red"
OUTSIDE = re.compile(rf"\.\./{WORKSHOP}\b|\b{WORKSHOP}/(bench|seeds|hooks|DESIGN|STYLE|NETTESTS)"
                     rf"|/ *[\"']{WORKSHOP}[\"']|[\"']{WORKSHOP}[\"'] */")


def _text_files() -> list[Path]:
    out = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts) or \
                any(rel.is_relative_to(skip) for skip in SKIP_PATHS):
            continue
        if path.is_file():
            out.append(path)
    return out


def test_no_file_refers_to_anything_beside_the_repository():
    offenders = []
    for path in _text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary (golden objects)
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not offenders, "files refer outside the repository:\n" + "\n".join(offenders)


def test_the_demo_and_benchmarks_generate_data_with_the_generator_in_the_repository():
    from p2pbackup.cli import demo

    assert demo.MKDATA.is_file() and demo.MKDATA.resolve().is_relative_to(ROOT)
    bench = (ROOT / "bench" / "bench_restic.py").read_text()
    assert 'MKDATA = REPO / "bench" / "mkdata.py"' in bench
