#!/usr/bin/env python3
"""`make demo`, second part: two devices in two homes, each behind its own NAT router, pair
through the broker's mailbox and replicate through the broker (signaling, STUN/TURN servers
with fresh credentials), hole punched; `status` names the path.

Built on the NAT test harness (tests/nat.py: network namespaces, so root, iproute2 and coturn's
turnserver); without them it prints one line saying why it was skipped. Adds ~20 s to the demo.

    sudo .venv/bin/python bench/demo_homes.py
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.nat import Internet, coturn_available  # noqa: E402
from tests.netns import NetLab, available  # noqa: E402

PY = sys.executable


def step(text: str) -> None:
    print(f"\n== {text}")


def why_not() -> str | None:
    if os.geteuid() != 0:
        return "it creates network namespaces, which needs root"
    if not available():
        return "network namespaces cannot be created here (iproute2's ip, root)"
    if not coturn_available():
        return "coturn (turnserver) is not installed (`make sysdeps`)"
    return None


def main() -> int:
    reason = why_not()
    if reason:
        print(f"\n(two homes behind NAT replicating through the broker: skipped: {reason})")
        return 0
    work = Path(tempfile.mkdtemp(prefix="p2pbackup-demo-homes-"))
    procs: list[subprocess.Popen] = []
    try:
        with NetLab() as lab:
            step("Two homes behind NAT routers, and a broker with coturn on a pretend internet")
            internet = Internet(lab)
            turn = internet.coturn(secret=secrets.token_hex(16))
            broker = internet.broker(work / "broker", turn)
            homes = [internet.home("home1"), internet.home("home2")]
            kitchen, office = (h.device(f"{h.router.name}pc") for h in homes)
            print(f"    broker {broker.url} (TURN credentials from a secret shared with coturn); "
                  f"home routers {homes[0].public_ip} and {homes[1].public_ip}, no port "
                  "forwarded")

            def p2p(host, home: Path, *args: str, show: bool = True) -> str:
                env = dict(os.environ, P2PBACKUP_HOME=str(home), P2PBACKUP_LAN="on",
                           **broker.env)
                if show:
                    print(f"$ p2pbackup {' '.join(args)}    ({host.name})")
                got = host.run([PY, "-m", "p2pbackup.cli.main", *args], env=env,
                               capture_output=True, text=True, timeout=180)
                if got.returncode != 0:
                    sys.exit(f"demo failed: p2pbackup {' '.join(args)}: {got.stderr.strip()}")
                if show:
                    print("    " + got.stdout.strip().replace("\n", "\n    "))
                return got.stdout

            data, a, b = work / "data", work / "home-kitchen", work / "home-office"
            data.mkdir()
            for i in range(4):
                (data / f"photo{i}.jpg").write_bytes(os.urandom(500_000))
            (data / "notes.txt").write_text("written in the kitchen\n" * 100)
            p2p(kitchen, a, "init", "--source", str(data), show=False)
            with open(a / "config.toml", "a") as f:
                f.write(f'\n[daemon]\nseal_interval = 1\n\n[broker]\nurl = "{broker.url}"\n')
            p2p(kitchen, a, "snapshot")

            step("Pair the office's device through the broker's mailbox (a code, no address)")
            mailbox = broker.url.replace("https://", "wss://") + "/v1/mailbox"
            env = dict(os.environ, P2PBACKUP_HOME=str(a), **broker.env)
            host = kitchen.popen([PY, "-m", "p2pbackup.cli.main", "pair", "--mailbox", mailbox,
                                  "--yes", "--no-qr"], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
            assert host.stdout is not None
            code = ""
            for line in host.stdout:
                m = re.match(r"Pairing code: (\S+)", line)
                if m:
                    code = m.group(1)
                    break
            if not code:
                sys.exit("demo failed: the kitchen's `pair` printed no code")
            print(f"    the kitchen shows the code {code}")
            p2p(office, b, "pair", code, "--mailbox", mailbox, "--name", "office")
            host.wait(timeout=60)

            step("Both daemons start; they meet through the broker and replicate")
            for host_, home, name in ((kitchen, a, "kitchen"), (office, b, "office")):
                log = open(work / f"{name}-daemon.log", "wb")
                procs.append(host_.popen([PY, "-m", "p2pbackup.daemon.main"],
                                         env={"P2PBACKUP_HOME": str(home),
                                              "P2PBACKUP_LAN": "on", **broker.env},
                                         stdout=log, stderr=log))
            t0 = time.monotonic()
            want = {p.name for p in (a / "store" / "snapshots").iterdir()}
            while time.monotonic() - t0 < 120:
                snaps = b / "store" / "snapshots"
                if snaps.exists() and want <= {p.name for p in snaps.iterdir()}:
                    break
                time.sleep(0.2)
            else:
                sys.exit(f"demo failed: the office did not receive the snapshot in 120 s "
                         f"(logs in {work})")
            print(f"    the office holds the kitchen's snapshot after "
                  f"{time.monotonic() - t0:.1f} s")
            status = p2p(office, b, "status", show=False)
            for line in status.splitlines():
                if "broker" in line or "connected over" in line:
                    print(f"    {line.strip()}")
            peers = json.loads(p2p(office, b, "status", "--json", show=False))["peers"]
            path = next((p.get("ice_path") for p in peers if p.get("connected")), None)
            print(f"    path: {path} (host: same LAN; reflexive: hole punched; relay: TURN)")
            p2p(office, b, "restore", "latest", "--to", str(work / "restored"))
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=30)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
