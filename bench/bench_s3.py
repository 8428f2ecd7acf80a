#!/usr/bin/env python3
"""p2pbackup against restic on one S3 server (SeaweedFS `weed mini`), in the same run.

Run from the repository root: `.venv/bin/python bench/bench_s3.py [--scale 0.2]` (restic from
the OS packages: `apt-get install -y restic`). Everything lives in a temporary directory that
is deleted at the end, the server included.

Steps, each timed (wall clock), restic first then p2pbackup:

  1. backup to the bucket     restic backup DATA            vs p2pbackup snapshot (to this
                                                               device's store) + upload of
                                                               every object to the bucket
  2. full restore from it     restic restore latest          vs p2pbackup restore latest
                                                               --from s3://...
  3. full check of it         restic check --read-data       vs p2pbackup verify --read-data
                                                               --from s3://...

The upload in step 1 is what the daemon's uploader does (each object PUT once, 8 at a time,
through blobs/s3.py); the daemon itself is not started, so the figure is the store's and the
snapshot's, not the uploader's scheduling.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import servers  # noqa: E402

P2PBACKUP = REPO / ".venv" / "bin" / "p2pbackup"
RESTIC_PASSWORD = "p2pbackup-bench"
UPLOADS = 8


def run(argv: list[str], env: dict[str, str]) -> float:
    subprocess.run(["sync"], check=True)
    t = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, stdin=subprocess.DEVNULL)
    dt = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    print(f"  {dt:7.1f} s  {' '.join(Path(a).name if a.startswith('/') else a for a in argv)}",
          flush=True)
    return dt


async def upload(store_dir: Path, location: str, options: dict) -> tuple[int, int]:
    from p2pbackup.blobs import open_store
    from p2pbackup.blobs.local import LocalDirStore

    src, dst = LocalDirStore(store_dir), open_store(location, options=options)
    names = [n async for n in src.list("")]
    turn = asyncio.Semaphore(UPLOADS)
    sent = 0

    async def one(name: str) -> None:
        nonlocal sent
        async with turn:
            data = await src.get(name)
            await dst.put(name, data)
            sent += len(data)

    await asyncio.gather(*(one(n) for n in names))
    await dst.close()
    return len(names), sent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=0.2, help="mkdata.py scale (1.0: ~1 GB)")
    args = ap.parse_args()
    if shutil.which("restic") is None:
        raise SystemExit("restic is not installed (apt-get install -y restic)")
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / "data"
        subprocess.run([sys.executable, str(REPO / "bench" / "mkdata.py"), str(data),
                        "--scale", str(args.scale), "--seed", "42"], check=True,
                       stdout=subprocess.DEVNULL)
        size = sum(p.stat().st_size for p in data.rglob("*") if p.is_file()
                   and not p.is_symlink())
        gen = servers.weed_mini(tmp / "weed")
        srv = next(gen)
        try:
            env = dict(os.environ, AWS_ACCESS_KEY_ID=srv.access_key,
                       AWS_SECRET_ACCESS_KEY=srv.secret_key, AWS_ENDPOINT_URL=srv.endpoint,
                       AWS_REGION=servers.REGION, RESTIC_PASSWORD=RESTIC_PASSWORD,
                       RESTIC_CACHE_DIR=str(tmp / "restic-cache"),
                       P2PBACKUP_HOME=str(tmp / "home"))
            restic_repo = f"s3:{srv.endpoint}/{srv.new_bucket()}/restic"
            location = f"s3://{srv.new_bucket()}/p2pbackup"
            rows: list[tuple[str, float, float]] = []
            run(["restic", "-r", restic_repo, "init"], env)
            subprocess.run([str(P2PBACKUP), "init", "--source", str(data)], env=env,
                           check=True, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

            r = run(["restic", "-r", restic_repo, "backup", str(data)], env)
            snap = run([str(P2PBACKUP), "snapshot"], env)
            t = time.perf_counter()
            count, sent = asyncio.run(upload(tmp / "home" / "store", location, srv.options()))
            up = time.perf_counter() - t
            rows.append(("backup to the bucket", r, snap + up))
            r = run(["restic", "-r", restic_repo, "restore", "latest", "--target",
                     str(tmp / "r1")], env)
            p = run([str(P2PBACKUP), "restore", "latest", "--from", location, "--to",
                     str(tmp / "r2")], env)
            rows.append(("full restore from it", r, p))
            r = run(["restic", "-r", restic_repo, "check", "--read-data"], env)
            p = run([str(P2PBACKUP), "verify", "--read-data", "--from", location], env)
            rows.append(("full check of it", r, p))
        finally:
            gen.close()
    print(f"data: mkdata.py --scale {args.scale}, {size / 2**20:.0f} MiB; p2pbackup uploaded "
          f"{count} objects, {sent / 2**20:.0f} MiB (snapshot {snap:.1f} s + upload "
          f"{up:.1f} s)")
    print("| step | restic 0.14 (s) | p2pbackup (s) | ratio |")
    print("|---|---|---|---|")
    for step, r, p in rows:
        print(f"| {step} | {r:.1f} | {p:.1f} | {p / r:.2f} |")


if __name__ == "__main__":
    main()
