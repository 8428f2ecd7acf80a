"""What the broker and its devices sign (sans-I/O; broker/service.py and discovery/broker.py).

REST requests are signed as the storage server's are (store_requests), under the broker's own
domain so that a request signed for one service is worth nothing at the other. A socket is
opened by signing the broker's fresh challenge, so an answer captured from one connection
opens no other.
"""

from __future__ import annotations

REQUEST_DOMAIN = b"p2pbackup-broker request v1\n"
SOCKET_DOMAIN = b"p2pbackup-broker socket v1\n"

# Keepalive pings on a device's broker socket (seconds). Each socket pings at its own period,
# drawn from its range: sockets opened together (after a broker restart) then ping at
# different times, not all in one burst each period (10,000 pings in the 6 s they took to
# open pushed the relay's p99 past 50 ms). The broker pings only a socket silent for longer
# than any device's period, since a device's ping resets the broker's timer: it finds dead
# connections without pinging live ones.
DEVICE_PING = (20.0, 40.0)
BROKER_PING = (50.0, 70.0)


def ping_period(span: tuple[float, float], rand: float) -> float:
    """A socket's period in `span`, for `rand` in [0, 1)."""
    return span[0] + (span[1] - span[0]) * rand


def socket_auth_message(account: str, device: str, challenge: str) -> bytes:
    """What device `device` of `account` signs to answer the socket challenge `challenge`."""
    return SOCKET_DOMAIN + f"{account}\n{device}\n{challenge}".encode()
