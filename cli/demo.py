"""`make demo`: the main job on a generated tree, through the real CLI, printing each step.

init -> snapshot -> change a day's worth of files -> snapshot -> list -> restore both ->
compare with the originals -> verify --read-data -> pair a second device with a code (on
loopback) and restore on it -> run both daemons, which find each other by mDNS on loopback and
replicate over a signed WebRTC session and the direct TLS lane -> restore on the second
device from its own replica -> start a p2pbackup-server (TLS, self-signed) and `store add` it
with an invite: the first device's daemon registers the account and uploads -> recover a
third device from the recovery code and the second (a peer) -> recover a fourth from the
server alone and restore there -> print the laptop's web console address (`--keep` keeps its
daemon running so it can be opened).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from p2pbackup.sizes import format_size

ROOT = Path(__file__).resolve().parent.parent
MKDATA = ROOT / "bench" / "mkdata.py"  # the benchmarks' data generator


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def p2p(home: Path, *args: str, show: bool = True) -> str:
    env = dict(os.environ, P2PBACKUP_HOME=str(home))
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "p2pbackup.cli.main", *args], env=env,
                          capture_output=True, text=True)
    took = time.monotonic() - t
    print(f"$ p2pbackup {' '.join(args)}    ({took:.2f} s)")
    if show:
        for line in proc.stdout.splitlines():
            print(f"    {line}")
    for line in proc.stderr.splitlines():
        print(f"    {line}")
    if proc.returncode != 0:
        sys.exit(f"demo failed: p2pbackup {' '.join(args)} exited {proc.returncode}")
    return proc.stdout


def manifest(root: Path) -> dict[str, tuple]:
    """What a faithful restore must reproduce; SQLite files compare by their SQL content."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode, st.st_mtime_ns)
            else:
                with open(p, "rb") as f:
                    head = f.read(16)
                if head == b"SQLite format 3\x00":
                    db = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
                    digest = hashlib.sha256("\n".join(db.iterdump()).encode()).hexdigest()
                    db.close()
                else:
                    digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out[rel] = ("file", st.st_mode, st.st_mtime_ns, st.st_size, digest)
    return out


def compare(label: str, expected: dict, restored: Path) -> None:
    got = manifest(restored)
    diff = sorted(set(expected) ^ set(got)) + sorted(k for k in expected if k in got
                                                     and expected[k] != got[k])
    if diff:
        sys.exit(f"demo failed: {label} differs in {len(diff)} paths, e.g. {diff[:3]}")
    files = sum(1 for v in got.values() if v[0] == "file")
    print(f"    {label}: {files} files, {len(got) - files} dirs and links identical to the "
          "originals (contents, modes, mtimes; SQLite by content)")


def pair_device(home: Path, new_home: Path) -> None:
    """`pair` on the first device, `pair CODE` on the new one, as two processes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["pair", "--no-mdns", "--no-qr", "--yes", "--port", str(port)]
    print(f"$ p2pbackup {' '.join(args)}    (in the background)")
    host = subprocess.Popen([sys.executable, "-m", "p2pbackup.cli.main", *args],
                            env=dict(os.environ, P2PBACKUP_HOME=str(home)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert host.stdout is not None
    code = ""
    while not code:
        line = host.stdout.readline()
        if not line:
            sys.exit(f"demo failed: pair printed no code: {host.stderr.read() if host.stderr else ''}")
        print(f"    {line.rstrip()}")
        if line.startswith("Pairing code:"):
            code = line.split()[2]
    p2p(new_home, "pair", code, "--peer", f"127.0.0.1:{port}", "--name", "laptop")
    out, err = host.communicate(timeout=60)
    for line in (out + err).splitlines():
        print(f"    {line}")
    if host.returncode != 0:
        sys.exit("demo failed: pairing did not complete")


def replicate_with_daemons(home: Path, laptop: Path, work: Path, expected: dict
                           ) -> list[subprocess.Popen]:
    """Both daemons on loopback; the laptop ends with the first device's snapshots.
    Returns the daemons, still running (home's first)."""
    for h in (home, laptop):
        with open(h / "config.toml", "a") as f:
            f.write('\n[peers]\ninterfaces = ["lo"]\n')
    env = dict(os.environ, P2PBACKUP_LAN="on")
    procs = []
    for h in (home, laptop):
        log = open(work / f"{h.name}-daemon.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "p2pbackup.daemon.main"],
                                      env=dict(env, P2PBACKUP_HOME=str(h)), stdout=log,
                                      stderr=log, stdin=subprocess.DEVNULL))
    print("$ p2pbackupd    (one per device, in the background)")
    try:
        t0 = time.monotonic()
        want = {p.name for p in (home / "store" / "snapshots").iterdir()}
        while time.monotonic() - t0 < 120:
            have = {p.name for p in (laptop / "store" / "snapshots").iterdir()} \
                if (laptop / "store" / "snapshots").exists() else set()
            if want <= have:
                break
            time.sleep(0.2)
        else:
            sys.exit("demo failed: the laptop did not receive the snapshots within 120 s")
        print(f"    the laptop holds all {len(want)} snapshots of the first device after "
              f"{time.monotonic() - t0:.1f} s")
        p2p(laptop, "status")
        p2p(laptop, "snapshots")
        p2p(laptop, "restore", "latest", "--to", str(work / "restore-replica"))
        compare("restored on the laptop from its own replica", expected,
                work / "restore-replica" / "data")
        p2p(laptop, "verify", "--read-data")
    except BaseException:
        stop(procs)
        raise
    return procs


def start_storage_server(work: Path) -> tuple[subprocess.Popen, str, Path, Path]:
    """`p2pbackup-server serve` on a free loopback port, with TLS by a throwaway self-signed
    certificate; returns the process, its location, the certificate and its data dir."""
    from p2pbackup.server.tlsutil import self_signed_cert

    cert, key = self_signed_cert(work / "server-tls")
    data = work / "server-data"
    args = ["serve", "--data", str(data), "--listen", "127.0.0.1:0", "--tls-cert", str(cert),
            "--tls-key", str(key)]
    print(f"$ p2pbackup-server {' '.join(args)}    (in the background)")
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "p2pbackup.server.main", *args],
                            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                            text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()   # "p2pbackup-server: listening on 127.0.0.1:PORT"
    if "listening on" not in line:
        proc.wait(timeout=30)
        sys.exit(f"demo failed: p2pbackup-server did not start (see {work / 'server.log'})")
    print(f"    {line.rstrip()}")
    return proc, f"https://{line.split()[-1]}/", cert, data


def upload_to_server(home: Path, location: str, cert: Path, data: Path) -> None:
    """An invite, `store add` on `home` (whose daemon runs): it registers the account and
    uploads; prints what went up and how long it took."""
    args = ["invite", "--data", str(data)]
    print(f"$ p2pbackup-server {' '.join(args)}")
    token = subprocess.run([sys.executable, "-m", "p2pbackup.server.main", *args], check=True,
                           capture_output=True, text=True).stdout.strip()
    print(f"    {token[:6]}…    (a one-time token: it registers one account)")
    t0 = time.monotonic()
    p2p(home, "store", "add", location, "-o", f"invite={token}", "-o", f"ca_file={cert}")
    while time.monotonic() - t0 < 120:
        st = json.loads(p2p_quiet(home, "status", "--json"))["stores"][0]
        if st["reachable"] and st["objects_behind"] == 0 and st["uploaded"]:
            break
        time.sleep(0.2)
    else:
        sys.exit(f"demo failed: the upload to {location} did not finish within 120 s")
    held = sum(f.stat().st_size for f in (data / "partners").rglob("*") if f.is_file())
    print(f"    the daemon registered the account and uploaded {st['uploaded']} objects "
          f"({format_size(held)} on the server) in {time.monotonic() - t0:.1f} s")
    p2p(home, "status")


def p2p_quiet(home: Path, *args: str) -> str:
    """`p2pbackup ARGS`, not shown (polled)."""
    return subprocess.run([sys.executable, "-m", "p2pbackup.cli.main", *args], check=True,
                          env=dict(os.environ, P2PBACKUP_HOME=str(home)), capture_output=True,
                          text=True).stdout


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(timeout=30)


def signaling_port(home: Path) -> int:
    for _ in range(100):
        proc = subprocess.run([sys.executable, "-m", "p2pbackup.cli.main", "status", "--json"],
                              env=dict(os.environ, P2PBACKUP_HOME=str(home)),
                              capture_output=True, text=True)
        if proc.returncode == 0:
            return json.loads(proc.stdout)["lan"]["signaling_port"]
        time.sleep(0.2)
    sys.exit("demo failed: the laptop's daemon does not answer status")


def main() -> None:
    keep = "--keep" in sys.argv
    work = Path(tempfile.mkdtemp(prefix="p2pbackup-demo-"))
    home, data = work / "home", work / "data"
    print(f"p2pbackup demo in {work}")
    try:
        step("Generate a small device tree (mkdata.py, scale 0.05)")
        subprocess.run([sys.executable, str(MKDATA), str(data), "--scale", "0.05", "--seed", "42"],
                       check=True, stdout=subprocess.DEVNULL)
        day0 = manifest(data)
        size = sum(v[3] for v in day0.values() if v[0] == "file")
        print(f"    {sum(1 for v in day0.values() if v[0] == 'file')} files, "
              f"{format_size(size)}")

        step("Set up this device: keys, config and an encrypted local store")
        out = p2p(home, "init", "--source", str(data), show=False)
        code = next(line.strip() for line in out.splitlines() if line.count("-") == 10)
        print(f"    recovery code printed once: {code[:11]}-…")

        step("First snapshot")
        first = json.loads(p2p(home, "snapshot", "--json", show=False))
        print(f"    snapshot {first['short_id']}: {first['sources'][0]['files']} files, "
              f"{format_size(first['size'])}")

        step("A day of changes (edits, appends, a database update, adds, deletes, renames)")
        subprocess.run([sys.executable, str(MKDATA), str(data), "--mutate", "--seed", "1",
                        "--scale", "0.05"], check=True, stdout=subprocess.DEVNULL)
        day1 = manifest(data)

        step("Second snapshot: only what changed is read and stored")
        p2p(home, "snapshot")

        step("List snapshots")
        p2p(home, "snapshots")

        step("Restore both snapshots into a new directory and compare")
        p2p(home, "restore", first["id"][:8], "--to", str(work / "restore-1"))
        compare(f"snapshot {first['short_id']}", day0, work / "restore-1" / "data")
        p2p(home, "restore", "latest", "--to", str(work / "restore-2"))
        compare("latest snapshot", day1, work / "restore-2" / "data")

        step("Verify every object (decrypt and check every chunk)")
        p2p(home, "verify", "--read-data")

        step("Pair a second device with a short code (SPAKE2, over loopback)")
        laptop = work / "home-laptop"
        pair_device(home, laptop)
        p2p(laptop, "devices")
        p2p(laptop, "restore", "latest", "--from", str(home / "store"),
            "--to", str(work / "restore-laptop"))
        compare("restored on the paired device", day1, work / "restore-laptop" / "data")

        step("Start both daemons: they find each other (mDNS on loopback), open a signed "
             "WebRTC session, move bulk to the direct TLS lane and replicate")
        daemons = replicate_with_daemons(home, laptop, work, day1)
        console_url = ""
        try:
            step("A storage server of your own for when no peer is around: p2pbackup-server "
                 "(TLS, a self-signed certificate), an invite, and `store add` on the first "
                 "device: its daemon registers the account and uploads the ciphertext")
            server, location, cert, server_data = start_storage_server(work)
            daemons.append(server)   # (stopped with the daemons)
            upload_to_server(home, location, cert, server_data)

            step("The first device is lost (its daemon stops). A new device recovers from the "
                 "laptop, a peer, with the recovery code alone (signed WebRTC session, "
                 "bulk over the direct lane)")
            stop(daemons[:1])
            peer = f"peer:laptop@127.0.0.1:{signaling_port(laptop)}"
            (work / "code.txt").write_text(code)
            spare = work / "home-spare"
            p2p(spare, "recover", "--from", peer, "--recovery-code-file",
                str(work / "code.txt"), "--name", "spare")
            p2p(spare, "restore", "latest", "--from", peer, "--to", str(work / "restore-spare"))
            compare("restored on the recovered device from the laptop", day1,
                    work / "restore-spare" / "data")
            p2p(laptop, "devices")

            step("Another new device recovers from the storage server alone (the recovery "
                 "code, and the certificate that vouches for the server)")
            desk = work / "home-desk"
            t0 = time.monotonic()
            p2p(desk, "recover", "--from", location, "--option", f"ca_file={cert}",
                "--recovery-code-file", str(work / "code.txt"), "--name", "desk")
            p2p(desk, "restore", "latest", "--from", location, "--to",
                str(work / "restore-desk"))
            compare(f"restored from the server in {time.monotonic() - t0:.1f} s", day1,
                    work / "restore-desk" / "data")

            step("The laptop's daemon serves its web console on 127.0.0.1 (status, snapshots, "
                 "browse, download, restore, timeline, devices, verify)")
            console_url = p2p(laptop, "web", "--no-open").strip()
        finally:
            # (all still running, also after a failure; with --keep the laptop's daemon, and so
            # its console, stays up)
            stop([d for d in daemons if not keep or d is not daemons[1]])

        store = sum(f.stat().st_size for f in (home / "store").rglob("*") if f.is_file())
        size1 = sum(v[3] for v in day1.values() if v[0] == "file")
        print(f"\nDone: 2 snapshots of {format_size(size)} and {format_size(size1)} of files "
              f"({format_size(size + size1)} in all) take {format_size(store)} in the store: "
              "what both share is stored once, compressed where that helps, and encrypted.")
        print(f"\nWeb console of the laptop: {console_url}")
        if keep:
            pid = daemons[1].pid
            print(f"    p2pbackupd of the laptop keeps running (pid {pid}) so it can be opened; "
                  "the address signs in once, within 5 minutes: "
                  f"`P2PBACKUP_HOME={laptop} p2pbackup web` gives a fresh one; stop it with "
                  f"`kill {pid}`")
        else:
            print("    (the daemons have stopped: run the demo with --keep to open it)")
    finally:
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
