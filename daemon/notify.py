"""The sd_notify protocol (READY=1, STATUS=..., WATCHDOG=1): a datagram to NOTIFY_SOCKET.

It is a few lines, so no dependency: see sd_notify(3).
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger("p2pbackupd")


class Notifier:
    """Sends state lines to systemd; does nothing when not run by systemd."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        if address and address.startswith("@"):
            self.address = "\0" + address[1:]  # abstract socket namespace

    def send(self, *lines: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", self.address, exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")
