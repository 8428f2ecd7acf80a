"""Transports for the peer sync protocol, all speaking ordered, reliable binary messages.

- `datachannel.PeerLink`: one aiortc RTCPeerConnection with one data channel (any network,
  through NAT with STUN/TURN); pure-Python SCTP, ~25-30 MB/s at a full core per side.
- `tls_lane`: the direct lane, TLS 1.3 over TCP with fingerprint-pinned self-signed
  certificates, for peers that reach each other directly (LAN); hundreds of MB/s.
- `memory.memory_pair()`: an in-memory pair for tests of the layers above.

Import the submodules directly: importing this package does not load aiortc.
"""

from .link import CLOSED, CONNECTED, CONNECTING, FAILED, MessageLink

__all__ = ["CLOSED", "CONNECTED", "CONNECTING", "FAILED", "MessageLink"]
