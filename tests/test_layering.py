"""The layer rule: pure cores do no I/O, and the library never imports daemon/ or cli/."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PURE = ["format", "crypto", "chunking", "protocol"]
IO_MODULES = {"asyncio", "aiortc", "aiohttp", "aiosqlite", "zeroconf", "socket", "sqlite3"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_pure_cores_import_no_io():
    for pkg in PURE:
        for f in (ROOT / "p2pbackup" / pkg).rglob("*.py"):
            bad = {m for m in _imports(f) if m.split(".")[0] in IO_MODULES}
            assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_library_never_imports_daemon_or_cli():
    for f in (ROOT / "p2pbackup").rglob("*.py"):
        for m in _imports(f):
            assert not m.startswith(("p2pbackup.cli", "p2pbackup.daemon")), \
                f"{f.relative_to(ROOT)} imports {m}"


def test_the_daemon_runs_no_protocol_session_of_its_own():
    """Sessions (sync and fetch protocols) run in p2pbackup.replication and p2pbackup.blobs;
    daemon/ only hands them links and shows what they report (issue 18 §1)."""
    for f in (ROOT / "daemon").rglob("*.py"):
        bad = {m for m in _imports(f) if m.startswith("p2pbackup.protocol")}
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"

