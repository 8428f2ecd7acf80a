#!/usr/bin/env python3
"""p2pbackup against restic on one S3 server (SeaweedFS `weed mini`), in the same run; then
the throughput of our store clients against each kind of server on this machine.

Run from the repository root: `.venv/bin/python bench/bench_s3.py [--scale 1.0] [--repeat 2]`
(restic from the OS packages: `apt-get install -y restic`; nginx with dav-ext from `make
sysdeps`). Everything lives in a temporary directory that is deleted at the end, the servers
included. The figures go to the "## S3" section of bench/RESULTS.md (`--out`).

"Backup to S3" for p2pbackup is what a user without a peer does: `p2pbackup snapshot --push`
with the bucket configured (`store add`): the snapshot into this device's own store (a
directory) while the daemon's uploader (p2pbackup/repo/upload.py) puts each pack in the bucket
as it is written, then what the snapshot wrote last (snapshot object, heads). It is what the
daemon does on its own (its uploaders hear of each pack as the sink writes it), without
starting and stopping a daemon around a timed command: the product's fastest honest path. The
older way, `p2pbackup snapshot` then `p2pbackup store push LOCATION` (one after the other: the
sum of their times, the larger peak RSS), is a second row, on its own fresh repository and
bucket in the same repetition, against the same restic run.

Steps, each timed (wall clock, and the CPU seconds user + system of the process and its
children) with the peak RSS of the process (GNU time's %M) after a `sync`; each is repeated
`--repeat` times, alternating which tool goes first (restic in repetitions 1, 3, ...), and
the median is compared (`--steps` runs some of them, for A/B comparisons; then nothing is
written):

  initial backup    restic backup DATA            vs snapshot --push (fresh repository,
                                                     fresh home and a fresh bucket prefix in
                                                     every repetition; the last ones are kept)
                                                     and vs snapshot, then store push
  no-change backup  the same again                 vs the same again
  restore           restic restore latest          vs restore latest --from s3://...
                                                     (each into a new directory: see
                                                     RESTORE_TARGETS)
  read-data check   restic check --read-data       vs verify --read-data --from s3://...

Then: put and get throughput of `--packs` random 16 MiB packs, 8 at a time, through
open_store() to weed's S3, to p2pbackup-server (its own disk, TLS), to wsgidav and to nginx
with dav-ext (WebDAV), one after the other on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import S3_HEADING, bench_lock, cpu_s, write_section  # noqa: E402

from tests import servers  # noqa: E402

P2PBACKUP = REPO / ".venv" / "bin" / "p2pbackup"
RESTIC_PASSWORD = "p2pbackup-bench"
PACK = 16 << 20
IN_FLIGHT = 8
# weed's volumes, MB each: the tests' 64 (and weed mini's own default, 128) make writes wait a
# second or more each time the volumes fill (tests/servers.py), a stall of the server that
# would be measured instead of the clients; `weed master`'s default is 30,720.
VOLUME_MB = 1024

# The targets: p2pbackup's time / restic's (median), and the client's peak RSS.
TARGETS = {"initial backup": 0.6, "no-change backup": 0.5, "restore": 0.8,
           "read-data check": 1.0}
SEQUENTIAL = "initial backup, snapshot then store push"   # the second row of the first step
RSS_TARGET_MIB = 250
STEP_KEYS = {"initial": "initial backup", "no-change": "no-change backup", "restore": "restore",
             "read-data": "read-data check"}

# Restores go to a new directory in each repetition, never one just deleted on a disk without
# a journal: on ext4 without a journal (this machine's /tmp) creating an inode skips,
# one by one, each inode of its group freed in the last minute (five if its table block is
# not yet written back; fs/ext4/ialloc.c recently_deleted()). Restoring right after deleting
# the previous repetition's 20k files made both tools spend most of their time there (perf:
# 65% of the restore's CPU in recently_deleted() and the buffer lookups under it; system
# time 0.5 s on a fresh directory, 2.3 to 4.4 s after the delete, at scale 0.3) and made
# the ratio swing by whichever tool met more of them (0.72 to 1.51 in one run). Deletes by
# anything else on the machine in those minutes do the same (after other runs had deleted
# restores, restic took 5.4-7.5 s and we 4.7-5.2 s for what took 4.0-4.5 and 3.3-3.9 s on a
# fresh disk), so as root the restores go to a fresh ext4 with a journal (mkfs.ext4's
# defaults, as a user's disk: the scan is only done without one) on a loop device. There each
# restore is deleted once it is timed (elsewhere, after the step), and the loop device writes
# its image with direct I/O:
# ten restores kept, each cached twice (the disk's pages and its image file's), filled this
# machine's 24 GiB of memory by the third repetition, and the later ones ran while the kernel
# reclaimed pages (free memory 19 GiB -> 0.2 GiB, 4.8 GiB reclaimed meanwhile; restic took
# 4.1-5.6 s and we 3.3-5.2 s for what took 4.2-4.5 and 3.3-3.6 s one at a time).
RESTORE_TARGETS = ("restic-restore-{i}", "p2pbackup-restore-{i}")


@contextmanager
def restore_disk(tmp: Path, size: int) -> Iterator[tuple[Path, str, bool]]:
    """Where the restores go, how the results say it, and whether a restore may follow a
    delete there: a fresh journaled ext4 of `size` bytes (sparse) on a loop device when run as
    root, else `tmp`."""
    if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
        yield tmp, "this machine's temporary directory", False
        return
    image, disk = tmp / "restore.img", tmp / "restore-disk"
    disk.mkdir()
    with open(image, "wb") as f:
        f.truncate(size)
    # (inode tables written now: initialised lazily, in the background, they would be
    # written while the restores are timed)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                    str(image)], check=True)
    device = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", str(image)],
                            check=True, capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mount", device, str(disk)], check=True)
        try:
            yield disk, "a fresh ext4 with a journal on a loop device (direct I/O)", True
        finally:
            subprocess.run(["umount", str(disk)], check=False)
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)
        image.unlink(missing_ok=True)


Run = tuple[float, int, float]   # seconds, peak RSS in KiB, CPU seconds (user + system)

# The S3 server's process (`weed mini` is one), once started: each command's line says the
# CPU seconds the server spent meanwhile (weed and we share 2 cores; a client that makes the
# server work harder per byte shows there, not in its own CPU).
SERVER_PID: int | None = None


def server_pid(marker: str) -> int | None:
    """The process whose command line holds `marker` (a server's directory)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    return int(pid)
        except OSError:
            continue   # (gone meanwhile)
    return None


def timed_rss(argv: list[str], env: dict[str, str]) -> Run:
    """Seconds, peak RSS (KiB) and CPU seconds of one command (output to /dev/null); a
    failure stops the benchmark. The RSS is GNU time's: a child spawned from this process
    directly would count this process's own RSS in its ru_maxrss (the vfork before exec
    shares its memory). The CPU seconds tell a slow step from a busy machine."""
    subprocess.run(["sync"], check=True)
    server = SERVER_PID
    server_before = cpu_s(server) if server is not None else 0.0
    with tempfile.NamedTemporaryFile("r") as rss:
        t = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", rss.name, *argv],
                              env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        dt = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
        kib, user, system = rss.read().split()[-3:]
    cpu = float(user) + float(system)
    shown = ' '.join(Path(a).name if a.startswith('/') else a for a in argv)
    served = f" {cpu_s(server) - server_before:6.2f} server-cpu-s" if server is not None \
        else ""
    print(f"  {dt:7.2f} s {cpu:7.2f} cpu-s{served} {int(kib) / 1024:6.0f} MiB  {shown}",
          flush=True)
    return dt, int(kib), cpu


class Step:
    """One step's measurements: a Run per tool and repetition."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.restic: list[Run] = []
        self.ours: list[Run] = []

    def row(self) -> str:
        r = statistics.median(t for t, _, _ in self.restic)
        p = statistics.median(t for t, _, _ in self.ours)
        cpu = (statistics.median(c for _, _, c in self.ours)
               / statistics.median(c for _, _, c in self.restic))
        each = ", ".join(f"{a[0] / b[0]:.2f}" for a, b in zip(self.ours, self.restic))
        target = TARGETS.get(self.name, TARGETS["initial backup"])
        return (f"| {self.name} | {r:.2f} | {p:.2f} | **{p / r:.2f}** ({each}) | ≤ {target} "
                f"{'met' if p / r <= target else 'MISSED'} | {cpu:.2f} | "
                f"{max(m for _, m, _ in self.restic) / 1024:.0f} | "
                f"{max(m for _, m, _ in self.ours) / 1024:.0f} |")


def compare(reps: int, step: Step, restic: Callable[[int], Run], ours: Callable[[int], Run],
            before: Callable[[int], None] = lambda i: None,
            second: tuple[Step, Callable[[int], Run]] | None = None) -> None:
    """Each repetition: `before`, then restic and ours (and `second`: another way of ours
    against the same restic run, its Step sharing restic's runs), in alternating order."""
    print(f"{step.name}:", flush=True)
    for i in range(reps):
        before(i)
        order = [(restic, step.restic), (ours, step.ours)]
        if second is not None:
            second[0].restic = step.restic
            order.append((second[1], second[0].ours))
        for run, into in (order if i % 2 == 0 else order[::-1]):
            into.append(run(i))


def restore_step(reps: int, step: Step, tmp: Path, restic: Callable[[str], Run],
                 ours: Callable[[str], Run], *, delete_each: bool) -> None:
    """`compare` for restores, each into a new directory (RESTORE_TARGETS): deleted once it is
    timed with `delete_each` (a journaled disk of their own), else all after the step."""
    def into(run: Callable[[str], Run], target: str) -> Run:
        try:
            return run(target)
        finally:
            if delete_each:
                shutil.rmtree(target, ignore_errors=True)

    targets = [[str(tmp / t.format(i=i)) for t in RESTORE_TARGETS] for i in range(reps)]
    compare(reps, step, lambda i: into(restic, targets[i][0]),
            lambda i: into(ours, targets[i][1]))
    for pair in targets:
        for target in pair:
            shutil.rmtree(target, ignore_errors=True)


def both(a: Run, b: Run) -> Run:
    """Two commands that make one step: their times add up, the peak is the larger."""
    return a[0] + b[0], max(a[1], b[1]), a[2] + b[2]


# ---- throughput of our stores --------------------------------------------------------------

async def throughput(store: object, packs: int) -> tuple[float, float]:
    """MiB/s putting then getting `packs` random 16 MiB packs, IN_FLIGHT at a time."""
    from p2pbackup.format.pack import pack_name

    blobs = [os.urandom(PACK) for _ in range(packs)]
    names = [f"packs/{pack_name(b)}" for b in blobs]
    turn = asyncio.Semaphore(IN_FLIGHT)

    async def put(name: str, data: bytes) -> None:
        async with turn:
            await store.put(name, data)  # type: ignore[attr-defined]

    async def get(name: str) -> None:
        async with turn:
            assert len(await store.get(name)) == PACK  # type: ignore[attr-defined]

    t = time.perf_counter()
    await asyncio.gather(*(put(n, b) for n, b in zip(names, blobs)))
    up = time.perf_counter() - t
    t = time.perf_counter()
    await asyncio.gather(*(get(n) for n in names))
    down = time.perf_counter() - t
    mib = packs * PACK / 2**20
    return mib / up, mib / down


async def _throughput_of(open_it: Callable[[], Awaitable[Any]], packs: int
                         ) -> tuple[float, float]:
    store = await open_it()
    try:
        return await throughput(store, packs)
    finally:
        await store.close()


@contextmanager
def opened(tmp: Path, kind: str) -> Iterator[Callable[[], Awaitable[Any]]]:
    """A running server of `kind`, as a coroutine function that opens a store on it."""
    from p2pbackup.blobs import open_store

    if kind == "S3 (weed mini)":
        gen = servers.weed_mini(tmp / "weed-tp", VOLUME_MB)
        srv = next(gen)
        try:
            bucket = srv.new_bucket()

            async def s3_store() -> Any:
                return open_store(f"s3://{bucket}/tp", options=srv.options())
            yield s3_store
        finally:
            gen.close()
    elif kind == "p2pbackup-server (TLS, own disk)":
        with servers.storage_server(tmp / "server", "--open-registration") as s:
            async def server_store() -> Any:
                account = servers.StorageAccount()
                store = account.store(s)
                await store.put(*account.roster())   # (registers the account)
                return store
            yield server_store
    else:
        maker: Callable[[Path], AbstractContextManager[servers.DavServer]] = \
            servers.wsgidav if kind.startswith("wsgidav") else servers.nginx_dav
        with maker(tmp / kind.split()[0]) as dav:
            path = "/dav/tp" if kind.startswith("wsgidav") else "/tp"

            async def dav_store() -> Any:
                return open_store(dav.url.replace("http://", "webdav://") + path)
            yield dav_store


def store_throughputs(tmp: Path, packs: int) -> list[str]:
    rows = []
    for kind in ("S3 (weed mini)", "p2pbackup-server (TLS, own disk)",
                 "wsgidav (WebDAV)", "nginx dav-ext (WebDAV)"):
        try:
            with opened(tmp, kind) as open_it:
                up, down = asyncio.run(_throughput_of(open_it, packs))
        except BaseException as exc:   # (pytest's Skipped when a server is not installed)
            print(f"{kind}: not measured: {type(exc).__name__}: {exc}", flush=True)
            rows.append(f"| {kind} | not measured: {exc} | |")
            continue
        print(f"{kind}: put {up:.0f} MiB/s, get {down:.0f} MiB/s", flush=True)
        rows.append(f"| {kind} | {up:.0f} | {down:.0f} |")
    return rows


# ---- main ----------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0, help="mkdata.py scale (1.0: ~1 GB)")
    ap.add_argument("--repeat", type=int, default=2, help="repetitions of each step")
    ap.add_argument("--packs", type=int, default=12, help="16 MiB packs per throughput run")
    ap.add_argument("--parallel", type=int, default=None,
                    help="store push --parallel (default: its own, 4)")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--steps", default=",".join(STEP_KEYS),
                    help=f"comma-separated, of {', '.join(STEP_KEYS)} (the first backup is "
                    "made untimed when `initial` is left out); results are written only "
                    "when all are run")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "RESULTS.md")
    args = ap.parse_args()
    chosen = [k.strip() for k in args.steps.split(",") if k.strip()]
    if not chosen or set(chosen) - set(STEP_KEYS):
        raise SystemExit(f"--steps takes some of {', '.join(STEP_KEYS)}")
    selected = {STEP_KEYS[k] for k in chosen}
    if shutil.which("restic") is None:
        raise SystemExit("restic is not installed (apt-get install -y restic)")
    restored_to = ""
    with bench_lock(), tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp_name, \
            ExitStack() as stack:
        load_before = os.getloadavg()[1]
        tmp = Path(tmp_name)
        data = tmp / "data"
        subprocess.run([sys.executable, str(REPO / "bench" / "mkdata.py"), str(data),
                        "--scale", str(args.scale), "--seed", "42"], check=True,
                       stdout=subprocess.DEVNULL)
        files = [p for p in data.rglob("*") if p.is_file() and not p.is_symlink()]
        size = sum(p.stat().st_size for p in files)
        restic_v = subprocess.run(["restic", "version"], capture_output=True,
                                  text=True).stdout.split()[1]
        gen = servers.weed_mini(tmp / "weed", VOLUME_MB)
        srv = next(gen)
        global SERVER_PID
        SERVER_PID = server_pid(str(tmp / "weed"))
        try:
            base = dict(os.environ, AWS_ACCESS_KEY_ID=srv.access_key,
                        AWS_SECRET_ACCESS_KEY=srv.secret_key, AWS_ENDPOINT_URL=srv.endpoint,
                        AWS_REGION=servers.REGION, RESTIC_PASSWORD=RESTIC_PASSWORD)
            state: dict[str, object] = {}

            def fresh(i: int) -> None:
                """New repositories for repetition `i` (untimed)."""
                env = dict(base, RESTIC_CACHE_DIR=str(tmp / f"restic-cache-{i}"),
                           P2PBACKUP_HOME=str(tmp / f"home-{i}"))
                repo = f"s3:{srv.endpoint}/{srv.new_bucket()}/restic"
                subprocess.run(["restic", "-r", repo, "init"], env=env, check=True,
                               capture_output=True)
                location = f"s3://{srv.new_bucket()}/p2pbackup"
                options = [a for k, v in srv.options().items() for a in ("-o", f"{k}={v}")]
                subprocess.run([str(P2PBACKUP), "init", "--source", str(data)], env=env,
                               check=True, capture_output=True, stdin=subprocess.DEVNULL)
                subprocess.run([str(P2PBACKUP), "store", "add", location, *options, *push],
                               env=env, check=True, capture_output=True)
                # the older way's own repository and bucket (store push LOCATION)
                env_seq = dict(env, P2PBACKUP_HOME=str(tmp / f"home-seq-{i}"))
                subprocess.run([str(P2PBACKUP), "init", "--source", str(data)], env=env_seq,
                               check=True, capture_output=True, stdin=subprocess.DEVNULL)
                state.update(env=env, repo=repo, location=location, env_seq=env_seq,
                             location_seq=f"s3://{srv.new_bucket()}/p2pbackup")

            push = ["--parallel", str(args.parallel)] if args.parallel else []

            def restic_backup(i: int) -> Run:
                return timed_rss(["/usr/bin/restic", "-r", state["repo"], "backup",  # type: ignore
                                  str(data)], state["env"])  # type: ignore[arg-type]

            def our_backup(i: int) -> Run:
                return timed_rss([str(P2PBACKUP), "snapshot", "--push"],
                                 state["env"])  # type: ignore[arg-type]

            def our_backup_then_push(i: int) -> Run:
                env = state["env_seq"]
                return both(timed_rss([str(P2PBACKUP), "snapshot"], env),  # type: ignore
                            timed_rss([str(P2PBACKUP), "store", "push",
                                       state["location_seq"], *push], env))  # type: ignore

            steps = [Step(n) for n in TARGETS]
            sequential = Step(SEQUENTIAL)
            if steps[0].name in selected:
                compare(args.repeat, steps[0], restic_backup, our_backup, fresh,
                        second=(sequential, our_backup_then_push))
                steps.insert(1, sequential)
            else:   # the repositories the other steps need, untimed
                fresh(0)
                restic_backup(0), our_backup(0)
            no_change, restore, read_data = steps[-3:]
            if no_change.name in selected:
                compare(args.repeat, no_change, restic_backup, our_backup)
            if restore.name in selected:
                disk, restored_to, own_disk = stack.enter_context(
                    restore_disk(tmp, size * 13 // 10 + (2 << 30)))
                restore_step(args.repeat, restore, disk,
                             lambda to: timed_rss(["/usr/bin/restic", "-r",  # type: ignore
                                                   state["repo"], "restore", "latest",
                                                   "--target", to], state["env"]),  # type: ignore
                             lambda to: timed_rss([str(P2PBACKUP), "restore", "latest",
                                                   "--from", state["location"],  # type: ignore
                                                   "--to", to], state["env"]),  # type: ignore
                             delete_each=own_disk)
            if read_data.name in selected:
                compare(args.repeat, read_data,
                        lambda i: timed_rss(["/usr/bin/restic", "-r",  # type: ignore[list-item]
                                             state["repo"], "check", "--read-data"],
                                            state["env"]),  # type: ignore[arg-type]
                        lambda i: timed_rss([str(P2PBACKUP), "verify", "--read-data", "--from",
                                             state["location"]], state["env"]),  # type: ignore
                        )
        finally:
            gen.close()
        rows = [] if args.skip_throughput else store_throughputs(tmp, args.packs)
    load_after = os.getloadavg()[1]
    steps = [s for s in steps if s.ours]
    peak = max(m for s in steps for _, m, _ in s.ours) / 1024
    lines = [
        S3_HEADING, "",
        f"`bench/bench_s3.py --scale {args.scale} --repeat {args.repeat}`: mkdata.py tree "
        f"of {size / 2**20:.0f} MiB in {len(files)} files, restic {restic_v} and p2pbackup "
        f"on one SeaweedFS `weed mini` (S3) on this machine (2 cores, shared); p2pbackup's "
        f"backup is `snapshot --push` (packs uploaded as the snapshot writes them, as the "
        f"daemon does), and in the second row `snapshot` then `store push` (the daemon's "
        f"uploader run once, after). Times are "
        f"medians in seconds (each repetition's ratio in brackets); cpu is the ratio of the "
        f"median CPU seconds (user + system of the command, not the server's); RSS is the peak "
        f"in MiB. "
        f"{f'Restores go to {restored_to}. ' if restored_to else ''}"
        f"Load average (5 min) {load_before:.1f} at the start, {load_after:.1f} at the end "
        f"(other work on the machine: 2.0 is both cores busy).",
        "",
        "| step | restic | p2pbackup | ratio | target | cpu | restic RSS | p2pbackup RSS |",
        "|---|---|---|---|---|---|---|---|",
        *(s.row() for s in steps),
        "",
        f"p2pbackup's peak RSS: {peak:.0f} MiB (target ≤ {RSS_TARGET_MIB} MiB: "
        f"{'met' if peak <= RSS_TARGET_MIB else 'MISSED'}).",
    ]
    if rows:
        lines += ["", f"Store throughput through open_store(), {args.packs} random 16 MiB "
                  f"packs, {IN_FLIGHT} at a time, each server on this machine:", "",
                  "| server | put MiB/s | get MiB/s |", "|---|---|---|", *rows]
    section = "\n".join(lines) + "\n"
    print(section)
    if len(steps) == len(TARGETS) + 1:
        write_section(args.out, S3_HEADING, section)
    else:
        print(f"(some steps only: {args.out} is left as it was)")


if __name__ == "__main__":
    main()
