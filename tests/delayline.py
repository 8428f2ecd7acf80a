"""A cable that delays every frame, in user space: this kernel has no sch_netem.

    python tests/delayline.py IFACE_A IFACE_B DELAY_MS

Run inside the lab's switch namespace by `NetLab.delay`. Frames read from one interface are
written to the other DELAY_MS later, in order, both ways. The AF_PACKET sockets carry a
virtio-net header (PACKET_VNET_HDR), so TCP's large GSO frames and frames whose checksum the
kernel has not filled in yet (veth leaves that to the receiver) cross intact: the kernel
segments and checksums them on the way out, as a real NIC would.
"""

from __future__ import annotations

import collections
import socket
import sys
import threading
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4
READY = "delayline ready"


def _open(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
    sock.bind((ifname, 0))
    return sock


def _direction(src: socket.socket, dst: socket.socket, delay: float) -> None:
    """Read frames from `src`, write each to `dst` `delay` seconds after it arrived."""
    line: collections.deque[tuple[float, bytes]] = collections.deque()
    ready = threading.Condition()

    def send() -> None:
        while True:
            with ready:
                while not line:
                    ready.wait()
                due, frame = line[0]
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with ready:
                line.popleft()
            try:
                dst.send(frame)
            except OSError:   # a frame the other side cannot take is lost, as on a cable
                pass

    threading.Thread(target=send, daemon=True).start()
    while True:
        try:
            frame, addr = src.recvfrom(70000)
        except OSError:   # the cable is unplugged (ENETDOWN): wait for it to come back
            time.sleep(0.05)
            continue
        if addr[2] == PACKET_OUTGOING:   # our own writes to this interface
            continue
        with ready:
            line.append((time.monotonic() + delay, frame))
            ready.notify()


def main() -> None:
    a, b, ms = sys.argv[1], sys.argv[2], float(sys.argv[3])
    sa, sb = _open(a), _open(b)
    threading.Thread(target=_direction, args=(sb, sa, ms / 1000), daemon=True).start()
    print(READY, flush=True)
    _direction(sa, sb, ms / 1000)


if __name__ == "__main__":
    main()
