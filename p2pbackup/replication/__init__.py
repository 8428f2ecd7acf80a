"""Replication: running sync sessions between this device's store and its peers'.

`driver.SessionDriver` runs one session over its links (a control link, and a bulk lane while
one is up); `member.Replicator` is an account member's side of its sessions, `partner.
StoragePartner` a storage partner's. `daemon/` only hands them links (from discovery and
signaling) and shows their status.
"""

from __future__ import annotations

from ..protocol import fetch
from ..protocol.framing import peek_type


def reads_store(first: bytes) -> bool:
    """Whether a session whose first message is `first` reads a store (the fetch protocol:
    `restore --from peer:`), rather than replicating (the sync protocol). The dialer speaks
    first in both."""
    return peek_type(first) == fetch.HELLO
