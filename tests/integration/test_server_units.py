"""The system units of the two servers (storage server and broker): each runs its program as
its own user, hardened, and `systemd-analyze verify` finds nothing wrong in it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"

UNITS = {
    "p2pbackup-server": ("StateDirectory=p2pbackup-server", "ProtectHome=yes",
                         "p2pbackup-server serve --data /var/lib/p2pbackup-server"),
    "p2pbackup-broker": ("StateDirectory=p2pbackup-broker",
                         "p2pbackup-broker --data /var/lib/p2pbackup-broker"),
}
HARDENED = ("User=p2pbackup", "NoNewPrivileges=yes", "ProtectSystem=strict",
            "CapabilityBoundingSet=")


@pytest.mark.parametrize("program", sorted(UNITS))
def test_the_unit_runs_its_server_as_its_own_user_hardened(program: str) -> None:
    text = (SYSTEMD / f"{program}.service").read_text()
    for line in HARDENED + UNITS[program]:
        assert line in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed on this machine")
@pytest.mark.parametrize("program", sorted(UNITS))
def test_systemd_analyze_verifies_the_unit(program: str, tmp_path: Path) -> None:
    installed = Path(sys.executable).with_name(program)
    assert installed.exists(), f"{program} is not installed next to this interpreter"
    unit = tmp_path / f"{program}.service"
    unit.write_text((SYSTEMD / unit.name).read_text().replace(f"/usr/local/bin/{program}",
                                                               str(installed)))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)
    problems = [ln for ln in (proc.stdout + proc.stderr).splitlines() if unit.name in ln]
    assert not problems, proc.stdout + proc.stderr
