"""`p2pbackup-broker`: the broker's command line.

    p2pbackup-broker (--data DIR | --database postgresql://...) --listen 127.0.0.1:8444
                     [--tls-cert F --tls-key F]
                     [--stun-url URL]... [--turn-url URL]... [--turn-secret-file F] [--turn-ttl S]
                     [--push-ttl S] [--max-devices N]
                     [--oidc-issuer URL --oidc-audience ID [--max-accounts-per-person N]
                      | --invites]
    p2pbackup-broker invite (--data DIR | --database postgresql://...) [--expires S]
                                                         prints a one-time invitation

Registration is open unless `--oidc-issuer` (a sign-in with that OpenID Connect issuer) or
`--invites` (an invitation of the operator's) is given: broker/registration.py.

The TURN secret is coturn's `static-auth-secret` (`use-auth-secret`); give it in a file
(`--turn-secret-file`) or `--turn-secret` (visible in the process list). Errors are one line
on stderr with the exit codes of p2pbackup's table (README.md).

State: SQLite in --data by default; `--database postgresql://user@host/db` for a fleet: any
number of broker processes on one database, behind one name (a load balancer or DNS), relay to
each other through it (broker/postgres.py).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sqlite3
import sys
import time
from pathlib import Path

from ..errors import ConfigError
from ..server import invites
from ..server.main import listen_address, run_command, serve_app, tls_context
from .ice import IceSettings
from .mailbox import StoredMailboxes, add_mailbox_routes
from .oidc import OidcVerifier
from .postgres import PostgresRelay, PostgresState
from .pauses import GcFreezer
from .registration import (InviteRegistration, OpenRegistration, Registration,
                           SignInRegistration)
from .relay import LocalRelay, Relay
from .service import MAX_ACCOUNTS_PER_PERSON, MAX_DEVICES, MAX_TTL, PUSH_TTL, Broker
from .state import BrokerState, SqliteState, unavailable

STATE_FILE = "broker.sqlite"


def _turn_secret(args: argparse.Namespace) -> str:
    if args.turn_secret_file:
        try:
            secret = Path(args.turn_secret_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --turn-secret-file {args.turn_secret_file}: "
                              f"{exc.strerror}") from None
    else:
        secret = args.turn_secret or ""
    if args.turn_url and not secret:
        raise ConfigError("--turn-url needs the TURN server's shared secret "
                          "(--turn-secret-file or --turn-secret)")
    return secret


def settings(args: argparse.Namespace) -> IceSettings:
    if not 60 <= args.turn_ttl <= MAX_TTL:
        raise ConfigError(f"--turn-ttl {args.turn_ttl}: give 60 to {MAX_TTL} seconds")
    return IceSettings(tuple(args.stun_url), tuple(args.turn_url), _turn_secret(args),
                       args.turn_ttl)


def registration(args: argparse.Namespace, state: BrokerState) -> Registration:
    if args.oidc_issuer and args.invites:
        raise ConfigError("give --oidc-issuer or --invites, not both")
    if args.oidc_audience and not args.oidc_issuer:
        raise ConfigError("--oidc-audience goes with --oidc-issuer")
    if args.oidc_issuer:
        if not args.oidc_audience:
            raise ConfigError("--oidc-issuer needs --oidc-audience (the client id the issuer "
                              "gives the tokens for)")
        try:
            return SignInRegistration(OidcVerifier(args.oidc_issuer, args.oidc_audience))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if args.invites:   # kept in the state: any process of a fleet spends one, once
        return InviteRegistration(state, Path(args.data) if args.data else None)
    return OpenRegistration()


async def serve(args: argparse.Namespace) -> None:
    host, port = listen_address(args.listen)
    tls = tls_context(args.tls_cert, args.tls_key)
    ice = settings(args)
    if not 0 < args.push_ttl <= MAX_TTL:
        raise ConfigError(f"--push-ttl {args.push_ttl}: give 1 to {MAX_TTL} seconds")
    if args.max_accounts_per_person < 1 or args.max_devices < 1:
        raise ConfigError("--max-accounts-per-person and --max-devices are at least 1")
    state, relay, where = await open_state(args)
    admission = registration(args, state)
    mailboxes = StoredMailboxes(state, relay)   # a fleet's processes share the pairings
    broker = Broker(state, relay=relay, ice=ice, push_ttl=args.push_ttl,
                    registration=admission, max_accounts_per_person=args.max_accounts_per_person,
                    max_devices=args.max_devices,   # and pairing across the internet:
                    extra_routes=[lambda app: add_mailbox_routes(app, state=mailboxes)],
                    freezer=GcFreezer())     # sockets' objects out of full collections
    await serve_app(broker.app(), "p2pbackup-broker", host, port, tls, f"the broker from {where}")


async def open_state(args: argparse.Namespace) -> tuple[BrokerState, Relay, str]:
    if args.database:
        if not args.database.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"--database {args.database[:60]}: give a postgresql:// URL")
        pg = await PostgresState.open(args.database)
        return pg, PostgresRelay(pg), "PostgreSQL"
    if not args.data:
        raise ConfigError("give --data DIR (SQLite) or --database postgresql://... (a fleet)")
    path = Path(args.data) / STATE_FILE
    try:
        return SqliteState(path), LocalRelay(), args.data
    except sqlite3.OperationalError as exc:     # locked by another program, read-only
        raise unavailable(str(path), exc) from None


async def invite(args: argparse.Namespace) -> str:
    """A one-time invitation, kept in the state (the running brokers read it there)."""
    state, _, _ = await open_state(args)
    try:
        token = secrets.token_urlsafe(24)
        await state.add_invitation(invites.digest(token), time.time() + args.expires)
    finally:
        await state.close()
    return token


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="p2pbackup-broker",
                                description="p2pbackup's broker: devices, signaling, push",
                                epilog="`p2pbackup-broker invite --data DIR` (or --database "
                                       "URL) prints a one-time invitation for a broker run "
                                       "with --invites")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--data", help="the broker's directory (its SQLite file)")
    p.add_argument("--database", help="postgresql://... shared by several broker processes "
                                      "(instead of --data)")
    p.add_argument("--listen", default="127.0.0.1:8444", help="HOST:PORT")
    p.add_argument("--tls-cert", help="PEM certificate chain (else plain HTTP, for a proxy)")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--stun-url", action="append", default=[],
                   help="a STUN server to hand out, e.g. stun:turn.example.org:3478")
    p.add_argument("--turn-url", action="append", default=[],
                   help="a TURN server to hand out, e.g. turn:turn.example.org:3478")
    p.add_argument("--turn-secret-file", help="file holding coturn's static-auth-secret")
    p.add_argument("--turn-secret", help="coturn's static-auth-secret (prefer the file)")
    p.add_argument("--turn-ttl", type=int, default=3600,
                   help="seconds TURN credentials are valid (default 3600)")
    p.add_argument("--push-ttl", type=int, default=PUSH_TTL,
                   help="seconds a push waits for a device that is not connected")
    p.add_argument("--max-devices", type=int, default=MAX_DEVICES,
                   help=f"devices one account's roster may list (default {MAX_DEVICES})")
    p.add_argument("--oidc-issuer", help="registering an account needs a sign-in with this "
                   "OpenID Connect issuer (its https:// URL)")
    p.add_argument("--oidc-audience", help="the client id the issuer's tokens must be for")
    p.add_argument("--max-accounts-per-person", type=int, default=MAX_ACCOUNTS_PER_PERSON,
                   help="accounts one signed-in person may register (default "
                        f"{MAX_ACCOUNTS_PER_PERSON})")
    p.add_argument("--invites", action="store_true", help="registering an account needs an "
                   "invitation (`p2pbackup-broker invite`)")
    return p


def invite_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="p2pbackup-broker invite",
                                description="print a one-time invitation that registers one "
                                            "account on a broker run with --invites")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--data", help="the broker's directory (its SQLite file)")
    p.add_argument("--database", help="postgresql://... of the broker's fleet")
    p.add_argument("--expires", type=float, default=7 * 86400, help="seconds (default 7 days)")
    return p


def run(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["invite"]:
        inv = invite_parser().parse_args(argv[1:])
        run_command("p2pbackup-broker", inv.debug, lambda: print(asyncio.run(invite(inv))))
        return
    args = parser().parse_args(argv)
    run_command("p2pbackup-broker", args.debug, lambda: asyncio.run(serve(args)))


if __name__ == "__main__":
    run()
