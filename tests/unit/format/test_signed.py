"""The signed envelope: what a signature covers, and why old (version 1) envelopes are still
read for some record types and not others."""

from __future__ import annotations

import itertools

import msgpack
import pytest

from p2pbackup.crypto.identity import DeviceIdentity, verify_signature
from p2pbackup.errors import IntegrityError, P2PError, UnsupportedFormat
from p2pbackup.format.header import FORMAT_VERSION, Kind, ObjectHeader
from p2pbackup.format.log import GENESIS, Head, Segment, SegmentPart
from p2pbackup.format.membership import OWNER, Member, Membership
from p2pbackup.format.records import (ANCHOR_SIG, HEAD_SIG, LEGACY_SIGNED, SIGNED_TYPES,
                                      DeviceRecord, Signed, Snapshot, SourceRoot,
                                      signed_message)
from p2pbackup.format.removal import Removal, read_removal, removal_object
from p2pbackup.format.signaling import OFFER, SessionDescription

DEV = DeviceIdentity.generate()


def _removal_body(body: bytes):
    signed = Signed(body, DEV.device_id, b"\0" * 64).encode()
    data = ObjectHeader(FORMAT_VERSION, Kind.REMOVAL, 0, len(signed)).encode() + signed
    return read_removal(data, lambda _d: DEV.public_key, lambda *_a: True)


BODIES = {
    "snapshot": Snapshot(5, DEV.device_id, "h", (SourceRoot("docs", "/d", b"t" * 32),), 3).encode(),
    "segment": Segment(DEV.device_id, 2, GENESIS, 5, (SegmentPart("docs", 0, b"x"),)).encode(),
    "head": Head(DEV.device_id, 2, b"s" * 32, "ab" * 32, 5).encode(),
    "device": DeviceRecord(DEV.device_id, DEV.public_key, "n", 5).encode(),
    "membership": Membership(1, b"", 0, (Member(DEV.device_id, DEV.public_key, "n", OWNER),),
                             time_ns=5).encode(),
    "removal": msgpack.packb({"v": 1, "device": DEV.device_id, "time": 5,
                              "names": ["packs/" + "a" * 64]}, use_bin_type=True),
    "session": SessionDescription(OFFER, DEV.device_id, "x" * 32, "sdp", 5,
                                  b"n" * 16).encode(),
}
DECODERS = {
    "snapshot": Snapshot.decode, "segment": Segment.decode, "head": Head.decode,
    "device": DeviceRecord.decode, "membership": Membership.decode, "removal": _removal_body,
    "session": SessionDescription.decode,
}


def test_every_type_read_in_the_old_envelope_has_a_body_and_a_decoder_here():
    assert set(BODIES) == set(DECODERS) == set(LEGACY_SIGNED)
    for sig_type, body in BODIES.items():
        DECODERS[sig_type](body)


@pytest.mark.parametrize("signed_as,read_as", [p for p in itertools.permutations(BODIES, 2)])
def test_an_old_envelope_body_of_one_type_does_not_decode_as_another(signed_as, read_as):
    """Why version-1 signatures are still accepted for these types: the body they signed
    cannot pass for another type's."""
    with pytest.raises((P2PError, KeyError, TypeError)):
        DECODERS[read_as](BODIES[signed_as])


@pytest.mark.parametrize("signed_as,read_as", [p for p in itertools.permutations(
    sorted(SIGNED_TYPES), 2)])
def test_a_signature_made_for_one_type_does_not_verify_as_another(signed_as, read_as):
    signed = Signed.decode(Signed.make(signed_as, b"body", DEV.device_id, DEV.sign).encode(), "x")
    assert signed.verifies(signed_as, DEV.public_key, verify_signature)
    assert not signed.verifies(read_as, DEV.public_key, verify_signature)
    # Nor as an old envelope's signature of the same body, for any type.
    old = Signed(signed.body, signed.device, signed.signature)
    assert not old.verifies(read_as, DEV.public_key, verify_signature)


def test_a_new_signed_message_never_decodes_as_an_old_body():
    for sig_type in SIGNED_TYPES:
        with pytest.raises(Exception):
            msgpack.unpackb(signed_message(sig_type, BODIES["head"]), strict_map_key=False)


def test_old_envelopes_count_only_where_the_type_allows_it():
    body = BODIES["head"]
    old = Signed.decode(Signed(body, DEV.device_id, DEV.sign(body)).encode(), "x")
    assert (old.version, old.type) == (1, "")
    assert old.verifies(HEAD_SIG, DEV.public_key, verify_signature)
    assert not old.verifies(ANCHOR_SIG, DEV.public_key, verify_signature)
    assert old.verifies(ANCHOR_SIG, DEV.public_key, verify_signature, legacy=True)
    assert not old.verifies(HEAD_SIG, DEV.public_key, verify_signature, legacy=False)


def test_envelopes_from_a_newer_version_are_named_as_such():
    raw = msgpack.packb({"v": 3, "t": "head", "body": b"", "dev": "d", "sig": b""},
                        use_bin_type=True)
    with pytest.raises(UnsupportedFormat):
        Signed.decode(raw, "a record")
    with pytest.raises(IntegrityError, match="field 't'"):
        Signed.decode(msgpack.packb({"v": 2, "body": b"", "dev": "d", "sig": b""},
                                    use_bin_type=True), "a record")


def test_removal_records_sign_their_type():
    data = removal_object(Removal(DEV.device_id, 5, ("packs/" + "a" * 64,)), DEV.sign)
    assert read_removal(data, {DEV.device_id: DEV.public_key}.get, verify_signature).names
