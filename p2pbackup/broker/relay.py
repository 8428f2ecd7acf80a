"""How a broker process reaches a device whose socket another process holds.

The broker (service.py) delivers to the sockets it holds itself; a message for a device it does
not hold goes to `Relay.forward`. `LocalRelay` is the single-process broker's (SQLite): there
is no other process, so nothing is forwarded. `PostgresRelay` (broker/postgres.py) finds the
process holding the device in a presence table and hands it the message with NOTIFY; that
process calls back into its broker (`Arrivals`), which delivers it or, when the socket closed
meanwhile, treats it as undelivered there. Roster changes go the same way, so that every
process drops a removed device at once, and so do the pairing mailbox's messages (a message
added on one process reaches a client of that mailbox on another: `mailbox_added`).
"""

from __future__ import annotations

from typing import Any, Protocol

Doc = dict[str, Any]


class Arrivals(Protocol):
    """What a relay calls back into its broker with."""

    async def arrived(self, account: str, device: str, doc: Doc, queued: int | None) -> None:
        """A message another process forwarded for a device this process holds; `queued`:
        the state's index of the queued copy (a push) to drop once it is delivered."""
        ...

    async def roster_changed(self, account: str) -> None:
        """Another process stored a new roster for `account`."""
        ...

    async def replaced(self, account: str, device: str) -> None:
        """`device` opened a socket on another process: close the one it had here."""
        ...

    async def missed(self) -> None:
        """Notifications may have been lost (the relay's connection was cut): reload every
        roster held, as if each had changed."""
        ...


class MailboxArrivals(Protocol):
    """What a relay calls back into the pairing mailbox (broker/mailbox.py) with."""

    async def mailbox_added(self, app: str, mailbox: str) -> None:
        """A message was added to `mailbox` (on any process): deliver it to its clients here."""
        ...

    async def missed(self) -> None:
        """Notifications may have been lost: look for new messages in every mailbox here."""
        ...


class Relay(Protocol):
    async def start(self, arrivals: Arrivals) -> None: ...
    def hear_mailboxes(self, arrivals: MailboxArrivals) -> None:
        """Where mailbox notifications go (set before `start`)."""
        ...
    async def mailbox_added(self, app: str, mailbox: str) -> None:
        """Tell the other processes that `mailbox` holds a new message."""
        ...
    async def attached(self, account: str, device: str) -> None:
        """A socket of `device` is open on this process (it replaces one on another)."""
        ...
    async def detached(self, account: str, device: str) -> None: ...
    async def forward(self, account: str, device: str, doc: Doc, queued: int | None) -> bool:
        """Hand `doc` to the process holding `device`; False if no other live process holds
        it (the broker then answers "undeliverable", or leaves a push queued)."""
        ...
    async def elsewhere(self, account: str) -> set[str]:
        """The account's devices with a socket on another live process."""
        ...
    async def roster_stored(self, account: str) -> None:
        """Tell the other processes (they reload it and close removed devices' sockets)."""
        ...
    async def close(self) -> None: ...


class LocalRelay:
    """One broker process: every socket is here, nothing to forward."""

    async def start(self, arrivals: Arrivals) -> None:
        pass

    def hear_mailboxes(self, arrivals: MailboxArrivals) -> None:
        pass

    async def mailbox_added(self, app: str, mailbox: str) -> None:
        pass

    async def attached(self, account: str, device: str) -> None:
        pass

    async def detached(self, account: str, device: str) -> None:
        pass

    async def forward(self, account: str, device: str, doc: Doc, queued: int | None) -> bool:
        return False

    async def elsewhere(self, account: str) -> set[str]:
        return set()

    async def roster_stored(self, account: str) -> None:
        pass

    async def close(self) -> None:
        pass

