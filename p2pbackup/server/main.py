"""`p2pbackup-server`: the storage server's command line.

    p2pbackup-server serve --data DIR --listen 127.0.0.1:8443 [--tls-cert F --tls-key F]
                           [--quota 10G] [--removal-grace SECONDS] [--storage LOCATION]
                           [--open-registration]
    p2pbackup-server invite --data DIR [--expires SECONDS]    prints a one-time token

Errors are one line on stderr with the exit codes of p2pbackup's table (README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..blobs import exit_process
from ..errors import ConfigError, P2PError
from ..sizes import parse_size
from . import invites
from .storage import DEFAULT_GRACE, StorageServer

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("p2pbackup.server")


def listen_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--listen {value!r}: give HOST:PORT, e.g. 127.0.0.1:8443")
    return host.strip("[]") or "0.0.0.0", int(port)


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise ConfigError("--tls-cert and --tls-key go together")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {cert} / key {key}: {exc}") from None
    return ctx


async def serve_app(app: "web.Application", prog: str, host: str, port: int,
                    tls: ssl.SSLContext | None, what: str) -> None:
    """Serve `app` on host:port until cancelled; print the port bound (HOST:0 takes any)."""
    from aiohttp import web

    if tls is None and host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("serving plain HTTP on %s: put a TLS reverse proxy in front (clients "
                    "refuse http:// except on loopback)", host)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=tls)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        port = runner.addresses[0][1]    # the one bound (--listen HOST:0 takes any)
        logging.getLogger(f"p2pbackup.{prog.rpartition('-')[2]}").info(
            "serving %s on %s://%s:%d", what, "https" if tls else "http", host, port)
        print(f"{prog}: listening on {host}:{port}", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def serve(args: argparse.Namespace) -> None:
    host, port = listen_address(args.listen)
    tls = tls_context(args.tls_cert, args.tls_key)
    quota = parse_size(args.quota, "--quota") if args.quota else None
    server = StorageServer(Path(args.data), quota=quota, removal_grace=args.removal_grace,
                           storage=args.storage, open_registration=args.open_registration)
    await serve_app(server.app(), "p2pbackup-server", host, port, tls,
                    f"{len(server.accounts)} accounts from {args.data}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="p2pbackup-server",
                                description="p2pbackup's storage server: ciphertext only")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the accounts in --data")
    s.add_argument("--data", required=True, help="the server's directory")
    s.add_argument("--listen", default="127.0.0.1:8443", help="HOST:PORT")
    s.add_argument("--tls-cert", help="PEM certificate chain (else plain HTTP, for a proxy)")
    s.add_argument("--tls-key", help="PEM private key")
    s.add_argument("--quota", help="bytes each account may store, e.g. 10G (default: no limit)")
    s.add_argument("--removal-grace", type=float, default=DEFAULT_GRACE,
                   help="seconds a removal record is held before what it lists is deleted")
    s.add_argument("--storage", help="where objects go instead of --data (e.g. s3://bucket/p)")
    s.add_argument("--open-registration", action="store_true",
                   help="any device may register an account, without an invitation")
    i = sub.add_parser("invite", help="print a one-time token that registers one account")
    i.add_argument("--data", required=True)
    i.add_argument("--expires", type=float, default=7 * 86400, help="seconds (default 7 days)")
    return p


def run(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        _run(args)
    except SystemExit as exc:   # exit_process: --storage may be an S3 store (opendal)
        exit_process(exc.code if isinstance(exc.code, int) else 1)
    exit_process(0)


def _run(args: argparse.Namespace) -> None:
    def command() -> None:
        if args.command == "invite":
            print(invites.create(Path(args.data), args.expires, time.time_ns()))
        else:
            asyncio.run(serve(args))
    run_command("p2pbackup-server", args.debug, command)


def run_command(prog: str, debug: bool, command: Callable[[], None]) -> None:
    """Run `command` with logging to stderr; its errors become one line and the exit codes of
    p2pbackup's table (README.md)."""
    logging.basicConfig(level=logging.INFO, format=f"{prog}: %(levelname)s: %(message)s")
    try:
        command()
    except P2PError as exc:
        if debug:
            raise
        print(f"{prog}: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:
        if debug:
            raise
        print(f"{prog}: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        sys.exit(11)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    run()
