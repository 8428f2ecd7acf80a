"""Real storage servers for the backends' tests: one function per server.

Each starts its server as a subprocess (its own session: stopping it stops what it started) on
a free 127.0.0.1 port with its files in a temporary directory, waits until it answers, yields
what the tests need to reach it, and stops it. A server whose program is not installed skips
the test with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.eventually import eventually_sync

NGINX_DAV_EXT = Path("/usr/lib/nginx/modules/ngx_http_dav_ext_module.so")


@dataclass(frozen=True, slots=True)
class DavServer:
    """A running WebDAV server: the URL it answers on and the credentials it takes (if any)."""

    url: str                    # http://127.0.0.1:PORT (https:// with TLS)
    root: Path                  # where it keeps the files it serves
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None  # its self-signed certificate, with TLS


def self_signed_certificate(tmp: Path) -> tuple[Path, Path]:
    """(certificate, key) PEM files for 127.0.0.1, made now."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "server.crt", tmp / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


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
        ca_file, key_file = self_signed_certificate(tmp)
        config.update(ssl_certificate=str(ca_file), ssl_private_key=str(key_file))
    conf = tmp / "wsgidav.json"
    conf.write_text(json.dumps(config))
    argv = [sys.executable, "-m", "wsgidav.server.server_cli", "--config", str(conf)]
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    with _running(argv, tmp / "wsgidav.log", port):
        yield DavServer(url, root, username, password, ca_file)


@contextlib.contextmanager
def nginx_dav(tmp: Path) -> Iterator[DavServer]:
    """nginx with the dav-ext module (Debian `nginx` + `libnginx-mod-http-dav-ext`, installed
    by `make sysdeps`) serving `tmp/files` at /, in the foreground with its own config, as
    one process (no master: killed with SIGKILL, a master would leave its workers running)."""
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
      dav_ext_methods PROPFIND OPTIONS;
      dav_access user:rw;
    }}
  }}
}}
""")
    argv = [binary, "-c", str(conf), "-e", str(tmp / "nginx-error.log"), "-p", str(tmp)]
    url = f"http://127.0.0.1:{port}"
    with _running(argv, tmp / "nginx.log", port):
        yield DavServer(url, root)
