"""What the broker and its devices sign (sans-I/O; broker/service.py and discovery/broker.py).

REST requests are signed as the storage server's are (store_requests), under the broker's own
domain so that a request signed for one service is worth nothing at the other. A socket is
opened by signing the broker's fresh challenge, so an answer captured from one connection
opens no other.
"""

from __future__ import annotations

REQUEST_DOMAIN = b"p2pbackup-broker request v1\n"
SOCKET_DOMAIN = b"p2pbackup-broker socket v1\n"


def socket_auth_message(account: str, device: str, challenge: str) -> bytes:
    """What device `device` of `account` signs to answer the socket challenge `challenge`."""
    return SOCKET_DOMAIN + f"{account}\n{device}\n{challenge}".encode()
