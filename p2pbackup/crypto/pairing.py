"""Pairing a new device with a set-up one: SPAKE2 on a short code, as a sans-I/O state machine.

Bytes in, events and bytes out (the h11 shape): the transport (mDNS rendezvous or the broker's
mailbox) only moves bytes, so every transition is tested by feeding bytes. The protocol:

    joiner -> host   hello   {pake}                  SPAKE2 message A
    host -> joiner   pake    {pake}                  SPAKE2 message B; both now hold K
    joiner -> host   join    {box}  k_join, nonce 0  the joiner's payload (key confirmation)
    host -> joiner   welcome {box}  k_host, nonce 0  the host's payload (account key, records)
    joiner -> host   done    {box}  k_join, nonce 1  hash of the whole transcript
    either           error   {reason, msg}

Each frame is a 4-byte big-endian length and a msgpack map with "v" (version) and "t" (type).
A host machine serves one connection. Only its own key confirmation failing (Failed.wrong_code:
the join box does not open, so a guess was made) or its expiry speaks about the code; the
transport gives each connection a fresh machine and decides what uses the code up (see
pairing_link). What a peer *says* (an error frame) never carries a verdict about the host's code.
"""

from __future__ import annotations

import difflib
import enum
import hashlib
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
from nacl import bindings
from nacl.exceptions import CryptoError
from spake2 import SPAKE2_A, SPAKE2_B
from spake2.ed25519_basic import NotOnCurve
from spake2.spake2 import SPAKEError

from p2pbackup.crypto.kdf import hkdf_sha256
from p2pbackup.crypto.wordlist import EVEN_WORDS, ODD_WORDS
from p2pbackup.errors import LocalProtocolError, PairingFailed

PROTOCOL_VERSION = 1
MAX_FRAME = 16 * 1024 * 1024
# What accept() takes: device records and keys are a few KiB at most, and a bound well under
# MAX_FRAME keeps every frame we send within what the peer reads.
MAX_PAYLOAD = 1024 * 1024
# What JoinerPairing takes: a device id, key and name (~150 bytes). Everything a host reads
# comes before or right after the joiner proved the code, so the host's frames are bounded by
# it: a stranger cannot make a host buffer more than this per connection.
MAX_JOIN_PAYLOAD = 64 * 1024
_HOST_MAX_FRAME = MAX_JOIN_PAYLOAD + 1024  # the join box's nonce, tag and msgpack map
# The lifetime callers give a code (expires_at = now + CODE_LIFETIME).
CODE_LIFETIME = 600.0
EXAMPLE_CODE = "7-guitarist-revenge"

JOINER_ID = b"p2pbackup-pair-joiner"
HOST_ID = b"p2pbackup-pair-host"

_NONCE_SIZE = bindings.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
_TAG_SIZE = bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES
_PAKE_MESSAGE_SIZE = 33  # spake2's side byte + an Ed25519 group element
_MAX_SHOWN = 200  # characters of the peer's error text we show
_LABEL = b"p2pbackup pair v1"
_ODD = frozenset(ODD_WORDS)
_EVEN = frozenset(EVEN_WORDS)
_CODE_SHAPE = re.compile(r"([0-9]{1,3})[\s-]+([a-z]+)[\s-]+([a-z]+)")
_UNPACK_LIMITS = dict(max_str_len=1 << 16, max_bin_len=MAX_FRAME, max_array_len=1 << 10,
                      max_map_len=1 << 8, max_ext_len=1 << 16)


# --- codes ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PairingCode:
    """A parsed pairing code: nameplate 1..999 and two words, e.g. 7 and "guitarist-revenge"."""

    nameplate: int
    words: str

    @property
    def text(self) -> str:
        """The normalised code, which is also the SPAKE2 password."""
        return f"{self.nameplate}-{self.words}"

    def __str__(self) -> str:
        return self.text


def make_code(nameplate: int | None = None) -> str:
    """Return a fresh random code, e.g. `7-guitarist-revenge` (magic-wormhole's word order);
    its number is `nameplate` when a mailbox allocated one (1..999), else random."""
    if nameplate is None:
        nameplate = secrets.randbelow(999) + 1
    elif not 1 <= nameplate <= 999:
        raise ValueError(f"a pairing code's number is 1..999, not {nameplate}")
    return f"{nameplate}-{secrets.choice(ODD_WORDS)}-{secrets.choice(EVEN_WORDS)}"


def qr_text(code: str) -> str:
    """What a pairing code's QR code holds (the terminal's and the web console's)."""
    return f"p2pbackup:pair:{code}"


def parse_code(text: str | PairingCode) -> PairingCode:
    """Parse a code as a person typed it (any case, spaces around); PairingFailed if malformed."""
    if isinstance(text, PairingCode):
        return text
    match = _CODE_SHAPE.fullmatch(text.strip().lower())
    if match is None or not 1 <= int(match[1]) <= 999:
        shown = _one_line(text.strip(), 40)
        raise PairingFailed(f"{shown!r} is not a pairing code; a pairing code looks like "
                            f"{EXAMPLE_CODE}")
    nameplate, first, second = int(match[1]), match[2], match[3]
    if first in _EVEN and second in _ODD:
        raise PairingFailed(f"the words of the pairing code are swapped: did you mean "
                            f"{nameplate}-{second}-{first}?")
    for word, words, place in ((first, _ODD, "first"), (second, _EVEN, "second")):
        if word in words:
            continue
        if word in _ODD or word in _EVEN:
            raise PairingFailed(f"{word!r} cannot be the {place} word of a pairing code; check "
                                f"the code (it looks like {EXAMPLE_CODE})")
        close = difflib.get_close_matches(word, sorted(words), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PairingFailed(f"{word!r} is not a pairing code word{hint}; check the spelling")
    return PairingCode(nameplate, f"{first}-{second}")


def rendezvous_tag(code: str | PairingCode) -> str:
    """Hex tag the host advertises over mDNS; derived from the nameplate only, never the words."""
    # The tag is public on the LAN: anything derived from the words would let an eavesdropper
    # test all 65536 word pairs offline, which is exactly what SPAKE2 exists to prevent.
    nameplate = parse_code(code).nameplate
    return hkdf_sha256(str(nameplate).encode(), salt=b"",
                       info=_LABEL + b" rendezvous tag", length=8).hex()


# --- events and states ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PakeDone:
    """Both sides hold the PAKE key; show `verifier` (e.g. "482 913") to the user."""

    verifier: str


@dataclass(frozen=True, slots=True)
class JoinRequest:
    """Host: the joiner proved it knows the code; call accept() or reject()."""

    payload: bytes
    verifier: str


@dataclass(frozen=True, slots=True)
class Welcome:
    """Joiner: the host's payload arrived; store it, then call confirm()."""

    payload: bytes
    verifier: str


@dataclass(frozen=True, slots=True)
class Completed:
    """Host: the joiner confirmed the whole exchange; only now record the new member."""


@dataclass(frozen=True, slots=True)
class Failed:
    """Pairing is over; `reason` is one line for the user."""

    reason: str
    wrong_code: bool = False
    expired: bool = False


Event = PakeDone | JoinRequest | Welcome | Completed | Failed


class State(enum.Enum):
    WAIT_HELLO = "wait-hello"        # host: nobody has tried the code yet
    WAIT_PAKE = "wait-pake"          # joiner: hello sent
    WAIT_JOIN = "wait-join"          # host: pake sent
    WAIT_WELCOME = "wait-welcome"    # joiner: join sent
    WAIT_DECISION = "wait-decision"  # host: JoinRequest emitted, the application decides
    WAIT_CONFIRM = "wait-confirm"    # joiner: Welcome emitted, the application stores it
    WAIT_DONE = "wait-done"          # host: welcome sent
    DONE = "done"
    FAILED = "failed"


# --- internals --------------------------------------------------------------------------------

class _Stop(Exception):
    """Ends the session: `failed` for our user, `notify` = (reason, msg) for the peer, if any."""

    def __init__(self, failed: Failed, notify: tuple[str, str] | None) -> None:
        super().__init__(failed.reason)
        self.failed = failed
        self.notify = notify


def _one_line(text: str, limit: int = _MAX_SHOWN) -> str:
    # The peer's text reaches a terminal: no control characters, no bidi overrides, no newlines.
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text[:limit * 4])
    cleaned = " ".join(cleaned.split())
    return cleaned if len(cleaned) <= limit else cleaned[:limit - 1] + "…"


def _malformed(detail: str) -> _Stop:
    return _Stop(Failed(f"pairing failed: the other device sent a malformed message ({detail})"),
                 ("malformed", f"malformed message ({detail})"))


def _field(message: dict[Any, Any], name: str, kind: type) -> Any:
    if name not in message:
        raise _malformed(f"missing field {name!r}")
    value = message[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _malformed(f"field {name!r} has the wrong type")
    return value


def _frame(t: str, **fields: Any) -> bytes:
    body = msgpack.packb({"v": PROTOCOL_VERSION, "t": t, **fields}, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def _nonce(counter: int) -> bytes:
    # Each direction has its own key, so a per-direction counter never repeats a (key, nonce).
    return counter.to_bytes(_NONCE_SIZE, "big")


def _peer_failure(reason: str, msg: str) -> Failed:
    detail = _one_line(msg)
    if reason == "wrong-code":
        return Failed("pairing failed: the other device says the code was wrong; ask for a new "
                      "code", wrong_code=True)
    if reason == "expired":
        return Failed("pairing failed: the pairing code expired on the other device; ask for a "
                      "new code", expired=True)
    if reason == "rejected":
        return Failed("pairing failed: the other device declined" + (f": {detail}" if detail
                                                                     else ""))
    return Failed(f"pairing failed: the other device stopped: {detail or _one_line(reason, 40)}")


class _PairingMachine:
    """What host and joiner share: framing, the PAKE keys, boxes and failure handling."""

    _expected: dict[State, str]
    _max_frame = MAX_FRAME

    def __init__(self, code: PairingCode, spake: SPAKE2_A | SPAKE2_B, state: State) -> None:
        self.code = code
        self.state = state
        self.verifier: str | None = None
        self.failure: Failed | None = None
        self._spake = spake
        self._my_pake = spake.start()
        self._inbuf = bytearray()
        self._outbuf = bytearray()
        self._transcript = b""
        self._k_join = b""
        self._k_host = b""

    @property
    def finished(self) -> bool:
        """True once DONE or FAILED; all later input is ignored."""
        return self.state in (State.DONE, State.FAILED)

    def data_to_send(self) -> bytes:
        """Bytes to write to the peer (drains the queue)."""
        out = bytes(self._outbuf)
        self._outbuf.clear()
        return out

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the peer; return the events they complete (partial frames wait)."""
        if self.finished:
            return []
        events: list[Event] = []
        try:
            self._check_expired()
            self._inbuf += data
            while not self.finished:
                message = self._next_message()
                if message is None:
                    break
                events.extend(self._dispatch(message))
        except _Stop as stop:
            events.append(self._fail(stop))
        return events

    def _check_expired(self) -> None:
        """Hosts raise _Stop once their code has expired; joiners do not expire by themselves."""

    def _fail(self, stop: _Stop) -> Failed:
        self.state = State.FAILED
        self.failure = stop.failed
        self._inbuf.clear()
        self._k_join = self._k_host = b""
        if stop.notify is not None:
            reason, msg = stop.notify
            self._outbuf += _frame("error", reason=reason, msg=_one_line(msg))
        return stop.failed

    def _stop_locally(self, reason: str, failed: Failed, msg: str) -> None:
        # A decision of our own application (reject, cancel): the peer hears it as `reason`.
        self._fail(_Stop(failed, (reason, msg)))

    def _require(self, state: State, action: str, after: str) -> None:
        if self.state is State.FAILED and self.failure is not None:
            raise PairingFailed(self.failure.reason)
        if self.state is not state:
            raise LocalProtocolError(f"pairing: {action}() is only valid after {after} (the "
                                     f"pairing is in state {self.state.value})")

    def _next_message(self) -> dict[Any, Any] | None:
        if len(self._inbuf) < 4:
            return None
        length = int.from_bytes(self._inbuf[:4], "big")
        if length > self._max_frame:
            # Fail on the header alone: never wait to buffer 4 GiB a broken peer announced.
            raise _Stop(Failed(f"pairing failed: the other device sent a {length}-byte message "
                               f"(at most {self._max_frame} are allowed)"),
                        ("too-large", f"message of {length} bytes is too large"))
        if len(self._inbuf) < 4 + length:
            return None
        body = bytes(self._inbuf[4:4 + length])
        del self._inbuf[:4 + length]
        try:
            message = msgpack.unpackb(body, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
        except (ValueError, TypeError, msgpack.UnpackException):
            raise _malformed("not valid msgpack") from None
        if not isinstance(message, dict):
            raise _malformed("not a map")
        version = _field(message, "v", int)
        if version > PROTOCOL_VERSION:
            raise _Stop(Failed(f"pairing failed: the other device runs a newer pairing protocol "
                               f"(v{version}); upgrade p2pbackup"),
                        ("unsupported-version",
                         f"this device speaks pairing protocol v{PROTOCOL_VERSION}; upgrade it"))
        if version < 1:
            raise _malformed(f"unknown version v{version}")
        _field(message, "t", str)
        return message

    def _dispatch(self, message: dict[Any, Any]) -> list[Event]:
        t = message["t"]
        if t == "error":
            reason = _field(message, "reason", str)
            msg = message.get("msg")
            raise _Stop(self._peer_failure(reason, msg if isinstance(msg, str) else ""), None)
        expected = self._expected.get(self.state)
        if t != expected:
            shown = _one_line(t, 40)
            if t not in ("hello", "pake", "join", "welcome", "done"):
                detail = f"an unknown message type {shown!r}"
            elif expected is None:
                detail = f"{shown!r} while this device waits for its user"
            else:
                detail = f"{shown!r} where {expected!r} was due (replayed or out of order)"
            raise _Stop(Failed(f"pairing failed: the other device sent {detail}"),
                        ("unexpected", f"unexpected message {shown!r}"))
        return self._handle(t, message)

    def _handle(self, t: str, message: dict[Any, Any]) -> list[Event]:
        raise NotImplementedError

    def _peer_failure(self, reason: str, msg: str) -> Failed:
        return _peer_failure(reason, msg)

    def _finish_pake(self, message: dict[Any, Any], msg_a: bytes | None = None) -> PakeDone:
        their = _field(message, "pake", bytes)
        if len(their) != _PAKE_MESSAGE_SIZE:
            raise _malformed("field 'pake' has the wrong length")
        try:
            key = self._spake.finish(their)
        # spake2 signals a bad element with its own errors, ValueError or NotOnCurve.
        except (SPAKEError, ValueError, NotOnCurve):
            raise _malformed("field 'pake' is not a valid SPAKE2 message") from None
        if msg_a is None:  # we are the host: their message is A
            msg_a, msg_b = their, self._my_pake
        else:
            msg_b = their
        self._transcript = hashlib.sha256(
            _LABEL + b"\0" + bytes([len(msg_a)]) + msg_a + bytes([len(msg_b)]) + msg_b).digest()
        self._k_join = hkdf_sha256(key, salt=self._transcript, info=_LABEL + b" joiner->host")
        self._k_host = hkdf_sha256(key, salt=self._transcript, info=_LABEL + b" host->joiner")
        digits = int.from_bytes(hkdf_sha256(key, salt=self._transcript,
                                            info=_LABEL + b" verifier", length=8), "big")
        number = f"{digits % 1_000_000:06d}"
        self.verifier = f"{number[:3]} {number[3:]}"
        return PakeDone(self.verifier)

    def _aad(self, t: str) -> bytes:
        # The message type and the PAKE transcript: a box opens only in its own slot of its own
        # session.
        return _LABEL + b" " + t.encode() + b"\0" + self._transcript

    def _seal(self, t: str, key: bytes, counter: int, plaintext: bytes) -> bytes:
        """Return nonce || XChaCha20-Poly1305 ciphertext and tag."""
        nonce = _nonce(counter)
        return nonce + bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
            plaintext, self._aad(t), nonce, key)

    def _open(self, t: str, box: bytes, key: bytes, counter: int) -> bytes:
        """Open a box; raise CryptoError if it does not open, _Stop if it is misplaced."""
        if len(box) < _NONCE_SIZE + _TAG_SIZE:
            raise _malformed("field 'box' is too short")
        if box[:_NONCE_SIZE] != _nonce(counter):
            raise _Stop(Failed("pairing failed: the other device sent a replayed or out-of-order "
                               "message"), ("out-of-order", "replayed or out-of-order message"))
        return bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(
            box[_NONCE_SIZE:], self._aad(t), box[:_NONCE_SIZE], key)

    def _done_hash(self, join_box: bytes, welcome_box: bytes) -> bytes:
        return hashlib.sha256(_LABEL + b" done\0" + self._transcript + join_box
                              + welcome_box).digest()


# --- the two roles ----------------------------------------------------------------------------

class HostPairing(_PairingMachine):
    """The device already set up (`p2pbackup pair`); one attempt per instance."""

    _expected = {State.WAIT_HELLO: "hello", State.WAIT_JOIN: "join", State.WAIT_DONE: "done"}
    _max_frame = _HOST_MAX_FRAME

    def __init__(self, code: str | PairingCode, *, expires_at: float,
                 now: Callable[[], float] = time.monotonic) -> None:
        code = parse_code(code)
        super().__init__(code, SPAKE2_B(code.text.encode(), idA=JOINER_ID, idB=HOST_ID),
                         State.WAIT_HELLO)
        self.expires_at = expires_at
        self._now = now
        self._join_box = b""
        self._done_expected = b""

    def check_expiry(self) -> list[Event]:
        """Return [Failed(expired=True)] once the code has expired (call it periodically)."""
        if self.finished:
            return []
        try:
            self._check_expired()
        except _Stop as stop:
            return [self._fail(stop)]
        return []

    def accept(self, welcome_payload: bytes) -> None:
        """Send the welcome payload to the joiner; Completed follows once it confirms."""
        self._require(State.WAIT_DECISION, "accept", "a JoinRequest")
        if len(welcome_payload) > MAX_PAYLOAD:
            raise ValueError(f"the welcome payload is larger than {MAX_PAYLOAD} bytes")
        try:
            self._check_expired()
        except _Stop as stop:
            raise PairingFailed(self._fail(stop).reason) from None
        box = self._seal("welcome", self._k_host, 0, bytes(welcome_payload))
        self._done_expected = self._done_hash(self._join_box, box)
        self._outbuf += _frame("welcome", box=box)
        self.state = State.WAIT_DONE

    def reject(self, reason: str) -> None:
        """Refuse the joiner (or cancel before one came); tells the peer and burns the code."""
        if self.state is State.FAILED:
            return
        if self.state is State.DONE:
            raise LocalProtocolError("pairing: reject() after the pairing completed")
        shown = _one_line(reason)
        code = "rejected" if self.state is State.WAIT_DECISION else "cancelled"
        self._stop_locally(code, Failed(f"pairing failed: declined on this device ({shown})"),
                           shown)

    def _peer_failure(self, reason: str, msg: str) -> Failed:
        # A joiner has no verdict about this host's code to give: anyone on the LAN can send
        # "wrong-code" or "expired", and that must not end the code for everyone.
        return Failed(f"pairing failed: the other device stopped: "
                      f"{_one_line(msg) or _one_line(reason, 40)}")

    def _check_expired(self) -> None:
        if self._now() >= self.expires_at:
            raise _Stop(Failed("pairing failed: the pairing code expired; run `p2pbackup pair` "
                               "again for a new code", expired=True),
                        ("expired", "the pairing code expired"))

    def _handle(self, t: str, message: dict[Any, Any]) -> list[Event]:
        if t == "hello":
            done = self._finish_pake(message)
            self._outbuf += _frame("pake", pake=self._my_pake)
            self.state = State.WAIT_JOIN
            return [done]
        if t == "join":
            box = _field(message, "box", bytes)
            try:
                payload = self._open("join", box, self._k_join, 0)
            except CryptoError:
                # Key confirmation failed: the joiner used another code. One guess per code.
                raise _Stop(Failed("pairing failed: wrong code (the other device typed a "
                                   "different one); this code is now used up, run `p2pbackup "
                                   "pair` again for a new one", wrong_code=True),
                            ("wrong-code", "the code was wrong")) from None
            self._join_box = box
            self.state = State.WAIT_DECISION
            assert self.verifier is not None
            return [JoinRequest(payload, self.verifier)]
        # t == "done"
        try:
            confirmation = self._open("done", _field(message, "box", bytes), self._k_join, 1)
        except CryptoError:
            confirmation = b""
        if not secrets.compare_digest(confirmation, self._done_expected):
            raise _Stop(Failed("pairing failed: the other device's confirmation does not match "
                               "this exchange"), ("bad-confirmation", "confirmation mismatch"))
        self.state = State.DONE
        return [Completed()]


class JoinerPairing(_PairingMachine):
    """The new device (`p2pbackup pair CODE`); hello is queued on creation."""

    _expected = {State.WAIT_PAKE: "pake", State.WAIT_WELCOME: "welcome"}

    def __init__(self, code: str | PairingCode, joiner_payload: bytes) -> None:
        if len(joiner_payload) > MAX_JOIN_PAYLOAD:
            raise ValueError(f"the joiner payload is larger than {MAX_JOIN_PAYLOAD} bytes")
        code = parse_code(code)
        super().__init__(code, SPAKE2_A(code.text.encode(), idA=JOINER_ID, idB=HOST_ID),
                         State.WAIT_PAKE)
        self._payload = bytes(joiner_payload)
        self._join_box = b""
        self._welcome_box = b""
        self._outbuf += _frame("hello", pake=self._my_pake)

    def confirm(self) -> None:
        """Tell the host the welcome was stored; the joiner is then done."""
        self._require(State.WAIT_CONFIRM, "confirm", "a Welcome")
        done = self._done_hash(self._join_box, self._welcome_box)
        self._outbuf += _frame("done", box=self._seal("done", self._k_join, 1, done))
        self.state = State.DONE

    def cancel(self, reason: str) -> None:
        """Stop pairing (e.g. the verifiers differ) and tell the host; no-op once finished."""
        if self.finished:
            return
        shown = _one_line(reason)
        self._stop_locally("cancelled", Failed(f"pairing failed: cancelled on this device "
                                               f"({shown})"), shown)

    def _handle(self, t: str, message: dict[Any, Any]) -> list[Event]:
        if t == "pake":
            done = self._finish_pake(message, msg_a=self._my_pake)
            self._join_box = self._seal("join", self._k_join, 0, self._payload)
            self._outbuf += _frame("join", box=self._join_box)
            self.state = State.WAIT_WELCOME
            return [done]
        # t == "welcome"
        box = _field(message, "box", bytes)
        try:
            payload = self._open("welcome", box, self._k_host, 0)
        except CryptoError:
            raise _Stop(Failed("pairing failed: the other device's welcome message could not be "
                               "decrypted (tampered with, or from another session)"),
                        ("decrypt-failed", "welcome could not be decrypted")) from None
        self._welcome_box = box
        self.state = State.WAIT_CONFIRM
        assert self.verifier is not None
        return [Welcome(payload, self.verifier)]
