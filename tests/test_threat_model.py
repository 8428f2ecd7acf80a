"""docs/THREAT_MODEL.md and the hostile-actor suite say the same: every test the page names
exists, and every test in tests/adversary/ is named on the page."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "THREAT_MODEL.md"
CITED = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.name.startswith("test_")}


def test_every_test_the_threat_model_names_exists():
    cited = CITED.findall(PAGE.read_text())
    assert len(cited) > 50
    missing = [f"{f}::{t}" for f, t in cited
               if not (ROOT / f).is_file() or t not in _tests_in(ROOT / f)]
    assert not missing, f"docs/THREAT_MODEL.md names tests that do not exist: {missing}"


def test_every_attacker_test_is_in_the_threat_model():
    cited = set(CITED.findall(PAGE.read_text()))
    suite = {(str(p.relative_to(ROOT)), t)
             for p in sorted((ROOT / "tests" / "adversary").glob("test_*.py"))
             for t in _tests_in(p)}
    absent = sorted(f"{f}::{t}" for f, t in suite - cited)
    assert not absent, f"attacker tests docs/THREAT_MODEL.md does not name: {absent}"
