"""The membership chain: who may change it, and every way a forged or replayed version fails."""

from __future__ import annotations

from dataclasses import replace

import msgpack
import pytest

from p2pbackup.crypto.identity import DeviceIdentity, device_id_for, verify_signature
from p2pbackup.errors import IntegrityError
from p2pbackup.format.membership import (MEMBER, OWNER, PARTNER, Kept, Member, Membership,
                                         Signers, check_chain, check_versions, keyring_object,
                                         read_keyring, record_hash, sign_membership)
from p2pbackup.format.records import Signed

A, B, C = DeviceIdentity.generate(), DeviceIdentity.generate(), DeviceIdentity.generate()
RECOVERY = DeviceIdentity.generate()


def member(d: DeviceIdentity, role: str = OWNER, **kw) -> Member:
    return Member(d.device_id, d.public_key, f"dev-{d.device_id[:4]}", role, **kw)


def check(chain: list[bytes]) -> Membership:
    return check_chain(chain, verify_signature, device_id_for)


def genesis() -> tuple[Membership, bytes]:
    m = Membership(1, b"", 0, (member(A),), recovery_key=RECOVERY.public_key)
    return m, sign_membership(m, A.device_id, A.sign)


def follow(prev: Membership, prev_signed: bytes, signer: DeviceIdentity, **changes
           ) -> tuple[Membership, bytes]:
    m = replace(prev, seq=prev.seq + 1, prev=record_hash(prev_signed), **changes)
    return m, sign_membership(m, signer.device_id, signer.sign)


def test_a_valid_chain_of_joins_and_a_removal():
    g, s1 = genesis()
    m2, s2 = follow(g, s1, A, members=g.members + (member(B),))
    m3, s3 = follow(m2, s2, B, members=m2.members + (member(C, MEMBER, scopes=("docs",)),))
    m4, s4 = follow(m3, s3, A, members=(member(A), member(B)), removed=(C.device_id,), epoch=1)
    newest = check([s1, s2, s3, s4])
    assert newest == m4 and newest.admits(B.device_id) and not newest.admits(C.device_id)


def test_the_recovery_signer_may_add_a_device():
    g, s1 = genesis()
    _, s2 = follow(g, s1, RECOVERY, members=g.members + (member(B),))
    assert check([s1, s2]).admits(B.device_id)


@pytest.mark.parametrize("case", ["rollback", "gap", "fork", "stranger", "member-signs",
                                  "partner-signs", "bad-signature", "readmit", "epoch-back",
                                  "wrong-key", "removed-listed"])
def test_forged_versions_are_refused(case: str):
    g, s1 = genesis()
    m2, s2 = follow(g, s1, A, members=g.members + (member(B, MEMBER), member(C, PARTNER)),
                    epoch=1, removed=("f" * 32,))
    chain = [s1, s2]
    if case == "rollback":
        chain = [s1, s2, s1]
    elif case == "gap":
        m = replace(m2, seq=4, prev=record_hash(s2))
        chain.append(sign_membership(m, A.device_id, A.sign))
    elif case == "fork":
        m = replace(m2, seq=3, prev=record_hash(s1))
        chain.append(sign_membership(m, A.device_id, A.sign))
    elif case == "stranger":
        stranger = DeviceIdentity.generate()
        chain.append(follow(m2, s2, stranger)[1])
    elif case == "member-signs":
        chain.append(follow(m2, s2, B)[1])
    elif case == "partner-signs":
        chain.append(follow(m2, s2, C)[1])
    elif case == "bad-signature":
        signed = Signed.decode(follow(m2, s2, A)[1], "x")
        chain.append(Signed(signed.body, signed.device, bytes(64)).encode())
    elif case == "readmit":
        chain.append(follow(m2, s2, A, removed=())[1])
    elif case == "epoch-back":
        chain.append(follow(m2, s2, A, epoch=0)[1])
    elif case == "wrong-key":
        bad = Member(B.device_id, C.public_key, "b", OWNER)
        chain.append(follow(m2, s2, A, members=(member(A), bad))[1])
    elif case == "removed-listed":
        chain.append(follow(m2, s2, A, removed=("f" * 32, B.device_id))[1])
    with pytest.raises(IntegrityError):
        check(chain)


def test_the_first_version_must_be_signed_by_its_owner():
    m = Membership(1, b"", 0, (member(A),))
    with pytest.raises(IntegrityError):
        check([sign_membership(m, B.device_id, B.sign)])
    with pytest.raises(IntegrityError):
        check([])


def test_unknown_fields_and_roles_from_a_newer_version_are_skipped():
    g, _ = genesis()
    obj = msgpack.unpackb(g.encode(), raw=False)
    obj["future_field"] = [1, 2, 3]
    obj["members"].append({"id": "x" * 32, "pk": b"k" * 32, "role": "auditor"})
    body = msgpack.packb(obj, use_bin_type=True)
    signed = Signed(body, A.device_id, A.sign(body)).encode()
    newest = check([signed])
    assert [m.device_id for m in newest.members] == [A.device_id]


def test_re_adding_a_removed_device_is_refused_when_building():
    g, s1 = genesis()
    m2, _ = follow(g, s1, A, removed=(B.device_id,))
    with pytest.raises(IntegrityError, match="cannot join again"):
        m2.with_member(member(B), 0)


def removal_of(victim: DeviceIdentity, kept: Kept) -> tuple[list[bytes], Membership]:
    """A chain: A, then B (member for docs), C (owner), P (partner), then C removed."""
    g, s1 = genesis()
    m2, s2 = follow(g, s1, A, members=g.members + (member(B, MEMBER, scopes=("docs",)),
                                                  member(victim), member(PARTNER_DEV, PARTNER)))
    m3, s3 = follow(m2, s2, A, members=tuple(m for m in m2.members
                                             if m.device_id != victim.device_id),
                    removed=(victim.device_id,), epoch=1, kept={victim.device_id: kept})
    return [s1, s2, s3], m3


PARTNER_DEV = DeviceIdentity.generate()


def test_what_stays_valid_of_a_removed_device_is_pinned_for_good():
    pin = Kept(frozenset({b"s" * 32}), 4, b"h" * 32)
    chain, m3 = removal_of(C, pin)
    assert check(chain).kept == {C.device_id: pin}
    m4, s4 = follow(m3, chain[-1], A)
    assert check(chain + [s4]).kept == {C.device_id: pin}      # carried along
    for kept in ({}, {C.device_id: Kept(frozenset(), 9, b"h" * 32)}):
        _, forged = follow(m3, chain[-1], A, kept=kept)          # dropped, or widened
        with pytest.raises(IntegrityError, match="what stays valid"):
            check(chain + [forged])
    _, odd = follow(m3, chain[-1], A, kept={**m3.kept, B.device_id: pin})
    with pytest.raises(IntegrityError, match="not removed"):
        check(chain + [odd])


def test_the_signers_refuse_writers_by_role_source_epoch_and_pin():
    pin = Kept(frozenset({b"s" * 32}), 4, b"h" * 32)
    chain, _ = removal_of(C, pin)
    signers = Signers(check_versions(chain, verify_signature, device_id_for))
    assert signers.writer_key(A.device_id, 1, "x", sources=["docs", "photos"]) == A.public_key
    assert signers.writer_key(B.device_id, 0, "x", sources=["docs"]) == B.public_key
    with pytest.raises(IntegrityError, match="a member for docs only"):
        signers.writer_key(B.device_id, 0, "x", sources=["photos"])
    with pytest.raises(IntegrityError, match="storage partner"):
        signers.writer_key(PARTNER_DEV.device_id, 0, "x")
    with pytest.raises(IntegrityError, match="not a member .* in key epoch 5"):
        signers.writer_key(A.device_id, 5, "x")
    stranger = DeviceIdentity.generate()
    with pytest.raises(IntegrityError, match="not a member"):
        signers.writer_key(stranger.device_id, 0, "x")
    # The removed device: what its pin keeps, and nothing else, whatever epoch it claims.
    assert signers.writer_key(C.device_id, 0, "x", kept=lambda k: b"s" * 32 in k.snapshots)
    with pytest.raises(IntegrityError, match="removed from the account"):
        signers.writer_key(C.device_id, 0, "x", kept=lambda k: b"t" * 32 in k.snapshots)
    with pytest.raises(IntegrityError, match="removed from the account"):
        signers.writer_key(C.device_id, 0, "x")
    with pytest.raises(IntegrityError, match="not a member"):
        signers.writer_key(C.device_id, 1, "x", kept=lambda k: True)
    assert pin.keeps_segment(4) and not pin.keeps_segment(5)
    assert pin.keeps_head(3, b"x" * 32) and pin.keeps_head(4, b"h" * 32)
    assert not pin.keeps_head(4, b"x" * 32) and not pin.keeps_head(5, b"h" * 32)


def test_a_removal_without_a_pin_keeps_what_was_sealed_before_it():
    """Removals signed before pins existed: the device keeps its old epochs' records."""
    g, s1 = genesis()
    m2, s2 = follow(g, s1, A, members=g.members + (member(C),))
    _, s3 = follow(m2, s2, A, members=(member(A),), removed=(C.device_id,), epoch=1)
    signers = Signers(check_versions([s1, s2, s3], verify_signature, device_id_for))
    assert signers.writer_key(C.device_id, 0, "x") == C.public_key


def test_a_box_key_is_carried_and_a_malformed_one_refused():
    m = Membership(1, b"", 0, (member(A, box_key=A.box_public_key),))
    assert Membership.decode(m.encode()).members[0].box_key == A.box_public_key
    obj = msgpack.unpackb(m.encode(), raw=False)
    obj["members"][0]["box"] = b"short"
    with pytest.raises(IntegrityError, match="box key"):
        Membership.decode(msgpack.packb(obj, use_bin_type=True))


def test_a_keyring_envelope_names_its_epoch_and_signer():
    data = keyring_object(3, b"sealed", RECOVERY.device_id, RECOVERY.sign)
    epoch, sealed, signed = read_keyring(data)
    assert (epoch, sealed, signed.device) == (3, b"sealed", RECOVERY.device_id)
    assert signed.verifies("keyring", RECOVERY.public_key, verify_signature)
    with pytest.raises(IntegrityError, match="whole signed keyring"):
        read_keyring(data[:-1])


def test_a_version_that_does_not_decode_is_named_by_its_own_place_in_the_chain():
    """The error names the version that failed, not how many versions the chain holds."""
    g, s1 = genesis()
    _, s2 = follow(g, s1, A, members=g.members + (member(B),))
    body = msgpack.packb({"v": 1, "seq": 3, "prev": b"", "epoch": 0}, use_bin_type=True)
    broken = Signed.make("membership", body, A.device_id, A.sign).encode()
    _, s4 = genesis()
    with pytest.raises(IntegrityError, match="membership v3 is malformed"):
        check([s1, s2, broken, s4])
