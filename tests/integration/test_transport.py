"""Real transports between processes in two network namespaces on one bridge (netlab).

Each peer is this file run as a script inside its host's namespace (`peer MODE ...`); the
test relays signaling (SDP, fingerprints, ports) between their stdin/stdout as JSON lines,
as the signaling layer will. aiortc gathers host candidates on every interface of its
namespace, which here is only the bridge's eth0: no packet leaves the lab.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import queue
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.netns import NetLab

REPO = Path(__file__).resolve().parents[2]
DC_BYTES = 20 * 1024 * 1024
LANE_BYTES = 64 * 1024 * 1024

pytestmark = pytest.mark.timeout(90)


# ------------------------------------------------------------------ the peer processes

def _emit(**obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _read() -> dict:
    return json.loads(await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline))


def _payload(nbytes: int, seed: int, size: int):
    rnd = random.Random(seed)
    for off in range(0, nbytes, size):
        yield rnd.randbytes(min(size, nbytes - off))


async def dc_peer(role: str, nbytes: int, timeout: float = 15,
                  host_addresses: tuple[str, ...] | None = None) -> None:
    from p2pbackup.errors import P2PError
    from p2pbackup.transport.datachannel import MESSAGE_SIZE, IceConfig, PeerLink
    states: list[str] = []
    link = PeerLink(IceConfig(host_addresses=host_addresses), on_state=states.append)
    try:
        if role == "offer":
            _emit(sdp=await link.create_offer())
            await link.accept_answer((await _read())["sdp"])
        else:
            _emit(sdp=await link.accept_offer((await _read())["sdp"]))
        await link.wait_connected(timeout)
    except P2PError as exc:
        _emit(error=type(exc).__name__, message=str(exc), states=states)
        return
    _emit(event="connected", local_fp=str(link.local_fingerprint()),
          remote_fp=str(link.remote_fingerprint()), max_message_size=link.max_message_size)
    digest = hashlib.sha256()
    if role == "offer":  # send, then read the receiver's digest and see it close
        max_buffered = 0
        for msg in _payload(nbytes, 7, MESSAGE_SIZE):
            await link.send(msg)
            digest.update(msg)
            max_buffered = max(max_buffered, link.buffered_amount)
        reply = await link.recv()
        after = await link.recv()
        _emit(sha256=digest.hexdigest(), reply=reply.decode(), after_reply=after,
              max_buffered=max_buffered, high_water=link._high_water, states=states)
    else:  # receive everything, answer with its digest, close
        got = 0
        while got < nbytes:
            msg = await link.recv()
            if msg is None:
                break
            got += len(msg)
            digest.update(msg)
        await link.send(digest.hexdigest().encode())
        await link.close()
        _emit(received=got, sha256=digest.hexdigest(), states=states)


async def lane_peer(role: str, nbytes: int) -> None:
    from p2pbackup.errors import P2PError
    from p2pbackup.transport.tls_lane import LaneIdentity, LaneServer, connect_lane
    me = LaneIdentity.generate()
    _emit(fingerprint=me.fingerprint)
    peer = await _read()
    if role == "server":
        finished = asyncio.Event()

        async def handle(link):
            digest, got = hashlib.sha256(), 0
            while (msg := await link.recv()) is not None:
                digest.update(msg)
                got += len(msg)
                if got >= nbytes:
                    break
            await link.send(digest.hexdigest().encode())
            _emit(received=got, sha256=digest.hexdigest(), peer=link.peer_fingerprint)
            finished.set()

        def refused(exc: Exception) -> None:
            _emit(refused=type(exc).__name__, message=str(exc))
            finished.set()

        server = LaneServer(me, handle, expected=[peer["expect"]], on_refused=refused)
        host, port = await server.start(peer["host"], 0)
        _emit(port=port)
        await asyncio.wait_for(finished.wait(), 30)
        await asyncio.sleep(0.2)
        await server.close()
    else:
        try:
            link = await connect_lane(peer["host"], peer["port"], peer["expect"], me)
        except P2PError as exc:
            _emit(error=type(exc).__name__, message=str(exc))
            return
        digest = hashlib.sha256()
        t0 = time.perf_counter()
        for msg in _payload(nbytes, 11, 1024 * 1024):
            await link.send(msg)
            digest.update(msg)
        reply = await link.recv()
        await link.close()
        _emit(sha256=digest.hexdigest(), reply=reply.decode(),
              seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------ the test side

class Peer:
    """A peer process in a namespace, spoken to in JSON lines."""

    def __init__(self, host, *args: str) -> None:
        self.proc = host.popen([sys.executable, __file__, "peer", *args],
                               env={"PYTHONPATH": str(REPO)}, cwd=REPO,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def get(self, timeout: float = 30) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"peer said nothing within {timeout} s") from None
        if line is None:
            self.proc.wait(5)
            raise AssertionError(f"peer exited {self.proc.returncode}: {self.proc.stderr.read()}")
        return json.loads(line)

    def put(self, **obj) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        assert self.proc.wait(15) == 0, self.proc.stderr.read()


@pytest.fixture
def lan(netlab: NetLab):
    netlab.lan("lan")
    return netlab.host("a", "lan", "10.10.0.1/24"), netlab.host("b", "lan", "10.10.0.2/24")


def _connect_dc(lan, nbytes: int, tamper=None, timeout: float = 15, hosts: str = ""):
    a, b = lan
    extra = [hosts] if hosts else []
    offer = Peer(a, "dc", "offer", str(nbytes), str(timeout), *extra)
    answer = Peer(b, "dc", "answer", str(nbytes), str(timeout), *extra)
    sdp = offer.get()["sdp"]
    if not hosts:
        assert "10.10.0.1" in sdp and "127.0.0.1" not in sdp
    answer.put(sdp=sdp)
    reply = answer.get()["sdp"]
    offer.put(sdp=tamper(reply) if tamper else reply)
    return offer, answer


def test_data_channel_carries_20_mb_with_backpressure_and_close_is_seen(lan):
    t0 = time.monotonic()
    offer, answer = _connect_dc(lan, DC_BYTES)
    ca, cb = offer.get(), answer.get()
    assert ca["event"] == cb["event"] == "connected"
    # Each side sees the other's SDP fingerprint: what the signaling layer signs.
    assert ca["remote_fp"] == cb["local_fp"] and cb["remote_fp"] == ca["local_fp"]
    assert ca["max_message_size"] == 262144
    sent, got = offer.get(60), answer.get(60)
    assert got["received"] == DC_BYTES
    assert sent["sha256"] == got["sha256"] == sent["reply"]
    # The receiver's close reached the sender after its last message.
    assert sent["after_reply"] is None
    assert sent["states"] == ["connected", "closed"] and got["states"] == ["connected",
                                                                           "closed"]
    # Backpressure: never more than the high-water mark plus one message queued.
    assert sent["max_buffered"] <= sent["high_water"] + 64 * 1024
    offer.finish()
    answer.finish()
    print(f"data channel: {DC_BYTES / 1e6:.0f} MB in {time.monotonic() - t0:.1f} s incl. setup")


def test_data_channel_over_loopback_only(netlab: NetLab):
    """aioice skips 127.0.0.1; IceConfig.host_addresses brings it back (one machine, demo)."""
    host = netlab.host("solo", None)  # only `lo` in this namespace
    offer, answer = _connect_dc((host, host), 1024 * 1024, hosts="127.0.0.1")
    assert offer.get()["event"] == answer.get()["event"] == "connected"
    sent, got = offer.get(), answer.get()
    assert sent["sha256"] == got["sha256"] and got["received"] == 1024 * 1024
    offer.finish()
    answer.finish()


def test_data_channel_refuses_a_tampered_dtls_fingerprint(lan):
    """A relay that swaps the answer's fingerprint (signaling MITM) gets no channel."""
    def tamper(sdp: str) -> str:
        lines = sdp.split("\r\n")
        for i, line in enumerate(lines):
            if line.startswith("a=fingerprint:"):
                algo, value = line.split(" ", 1)
                first = "00" if not value.startswith("00") else "11"
                lines[i] = f"{algo} {first}{value[2:]}"
        return "\r\n".join(lines)

    t0 = time.monotonic()
    offer, answer = _connect_dc(lan, 1024, tamper, timeout=4)
    res = offer.get()
    # The offer side checks the (tampered) fingerprint and fails at once ...
    assert res == {"error": "PeerUnreachable", "states": ["failed"],
                   "message": "the connection to the peer failed (ICE or DTLS)"}, res
    assert time.monotonic() - t0 < 3
    # ... the answer side hears no alert (aiortc sends none) and gives up at its timeout.
    res_b = answer.get()
    assert res_b["error"] == "PeerUnreachable" and "connected" not in res_b["states"]
    offer.finish()
    answer.finish()


def _lane(lan, *, server_expects=None, client_expects=None, nbytes=LANE_BYTES):
    a, b = lan
    server, client = Peer(a, "lane", "server", str(nbytes)), Peer(b, "lane", "client",
                                                                  str(nbytes))
    sfp, cfp = server.get()["fingerprint"], client.get()["fingerprint"]
    server.put(host=a.ip, expect=server_expects or cfp)
    port = server.get()["port"]
    client.put(host=a.ip, port=port, expect=client_expects or sfp)
    return server, client, sfp, cfp


def test_tls_lane_over_the_bridge_with_pinned_certificates(lan):
    server, client, sfp, cfp = _lane(lan)
    done, got = client.get(), server.get()
    assert got["received"] == LANE_BYTES and got["peer"] == cfp
    assert done["sha256"] == got["sha256"] == done["reply"]
    server.finish()
    client.finish()
    print(f"lane: {LANE_BYTES / done['seconds'] / 1e6:.0f} MB/s between namespaces")


def test_tls_lane_server_refuses_an_unexpected_client_certificate(lan):
    server, client, _, _ = _lane(lan, server_expects="ab" * 32)
    res, ref = client.get(), server.get()
    assert res["error"] == "PeerNotPaired" and "refused this device's lane certificate" \
        in res["message"]
    assert ref["refused"] == "PeerNotPaired" and "not one a paired session announced" \
        in ref["message"]
    server.finish()
    client.finish()


def test_tls_lane_client_refuses_a_server_with_another_certificate(lan):
    server, client, _, _ = _lane(lan, client_expects="cd" * 32)
    res, ref = client.get(), server.get()
    assert res["error"] == "PeerNotPaired" and "not the signed fingerprint" in res["message"]
    assert ref["refused"] == "PeerNotPaired" and "expected another fingerprint" \
        in ref["message"]
    server.finish()
    client.finish()


if __name__ == "__main__" and sys.argv[1:2] == ["peer"]:
    kind, role, nbytes = sys.argv[2], sys.argv[3], int(sys.argv[4])
    if kind == "dc":
        hosts = tuple(sys.argv[6].split(",")) if len(sys.argv) > 6 else None
        asyncio.run(dc_peer(role, nbytes, float(sys.argv[5]), hosts))
    else:
        asyncio.run(lane_peer(role, nbytes))
