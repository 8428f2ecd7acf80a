"""Pairing across the internet through a mailbox: ours and magic-wormhole's mailbox server.

The two devices share no LAN here: the host does not announce on mDNS and the joiner is given
no address, only the mailbox, so the mailbox is the only way they meet (on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import os
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from p2pbackup.errors import PairingFailed
from p2pbackup.pairing_link import HostOutcome, PairingHost, StaticRendezvous, join, new_code
from tests.conftest import Cli, make_sample_tree, tree_state
from tests.integration.test_pairing import Host, devices, owner, wrong_words  # noqa: F401
from tests.mailboxes import KINDS, mailbox_server

WELCOME = b"the account key and the device records"


class Nowhere:
    """A rendezvous that finds nothing: the joiner must not need the LAN."""

    def offer(self, tag: str, port: int) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()  # type: ignore[return-value]

    async def locate(self, tag: str, timeout: float) -> list[tuple[str, int]]:
        raise AssertionError("the joiner looked on the LAN")


@pytest.fixture(scope="module", params=KINDS)
def mailbox(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[str]:
    with mailbox_server(request.param, tmp_path_factory.mktemp("mailbox")) as url:
        yield url


@contextlib.asynccontextmanager
async def hosting(url: str, answer: bool | asyncio.Future[bool] = True,
                  welcome: bytes = WELCOME) -> AsyncIterator[tuple[str, asyncio.Task]]:
    code, pipe = await new_code(url)
    completed: list[str] = []

    async def on_request(payload: bytes, verifier: str) -> bytes:
        return welcome

    async def confirm(verifier: str) -> bool:
        return answer if isinstance(answer, bool) else await answer

    async def on_complete() -> str:
        completed.append("yes")
        return "joined"

    host = PairingHost(code, on_request, on_complete, confirm=confirm,
                       rendezvous=StaticRendezvous("", 0), bind="127.0.0.1", lifetime=120,
                       mailbox=pipe)
    task: asyncio.Task[HostOutcome] = asyncio.ensure_future(host.run())
    try:
        yield code, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_device_pairs_through_the_mailbox_alone(mailbox: str):
    async with hosting(mailbox) as (code, task):
        assert 1 <= int(code.split("-")[0]) <= 999  # the nameplate the mailbox allocated
        got: list[bytes] = []

        async def on_welcome(payload: bytes, verifier: str) -> None:
            got.append(payload)

        verifier = await asyncio.wait_for(join(code, b"me", on_welcome, rendezvous=Nowhere(),
                                               mailbox=mailbox), 60)
        outcome = await asyncio.wait_for(task, 60)
    assert got == [WELCOME]
    assert outcome.ok and outcome.verifier == verifier


async def test_a_welcome_larger_than_a_mailbox_message_crosses_in_pieces(mailbox: str):
    from p2pbackup.crypto.pairing import MAX_PAYLOAD

    big = bytes(range(256)) * (MAX_PAYLOAD // 256)  # 1 MiB: 32 messages of 32 KiB
    async with hosting(mailbox, welcome=big) as (code, task):
        got: list[bytes] = []

        async def on_welcome(payload: bytes, verifier: str) -> None:
            got.append(payload)

        await asyncio.wait_for(join(code, b"me", on_welcome, rendezvous=Nowhere(),
                                    mailbox=mailbox), 60)
        assert (await asyncio.wait_for(task, 60)).ok
    assert got == [big]


async def test_a_wrong_code_through_the_mailbox_uses_the_code_up(mailbox: str):
    async with hosting(mailbox) as (code, task):
        with pytest.raises(PairingFailed, match="code was wrong"):
            await asyncio.wait_for(join(wrong_words(code), b"me", _never, rendezvous=Nowhere(),
                                        mailbox=mailbox), 60)
        outcome = await asyncio.wait_for(task, 60)
        assert not outcome.ok and "wrong code" in outcome.message
        # The right code now finds nobody to talk to: one attempt per code.
        with pytest.raises(PairingFailed):
            await asyncio.wait_for(join(code, b"me", _never, rendezvous=Nowhere(),
                                        mailbox=mailbox, find_timeout=3), 60)


async def test_a_second_device_on_the_code_is_refused_while_the_first_pairs(mailbox: str):
    await second_device_refused(mailbox, mailbox, mailbox)


async def second_device_refused(host: str, first: str, second: str) -> None:
    """The host offers a code on mailbox URL `host`, a device joins on `first` and, while its
    user looks at the verifier, another tries the code on `second`: refused, and the first
    pairs."""
    answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    asked = asyncio.Event()
    got: list[bytes] = []

    async def on_welcome(payload: bytes, verifier: str) -> None:
        got.append(payload)

    async with hosting(host, answer) as (code, task):
        joining = asyncio.ensure_future(join(code, b"me", on_welcome, rendezvous=Nowhere(),
                                             mailbox=first, on_verifier=lambda v: asked.set()))
        await asyncio.wait_for(asked.wait(), 30)
        with pytest.raises(PairingFailed, match="another device is already pairing with this "
                                                "code there"):
            await asyncio.wait_for(join(code, b"me too", _never, rendezvous=Nowhere(),
                                        mailbox=second), 30)
        answer.set_result(True)
        await asyncio.wait_for(joining, 30)
        assert (await asyncio.wait_for(task, 30)).ok and got == [WELCOME]


async def test_a_code_nobody_offers_on_the_mailbox_is_one_line(mailbox: str):
    with pytest.raises(PairingFailed, match="no device offers pairing code 998-… through the "
                                            "pairing mailbox"):
        await asyncio.wait_for(join("998-guitarist-revenge", b"me", _never, rendezvous=Nowhere(),
                                    mailbox=mailbox, find_timeout=1), 60)


async def test_an_unreachable_mailbox_is_one_line():
    from tests.servers import free_port

    url = f"ws://127.0.0.1:{free_port()}/v1"
    with pytest.raises(PairingFailed, match="cannot reach the pairing mailbox at"):
        await new_code(url)


async def test_a_url_that_is_no_mailbox_is_one_line():
    from tests.mailboxes import our_mailbox

    async with our_mailbox() as (url, _):
        with pytest.raises(PairingFailed, match=r"it is not a mailbox \(HTTP 404"):
            await new_code(url.replace("/v1/mailbox", "/v1/elsewhere"))


async def _never(payload: bytes, verifier: str) -> None:
    raise AssertionError("a welcome arrived")


# --- the real CLI (the `owner` fixture is test_pairing's) ---------------------------------

def test_a_new_device_in_a_third_home_pairs_through_the_mailbox(mailbox: str, owner,
                                                                 tmp_path: Path):
    a, src = owner
    b = Cli(tmp_path / "home-b")
    host = Host(a, "--mailbox", mailbox)
    joined = b("pair", host.code, "--mailbox", mailbox, "--name", "far-laptop", check=False)
    assert joined.returncode == 0, joined.stderr
    code, out, err = host.finish()
    assert code == 0, err
    assert "joined as owner" in out
    assert "far-laptop" in {d["name"] for d in devices(a)["devices"]}
    # The joined device holds the account: it verifies and restores the host's snapshots.
    verified = b("verify", "--from", str(a.home / "store"), check=False)
    assert verified.returncode == 0, verified.stderr
    b("restore", "latest", "--from", str(a.home / "store"), "--to", str(tmp_path / "out"))
    assert tree_state(tmp_path / "out" / "src") == tree_state(src)


def test_a_wrong_code_through_the_mailbox_is_one_attempt_with_the_cli(mailbox: str, owner,
                                                                      tmp_path: Path):
    a, _ = owner
    b = Cli(tmp_path / "home-b")
    host = Host(a, "--mailbox", mailbox)
    wrong = b("pair", wrong_words(host.code), "--mailbox", mailbox, check=False)
    assert wrong.returncode == 24
    assert "code was wrong" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1
    code, _, err = host.finish()
    assert code == 24 and "wrong code" in err and "used up" in err
    assert not (b.home / "config.toml").exists()


def test_the_daemon_hosts_a_code_through_the_mailbox(mailbox: str, owner, tmp_path: Path):
    from tests.integration.test_daemon import Daemon

    a, _ = owner
    daemon = Daemon(a, tmp_path)
    try:
        daemon.wait_for("READY=1")
        host = Host(a, "--mailbox", mailbox)  # goes through the daemon (it holds the lock)
        assert f"--mailbox {mailbox}" in "".join(host.lines)  # the joiner is told how
        b = Cli(tmp_path / "home-b")
        joined = b("pair", host.code, "--mailbox", mailbox, "--name", "far-laptop", check=False)
        assert joined.returncode == 0, joined.stderr
        code, out, err = host.finish()
        assert code == 0 and "joined as owner" in out, err
    finally:
        assert daemon.stop() == 0


def test_a_bad_or_unreachable_mailbox_is_one_line_with_the_cli(owner, tmp_path: Path):
    from tests.servers import free_port

    a, _ = owner
    bad = a("pair", "--no-qr", "--yes", "--mailbox", "https://broker.example/v1", check=False)
    assert bad.returncode == 10 and "give a ws:// or wss:// URL" in bad.stderr
    url = f"ws://127.0.0.1:{free_port()}/v1"
    down = a("pair", "--no-qr", "--no-mdns", "--yes", "--mailbox", url, check=False)
    assert down.returncode == 24 and f"cannot reach the pairing mailbox at {url}" in down.stderr
    b = Cli(tmp_path / "home-b")
    joining = b("pair", "7-guitarist-revenge", "--mailbox", url, check=False)
    assert joining.returncode == 24 and "cannot reach the pairing mailbox" in joining.stderr
    for r in (bad, down, joining):
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_device_on_another_lan_pairs_through_the_mailbox_with_mdns_on(netlab, tmp_path: Path):
    """Two homes with no route between them (namespaces); the mailbox is on a machine both
    reach. The host also announces on its LAN, as by default; the joiner's LAN hears nothing."""
    import re
    import subprocess
    import sys

    from tests.eventually import eventually_sync

    home, far = netlab.lan("home"), netlab.lan("far")
    a = netlab.host("a", home, "10.10.0.1/24")
    c = netlab.host("c", far, "10.20.0.1/24")
    broker = netlab.host("broker", home, "10.10.0.9/24")
    netlab.attach(broker, far, "10.20.0.9/24")  # it does not forward: the homes stay apart
    broker.popen([sys.executable, "-m", "p2pbackup.broker.mailbox", "--host", "0.0.0.0",
                  "--port", "4000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reach = "import socket,sys; socket.create_connection((sys.argv[1], 4000), 1)"
    eventually_sync(lambda: c.run([sys.executable, "-c", reach, "10.20.0.9"],
                                  capture_output=True).returncode == 0, timeout=30)
    assert not c.ping("10.10.0.1")

    owner = Cli(tmp_path / "home-a")
    src = tmp_path / "src"
    make_sample_tree(src, big=100_000)
    owner("init", "--source", str(src))
    owner("snapshot")
    pair = [sys.executable, "-m", "p2pbackup.cli.main", "pair"]
    host = a.popen(pair + ["--no-qr", "--yes", "--mailbox", "ws://10.10.0.9:4000/v1/mailbox"],
                   env={"P2PBACKUP_HOME": str(owner.home)}, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True)
    code = ""
    while not code:
        line = host.stdout.readline()  # the test's timeout bounds this
        assert line, host.stderr.read()
        m = re.match(r"Pairing code: (\S+)", line)
        code = m.group(1) if m else ""
    joined = c.run(pair + [code, "--mailbox", "ws://10.20.0.9:4000/v1/mailbox", "--name", "far"],
                   env={**os.environ, "P2PBACKUP_HOME": str(tmp_path / "home-c")},
                   capture_output=True, text=True)
    assert joined.returncode == 0, joined.stderr
    out, err = host.communicate(timeout=60)
    assert host.returncode == 0 and "joined as owner" in out, err
    assert "far" in {d["name"] for d in devices(owner)["devices"]}
