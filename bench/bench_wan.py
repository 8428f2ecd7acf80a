#!/usr/bin/env python3
"""Two homes behind NAT on an emulated WAN: replication through TURN against a raw data channel.

Topology (tests/nat.py, on tests/netns.py): a pretend internet with coturn on its public host;
two homes behind symmetric NATs (`MASQUERADE --random-fully`: only the TURN relay gets
through) and two behind cone-like NATs (STUN hole punching works). One router of each pair
sits behind the user-space delay line (tests/delayline.py), --rtt/2 each way, so both paths
have --rtt ms of round trip between the two devices.

  (a) raw aiortc data channel through the TURN relay (bench_transport.py's child, 64 KiB
      messages, --seconds of sending), device to device across the two symmetric NATs
  (b) p2pbackupd replicating a snapshot of --mb MB of random files over the same relay and
      path: the receiver dials the sender's forwarded signaling port ([peers.addresses])
  (c) the same across the two cone NATs: hole punched with STUN only
  (d), (e) as (b) and (c) through the broker (p2pbackup-broker on the public host beside
      coturn, handing out its STUN/TURN servers with REST credentials): no port forwarded, no
      [ice] table, only `[broker] url`; signaling through the broker's socket

For (b) and (c): the sender's daemon is up first; setup ("both online → connected") runs from
the receiver's control socket first answering (its daemon is up: it dials at once) to its
status showing the session connected (polled every 50 ms); also shown from the receiver's
process start, and to the first object. Throughput = bytes replicated / (connected → every
object of the sender present in the receiver's store). Targets (issue 18 §4): (b) ≥ 80% of (a);
connected within 2 s hole punched and 3 s through TURN.

    sudo .venv/bin/python bench/bench_wan.py [--mb 48] [--rtt 40] [--seconds 8] [--json]
                                             [--broker-only | --relay-only]

`--relay-only` runs (a) and (b) alone (about a third of the time): the ratio and nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from _common import bench_lock  # noqa: E402
from bench_replication import (BenchError, cli, control, log, missing, pair_homes,  # noqa: E402
                               peer_entry, proc_cpu, set_config, start_daemon, store_objects,
                               wait_for)

WORK = REPO / "bench" / "work" / "wan"
PORT = 7890
RATIO_TARGET = 0.80
SETUP_TARGETS = {"relay": 3.0, "reflexive": 2.0}   # s, both online -> connected


def prepare(work: Path, mb: int) -> tuple[Path, Path, Path, str, str]:
    """Home a (a snapshot of `mb` MB of random files) paired with home b, kept as templates."""
    data = work / "data"
    data.mkdir(parents=True)
    for i in range(max(1, mb // 4)):
        (data / f"f{i}.bin").write_bytes(os.urandom(min(4, mb) * 1024 * 1024))
    a, b = work / "home-a", work / "home-b"
    a_id, b_id = pair_homes(a, b, data)
    cli(a, "snapshot")
    return a, b, data, a_id, b_id


def replicate(homes, devices, a_tpl: Path, b_tpl: Path, a_id: str, b_id: str, ice: dict,
              logs: Path, tag: str, broker_url: str | None = None) -> dict:
    """Fresh copies of both homes in the two NATed homes; time b's connection and transfer
    (through the broker at `broker_url` if given, else to a's forwarded port)."""
    home_a, home_b = homes
    dev_a, dev_b = devices
    a, b = WORK / f"a-{tag}", WORK / f"b-{tag}"
    for src, dst in ((a_tpl, a), (b_tpl, b)):
        shutil.rmtree(dst, ignore_errors=True)
        subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    if broker_url:
        for home in (a, b):
            set_config(home, broker={"url": broker_url})
    else:
        address = home_a.forward(PORT, dev_a)
        set_config(a, peers={"port": PORT}, ice=ice)
        set_config(b, peers={"addresses": {a_id[:8]: address}}, ice=ice)
    want = store_objects(a / "store")
    left = [n for n in want if not (b / "store" / n).exists()]
    nbytes = sum(want[n] for n in left)
    da = start_daemon(dev_a, "a", a, logs, tag)
    db = None
    try:
        wait_for(da.ready, 120, "the sender's daemon")
        wait_for(lambda: control(a, "status"), 30, "the sender's control socket")
        db = start_daemon(dev_b, "b", b, logs, tag)
        t0 = db.started
        up = connected = first = None
        deadline = time.monotonic() + 900
        while left and time.monotonic() < deadline:
            now = time.monotonic()
            if connected is None:
                status = control(b, "status", timeout=5)
                up = up or (now if status else None)
                e = peer_entry(status, a_id)
                if e and e.get("connected"):
                    connected, path = now, e.get("ice_path")
                    cpu0 = proc_cpu(da.real_pid()), proc_cpu(db.real_pid())
            n = len(left)
            left = missing(b / "store", left)
            if first is None and len(left) < n:
                first = now
            if db.proc.poll() is not None or da.proc.poll() is not None:
                raise BenchError(f"a daemon exited (see {logs})")
            time.sleep(0.05)
        if left or connected is None:
            raise BenchError(f"[{tag}] replication did not finish: {len(left)} objects left")
        done = time.monotonic()
        cpu = proc_cpu(da.real_pid()) - cpu0[0], proc_cpu(db.real_pid()) - cpu0[1]
    finally:
        for d in (db, da):
            if d is not None:
                d.stop()
    up = up or connected
    return {"path": path, "receiver_up_s": up - t0, "setup_s": connected - up,
            "connected_s": connected - t0, "first_object_s": (first or done) - t0,
            "transfer_s": done - connected, "bytes": nbytes,
            "mb_per_s": nbytes / (done - connected) / 1e6,
            "cpu_s": {"sender": cpu[0], "receiver": cpu[1]}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=48, help="data replicated in (b) and (c)")
    ap.add_argument("--rtt", type=float, default=40.0, help="round trip between the devices, ms")
    ap.add_argument("--seconds", type=float, default=8.0, help="sending time of (a)")
    ap.add_argument("--keep", action="store_true", help="keep bench/work/wan")
    ap.add_argument("--json", action="store_true")
    only = ap.add_mutually_exclusive_group()
    only.add_argument("--broker-only", action="store_true", help="only (d) and (e)")
    only.add_argument("--relay-only", action="store_true", help="only (a) and (b)")
    args = ap.parse_args()
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("turnserver"):
        raise SystemExit("needs root, iproute2 and coturn (turnserver)")
    from bench_transport import run_pair
    from p2pbackup.transport.datachannel import MESSAGE_SIZE
    from tests.nat import Internet
    from tests.netns import NetLab

    with contextlib.ExitStack() as stack:
        stack.enter_context(bench_lock())
        load = os.getloadavg()
        shutil.rmtree(WORK, ignore_errors=True)
        logs = WORK / "logs"
        logs.mkdir(parents=True)
        log(f"preparing {args.mb} MB of random files and two paired homes")
        a_tpl, b_tpl, _, a_id, b_id = prepare(WORK, args.mb)
        lab = stack.enter_context(NetLab())
        internet = Internet(lab)
        turn = internet.coturn(user=("p2p", "secret"))
        rest_turn = internet.coturn(secret=os.urandom(16).hex(), port=3479)
        broker = internet.broker(WORK / "broker", rest_turn)
        os.environ.update(broker.env)   # the daemons trust the broker's certificate
        sym = [internet.home(f"s{i}", symmetric=True) for i in (1, 2)]
        cone = [internet.home(f"c{i}") for i in (1, 2)]
        devs = {h.router.name: h.device(f"{h.router.name}d") for h in sym + cone}
        for home in (sym[0], cone[0]):
            lab.delay(home.router, args.rtt / 2, ifname="wan")
        # The smallest of three: the first echo also waits for ARP through the delay line.
        rtt = {k: min(devs[k].rtt_ms(internet.public.ip, 5) or 1e9 for _ in range(3))
               for k in ("s1", "c1")}
        log(f"round trip device -> public host: {rtt}")
        servers = [{"urls": turn.stun}, {"urls": turn.turn, "username": "p2p",
                                         "credential": "secret"}]
        ice_json = json.dumps({"servers": servers, "relay_only": False})
        raw = relay = punched = None
        if not args.broker_only:
            log("(a) raw data channel through TURN")
            raw = run_pair("dc", MESSAGE_SIZE, args.seconds, ice=ice_json,
                           where=(devs["s1"].exec_prefix(), devs["s2"].exec_prefix()))
            log(f"(a) {raw['mb_per_s']:.2f} MB/s over {raw.get('ice_path')}")
            log("(b) replication through TURN")
            relay = replicate(sym, (devs["s1"], devs["s2"]), a_tpl, b_tpl, a_id, b_id,
                              {"servers": servers}, logs, "relay")
            log(f"(b) {relay}")
        if not (args.broker_only or args.relay_only):
            log("(c) replication hole punched (STUN only)")
            punched = replicate(cone, (devs["c1"], devs["c2"]), a_tpl, b_tpl, a_id, b_id,
                                {"servers": servers[:1]}, logs, "punched")
            log(f"(c) {punched}")
        b_relay = b_punched = None
        if not args.relay_only:
            log("(d) replication through the broker, TURN relay")
            b_relay = replicate(sym, (devs["s1"], devs["s2"]), a_tpl, b_tpl, a_id, b_id, {},
                                logs, "broker-relay", broker.url)
            log(f"(d) {b_relay}")
            log("(e) replication through the broker, hole punched")
            b_punched = replicate(cone, (devs["c1"], devs["c2"]), a_tpl, b_tpl, a_id, b_id, {},
                                  logs, "broker-punched", broker.url)
            log(f"(e) {b_punched}")
        if not args.keep:
            stack.callback(shutil.rmtree, WORK, True)
    result = {"load_before": load, "rtt_ms": rtt, "raw": raw, "relay": relay,
              "punched": punched, "broker_relay": b_relay, "broker_punched": b_punched,
              "ratio": relay["mb_per_s"] / raw["mb_per_s"] if relay and raw else None}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    ok = lambda b: "met" if b else "NOT met"  # noqa: E731
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"round trip to the public host: {rtt['s1']:.1f} ms (TURN homes), "
          f"{rtt['c1']:.1f} ms (cone homes)")
    if raw:
        print(f"(a) raw data channel through TURN: {raw['mb_per_s']:.2f} MB/s (path "
              f"{raw.get('ice_path')}, {raw['bytes'] / 1e6:.0f} MB in {raw['seconds']:.1f} s)")
    for name, r in (("(b) replication through TURN", relay),
                    ("(c) replication hole punched", punched),
                    ("(d) through the broker, TURN", b_relay),
                    ("(e) through the broker, hole punched", b_punched)):
        if r is None:
            continue
        target = SETUP_TARGETS.get(r["path"] or "", 2.0)
        print(f"{name}: {r['mb_per_s']:.2f} MB/s ({r['bytes'] / 1e6:.0f} MB in "
              f"{r['transfer_s']:.1f} s, path {r['path']}; CPU s sender "
              f"{r['cpu_s']['sender']:.1f}, receiver {r['cpu_s']['receiver']:.1f}); both online -> connected "
              f"{r['setup_s']:.2f} s (target {target:g} s: {ok(r['setup_s'] <= target)}; the "
              f"receiver's daemon answered {r['receiver_up_s']:.2f} s after its start, "
              f"connected at {r['connected_s']:.2f} s, first object at "
              f"{r['first_object_s']:.2f} s)")
    if result["ratio"] is not None:
        print(f"(b)/(a) = {result['ratio']:.2f} (target {RATIO_TARGET}: "
              f"{ok(result['ratio'] >= RATIO_TARGET)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
