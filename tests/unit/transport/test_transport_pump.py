"""The one loop of every protocol end over a link (transport/pump.py), with the fetch protocol's
two ends: it feeds what was already read first, stops once the end closes (reading no further
message) or the link ends, and `send_queued` cuts the output into the link's messages."""

from __future__ import annotations

from p2pbackup.protocol import fetch
from p2pbackup.transport.memory import memory_pair
from p2pbackup.transport.pump import pump, send_queued


async def test_the_first_message_goes_first_and_the_loop_stops_when_the_end_closes():
    client, server = fetch.FetchClient("c"), fetch.FetchServer("s")
    out, into = memory_pair()
    await send_queued(client, out, 7)                   # the hello, cut into 7-byte messages
    await out.close()
    hello_parts = []
    while (part := await into.recv()) is not None:
        hello_parts.append(part)
    assert len(hello_parts) > 1 and all(len(p) <= 7 for p in hello_parts)
    near, far = memory_pair()
    for part in hello_parts[1:]:
        await near.send(part)
    client.close("done")
    await near.send(client.data_to_send())               # the client says goodbye
    await near.send(b"never read")
    seen: list[object] = []

    async def handle(events) -> None:
        seen.extend(events)

    await pump(server, far, handle, first=hello_parts[0])
    assert isinstance(seen[0], fetch.Hello) and isinstance(seen[-1], fetch.Closed)
    assert server.closed and await far.recv() == b"never read"   # left on the link


async def test_the_loop_ends_with_the_link():
    server = fetch.FetchServer("s")
    near, far = memory_pair()
    await near.close()
    await pump(server, far, lambda events: None)  # type: ignore[arg-type,return-value]
    assert not server.closed
