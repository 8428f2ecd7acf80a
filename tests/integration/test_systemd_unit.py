"""The unit file is valid for systemd (checked with systemd-analyze when it is installed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "p2pbackupd.service"


def test_unit_is_type_notify_with_watchdog_and_restart():
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "LimitNOFILE="):
        assert line in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed on this machine")
def test_systemd_analyze_verify(tmp_path: Path):
    daemon = Path(sys.executable).with_name("p2pbackupd")
    assert daemon.exists(), "p2pbackupd is not installed next to this interpreter"
    unit = tmp_path / "p2pbackupd.service"
    unit.write_text(UNIT.read_text().replace("ExecStart=%h/.local/bin/p2pbackupd",
                                             f"ExecStart={daemon}"))
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {"PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path)}
    proc = subprocess.run(["systemd-analyze", "verify", "--user", str(unit)],
                          capture_output=True, text=True, timeout=60, env=env)
    problems = [ln for ln in (proc.stdout + proc.stderr).splitlines()
                if "p2pbackupd.service" in ln]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr
