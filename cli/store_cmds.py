"""`p2pbackup store ...`: commands about a store location itself, whatever its scheme."""

from __future__ import annotations

from typing import Any, Optional

import typer

from .common import run_async

store_app = typer.Typer(no_args_is_help=True, help="The stores p2pbackupd uploads to "
                        "([[stores]] in config.toml), and checking a location.")


def parse_options(pairs: list[str], username: str | None, password: str | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--option")
        options[key] = value
    if username is not None:
        options["username"] = username
    if password is not None:
        options["password"] = password
    return options


@store_app.command("check")
def check(location: str = typer.Argument(..., metavar="LOCATION",
                                         help="A directory, webdav(s)://host/path, ..."),
          username: Optional[str] = typer.Option(None, "--username", help="Log in as this user."),
          password: Optional[str] = typer.Option(
              None, "--password", envvar="P2PBACKUP_STORE_PASSWORD", show_envvar=True,
              help="The password (an app password for Nextcloud/ownCloud); better given in "
                   "the environment variable than on the command line."),
          option: list[str] = typer.Option([], "--option", "-o", metavar="KEY=VALUE",
                                           help="Another option of the store (repeatable)."),
          size: int = typer.Option(4, "--size", min=1, max=1024, metavar="MIB",
                                   help="How many MiB to write and read for the speed figures."),
          ) -> None:
    """Write, read, list, try to overwrite and delete a test object; report speed.

    Exits 0 when the store is usable; otherwise the failing step is marked FAILED, its error
    is the one line on stderr and the exit code is the error's (10 bad location, 11 storage,
    12 full, 13 wrong data read back)."""
    from p2pbackup.blobs import open_store
    from p2pbackup.blobs.check import check_store

    options = parse_options(option, username, password)

    async def go() -> None:
        store = open_store(location, options=options)
        try:
            print(f"checking {store.location}")
            async for step in check_store(store, size=size << 20):
                if step.error is not None:   # its words: the error line on stderr (run)
                    print(f"{step.step:<10}FAILED", flush=True)
                    raise step.error
                print(step.line, flush=True)
        finally:
            await store.close()

    run_async(go())
    print("the store is usable")
