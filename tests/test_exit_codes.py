"""The README's exit-code table lists every code a command can end with."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import p2pbackup
from p2pbackup.errors import EXIT_PARTIAL, P2PError

ROOT = Path(__file__).resolve().parent.parent


def _table_codes() -> set[int]:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| code | meaning |"):].split("\n\n", 1)[0]
    return {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)}


def _error_classes() -> set[type]:
    for mod in pkgutil.walk_packages(p2pbackup.__path__, "p2pbackup."):
        importlib.import_module(mod.name)
    found, todo = set(), [P2PError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


def _literal_exits() -> set[int]:
    """Codes written as numbers in sys.exit(...) / typer.Exit(...) by the entry points."""
    codes = set()
    for path in [*(ROOT / "cli").glob("*.py"), ROOT / "daemon" / "main.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("exit", "Exit") and node.args \
                    and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, int):
                codes.add(node.args[0].value)
    return codes


def test_every_exit_code_is_in_the_readme_table():
    listed = _table_codes()
    for cls in _error_classes():
        assert cls.exit_code in listed, f"{cls.__name__} exits {cls.exit_code}, not in README"
    assert P2PError.exit_code in listed
    usage = 2  # click's usage errors
    for code in {0, usage, EXIT_PARTIAL} | _literal_exits():
        assert code in listed, f"exit code {code} is not in the README table"
