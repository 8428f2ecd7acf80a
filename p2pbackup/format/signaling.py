"""Signed session offers and answers: what travels over an untrusted signaling path.

Each side signs its SDP (which holds its DTLS fingerprint) with its device key, together with
who it is for, a time and a random nonce. The receiver checks the signature against the key
the membership record lists for the sender, and refuses unknown, removed, stale, misdirected
or replayed messages. Pure: bytes in, a checked record or a one-line reason out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import PeerNotPaired, RemoteProtocolError
from .membership import PARTNER, Membership
from .records import RECORD_VERSION, SESSION_SIG, Signed, _need, _pack, _unpack

OFFER, ANSWER = "offer", "answer"
MAX_SKEW_NS = 120 * 10**9   # clocks of a person's devices agree within two minutes


@dataclass(frozen=True, slots=True)
class SessionDescription:
    """One side's signed half of a session setup."""

    kind: str            # offer or answer
    sender: str          # device id
    recipient: str       # device id
    sdp: str
    time_ns: int
    nonce: bytes         # 16 random bytes; an answer echoes the offer's in `reply_to`
    reply_to: bytes = b""

    def encode(self) -> bytes:
        return _pack({"v": RECORD_VERSION, "kind": self.kind, "from": self.sender,
                      "to": self.recipient, "sdp": self.sdp, "time": self.time_ns,
                      "nonce": self.nonce, "re": self.reply_to})

    @classmethod
    def decode(cls, data: bytes, what: str = "session description") -> "SessionDescription":
        obj = _unpack(data, what)
        return cls(_need(obj, "kind", str, what), _need(obj, "from", str, what),
                   _need(obj, "to", str, what), _need(obj, "sdp", str, what),
                   _need(obj, "time", int, what), _need(obj, "nonce", bytes, what),
                   bytes(obj.get("re", b"")))


def sign_description(desc: SessionDescription, sign: Callable[[bytes], bytes]) -> bytes:
    """The signed encoding to send over signaling."""
    return Signed.make(SESSION_SIG, desc.encode(), desc.sender, sign).encode()


class ReplayGuard:
    """Remembers recent nonces (bounded) so a captured offer cannot be played again."""

    def __init__(self, size: int = 4096) -> None:
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._size = size

    def first_time(self, nonce: bytes) -> bool:
        if nonce in self._seen:
            return False
        self._seen[nonce] = None
        if len(self._seen) > self._size:
            self._seen.popitem(last=False)
        return True


def check_description(raw: bytes, *, me: str, membership: Membership, now_ns: int,
                      guard: ReplayGuard, verify: Callable[[bytes, bytes, bytes], bool],
                      expect: str, reply_to: bytes = b"",
                      allow_partners: bool = True,
                      recovery: Mapping[str, bytes] | None = None) -> SessionDescription:
    """Check a received offer or answer; raise PeerNotPaired or RemoteProtocolError.

    `recovery` (device id -> public key of a recovery signer: the membership's, or for a
    storage partner those its accounts' rosters name) admits an offer signed with the
    recovery code's key, sent to any device: a new device recovering from a peer.
    """
    try:
        signed = Signed.decode(raw, "session description")
        desc = SessionDescription.decode(signed.body)
    except Exception as exc:  # any decoding problem of untrusted bytes is the peer's
        raise RemoteProtocolError(f"a malformed session {expect} arrived ({exc})") from None
    if desc.kind != expect:
        raise RemoteProtocolError(f"expected a session {expect}, got {desc.kind!r}")
    if signed.device != desc.sender:
        raise RemoteProtocolError("a session description signed by another device than its "
                                  "sender")
    who = desc.sender[:12]
    if desc.sender in membership.removed:
        raise PeerNotPaired(f"refused device {who}: it was removed from the account")
    member = membership.member(desc.sender)
    recovering = recovery is not None and desc.sender in recovery and expect == OFFER
    if member is None and not recovering:
        raise PeerNotPaired(f"refused device {who}: it is not paired with this account")
    if member is not None and member.role == PARTNER and not allow_partners:
        raise PeerNotPaired(f"refused device {who}: a storage partner cannot open this session")
    key = member.public_key if member is not None else (recovery or {})[desc.sender]
    if not signed.verifies(SESSION_SIG, key, verify):
        raise PeerNotPaired(f"refused a session {expect} claiming to be device {who}: bad "
                            "signature")
    if desc.recipient != me and not (recovering and desc.recipient == ""):
        raise PeerNotPaired(f"refused a session {expect} from {who} meant for another device")
    if abs(now_ns - desc.time_ns) > MAX_SKEW_NS:
        raise PeerNotPaired(f"refused a stale session {expect} from {who} (time off by "
                            f"{abs(now_ns - desc.time_ns) / 1e9:.0f} s)")
    if expect == ANSWER and desc.reply_to != reply_to:
        raise PeerNotPaired(f"refused a session answer from {who} to another offer")
    if len(desc.nonce) != 16 or not guard.first_time(desc.nonce):
        raise PeerNotPaired(f"refused a replayed session {expect} from {who}")
    return desc
