#!/usr/bin/env python3
"""Raw transport throughput between two processes on loopback: aiortc data channel vs TLS lane.

  (a) p2pbackup.transport.datachannel.PeerLink: one data channel, for each --dc-sizes message
      size (the first is the size p2pbackup uses, datachannel.MESSAGE_SIZE)
  (b) p2pbackup.transport.tls_lane: TLS 1.3 over asyncio TCP, --lane-size messages

Each measurement starts two fresh processes (sender, receiver) that exchange SDP through this
script's pipes; the sender sends zero-filled messages for --seconds, then closes; the receiver
times from its first to its last byte. CPU seconds are each process's own (user+system) over
its transfer phase. Everything runs inside a private network namespace with only `lo` up
(`unshare -n`, made here; needs root or unprivileged user namespaces), and aiortc gathers only
127.0.0.1 (IceConfig.host_addresses), so no packet leaves the loopback of that namespace.

    .venv/bin/python bench/bench_transport.py [--seconds 3] [--repeat 3] [--json]

The machine's other load matters a lot (a busy second core halves (a)); UDP drops are the
datagrams the receiver's socket buffer overflowed, which SCTP then retransmits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

INSIDE = "P2PBACKUP_BENCH_NETNS"  # set once we run in our own namespace


# ---------------------------------------------------------------- child processes

def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _read_json() -> dict:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return json.loads(line)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


async def dc_child(role: str, size: int, seconds: float, ice: str | None = None) -> None:
    """`ice`: JSON {"servers": [{"urls", "username", "credential"}], "relay_only"} (another
    script runs the two ends in two namespaces, bench_wan.py); default loopback only."""
    from p2pbackup.transport.datachannel import IceConfig, IceServer, PeerLink
    if ice:
        doc = json.loads(ice)
        config = IceConfig(tuple(IceServer(**s) for s in doc["servers"]),
                           doc.get("relay_only", False))
    else:
        config = IceConfig(host_addresses=("127.0.0.1",))
    link = PeerLink(config)
    if role == "send":
        _emit({"sdp": await link.create_offer()})
        await link.accept_answer((await _read_json())["sdp"])
    else:
        _emit({"sdp": await link.accept_offer((await _read_json())["sdp"])})
    await link.wait_connected(30)
    route = link.ice_path()
    await run_transfer(link, role, size, seconds,
                       extra={"max_buffered": 0, "ice_path": route.kind if route else None})


async def lane_child(role: str, size: int, seconds: float) -> None:
    from p2pbackup.transport.tls_lane import LaneIdentity, LaneServer, connect_lane
    me = LaneIdentity.generate()
    if role == "recv":
        done = asyncio.get_running_loop().create_future()

        async def handle(link):
            await run_transfer(link, role, size, seconds)
            done.set_result(None)

        peer = await _read_json()
        server = LaneServer(me, handle, expected=[peer["fingerprint"]])
        host, port = await server.start("127.0.0.1")
        _emit({"fingerprint": me.fingerprint, "port": port})
        await done
        await server.close()
    else:
        _emit({"fingerprint": me.fingerprint})
        peer = await _read_json()
        link = await connect_lane("127.0.0.1", peer["port"], peer["fingerprint"], me)
        await run_transfer(link, role, size, seconds)


async def run_transfer(link, role: str, size: int, seconds: float, extra=None) -> None:
    extra = dict(extra or {})
    if role == "send":
        msg = bytes(size)
        sent = 0
        cpu0, t0 = _cpu(), time.perf_counter()
        deadline = t0 + seconds
        while time.perf_counter() < deadline:
            for _ in range(8):
                await link.send(msg)
                if extra.get("max_buffered") is not None:
                    extra["max_buffered"] = max(extra["max_buffered"], link.buffered_amount)
            sent += 8 * size
        await link.close()
        _emit({"bytes": sent, "cpu": _cpu() - cpu0, "wall": time.perf_counter() - t0, **extra})
    else:
        got = 0
        first = None
        cpu0 = _cpu()
        while (m := await link.recv()) is not None:
            if first is None:
                first = time.perf_counter()
                cpu0 = _cpu()
            got += len(m)
        wall = time.perf_counter() - (first or time.perf_counter())
        await link.close()
        _emit({"bytes": got, "cpu": _cpu() - cpu0, "wall": wall,
               **({"ice_path": extra["ice_path"]} if "ice_path" in extra else {})})


# ---------------------------------------------------------------- driver

def udp_receive_drops() -> int:
    """UDP datagrams this namespace dropped because a socket's receive buffer was full."""
    lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines()
             if ln.startswith("Udp:")]
    return int(dict(zip(lines[0][1:], lines[1][1:]))["RcvbufErrors"])


def run_pair(kind: str, size: int, seconds: float, *, ice: str | None = None,
             where: tuple[list[str], list[str]] = ([], [])) -> dict:
    """Start sender and receiver (each under its command prefix in `where`, e.g. `ip netns
    exec NS`), relay their signaling lines, collect their reports."""
    drops = udp_receive_drops()
    def spawn(role: str) -> subprocess.Popen:
        return subprocess.Popen(
            [*where[role == "recv"], sys.executable, __file__, "--child", kind, role, str(size),
             str(seconds), *(["--child-ice", ice] if ice else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)

    send, recv = spawn("send"), spawn("recv")
    try:
        # First lines: the sender's offer/fingerprint goes to the receiver, and back.
        recv.stdin.write(send.stdout.readline())
        recv.stdin.flush()
        send.stdin.write(recv.stdout.readline())
        send.stdin.flush()
        s = json.loads(send.stdout.readline())
        r = json.loads(recv.stdout.readline())
        for p in (send, recv):
            p.wait(timeout=30)
    finally:
        for p in (send, recv):
            if p.poll() is None:
                p.kill()
                p.wait()
    if r["bytes"] != s["bytes"]:
        raise SystemExit(f"{kind}: sent {s['bytes']} bytes but {r['bytes']} arrived")
    return {"kind": kind, "message_size": size, "bytes": r["bytes"],
            "mb_per_s": r["bytes"] / r["wall"] / 1e6, "seconds": r["wall"],
            "cpu_sender": s["cpu"], "cpu_receiver": r["cpu"],
            "cpu_per_s_sender": s["cpu"] / s["wall"], "cpu_per_s_receiver": r["cpu"] / r["wall"],
            "udp_drops": udp_receive_drops() - drops,
            **({"max_buffered": s["max_buffered"]} if "max_buffered" in s else {}),
            **({"ice_path": r["ice_path"]} if "ice_path" in r else {})}


def main() -> None:
    from p2pbackup.transport.datachannel import MESSAGE_SIZE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="sending time per measurement")
    ap.add_argument("--dc-sizes", default=f"{MESSAGE_SIZE},16384,262144",
                    help="data-channel message sizes, comma-separated")
    ap.add_argument("--lane-size", type=int, default=1024 * 1024)
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every measurement N times, interleaved; report each and medians")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--child-ice", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        kind, role, size, seconds = args.child
        if kind == "dc":
            asyncio.run(dc_child(role, int(size), float(seconds), args.child_ice))
        else:
            asyncio.run(lane_child(role, int(size), float(seconds)))
        return

    if os.environ.get(INSIDE) != "1":
        unshare = shutil.which("unshare") or "unshare"
        flags = "-n" if os.geteuid() == 0 else "-rn"
        env = dict(os.environ, **{INSIDE: "1"})
        os.execvpe(unshare, [unshare, flags, sys.executable, __file__, *sys.argv[1:]], env)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)

    configs = [("dc", int(s)) for s in args.dc_sizes.split(",")] + [("lane", args.lane_size)]
    results = [run_pair(kind, size, args.seconds)
               for _ in range(args.repeat) for kind, size in configs]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    if args.repeat > 1:
        results.sort(key=lambda r: configs.index((r["kind"], r["message_size"])))
    print(f"{'transport':<14} {'message':>9} {'MB/s':>8} {'CPU s send':>11} "
          f"{'CPU s recv':>11} {'cores send':>11} {'cores recv':>11} {'UDP drops':>10}")
    for r in results:
        name = "(a) datachan" if r["kind"] == "dc" else "(b) TLS lane"
        print(f"{name:<14} {r['message_size'] // 1024:>7}Ki {r['mb_per_s']:>8.1f} "
              f"{r['cpu_sender']:>11.2f} {r['cpu_receiver']:>11.2f} "
              f"{r['cpu_per_s_sender']:>11.2f} {r['cpu_per_s_receiver']:>11.2f} "
              f"{r['udp_drops'] if r['kind'] == 'dc' else '':>10}")
    if args.repeat > 1:
        print("medians:")
        for kind, size in configs:
            rows = [r for r in results if (r["kind"], r["message_size"]) == (kind, size)]
            print(f"  {kind:<5} {size // 1024:>5}Ki "
                  f"{statistics.median(r['mb_per_s'] for r in rows):8.1f} MB/s  cores send "
                  f"{statistics.median(r['cpu_per_s_sender'] for r in rows):.2f} recv "
                  f"{statistics.median(r['cpu_per_s_receiver'] for r in rows):.2f}")


if __name__ == "__main__":
    main()
