"""The one driver of a sync session over whatever links it has.

A `SessionDriver` runs one `SyncSession` (protocol/sync.py, sans-I/O) over:

- its **control link** (`transport.link.MessageLink`), given when it starts: the signed
  aiortc data channel on the LAN today; any other link that carries ordered, reliable
  messages (one relayed through the broker or TURN) works unchanged. Control frames (hellos,
  inventories, asks, acknowledgements, small objects) always go here.
- at most one **bulk lane** at a time (`transport.link.BulkLane`), handed to `run_lane`
  whenever one comes up (the direct TLS lane, pinned inside the session) and gone when it
  drops: while it is up, object parts go over it, and the session moves them back to the
  control link when it goes (`lane_down`).

What either link brings is fed to the session; its events go to the side's `on_event` (a
member's: `member.Replicator`; a storage partner's: `partner.StoragePartner`), which stores,
refuses or answers; then `drive` sends what the session queued and asks it for the next
objects its window lets it send. Sends on one session never interleave (one lock). The loop
itself is transport/pump.py's, shared with the fetch protocol (blobs/peer.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..errors import NameMismatch, P2PError
from ..protocol.sync import MISMATCH, Event, SyncSession
from ..transport import pump as transport
from ..transport.datachannel import MESSAGE_SIZE
from ..transport.link import BulkLane, MessageLink

# What one message on a bulk lane holds: whole frames adding up to about this many bytes.
LANE_PIECE = 1024 * 1024

EventHandler = Callable[[Event], Awaitable[None]]


class SessionDriver:
    """Runs session `session` over its control link and, while one is up, a bulk lane."""

    def __init__(self, session: SyncSession, control: MessageLink, on_event: EventHandler,
                 *, on_send: Callable[[], None] | None = None) -> None:
        self.session, self.control = session, control
        self.on_event = on_event
        self.on_send = on_send   # told before each send (e.g. to show progress)
        self.lane: BulkLane | None = None
        # Concurrent sends (session loop, lane loop, objects being taken in) would interleave
        # the pieces of their frames.
        self._sending = asyncio.Lock()

    async def run(self, first: bytes | None = None) -> None:
        """Run the session until either side ends it or the control link closes (`first`:
        a message already read from it)."""
        await pump(self.session, self.control, self.on_event, self.send, first)

    async def handle(self, events: list[Event]) -> None:
        """Act on `events` and on what follows from them (`drive`)."""
        await drive(self.session, events, self.on_event, self.send)

    async def send(self) -> None:
        """Send what the session queued: control frames on the control link, parts on the
        bulk lane if one is up."""
        if self.on_send is not None:
            self.on_send()
        async with self._sending:
            # The lane is looked up once the control frames are out: it may have come up
            # meanwhile and the session queued parts for it (a lane read before the control
            # send was None, and those parts were dropped: the peer waited forever).
            await flush(self.session, self.control, lambda: self.lane)

    async def run_lane(self, lane: BulkLane) -> None:
        """Move object parts onto `lane` and run it until it drops (its P2PError is raised;
        a lane closed by the peer just returns). The lane is not closed here; call
        `lane_down` after it to move what waits back to the control link."""
        self.lane = lane
        self.session.bulk_lane_up()
        try:
            await self.handle(self.session.next_wanted())
            await pump(self.session, lane, self.on_event, self.send, on="bulk")
        finally:
            self.lane = None

    async def lane_down(self) -> None:
        """No bulk lane (any more, or it never came): what waited for one goes over the
        control link."""
        if self.session.closed:
            return
        self.session.bulk_lane_down()
        await self.handle(self.session.next_wanted())


def refuse(s: SyncSession, name: str, exc: P2PError) -> None:
    """Tell the peer why `name` was not taken; a content that does not match its name says so
    in the frame's code, so that the peer checks its copy (and not for any other refusal)."""
    s.reject(name, str(exc), code=MISMATCH if isinstance(exc, NameMismatch) else None)


async def drive(s: SyncSession, events: list[Event], on_event: EventHandler,
                send: Callable[[], Awaitable[None]]) -> None:
    """Hand `events` to `on_event` in turn and `send` what the session queued (also when no
    event came), then go on with the objects the window lets it send next, until it has
    nothing more to do."""
    while True:
        for ev in events:
            await on_event(ev)
        await send()
        events = s.next_wanted()
        if not events:
            return


async def pump(s: SyncSession, link: MessageLink, on_event: EventHandler,
               send: Callable[[], Awaitable[None]], first: bytes | None = None, *,
               on: str = "control") -> None:
    """Run session `s` until either side ends it or `link` closes: what `link` brings (the
    session's lane `on`; `first`: a message already read) goes through `drive`."""
    await send()
    await transport.pump(s, link, lambda events: drive(s, events, on_event, send),
                         first=first, feed=lambda msg: s.receive_data(msg, on))


async def flush(s: SyncSession, link: MessageLink,
                lane: BulkLane | Callable[[], BulkLane | None] | None = None) -> None:
    """Send what the session has queued: control frames on the link, parts on the lane
    (`lane` may be a function giving the current lane, asked after the control frames).

    On the lane each message holds whole frames (about LANE_PIECE bytes of them), written
    from the session's buffers without copying: the receiver parses them where they lie."""
    await transport.send_queued(s, link, MESSAGE_SIZE)
    if callable(lane):
        lane = lane()
    if lane is None:
        # Parts are queued for the lane only while it is up (`bulk_lane_up`/`_down` follow
        # `SessionDriver.lane`), so there are none to send.
        return
    frames = s.frames_to_send("bulk")
    if not frames:
        return
    batch: list = []
    size = 0
    for frame in frames:
        batch += frame
        size += sum(len(b) for b in frame)
        if size >= LANE_PIECE:
            await lane.send_buffers(batch)
            batch, size = [], 0
    if batch:
        await lane.send_buffers(batch)
