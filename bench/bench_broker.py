"""The broker under many devices (issue 18 §4): N simulated devices (one account per
--per-account of them) hold a WebSocket each, from --workers client processes (aiohttp),
against one broker process on SQLite, then against two processes sharing PostgreSQL (each
account's devices split between them, so every message crosses processes). Measured: the
broker's RSS (each process; peak), relay latency p50/p99 of signaling messages at --rate per
second for --seconds, and the time from a device's push to each of its peers hearing it.

    .venv/bin/python bench/bench_broker.py [--devices 10000] [--rate 1000] [--seconds 20]
                                           [--write-results]

Latency is measured by the receiving device against the send time carried in the message
(the same machine's clock). A device that cannot connect, and messages that do not arrive
within the run, are counted and reported, not hidden.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import json
import multiprocessing as mp
import os
import random
import re
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import bench_lock, cpu_s, write_section  # noqa: E402

HEADING = "## Broker"
SLOW = 0.05           # seconds: the p99 target; slower messages are placed in time


def raise_nofile() -> int:
    """Open files up to the hard limit (10,000 sockets need more than the default 1,024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# -- the simulated devices (client processes) ------------------------------------------------

def worker(accounts: list[tuple[str, list[tuple[bytes, str]]]], conn: mp.connection.Connection
           ) -> None:
    """One client process: `accounts` = [(account id, [(device seed, broker url)])]."""
    raise_nofile()
    asyncio.run(_worker(accounts, conn))


async def _worker(accounts: list[tuple[str, list[tuple[bytes, str]]]],
                  conn: mp.connection.Connection) -> None:
    import aiohttp

    from p2pbackup.broker.pauses import GcPauses
    from p2pbackup.crypto.identity import DeviceIdentity
    from p2pbackup.protocol.broker_wire import DEVICE_PING, ping_period, socket_auth_message

    loop = asyncio.get_running_loop()
    pauses = GcPauses().install()     # this client's own pauses delay what it measures
    latencies: list[float] = []
    slow: list[float] = []      # send times of the messages slower than SLOW
    pushes: list[float] = []
    errors: list[str] = []
    sockets: dict[str, aiohttp.ClientWebSocketResponse] = {}
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=None))
    gate = asyncio.Semaphore(100)

    async def reader(ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            doc = json.loads(msg.data)
            if doc.get("t") == "signal":
                sent_at = float(base64.b64decode(doc["data"]))
                latencies.append(time.time() - sent_at)
                if latencies[-1] > SLOW:
                    slow.append(sent_at)
            elif doc.get("t") == "push":
                pushes.append(time.time() - float(base64.b64decode(doc["data"])))

    async def connect(account: str, seed: bytes, url: str) -> str | None:
        ident = DeviceIdentity(seed)
        async with gate:
            try:
                # pinging as a daemon's BrokerClient does (its period drawn from the range)
                ws = await http.ws_connect(f"{url}/v1/account/{account}/ws", autoping=True,
                                           heartbeat=ping_period(DEVICE_PING, random.random()))
                nonce = (await ws.receive_json(timeout=60))["nonce"]
                sig = ident.sign(socket_auth_message(account, ident.device_id, nonce))
                await ws.send_json({"t": "auth", "device": ident.device_id,
                                    "sig": base64.b64encode(sig).decode()})
                ready = await ws.receive_json(timeout=60)
                if ready.get("t") != "ready":
                    errors.append(str(ready)[:200])
                    return None
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                return None
        sockets[ident.device_id] = ws
        readers.append(asyncio.create_task(reader(ws)))
        return ident.device_id

    readers: list[asyncio.Task[None]] = []
    t0 = time.monotonic()
    ids = await asyncio.gather(*(connect(a, seed, url) for a, devs in accounts
                                 for seed, url in devs))
    # what the sockets hold lives to the end: out of this client's full collections, which
    # would otherwise pause it (and delay what it measures) as the broker's did
    gc.freeze()
    conn.send(("connected", sum(1 for i in ids if i), time.monotonic() - t0, errors[:5]))
    # pairs: device k sends to device k + half of its account (the other process, on two)
    per = [[i for i in ids[n:n + len(devs)]] for n, (_, devs) in
           zip(_offsets([len(d) for _, d in accounts]), accounts)]
    pairs = [(devs[k], devs[k + len(devs) // 2]) for devs in per
             for k in range(len(devs) // 2) if devs[k] and devs[k + len(devs) // 2]]
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd[0] == "signals":
            rate, seconds = cmd[1], cmd[2]
            sent = 0
            pauses.count, pauses.longest, pauses.total = 0, 0.0, 0.0
            cpu = time.process_time()
            start, wall = time.monotonic(), time.time()
            total = int(rate * seconds)
            for i in range(total):
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                src, dst = pairs[i % len(pairs)]
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await sockets[src].send_json({
                        "t": "signal", "to": dst, "id": i,
                        "data": base64.b64encode(repr(time.time()).encode()).decode()})
                    sent += 1
            await asyncio.sleep(5)      # the last ones arrive
            conn.send(("signals", sent, latencies[:], time.monotonic() - start, slow[:],
                       wall, pauses.figures(), time.process_time() - cpu))
            latencies.clear()
        elif cmd[0] == "pushes":
            count = cmd[1]
            senders = [devs[0] for devs in per if devs[0]][:count]
            for src in senders:
                await sockets[src].send_json({
                    "t": "push", "data": base64.b64encode(repr(time.time()).encode()).decode()})
                await asyncio.sleep(0.02)
            await asyncio.sleep(5)
            conn.send(("pushes", len(senders), pushes[:]))
            pushes.clear()
        else:
            break
    for ws in sockets.values():
        await ws.close()
    await http.close()
    conn.send(("closed",))


def _offsets(sizes: list[int]) -> list[int]:
    out, n = [], 0
    for s in sizes:
        out.append(n)
        n += s
    return out


# -- the broker processes ----------------------------------------------------------------------

PAUSE = re.compile(r"a full garbage collection paused the broker for (\d+) ms "
                   r"\((\d+) full collections, ([\d.]+) s in all\)")


def broker_pauses(log: Path, offset: int) -> dict[str, float]:
    """The broker's full-collection pauses it logged after `offset` of its log (those of at
    least broker/pauses.py LOG_OVER) and its running count of all full collections."""
    found = PAUSE.findall(log.read_bytes()[offset:].decode(errors="replace"))
    return {"logged": len(found), "longest_ms": max((int(f[0]) for f in found), default=0),
            "logged_s": sum(int(f[0]) for f in found) / 1000,
            "full_so_far": int(found[-1][1]) if found else -1}


def rss_mib(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of process `pid`, in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))]


@contextlib.contextmanager
def brokers(tmp: Path, mode: str) -> Iterator[list[tuple[str, int, Path]]]:
    """[(url, pid, log)] of one SQLite broker or two on a fresh PostgreSQL."""
    from tests.servers import broker_server, postgres_server

    with contextlib.ExitStack() as stack:
        if mode == "sqlite":
            b = stack.enter_context(broker_server(tmp / "one"))
            yield [(b.url, b.process.pid, b.log)]          # type: ignore[union-attr]
            return
        pg = stack.enter_context(postgres_server())
        dsn = pg.new_database()
        out = []
        for name in ("one", "two"):
            b = stack.enter_context(broker_server(tmp / name, "--database", dsn))
            out.append((b.url, b.process.pid, b.log))       # type: ignore[union-attr]
        yield out


def register(urls: list[str], n_devices: int, per_account: int
             ) -> list[tuple[str, list[tuple[bytes, str]]]]:
    """The accounts (each registered by its owner on the first broker), their devices' seeds
    and the broker each device connects to."""
    import os

    from p2pbackup.crypto.identity import DeviceIdentity
    from p2pbackup.discovery.broker import BrokerClient
    from tests.servers import StorageAccount

    accounts = []
    todo = []
    for _ in range(n_devices // per_account):
        seeds = [os.urandom(32) for _ in range(per_account)]
        idents = [DeviceIdentity(s) for s in seeds]
        acct = StorageAccount(owner=idents[0], members=idents[1:])
        raw = acct.roster()[1]
        devs = [(seed, urls[(k * len(urls)) // per_account]) for k, seed in enumerate(seeds)]
        accounts.append((acct.fingerprint, devs))
        todo.append((acct, raw))

    async def publish() -> None:
        gate = asyncio.Semaphore(50)

        async def one(acct: object, raw: bytes) -> None:
            async with gate:
                c = BrokerClient(urls[0], acct.owner, acct.fingerprint)   # type: ignore
                await c.publish_rosters([raw])
                await c.close()
        await asyncio.gather(*(one(a, r) for a, r in todo))
    asyncio.run(publish())
    return accounts


def run_mode(mode: str, args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    with brokers(tmp, mode) as procs:
        urls = [u for u, _, _ in procs]
        t = time.monotonic()
        accounts = register(urls, args.devices, args.per_account)
        registered = time.monotonic() - t
        before = [rss_mib(pid)[0] for _, pid, _ in procs]
        ctx = mp.get_context("spawn")
        pipes, workers = [], []
        for w in range(args.workers):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker, args=(accounts[w::args.workers], child))
            p.start()
            pipes.append(parent)
            workers.append(p)
        connected = [pipe.recv() for pipe in pipes]
        time.sleep(args.settle)
        idle = [rss_mib(pid)[0] for _, pid, _ in procs]
        offsets = [log.stat().st_size for _, _, log in procs]
        cpu = [cpu_s(pid) for _, pid, _ in procs]
        for pipe in pipes:
            pipe.send(("signals", args.rate / args.workers, args.seconds))
        sig = [pipe.recv() for pipe in pipes]
        cpu = [cpu_s(pid) - c for (_, pid, _), c in zip(procs, cpu)]
        gc_broker = [broker_pauses(log, o) for (_, _, log), o in zip(procs, offsets)]
        gc_connect = [broker_pauses(log, 0) for _, _, log in procs]
        for pipe in pipes:
            pipe.send(("pushes", args.pushes // args.workers))
        push = [pipe.recv() for pipe in pipes]
        peak = [rss_mib(pid)[1] for _, pid, _ in procs]
        for pipe in pipes:
            pipe.send(("stop",))
        for pipe in pipes:
            pipe.recv()
        for p in workers:
            p.join(60)
    lat = [x for s in sig for x in s[2]]
    t0 = min(s[5] for s in sig)
    per_second: dict[int, int] = {}
    for s in sig:
        for at in s[4]:
            per_second[int(at - t0)] = per_second.get(int(at - t0), 0) + 1
    pushed = [x for s in push for x in s[2]]
    sent = sum(s[1] for s in sig)
    return {
        "mode": mode, "processes": len(procs),
        "devices": sum(c[1] for c in connected), "wanted": args.devices,
        "connect_s": max(c[2] for c in connected), "register_s": registered,
        "errors": [e for c in connected for e in c[3]][:5],
        "rss_start": before, "rss_idle": idle, "rss_peak": peak,
        "sent": sent, "received": len(lat), "rate": sent / max(s[3] - 5 for s in sig),
        "p50_ms": pct(lat, 0.5) * 1000, "p99_ms": pct(lat, 0.99) * 1000,
        "max_ms": max(lat, default=float("nan")) * 1000,
        "pushes": sum(p[1] for p in push), "push_heard": len(pushed),
        "push_p50_ms": pct(pushed, 0.5) * 1000, "push_max_ms": max(pushed, default=0) * 1000,
        "slow_by_second": dict(sorted(per_second.items())),
        "broker_cpu_s": cpu, "broker_gc_signals": gc_broker, "broker_gc_all": gc_connect,
        "client_gc_signals": [s[6] for s in sig], "client_cpu_s": [s[7] for s in sig],
        "load": os.getloadavg(),
    }


def report(results: list[dict[str, object]], args: argparse.Namespace) -> str:
    lines = [HEADING, "",
             f"`bench_broker.py --devices {args.devices} --rate {args.rate} --seconds "
             f"{args.seconds} --settle {args.settle}` ({args.per_account} devices per account, {args.workers} client "
             f"processes; {time.strftime('%Y-%m-%d')}, load average "
             f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end: "
             "a shared 2-core machine). Targets: RSS <= 500 MiB per process, relay p99 <= 50 "
             "ms, push heard <= 1 s.", "",
             "| state | processes | devices connected | connect (s) | RSS idle (MiB) | "
             "RSS peak (MiB) | signals sent/received | rate (/s) | p50 (ms) | p99 (ms) | "
             "max (ms) | pushes heard | push p50 / max (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes: list[str] = []
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['processes']} | {r['devices']} of {r['wanted']} | "
            f"{r['connect_s']:.1f} | {' + '.join(f'{x:.0f}' for x in r['rss_idle'])} | "
            f"{' + '.join(f'{x:.0f}' for x in r['rss_peak'])} | {r['sent']}/{r['received']} | "
            f"{r['rate']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.0f} | "
            f"{r['push_heard']} | {r['push_p50_ms']:.0f} / {r['push_max_ms']:.0f} |")
        notes.append(f"{r['mode']}: during the signals, broker CPU s {r['broker_cpu_s']}, "
                     f"broker full-collection pauses logged (>= 50 ms) "
                     f"{r['broker_gc_signals']}; clients' full collections "
                     f"{r['client_gc_signals']}, client CPU s {r['client_cpu_s']}")
        notes.append(f"{r['mode']}: messages slower than {SLOW * 1000:.0f} ms, by the second "
                     f"of the run they were sent in: {r['slow_by_second']}")
        if r["errors"]:
            notes.append(f"{r['mode']}: first connection errors: {r['errors']}")
    return "\n".join(lines + [""] + notes) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--per-account", type=int, default=4)
    ap.add_argument("--workers", type=int, default=4, help="client processes")
    ap.add_argument("--rate", type=float, default=1000.0, help="signals per second, in all")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--pushes", type=int, default=200)
    ap.add_argument("--settle", type=float, default=0.0,
                    help="seconds between the last connection and the first message")
    ap.add_argument("--modes", default="sqlite,postgres")
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args()
    raise_nofile()
    results = []
    with bench_lock(), tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:
        for mode in args.modes.split(","):
            results.append(run_mode(mode, args, Path(tmp) / mode))
            print(json.dumps(results[-1]), flush=True)
    text = report(results, args)
    print(text)
    if args.write_results:
        write_section(args.out, HEADING, text)


if __name__ == "__main__":
    main()
