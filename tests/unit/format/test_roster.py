"""The roster: encoding round-trips, a valid chain is followed, and hostile bytes only ever
raise IntegrityError (or UnsupportedFormat, for a newer version)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pbackup.crypto.identity import DeviceIdentity, device_id_for, verify_signature
from p2pbackup.errors import IntegrityError, UnsupportedFormat
from p2pbackup.format.membership import MEMBER, OWNER, PARTNER, Member, Membership
from p2pbackup.format.roster import (Roster, check_next, check_signed, read_roster, roster_hash,
                                     roster_name, roster_object, roster_of)

A, B, P = DeviceIdentity.generate(), DeviceIdentity.generate(), DeviceIdentity.generate()


def membership(*members: tuple[DeviceIdentity, str], removed=()) -> Membership:
    return Membership(1, b"", 0, tuple(Member(d.device_id, d.public_key, "x", role)
                                       for d, role in members), tuple(removed))


def test_a_roster_states_the_membership_without_partners_and_follows_its_chain():
    m = membership((A, OWNER), (B, MEMBER), (P, PARTNER))
    first = roster_of(m, 1, b"", 5)
    raw1 = roster_object(first, A.device_id, A.sign)
    assert read_roster(raw1, device_id_for)[0] == first
    assert [e.device_id for e in first.members] == [A.device_id, B.device_id]
    assert check_signed(raw1, first.owner_key, verify_signature, device_id_for) == first
    second = roster_of(membership((A, OWNER), removed=[B.device_id]), 2, roster_hash(raw1), 6)
    raw2 = roster_object(second, A.device_id, A.sign)
    assert check_next(first, roster_hash(raw1), raw2, verify_signature, device_id_for) == second
    assert roster_name(2) == "roster/000000000002" and not second.lists_same(first)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.integers(min_value=0, max_value=400))
def test_hostile_roster_bytes_raise_integrity_or_version_errors_only(junk: bytes, cut: int):
    raw = roster_object(Roster(1, b"", ()), A.device_id, A.sign)
    for data in (junk, raw[:cut], raw[:cut] + junk):
        try:
            read_roster(data, device_id_for)
        except (IntegrityError, UnsupportedFormat):
            pass


R, X = DeviceIdentity.generate(), DeviceIdentity.generate()   # a recovery signer, a stranger


def test_a_roster_names_the_recovery_signer_who_may_sign_the_next_version():
    m = Membership(1, b"", 0, (Member(A.device_id, A.public_key, "a", OWNER),),
                   recovery_key=R.public_key)
    first = roster_of(m, 1, b"", 5)
    raw1 = roster_object(first, A.device_id, A.sign)
    assert read_roster(raw1, device_id_for)[0].recovery_key == R.public_key
    new = Member(B.device_id, B.public_key, "b", OWNER)
    second = roster_of(Membership(2, b"", 0, m.members + (new,), recovery_key=R.public_key),
                       2, roster_hash(raw1), 6)
    by_recovery = roster_object(second, R.device_id, R.sign)
    assert check_next(first, roster_hash(raw1), by_recovery, verify_signature,
                      device_id_for) == second
    # Anyone else's key under the recovery signer's id, or a stranger's signature: refused.
    for forged in (roster_object(second, R.device_id, X.sign),
                   roster_object(second, X.device_id, X.sign)):
        with pytest.raises(IntegrityError):
            check_next(first, roster_hash(raw1), forged, verify_signature, device_id_for)
    # A roster that names no recovery signer (written before they were named): owners only.
    old = Roster(1, b"", first.members, (), 5)
    raw_old = roster_object(old, A.device_id, A.sign)
    after_old = replace(second, prev=roster_hash(raw_old))
    with pytest.raises(IntegrityError, match="not an owner"):
        check_next(old, roster_hash(raw_old), roster_object(after_old, R.device_id, R.sign),
                   verify_signature, device_id_for)
    assert not old.lists_same(first)   # an owner's next publish names it


def test_a_roster_field_a_newer_version_adds_is_skipped_and_a_bad_recovery_key_refused():
    import msgpack

    from p2pbackup.format.cleartext import clear_object
    from p2pbackup.format.header import Kind
    from p2pbackup.format.records import ROSTER_SIG, Signed

    def raw(**extra) -> bytes:
        body = msgpack.packb({"v": 1, "seq": 1, "prev": b"", "time": 1, "removed": [],
                              "members": [[A.device_id, A.public_key, OWNER]], **extra},
                             use_bin_type=True)
        return clear_object(Kind.ROSTER, Signed.make(ROSTER_SIG, body, A.device_id, A.sign))

    assert read_roster(raw(later={"x": 1}), device_id_for)[0].recovery_key == b""
    for bad in (b"short", "text", 7):
        with pytest.raises(IntegrityError, match="malformed"):
            read_roster(raw(recovery=bad), device_id_for)


def test_a_roster_names_the_partners_apart_from_the_devices_and_never_a_removed_one():
    m = membership((A, OWNER), (B, MEMBER), (P, PARTNER))
    first = roster_of(m, 1, b"", 5)
    raw1 = roster_object(first, A.device_id, A.sign)
    got = read_roster(raw1, device_id_for)[0]
    assert got == first and [e.device_id for e in got.partners] == [P.device_id]
    # A partner is no device of the account: it neither connects as one nor signs.
    assert got.partner_key(P.device_id) == P.public_key and got.key_of(P.device_id) is None
    assert got.partner_key(B.device_id) is None
    # Pairing or removing a partner is a new version; a removed partner is named no more.
    assert not roster_of(membership((A, OWNER), (B, MEMBER)), 1, b"", 5).lists_same(first)
    gone = roster_of(membership((A, OWNER), (B, MEMBER), removed=[P.device_id]), 2,
                     roster_hash(raw1), 6)
    assert gone.partners == () and check_next(
        first, roster_hash(raw1), roster_object(gone, A.device_id, A.sign), verify_signature,
        device_id_for).removed == (P.device_id,)
    back = replace(gone, partners=first.partners)
    with pytest.raises(IntegrityError, match="removed one as current"):
        read_roster(roster_object(back, A.device_id, A.sign), device_id_for)
    wrong_key = replace(first, partners=(replace(first.partners[0], public_key=B.public_key),))
    with pytest.raises(IntegrityError, match="not its own"):
        read_roster(roster_object(wrong_key, A.device_id, A.sign), device_id_for)
