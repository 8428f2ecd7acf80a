"""`p2pbackup store ...`: commands about a store location itself, whatever its scheme."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, Optional

import typer

from p2pbackup.errors import ConfigError

from .common import run_async

store_app = typer.Typer(no_args_is_help=True, help="The stores p2pbackupd uploads to "
                        "([[stores]] in config.toml), and checking a location.")


def parse_options(pairs: list[str], username: str | None = None, password: str | None = None,
                  *, reserved: tuple[str, ...] = ()) -> dict[str, Any]:
    """`-o KEY=VALUE` options of a store (and --username/--password), the one parser of every
    command that takes them; `reserved` keys have options of their own."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key or key in reserved:
            but = f" (not {', '.join(reserved)}: they have their own options)" if reserved \
                else ""
            raise ConfigError(f"--option {pair!r}: give KEY=VALUE{but}")
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


@store_app.command("push")
def push(location: Optional[str] = typer.Argument(
             None, metavar="[LOCATION]", help="A configured store (default: every one), or "
             "another location (options from -o and the environment)."),
         option: list[str] = typer.Option([], "--option", "-o", metavar="KEY=VALUE",
                                          help="An option of an unconfigured LOCATION "
                                          "(repeatable)."),
         parallel: Optional[int] = typer.Option(None, "--parallel", min=1, max=64,
                                                help="Uploads at once (default: the store's "
                                                "`parallel`, 4)."),
         ) -> None:
    """Upload what the store lacks now, as p2pbackupd does in the background, and wait.

    The same pass as the daemon's uploader (packs first, heads last; progress noted, so
    neither a second push nor the daemon sends an object again). Refused while p2pbackupd
    runs: it uploads by itself (exit 16)."""
    import time
    from dataclasses import replace

    from p2pbackup.config import StoreSettings, load_config
    from p2pbackup.errors import ConfigError
    from p2pbackup.repo.upload import FAILURES, UploadProgress, store_error

    from .common import home, writable_device

    config = load_config(home())
    if location is None:
        if option:
            raise ConfigError("--option is for a LOCATION that is not configured")
        targets = list(config.stores)
        if not targets:
            raise ConfigError("no store is configured: give a LOCATION, or `p2pbackup store "
                              "add` one")
    else:
        known = {s.location: s for s in config.stores}
        got = known.get(location) or known.get(os.path.abspath(location))
        if got is not None and option:
            raise ConfigError(f"store {got.location} is configured: its options are in "
                              f"{config.home / 'config.toml'}, not --option")
        if got is None and "://" not in location:
            location = os.path.abspath(location)   # (as open_store names a path)
        targets = [got or StoreSettings(location, parse_options(option, None, None))]
    if parallel is not None:
        targets = [replace(s, parallel=parallel) for s in targets]
    refuse_if_daemon_uploads()

    async def go() -> None:
        async with writable_device("store push") as dev:   # one push at a time
            with upload_progress(config) as progress:
                for settings in targets:
                    await _push_one(dev.repo, settings, progress)

    async def _push_one(repo: Any, settings: StoreSettings, progress: UploadProgress) -> None:
        uploader = new_uploader(repo, settings, progress)
        started = time.monotonic()
        try:
            await uploader.upload_pending()
        except FAILURES as exc:   # (OSError, TimeoutError from a backend too)
            raise store_error(settings.location, exc) from None
        finally:
            await uploader.close()
        say_pushed(uploader, time.monotonic() - started)

    run_async(go())


def refuse_if_daemon_uploads() -> None:
    """DaemonRunning if p2pbackupd runs: it uploads to the stores itself."""
    from p2pbackup.errors import DaemonRunning

    from .common import via_daemon

    running = via_daemon("status", timeout=30)
    if running is not None:
        raise DaemonRunning(running.get("pid"))


@contextlib.contextmanager
def upload_progress(config: Any) -> Iterator[Any]:
    """What was uploaded to each store (shared with p2pbackupd's uploaders)."""
    from p2pbackup.repo.upload import UploadProgress

    progress = UploadProgress(config.cache_dir / "uploads.sqlite")
    try:
        yield progress
    finally:
        progress.close()


def new_uploader(repo: Any, settings: Any, progress: Any) -> Any:
    """A StoreUploader to the store of `settings`, as `store push` runs it."""
    from p2pbackup.blobs import StoreSigner, open_store
    from p2pbackup.repo.upload import StoreUploader

    def opener() -> Any:   # (the storage server's requests are signed as this device)
        return open_store(settings.location, options=settings.options,
                          signer=StoreSigner(repo.identity, repo.keys.fingerprint()))

    return StoreUploader(repo, settings, progress, opener)


def say_pushed(uploader: Any, took: float) -> None:
    """The line of one store's push: what went up, how fast."""
    from . import output

    st = uploader.status
    if st.uploaded:
        print(f"pushed {st.uploaded} objects, {output.human_bytes(st.uploaded_bytes)} to "
              f"{uploader.location} in {took:.1f} s "
              f"({st.uploaded_bytes / 2**20 / max(took, 1e-3):.1f} MiB/s)", flush=True)
    else:
        print(f"{uploader.location} is up to date (nothing to push)", flush=True)
