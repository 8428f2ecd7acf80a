"""A second local user against p2pbackupd's control socket, which now relays through the
daemon's broker socket as this device (`broker_signal`) and makes a partner take grant files
(`reload_grants`): even where the home's folders let others through, the socket itself is the
owner's alone, so another user reaches no command."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from p2pbackup.daemon.control import ControlServer

pytestmark = pytest.mark.timeout(60)

CONNECT = """
import json, socket, sys
with socket.socket(socket.AF_UNIX) as s:
    try:
        s.connect(sys.argv[1])
    except PermissionError:
        print("refused")
        raise SystemExit
    s.sendall(b'{"v": 1, "cmd": "broker_signal", "args": {"to": "x", "offer": ""}}\\n')
    print(s.makefile().readline())
"""


async def test_another_local_user_cannot_reach_broker_signal_or_reload_grants() -> None:
    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root (runuser)")
    called: list[str] = []

    async def handler(args: dict) -> dict:
        called.append("called")
        return {}

    async def as_nobody(sock: Path) -> str:
        # the system's Python: another user may not run the tests' virtualenv
        proc = await asyncio.create_subprocess_exec(
            "runuser", "-u", "nobody", "--", "/usr/bin/python3", "-c", CONNECT, str(sock),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        return out.decode().strip()

    # a home others may walk through (pytest's own folders are not): the socket alone refuses
    home = Path(tempfile.mkdtemp(prefix="p2pb-home-", dir="/tmp"))
    home.chmod(0o755)
    sock = home / "daemon.sock"
    server = ControlServer(sock, {"broker_signal": handler, "reload_grants": handler})
    await server.start()
    try:
        assert await as_nobody(sock) == "refused"
        assert called == []
        sock.chmod(0o666)   # the control: the same user reaches it once the socket lets it
        assert "refused" not in await as_nobody(sock) and called == ["called"]
    finally:
        await server.close()
        shutil.rmtree(home, ignore_errors=True)
