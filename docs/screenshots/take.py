"""Takes the README's screenshots of the web console: a small home, its daemon (off the
network), Debian's chromium through Playwright. From the checkout:

    .venv/bin/python docs/screenshots/take.py [OUT_DIR]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-sync"]


def make_tree(src: Path) -> None:
    (src / "taxes" / "2025").mkdir(parents=True)
    (src / "photos").mkdir()
    (src / "taxes" / "2025" / "return.pdf").write_bytes(os.urandom(180_000))
    (src / "taxes" / "notes.txt").write_text("receipts in the blue folder\n")
    for i in range(12):
        (src / "photos" / f"IMG_{4100 + i}.jpg").write_bytes(os.urandom(40_000 + i * 999))
    (src / "todo.md").write_text("- renew passport\n")
    (src / "videos").mkdir()
    _film(src)


def _film(src: Path) -> None:
    """A big file: written again before the Status screenshot, so that a snapshot is
    reading it (with a bar) when it is taken."""
    with open(src / "videos" / "holiday.mp4", "wb") as f:
        for _ in range(640):   # (160 MiB was snapshotted before the page drew its bar)
            f.write(os.urandom(1 << 20))


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
    root = Path(tempfile.mkdtemp(prefix="p2pbackup-shots-"))
    home, src = root / "home", root / "Documents"
    make_tree(src)
    env = dict(os.environ, P2PBACKUP_HOME=str(home), P2PBACKUP_LAN="off")

    def cli(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "p2pbackup.cli.main", *args], env=env,
                              check=True, capture_output=True, text=True).stdout

    cli("init", "--source", str(src))
    with open(home / "config.toml", "a") as f:
        f.write("\n[daemon]\nseal_interval = 1\n")
    daemon = subprocess.Popen([sys.executable, "-m", "p2pbackup.daemon.main"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):  # the daemon's first snapshot
            if json.loads(cli("snapshots", "--json")):
                break
            time.sleep(0.2)
        (src / "todo.md").write_text("- renew passport\n- call the plumber\n")
        time.sleep(2.5)
        cli("snapshot")
        url = cli("web", "--no-open").strip()
        base = url.split("/login")[0]
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                str(root / "profile"), executable_path="/usr/bin/chromium", headless=True,
                args=ARGS, viewport={"width": 800, "height": 560})
            page = ctx.new_page()
            page.goto(url)
            page.wait_for_selector("#activity")
            _film(src)
            taking = subprocess.Popen([sys.executable, "-m", "p2pbackup.cli.main", "snapshot"],
                                      env=env, stdout=subprocess.DEVNULL)
            page.wait_for_selector("#work li[data-kind='snapshot'] progress", timeout=60_000)
            page.screenshot(path=str(out / "status.png"))
            taking.wait(300)
            page.goto(base + "/snapshots")
            page.screenshot(path=str(out / "snapshots.png"))
            page.click("table.list tbody tr >> nth=0 >> a")
            page.click("text=photos/")
            page.screenshot(path=str(out / "browse.png"))
            page.click("tr:has-text('IMG_4103.jpg') >> button.restore")
            page.fill("#restore-to", str(root / "restored"))
            page.click("#restore-go")
            page.wait_for_selector("#restore-state.done")
            page.screenshot(path=str(out / "restore.png"))
            page.goto(base + "/timeline")
            page.screenshot(path=str(out / "timeline.png"))
            page.goto(base + "/devices")
            page.check("input[name='pair-role'][value='member']")
            page.check("input[name='pair-source']")
            page.click("#pair-start")
            page.wait_for_selector("#pair-qr[src^='data:']")
            page.screenshot(path=str(out / "devices.png"))
            page.click("#pair-cancel")
            page.goto(base + "/verify")
            page.click("button.verify[data-read='true']")
            page.wait_for_selector("#verify-state.done")
            page.screenshot(path=str(out / "verify.png"))
            phone = ctx.new_page()
            phone.set_viewport_size({"width": 390, "height": 700})
            phone.goto(base + "/")
            phone.wait_for_selector("#activity")
            phone.screenshot(path=str(out / "status-phone.png"))
            ctx.close()
    finally:
        daemon.terminate()
        daemon.wait(30)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
