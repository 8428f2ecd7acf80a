"""Devices of one account talking through a broker in this event loop: their membership (as the
devices hold it, for session checks), the roster the broker follows, and a BrokerClient each
that answers offers with session.OfferAnswerer and records links, pushes, commands and
refusals."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup import session
from p2pbackup.discovery.broker import BrokerClient, BrokerSignaling
from p2pbackup.format.membership import MEMBER, OWNER, Member, Membership
from p2pbackup.protocol.broker_wire import socket_auth_message
from p2pbackup.session import OfferAnswerer
from p2pbackup.transport.datachannel import IceConfig, PeerLink
from tests.eventually import eventually
from tests.servers import StorageAccount

LOOPBACK = IceConfig(host_addresses=("127.0.0.1",))


@dataclass
class Device:
    """One device's broker client and what reached it."""

    identity: DeviceIdentity
    client: BrokerClient
    links: list[tuple[str, PeerLink]] = field(default_factory=list)
    pushes: list[tuple[str, bytes]] = field(default_factory=list)
    commands: list[tuple[int, str, str, bytes]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def membership(acct: StorageAccount, removed: tuple[DeviceIdentity, ...] = ()) -> Membership:
    """The membership the account's devices hold: the owner and members, `removed` gone."""
    gone = {r.device_id for r in removed}
    members = (Member(acct.owner.device_id, acct.owner.public_key, "owner", OWNER),) + tuple(
        Member(m.device_id, m.public_key, f"m{i}", MEMBER) for i, m in enumerate(acct.members)
        if m.device_id not in gone)
    return Membership(1, b"", 0, members, tuple(sorted(gone)))


def device(url: str, acct: StorageAccount, who: DeviceIdentity,
           held: list[Membership]) -> Device:
    """A device whose client answers offers against `held[0]` (a list: tests change it)."""
    dev: Device

    async def on_link(sender: str, link: PeerLink) -> None:
        dev.links.append((sender, link))

    async def on_push(sender: str, data: bytes) -> None:
        dev.pushes.append((sender, data))

    async def on_command(index: int, sender: str, command: str, payload: bytes) -> None:
        dev.commands.append((index, sender, command, payload))

    client = BrokerClient(url, who, acct.fingerprint,
                          answerer=OfferAnswerer(who, lambda: held[0], ice=LOOPBACK),
                          on_link=on_link, on_push=on_push, on_command=on_command,
                          on_refused=lambda why: dev.refused.append(why))
    dev = Device(who, client)
    return dev


async def online(*devices: Device) -> None:
    for d in devices:
        d.client.start()
    for d in devices:
        await asyncio.wait_for(d.client.connected.wait(), 30)


async def echo(link: PeerLink) -> None:
    while (msg := await link.recv()) is not None:
        await link.send(msg)


async def echoed(a: Device, b: Device, held: Membership, message: bytes,
                 ice: IceConfig = LOOPBACK) -> bytes:
    """Open a session from `a` to `b` through the broker (BrokerSignaling); what `b` echoes of
    `message`."""
    link = await session.connect(a.identity, b.identity.device_id, held,
                                 BrokerSignaling(a.client, b.identity.device_id), ice=ice)
    await eventually(lambda: b.links)
    assert b.links[-1][0] == a.identity.device_id
    served = asyncio.create_task(echo(b.links[-1][1]))
    try:
        await link.send(message)
        return await asyncio.wait_for(link.recv(), 30)
    finally:
        await link.close()
        served.cancel()


@contextlib.asynccontextmanager
async def front(*urls: str) -> AsyncIterator[str]:
    """One address in front of several broker processes (a load balancer's job): each TCP
    connection goes to the first of `urls` that accepts it. Yields its http:// URL."""
    backends = [urlsplit(u) for u in urls]

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for b in backends:
            try:
                up_r, up_w = await asyncio.open_connection(b.hostname, b.port)
            except OSError:
                continue
            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
            return
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def raw_socket(http: aiohttp.ClientSession, url: str, acct: StorageAccount,
                     who: DeviceIdentity) -> aiohttp.ClientWebSocketResponse:
    """An authenticated broker socket, spoken by hand."""
    ws = await http.ws_connect(f"{url}/v1/account/{acct.fingerprint}/ws")
    challenge = (await ws.receive_json())["nonce"]
    sig = who.sign(socket_auth_message(acct.fingerprint, who.device_id, challenge))
    await ws.send_json({"t": "auth", "device": who.device_id,
                        "sig": base64.b64encode(sig).decode()})
    assert (await ws.receive_json(timeout=30))["t"] == "ready"
    return ws


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> str:
    """The error the broker gave before closing `ws`."""
    error = ""
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data).get("t") == "error":
            error = json.loads(msg.data)["error"]
    assert ws.closed
    return error


async def registered(url: str, members: int = 1) -> StorageAccount:
    """A new account, its roster registered on the broker at `url` by its owner."""
    acct = StorageAccount(members=[DeviceIdentity.generate() for _ in range(members)])
    owner = BrokerClient(url, acct.owner, acct.fingerprint)
    await owner.publish_rosters([acct.roster()[1]])
    await owner.close()
    return acct


def invitation(database: str) -> str:
    """An operator's invitation (`p2pbackup-broker invite`) for the brokers on `database`."""
    return subprocess.run([sys.executable, "-m", "p2pbackup.broker.main", "invite",
                           "--database", database], check=True, capture_output=True,
                          text=True).stdout.strip()
