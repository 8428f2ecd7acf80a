import os

import pytest
from hypothesis import given, strategies as st

from p2pbackup.crypto import recovery
from p2pbackup.crypto.aead import AuthenticationFailed, decrypt, encrypt
from p2pbackup.crypto.identity import DeviceIdentity, device_id_for, verify_signature
from p2pbackup.crypto.kdf import hkdf_sha256
from p2pbackup.crypto.keys import AccountKeys, MissingKey


def test_hkdf_matches_rfc5869_case_1():
    ikm = bytes.fromhex("0b" * 22)
    salt = bytes.fromhex("000102030405060708090a0b0c")
    info = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9")
    okm = hkdf_sha256(ikm, salt=salt, info=info, length=42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                         "34007208d5b887185865")


def test_scope_keys_differ_per_source_and_epoch():
    keys = AccountKeys(os.urandom(32)).with_epoch(1, os.urandom(32))
    a, b, a1 = keys.scope("docs"), keys.scope("photos"), keys.scope("docs", 1)
    assert len({a.data_key, b.data_key, a1.data_key, keys.meta_key}) == 4
    assert a.blob_id(b"x") != b.blob_id(b"x")
    assert keys.scope("docs") is a  # cached
    assert keys.epoch == 1 and keys.record_key != keys.meta_key


def test_a_new_epoch_needs_its_own_root_not_the_account_key():
    old = AccountKeys(os.urandom(32))
    with pytest.raises(MissingKey, match="epoch 1"):
        old.scope("docs", 1)  # a removed device cannot derive what comes after it
    new = old.with_epoch(1, os.urandom(32))
    assert new.scope("docs", 0) == old.scope("docs", 0)


def test_key_export_full_and_scoped():
    keys = AccountKeys(os.urandom(32)).with_epoch(1, os.urandom(32))
    full = AccountKeys.from_export(keys.export())
    assert full.full and full.roots == keys.roots and full.fingerprint() == keys.fingerprint()
    part = AccountKeys.from_export(keys.export(["photos"]))
    assert not part.full and part.sources_granted() == ["photos"]
    assert part.scope("photos", 1) == keys.scope("photos", 1)
    assert part.meta_key == keys.meta_key and part.record_key == keys.record_key
    assert part.chunker_seed == keys.chunker_seed and part.fingerprint() == keys.fingerprint()
    with pytest.raises(MissingKey, match="'docs'"):
        part.scope("docs", 0)
    with pytest.raises(MissingKey):
        part.export()


def test_aead_rejects_changed_header_or_byte():
    key = os.urandom(32)
    sealed = encrypt(key, b"secret", b"hdr")
    assert decrypt(key, sealed, b"hdr") == b"secret"
    with pytest.raises(AuthenticationFailed):
        decrypt(key, sealed, b"HDR")
    bad = bytearray(sealed)
    bad[-1] ^= 1
    with pytest.raises(AuthenticationFailed):
        decrypt(key, bytes(bad), b"hdr")
    with pytest.raises(AuthenticationFailed):
        decrypt(key, sealed[:10], b"hdr")


def test_device_identity_signs_and_id_is_derived():
    ident = DeviceIdentity.generate()
    sig = ident.sign(b"msg")
    assert verify_signature(ident.public_key, b"msg", sig)
    assert not verify_signature(ident.public_key, b"other", sig)
    assert ident.device_id == device_id_for(ident.public_key) and len(ident.device_id) == 32


def test_grants_are_sealed_to_a_box_key_of_their_own_and_old_ones_still_open():
    from nacl.bindings import crypto_sign_ed25519_pk_to_curve25519

    from p2pbackup.crypto.identity import seal_to

    ident, other = DeviceIdentity(bytes(range(32))), DeviceIdentity.generate()
    # Derived from the seed, not the signing key converted: one key, one use.
    assert ident.box_public_key != crypto_sign_ed25519_pk_to_curve25519(ident.public_key)
    assert ident.box_public_key == DeviceIdentity(bytes(range(32))).box_public_key
    new = seal_to(ident.public_key, b"grant", ident.box_public_key)
    old = seal_to(ident.public_key, b"grant")   # a member that published no box key
    assert ident.open_sealed(new) == ident.open_sealed(old) == b"grant"
    assert other.open_sealed(new) is None and other.open_sealed(old) is None


def test_keyring_key_needs_the_root_and_is_no_record_key():
    keys = AccountKeys(os.urandom(32)).with_epoch(1, os.urandom(32))
    scoped = AccountKeys.from_export(keys.export(["docs"]))
    assert keys.keyring_key(1) not in keys.record_keys.values()
    assert keys.keyring_key(0) != keys.keyring_key(1)
    with pytest.raises(MissingKey):
        scoped.keyring_key(1)


@given(st.binary(min_size=32, max_size=32))
def test_recovery_code_round_trips(key):
    code = recovery.encode(key)
    assert recovery.decode(code) == key
    assert recovery.decode(code.lower().replace("-", " ")) == key


def test_recovery_code_catches_typos():
    key = os.urandom(32)
    code = recovery.encode(key)
    chars = list(code)
    pos = 7
    chars[pos] = "7" if chars[pos] != "7" else "8"
    with pytest.raises(recovery.RecoveryCodeError, match="typo"):
        recovery.decode("".join(chars))
    with pytest.raises(recovery.RecoveryCodeError, match="characters"):
        recovery.decode(code[:-3])
    with pytest.raises(recovery.RecoveryCodeError, match="cannot appear"):
        recovery.decode("U" + code[1:])


def test_recovery_code_reads_confusable_letters():
    key = bytes(32)
    code = recovery.encode(key)
    assert recovery.decode(code.replace("0", "O")) == key
