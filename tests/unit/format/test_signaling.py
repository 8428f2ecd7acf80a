"""Signed session offers/answers: every refusal the signaling path needs, and rotating tags."""

from __future__ import annotations

import os
import time

import pytest

from p2pbackup.crypto.identity import DeviceIdentity, verify_signature
from p2pbackup.crypto.tags import discovery_tag, which_device
from p2pbackup.errors import PeerNotPaired, RemoteProtocolError
from p2pbackup.format.membership import OWNER, PARTNER, Member, Membership
from p2pbackup.format.signaling import (ANSWER, OFFER, ReplayGuard, SessionDescription,
                                        check_description, sign_description)

A, B, GONE, STRANGER, FRIEND = (DeviceIdentity.generate() for _ in range(5))
M = Membership(3, b"x", 1, (Member(A.device_id, A.public_key, "a", OWNER),
                            Member(B.device_id, B.public_key, "b", OWNER),
                            Member(FRIEND.device_id, FRIEND.public_key, "f", PARTNER)),
               removed=(GONE.device_id,))
NOW = time.time_ns()


def offer(sender: DeviceIdentity, *, to: str | None = None, at: int = NOW,
          nonce: bytes | None = None, kind: str = OFFER, reply_to: bytes = b"") -> bytes:
    desc = SessionDescription(kind, sender.device_id, to or B.device_id,
                              "v=0\r\na=fingerprint:sha-256 AA:BB\r\n", at,
                              nonce or os.urandom(16), reply_to)
    return sign_description(desc, sender.sign)


def check(raw: bytes, guard: ReplayGuard | None = None, **kw) -> SessionDescription:
    kw.setdefault("expect", OFFER)
    return check_description(raw, me=B.device_id, membership=M, now_ns=NOW,
                             guard=guard or ReplayGuard(), verify=verify_signature, **kw)


def test_a_member_offer_is_accepted_and_its_answer_must_reply_to_it():
    desc = check(offer(A))
    assert desc.sender == A.device_id and "fingerprint" in desc.sdp
    ans = sign_description(SessionDescription(ANSWER, A.device_id, B.device_id, "v=0", NOW,
                                              os.urandom(16), desc.nonce), A.sign)
    assert check(ans, expect=ANSWER, reply_to=desc.nonce).kind == ANSWER
    with pytest.raises(PeerNotPaired, match="another offer"):
        check(ans, expect=ANSWER, reply_to=os.urandom(16))


@pytest.mark.parametrize("raw,why", [
    (lambda: offer(GONE), "removed"),
    (lambda: offer(STRANGER), "not paired"),
    (lambda: offer(A, to=A.device_id), "meant for another"),
    (lambda: offer(A, at=NOW - 10 * 60 * 10**9), "stale"),
    (lambda: offer(A, at=NOW + 10 * 60 * 10**9), "stale"),
])
def test_refusals(raw, why):
    with pytest.raises(PeerNotPaired, match=why):
        check(raw())


def test_a_forged_signature_and_a_replay_are_refused():
    from p2pbackup.format.records import Signed

    good = offer(A)
    s = Signed.decode(good, "x")
    forged = Signed(s.body, s.device, STRANGER.sign(s.body)).encode()
    with pytest.raises(PeerNotPaired, match="bad signature"):
        check(forged)
    guard = ReplayGuard()
    check(good, guard)
    with pytest.raises(PeerNotPaired, match="replayed"):
        check(good, guard)


def test_partners_may_be_refused_and_garbage_is_a_protocol_error():
    with pytest.raises(PeerNotPaired, match="storage partner"):
        check(offer(FRIEND), allow_partners=False)
    for junk in (b"", b"\x81\xa1v\x01", os.urandom(200)):
        with pytest.raises(RemoteProtocolError):
            check(junk)
    with pytest.raises(RemoteProtocolError, match="expected a session offer"):
        check(offer(A, kind=ANSWER))


def test_replay_guard_is_bounded():
    g = ReplayGuard(size=10)
    for i in range(100):
        assert g.first_time(bytes([i]) * 16)
    assert len(g._seen) == 10


def test_discovery_tags_rotate_and_name_the_device_only_to_members():
    key, other = os.urandom(32), os.urandom(32)
    t0 = discovery_tag(key, A.device_id, 1_000_000.0)
    assert discovery_tag(key, A.device_id, 1_000_000.0 + 300) != t0
    assert discovery_tag(key, B.device_id, 1_000_000.0) != t0
    devices = [B.device_id, A.device_id]
    assert which_device(key, t0, devices, 1_000_000.0 + 200) == A.device_id  # clock skew
    assert which_device(key, t0, devices, 1_000_000.0 + 1000) is None       # too old
    assert which_device(other, t0, devices, 1_000_000.0) is None            # another account


def test_the_recovery_signer_may_offer_to_any_device_and_nobody_else_may():
    from dataclasses import replace

    from p2pbackup.crypto.identity import device_id_for

    signer = DeviceIdentity.generate()
    m = replace(M, recovery_key=signer.public_key)
    rid = device_id_for(signer.public_key)

    def check_m(raw: bytes, **kw) -> SessionDescription:
        return check_description(raw, me=B.device_id, membership=m, now_ns=NOW,
                                 guard=ReplayGuard(), verify=verify_signature,
                                 expect=kw.pop("expect", OFFER),
                                 recovery={rid: signer.public_key}, **kw)

    def to_anyone(sender: DeviceIdentity, kind: str = OFFER) -> bytes:
        return sign_description(SessionDescription(kind, sender.device_id, "", "v=0", NOW,
                                                   os.urandom(16)), sender.sign)

    assert check_m(to_anyone(signer)).sender == rid          # a device holding the code
    with pytest.raises(PeerNotPaired, match="meant for another"):
        check_m(to_anyone(A))                                 # members name the recipient
    with pytest.raises(PeerNotPaired, match="not paired"):
        check_m(to_anyone(signer, ANSWER), expect=ANSWER)     # it only ever offers
    with pytest.raises(PeerNotPaired, match="not paired"):   # without the rule: a stranger
        check(to_anyone(signer))
    forged = SessionDescription(OFFER, rid, "", "v=0", NOW, os.urandom(16))
    with pytest.raises(PeerNotPaired, match="bad signature"):
        check_m(sign_description(forged, STRANGER.sign))
