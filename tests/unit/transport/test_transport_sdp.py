"""SDP fingerprint extraction, ICE configuration and the aioice host-address hook (no network)."""

from __future__ import annotations

import hashlib

import aioice.ice
import pytest

from p2pbackup.errors import RemoteProtocolError
from p2pbackup.transport import datachannel
from p2pbackup.transport.datachannel import (Fingerprint, IceConfig, IceServer, PeerLink,
                                             sdp_fingerprint, sdp_fingerprints)

SHA256 = ":".join(f"{b:02X}" for b in hashlib.sha256(b"a").digest())
SHA256_B = ":".join(f"{b:02X}" for b in hashlib.sha256(b"b").digest())
SHA384 = ":".join(f"{b:02X}" for b in hashlib.sha384(b"a").digest())

SDP = "\r\n".join([
    "v=0", "o=- 1 1 IN IP4 0.0.0.0", "s=-", "t=0 0",
    f"a=fingerprint:SHA-256 {SHA256.lower()}",
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
    "a=max-message-size:262144",
    f"a=fingerprint:sha-256 {SHA256}",
    f"a=fingerprint:sha-384 {SHA384}",
    "a=setup:actpass", ""])


def test_extracts_each_distinct_fingerprint_normalized():
    assert sdp_fingerprints(SDP) == [Fingerprint("sha-256", SHA256),
                                     Fingerprint("sha-384", SHA384)]
    assert sdp_fingerprint(SDP) == Fingerprint("sha-256", SHA256)
    assert str(sdp_fingerprint(SDP, "sha-384")) == f"sha-384 {SHA384}"


def test_lf_line_endings_and_trailing_space():
    sdp = SDP.replace("\r\n", "\n").replace(SHA384, SHA384 + "  ")
    assert sdp_fingerprints(sdp)[1] == Fingerprint("sha-384", SHA384)


@pytest.mark.parametrize("sdp", [
    "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n",  # none
    SDP.replace("a=setup", f"a=fingerprint:sha-256 {SHA256_B}\r\na=setup"),  # two differ
    SDP.replace(f"sha-256 {SHA256}", f"sha-256 {SHA256}:ZZ").replace(
        f"SHA-256 {SHA256.lower()}", "SHA-256 nothex"),  # malformed lines are not fingerprints
])
def test_missing_or_ambiguous_sha256_is_refused(sdp):
    with pytest.raises(RemoteProtocolError):
        sdp_fingerprint(sdp)


def test_not_fooled_by_fingerprint_text_inside_other_lines():
    sdp = f"v=0\r\na=x-note:a=fingerprint:sha-256 {SHA256}\r\n"
    assert sdp_fingerprints(sdp) == []


def test_host_address_hook_is_scoped_to_the_context():
    datachannel._aiortc()  # installs it (aiortc is imported at the first connection)
    token = datachannel._host_addresses.set(("127.0.0.1", "::1", "10.0.0.1"))
    try:
        assert aioice.ice.get_host_addresses(True, False) == ["127.0.0.1", "10.0.0.1"]
        assert aioice.ice.get_host_addresses(False, True) == ["::1"]
    finally:
        datachannel._host_addresses.reset(token)
    assert "127.0.0.1" not in aioice.ice.get_host_addresses(True, True)  # aioice's default


def test_ice_config_never_falls_back_to_a_public_stun_server():
    conf = datachannel._rtc_configuration(IceConfig())
    assert conf.iceServers == []
    conf = datachannel._rtc_configuration(IceConfig(
        servers=(IceServer("turn:10.1.0.1:3478", "p2p", "secret"),), relay_only=True))
    assert conf.iceServers[0].urls == "turn:10.1.0.1:3478"
    assert conf.iceServers[0].credential == "secret"
    assert conf.iceTransportPolicy.value == "relay"


async def test_offer_carries_the_certificate_fingerprint_without_touching_the_network():
    # No host addresses and no ICE servers: aioice binds no socket and sends nothing.
    link = PeerLink(IceConfig(host_addresses=()))
    try:
        offer = await link.create_offer()
        assert "m=application" in offer and "a=candidate" not in offer
        assert link.local_fingerprint() == sdp_fingerprint(offer)
        cert = link._pc._RTCPeerConnection__certificates[0]
        fps = {f.algorithm: f.value for f in cert.getFingerprints()}
        assert fps["sha-256"] == link.local_fingerprint().value
    finally:
        await link.close()
    assert link.state == "closed"


@pytest.mark.parametrize("bad", ["", "hello", "v=0\r\nm=audio 9 RTP/AVP 0\r\n",
                                 SDP.replace("a=fingerprint", "a=fingerprinx")])
async def test_garbage_offer_is_a_remote_protocol_error(bad):
    link = PeerLink(IceConfig(host_addresses=()))
    try:
        with pytest.raises(RemoteProtocolError):
            await link.accept_offer(bad)
    finally:
        await link.close()


def test_aiortc_is_imported_at_the_first_connection_not_before():
    import subprocess
    import sys

    code = ("import sys, p2pbackup.transport.datachannel as d, p2pbackup.session; "
            "assert 'aiortc' not in sys.modules; d._aiortc(); assert 'aiortc' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
