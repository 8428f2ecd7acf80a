"""`broker register`: register the account on its broker with a sign-in or an invitation, when
the broker asks for one (an open broker is registered by p2pbackupd itself). The sign-in is
the issuer's device authorization (a code to enter in a browser, discovery/signin.py), or an
ID token from a file."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from .common import home, run_async

if TYPE_CHECKING:
    from p2pbackup.discovery.signin import UserCode

broker_app = typer.Typer(no_args_is_help=True,
                         help="The account's broker (the [broker] table of config.toml).")


def _read_token(path: Path) -> str:
    from p2pbackup.errors import ConfigError

    try:
        token = sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read --token-file {path}: {exc.strerror}") from None
    if not token.strip():
        raise ConfigError(f"--token-file {path} is empty: it holds the ID token your sign-in "
                          "issuer gave you")
    return token.strip()


def _show(code: UserCode) -> None:
    print(f"To sign in, open {code.verification_uri} and enter the code {code.user_code}"
          + (f"\n(or open {code.verification_uri_complete})"
             if code.verification_uri_complete else ""), flush=True)
    print("Waiting for the sign-in...", flush=True)


@broker_app.command("register")
def broker_register(
        token_file: Path = typer.Option(None, "--token-file", help="A file holding an ID token "
                                        "of the broker's sign-in issuer ('-': standard "
                                        "input), instead of signing in with a code."),
        invite: str = typer.Option(None, "--invite", help="An invitation from the broker's "
                                   "operator (`p2pbackup-broker invite`).")) -> None:
    """Register this account on its broker (once, from an owner device), signed in or invited
    as the broker asks; p2pbackupd then keeps the broker's roster up to date itself."""
    from p2pbackup.config import load_config
    from p2pbackup.device import open_device
    from p2pbackup.discovery.broker import BrokerClient
    from p2pbackup.discovery.signin import device_sign_in
    from p2pbackup.errors import ConfigError
    from p2pbackup.repo.roster import PREFIX

    config = load_config(home())
    if not config.broker.url:
        raise ConfigError("no broker: set [broker] url = \"https://...\" in "
                          f"{config.home / 'config.toml'} first")
    token = _read_token(token_file) if token_file is not None else None

    async def go() -> str:
        async with open_device(home()) as dev:
            store = dev.repo.store
            rosters = [bytes(await store.get(n)) for n in sorted([n async for n in
                                                                  store.list(PREFIX)])]
            account = dev.keys.fingerprint()
            if not rosters:
                raise ConfigError(f"account {account} has one device: there is nothing to "
                                  "register on a broker before `p2pbackup pair` adds another")
            client = BrokerClient(config.broker.url, dev.identity, account)
            try:
                needs = await client.registration()
                oidc = needs.get("oidc")
                signed = token
                if isinstance(oidc, dict) and signed is None:
                    issuer, client_id = str(oidc.get("issuer")), str(oidc.get("audience"))
                    print(f"The broker at {config.broker.url} registers accounts signed in "
                          f"with {issuer}.", flush=True)
                    signed = await device_sign_in(issuer, client_id, _show)
                if needs.get("invites") and invite is None:
                    raise ConfigError(f"the broker at {config.broker.url} registers accounts "
                                      "with an invitation from its operator: give --invite "
                                      "TOKEN")
                await client.publish_rosters(rosters, token=signed, invite=invite)
            finally:
                await client.close()
            return account

    account = run_async(go())
    print(f"account {account} is registered on the broker at {config.broker.url}")
