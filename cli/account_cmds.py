"""`devices`, `devices remove`, `recover` and `pair`: the account's devices from the CLI."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
from pathlib import Path
from typing import Any

import typer

from . import output
from .common import home, run_async, via_daemon

devices_app = typer.Typer(help="List this account's devices, or remove one.",
                          invoke_without_command=True)


@devices_app.callback()
def devices(ctx: typer.Context,
            as_json: bool = typer.Option(False, "--json", help="Print the devices as JSON.")
            ) -> None:
    """List the account's devices (role, sources, quota)."""
    if ctx.invoked_subcommand is not None:
        return
    from p2pbackup import account
    from p2pbackup.device import open_device
    from p2pbackup.views import membership_json

    async def go() -> dict:
        async with open_device(home()) as dev:
            return membership_json(await account.listed_membership(dev),
                                   dev.identity.device_id)

    doc = run_async(go())
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    print(f"account devices (membership version {doc['version']}, key epoch {doc['key_epoch']})")
    for d in doc["devices"]:
        extra = ""
        if d["sources"] is not None:
            extra += f"  sources: {', '.join(d['sources'])}"
        if d["quota"] is not None:
            extra += f"  quota: {output.human_bytes(d['quota'])}"
        mark = "  (this device)" if d["this_device"] else ""
        print(f"  {d['id'][:12]}  {d['role']:<7} {d['name']}{extra}{mark}")
    if doc["removed"]:
        print(f"  removed: {', '.join(r[:12] for r in doc['removed'])}")


@devices_app.command("remove")
def devices_remove(device: str = typer.Argument(..., help="Device id (prefix) or name."),
                   as_json: bool = typer.Option(False, "--json")) -> None:
    """Remove a device: it is refused from now on and new data uses new keys."""
    from p2pbackup import account
    from p2pbackup.device import open_device

    result = via_daemon("devices_remove", {"device": device})
    if result is None:
        async def go() -> dict:
            async with open_device(home(), write=True) as dev:
                return (await account.remove_device(dev, device)).to_json()

        result = run_async(go())
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print(f"removed device {result['removed']['id'][:12]} ({result['removed']['name']}); "
          f"key epoch is now {result['key_epoch']}")
    print("Data written from now on uses new keys the removed device never had. Your old "
          "recovery code still opens everything written before; this new one opens all of it:")
    print()
    print(f"    {result['recovery_code']}")
    print()


def recover(store: str = typer.Option(..., "--from", help="A store holding the account, or "
                                      "peer:DEVICE[@HOST:PORT]: a device of it on the LAN."),
            code_file: Path = typer.Option(None, "--recovery-code-file",
                                           help="Read the recovery code from this file."),
            name: str = typer.Option(None, "--name", help="This device's name."),
            option: list[str] = typer.Option([], "--option", "-o", metavar="KEY=VALUE",
                                             help="An option of the store (repeatable), e.g. "
                                                  "ca_file=server.pem."),
            ice: Path = typer.Option(None, "--ice", metavar="FILE",
                                     help="STUN/TURN servers for reaching a peer across NATs: "
                                          "the [ice] table of FILE (another device's "
                                          "config.toml will do); the new home keeps it."),
            broker: str = typer.Option(None, "--broker", metavar="URL",
                                       help="The account's broker (https://...): a peer "
                                            "off the LAN is reached through it; the new home "
                                            "keeps it as [broker] url.")) -> None:
    """Set up this (new) device from the recovery code and a store holding the account.

    A remote store (SCHEME://...) is kept as a [[stores]] table of the new home, with its
    options: p2pbackupd goes on uploading there and --from finds its options."""
    from p2pbackup import account
    from p2pbackup.blobs import is_peer_location
    from p2pbackup.config import default_home, edit_stores

    from .store_cmds import parse_options

    options = parse_options(option, None, None)
    if options and is_peer_location(store):
        from p2pbackup.errors import ConfigError
        raise ConfigError(f"--option is for a store location, not for {store} (a peer)")

    if code_file is not None:
        try:
            code = code_file.read_text().strip()
        except OSError as exc:
            from p2pbackup.errors import ConfigError
            raise ConfigError(f"cannot read {code_file}: {exc.strerror}") from None
    elif sys.stdin.isatty():
        code = typer.prompt("Recovery code", hide_input=True)
    else:
        code = sys.stdin.readline().strip()
    peers, ice_table = None, None
    if ice is not None:
        import dataclasses

        from p2pbackup.config import PeerSettings, read_ice_table

        ice_settings, ice_table = read_ice_table(ice)
        peers = dataclasses.replace(PeerSettings.from_env(), ice=ice_settings)
    if broker is not None:
        from p2pbackup.discovery.broker import BrokerClient
        from p2pbackup.errors import ConfigError

        if not is_peer_location(store):
            raise ConfigError(f"--broker is for a peer (peer:DEVICE), not for {store}")
        BrokerClient.check_url(broker)
    r = run_async(account.recover(default_home(), store, code, name or socket.gethostname(),
                                  peers=peers, on_step=lambda step: print(f"{step}..."),
                                  options=options, broker=broker or ""))
    print(f"Recovered the account into {r.config.home} (key epoch {r.epoch}).")
    if broker is not None:
        from p2pbackup.config import set_broker

        set_broker(r.config.home, broker.rstrip("/"))
    if ice_table is not None:
        from p2pbackup.config import set_ice

        set_ice(r.config.home, ice_table)
    if "://" in store and not is_peer_location(store):
        edit_stores(r.config.home, lambda tables: tables + [{"location": store, **options}])
        print(f"p2pbackupd uploads to {store} too (`p2pbackup store remove` it to stop).")
    if r.epoch < r.newest_epoch:
        output.warn(f"this recovery code is from key epoch {r.epoch}; data written since epoch "
                    f"{r.epoch + 1} needs the newer code printed when a device was removed")
    if r.joined:
        print(f"This device ({r.config.device_name}) is now listed in the account.")
    print(f"Restore with: p2pbackup restore latest --from {store} --to DIR")


# ---- pair ------------------------------------------------------------------------------------

def _use_the_mailboxs_broker(mailbox: str | None) -> None:
    """A device that paired through a broker's mailbox uses that broker (unless its config
    names one already): its daemon reaches the account's other devices through it at once."""
    from p2pbackup.config import default_home, load_config, set_broker
    from p2pbackup.discovery.broker import broker_of_mailbox

    url = broker_of_mailbox(mailbox or "")
    if url is None or load_config(default_home()).broker.url:
        return
    set_broker(default_home(), url)
    print(f"This device uses the broker at {url} ([broker] url in config.toml).")

def _rendezvous(peer: str | None, mdns: bool = True) -> Any:
    from p2pbackup.pairing_link import MdnsRendezvous, StaticRendezvous

    if not mdns and not peer:
        return StaticRendezvous("", 0)  # the host just listens; the joiner gives --peer
    if peer:
        host_, _, port = peer.rpartition(":")
        if not host_ or not port.isdigit():
            from p2pbackup.errors import ConfigError
            raise ConfigError(f"--peer {peer!r}: give HOST:PORT")
        return StaticRendezvous(host_, int(port))
    return MdnsRendezvous()


def _print_code(code: str, lifetime: float, qr: bool, port: int | None = None,
                mailbox: str | None = None) -> None:
    """The code (and, without mDNS, the port the joiner must be told: it may be any)."""
    print(f"Pairing code: {code}   (valid for {int(lifetime // 60)} minutes, one attempt)")
    if port is not None:
        print(f"Listening on port {port}: on the new device give this device's address, "
              f"e.g. p2pbackup pair {code} --peer HOST:{port}")
    if qr:
        import io

        import qrcode

        from p2pbackup.crypto.pairing import qr_text

        q = qrcode.QRCode(border=1)
        q.add_data(qr_text(code))
        buf = io.StringIO()
        q.print_ascii(out=buf, invert=True)
        print(buf.getvalue(), end="")
    through = f" --mailbox {mailbox}" if mailbox else ""
    print(f"On the new device run:  p2pbackup pair {code}{through}")
    print("Waiting for it...", flush=True)


def _show_verifier(verifier: str) -> None:
    print(f"Verification: {verifier}  (the other device shows this number too and asks its "
          "user to confirm it; if the numbers differ, press Ctrl-C)", flush=True)


_QUESTION = "Does the other device show the same number?"


def _show_request(name: str, device_id: str, role: str, verifier: str) -> None:
    print(f"{name!r} ({device_id[:12]}) asks to join as {role}.")  # quoted: the joiner chose it
    print(f"Verification: {verifier}", flush=True)


async def _ask(question: str) -> bool:
    """Ask on the terminal without stopping the event loop: the pairing goes on meanwhile, and
    the question is withdrawn (cancelled) if the other device gives up."""
    import asyncio
    import os

    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    line: asyncio.Future[bytes] = loop.create_future()

    def readable() -> None:
        data = os.read(fd, 1024)  # a terminal hands over whole lines
        if not line.done():
            line.set_result(data)

    print(f"{question} [y/N] ", end="", flush=True)
    loop.add_reader(fd, readable)
    try:
        answer = await line
    except asyncio.CancelledError:
        print(flush=True)  # the line the error message then starts on
        raise
    finally:
        loop.remove_reader(fd)
    return answer.strip().lower() in (b"y", b"yes")


async def _answer(verifier: str, name: str, device_id: str, role: str, yes: bool) -> bool:
    _show_request(name, device_id, role, verifier)
    if yes:
        print(f"{_QUESTION} Yes (--yes).", flush=True)
        return True
    return await _ask(_QUESTION)


async def _follow_daemon_pairing(code: str, yes: bool, timeout: float) -> dict:
    """Wait for the pairing the daemon hosts, answering its question here."""
    import asyncio

    from p2pbackup import control
    from p2pbackup.config import load_config

    sock = load_config(home()).control_socket
    args = {"code": code}
    got = await control.request(sock, "pair_wait", {**args, "questions": True}, timeout=timeout)
    if got.get("state") != "question":
        return got
    answering = asyncio.ensure_future(_answer(got["verifier"], str(got.get("name", "")),
                                              str(got.get("id", "")), str(got.get("role", "")),
                                              yes))
    ending = asyncio.ensure_future(control.request(sock, "pair_wait", args, timeout=timeout))
    try:
        await asyncio.wait({answering, ending}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # Ctrl-C at the question: that is a no, not a wait
        answering.cancel()
        with contextlib.suppress(control.RemoteError):
            await control.request(sock, "pair_answer", {**args, "accept": False}, timeout=30)
        raise
    if not answering.done():  # the other device gave up while we asked
        answering.cancel()
        return await ending
    with contextlib.suppress(control.RemoteError):  # the pairing ended meanwhile: see below
        await control.request(sock, "pair_answer", {**args, "accept": answering.result()},
                              timeout=30)
    return await ending


def pair(code: str = typer.Argument(None, help="The code shown by the other device (to join)."),
         partner: bool = typer.Option(False, "--partner",
                                      help="Invite a friend's device to store ciphertext only."),
         sources: str = typer.Option(None, "--sources",
                                     help="Grant only these sources (comma-separated)."),
         quota: str = typer.Option(None, "--quota",
                                   help="A partner's quota, e.g. 50G or 500M, in binary units: "
                                        "G = GiB = 1024³ bytes (50GB is read as 50 GiB too)."),
         expires: float = typer.Option(600, "--expires", min=5, max=86400,
                                       help="Seconds the code stays valid."),
         name: str = typer.Option(None, "--name", help="This device's name (when joining)."),
         peer: str = typer.Option(None, "--peer", help="HOST:PORT of the other device "
                                  "(skips mDNS discovery)."),
         port: int = typer.Option(0, "--port", min=0, max=65535,
                                  help="Listen on this port (default: any)."),
         qr: bool = typer.Option(True, "--qr/--no-qr", help="Show the code as a QR code."),
         mdns: bool = typer.Option(True, "--mdns/--no-mdns",
                                   help="Announce the code on the LAN (multicast DNS)."),
         mailbox: str = typer.Option(None, "--mailbox", envvar="P2PBACKUP_MAILBOX",
                                     help="A pairing mailbox (ws:// or wss:// URL: the broker's "
                                     "/v1/mailbox, or a magic-wormhole mailbox server) to pair "
                                     "across the internet: the host offers its code there and "
                                     "on the LAN; the joiner goes through it only."),
         yes: bool = typer.Option(False, "--yes", "-y",
                                  help="Send the keys without asking whether the other device "
                                  "shows the same verification number (for scripts)."),
         ) -> None:
    """Show a code to add a device (or join with one): SPAKE2 over the LAN or a mailbox."""
    from p2pbackup import account
    from p2pbackup.config import default_home
    from p2pbackup.errors import ConfigError, PairingFailed
    from p2pbackup.pairing_link import CONFIRM_TIMEOUT, new_code
    from p2pbackup.sizes import parse_size

    if mailbox is not None and not mailbox.startswith(("ws://", "wss://")):
        raise ConfigError(f"--mailbox {mailbox!r}: give a ws:// or wss:// URL")
    if code is not None:
        if mailbox and peer:
            raise ConfigError("give either --mailbox or --peer, not both")
        if partner or sources or quota or yes:
            raise ConfigError("--partner, --sources, --quota and --yes belong on the device "
                              "that shows the code")
        from p2pbackup import control

        joined = run_async(account.join_account(
            default_home(), code, name or socket.gethostname(), rendezvous=_rendezvous(peer),
            mailbox=mailbox, on_verifier=_show_verifier))
        if joined.role == "partner":
            quota_text = output.human_bytes(joined.quota) if joined.quota else "no quota set"
            print(f"Paired as a storage partner of account {joined.account} "
                  f"({quota_text}); this device holds none of its keys.")
            try:
                if via_daemon("reload_grants", timeout=60) is None:
                    output.note("p2pbackupd is not running: it serves the account when it "
                                "starts")
            except control.RemoteError as exc:   # paired all the same: say what to do
                output.warn(f"the running p2pbackupd did not take the new account ({exc}); "
                            "restart it to serve it")
        else:
            what = (f"sources {', '.join(joined.sources)}" if joined.sources is not None
                    else "every source")
            print(f"Paired with {joined.host_name or 'the other device'}: this device joined "
                  f"account {joined.account} as {joined.role} ({what}).")
            _use_the_mailboxs_broker(mailbox)
        return
    if partner and sources:
        raise ConfigError("a partner gets no keys, so --sources does not apply to --partner")
    if quota and not partner:
        raise ConfigError("--quota applies to a storage partner (--partner)")
    if not yes and not sys.stdin.isatty():
        raise ConfigError("pair asks on the terminal whether the other device shows the same "
                          "verification number; without a terminal, pass --yes to skip that")
    role = "partner" if partner else ("member" if sources else "owner")
    granted = tuple(s.strip() for s in sources.split(",") if s.strip()) if sources else None
    invite = {"role": role, "sources": list(granted) if granted else None,
              "quota": parse_size(quota, "--quota") if quota else None, "expires": expires}
    async def through_daemon() -> dict | None:
        """Host through a running daemon (it holds the writer lock); the code stays offered
        while this command holds the lease, so it goes when this command ends."""
        from p2pbackup import control
        from p2pbackup.config import load_config

        sock = load_config(home()).control_socket
        async with control.lease(sock, "pair_host", {**invite, "port": port, "mdns": mdns,
                                                     "mailbox": mailbox},
                                 timeout=60) as started:
            if started is None:
                return None
            _print_code(started["code"], expires, qr, None if mdns else started.get("port"),
                        mailbox)
            return await _follow_daemon_pairing(started["code"], yes,
                                                expires + CONFIRM_TIMEOUT + 120)

    result = run_async(through_daemon())
    if result is not None:
        if not result["ok"]:
            raise PairingFailed(result["message"])
        print(f"Paired: {result['message']}")
        return

    from p2pbackup.device import open_device

    async def confirm(verifier: str, member: Any) -> bool:
        return await _answer(verifier, member.name, member.device_id, member.role, yes)

    async def host() -> Any:
        async with open_device(default_home(), write=True) as dev:
            inv = account.invitation(dev, role, granted, invite["quota"])
            code_, pipe = await new_code(mailbox)
            h = account.pairing_host(dev, inv, code_, rendezvous=_rendezvous(None, mdns),
                                     lifetime=expires, port=port, confirm=confirm,
                                     mailbox=pipe)
            return await h.run(started=lambda p: _print_code(code_, expires, qr,
                                                             None if mdns else p, mailbox))

    outcome = run_async(host())
    if not outcome.ok:
        raise PairingFailed(outcome.message)
    print(f"Paired: {outcome.message}")


# ---- account delete --------------------------------------------------------------------------

account_app = typer.Typer(help="The account as a whole.", no_args_is_help=True)


def _confirm_fingerprint(fingerprint: str, yes: bool) -> None:
    """The user types the account's fingerprint (or passes --yes); anything else stops here."""
    from p2pbackup.errors import P2PError

    if yes:
        return
    typed = typer.prompt(f"This deletes account {fingerprint} everywhere listed above, then "
                         f"this device's home. Type the account's fingerprint ({fingerprint}) "
                         "to go on", default="", show_default=False)
    if typed.strip().lower() != fingerprint:
        raise P2PError("not confirmed (that is not the account's fingerprint): nothing was "
                       "deleted")


@account_app.command("delete")
def account_delete(dry_run: bool = typer.Option(False, "--dry-run",
                                                help="List what would go; delete nothing."),
                   yes: bool = typer.Option(False, "--yes", "-y",
                                            help="Do not ask for the account's fingerprint "
                                            "(for scripts)."),
                   as_json: bool = typer.Option(False, "--json",
                                                help="With --dry-run: print the places as "
                                                "JSON.")) -> None:
    """Delete the account's data from every store, then this device's home (owners only)."""
    from p2pbackup import account_delete as deletion
    from p2pbackup.device import open_device
    from p2pbackup.errors import ConfigError, StorageError

    if as_json and not dry_run:
        raise ConfigError("--json goes with --dry-run")
    if not dry_run and not yes and not sys.stdin.isatty():
        raise ConfigError("account delete asks on the terminal for the account's fingerprint; "
                          "without a terminal, pass --yes")
    if not dry_run and via_daemon("status", timeout=30) is not None:
        raise ConfigError("p2pbackupd is running for this home: stop it first (e.g. "
                          "`systemctl --user stop p2pbackupd`), then run `p2pbackup account "
                          "delete` again")

    async def go() -> tuple[str, list, list[str] | None]:
        async with open_device(home(), write=not dry_run) as dev:
            fingerprint, places = await deletion.survey(dev)
            if dry_run:
                return fingerprint, places, None
            for p in places:
                print(p.line())
            _confirm_fingerprint(fingerprint, yes)
            print(f"deleting account {fingerprint}", flush=True)
            failed = await deletion.delete_stores(dev, lambda line: print(line, flush=True))
            return fingerprint, places, failed

    fingerprint, places, failed = run_async(go())
    if dry_run:
        if as_json:
            print(json.dumps({"account": fingerprint,
                              "places": [p.to_json() for p in places]}, indent=2))
            return
        print(f"account {fingerprint}: account delete would deal with (nothing is deleted "
              "now):")
        for p in places:
            print(f"  {p.line()}")
        return
    if failed:
        raise StorageError(f"the account could not be deleted at {', '.join(failed)}; this "
                           "device's home is kept so that `p2pbackup account delete` can run "
                           "again (`store remove` a store, `devices remove` a partner you give "
                           "up)")
    from p2pbackup.config import load_config

    print(deletion.wipe_home(load_config(home())))
