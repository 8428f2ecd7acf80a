"""The OpenSSL encryption path must produce exactly libsodium's XChaCha20-Poly1305."""

import os
import threading

import pytest
from nacl import bindings

from p2pbackup.crypto import aead


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 4096, 65537, 300_000])
def test_encrypt_into_matches_libsodium(size):
    key, plain, ad = os.urandom(32), os.urandom(size), os.urandom(12)
    out = bytearray(size + aead.NONCE_SIZE + aead.TAG_SIZE)
    aead.encrypt_into(memoryview(out), key, memoryview(bytearray(plain)), ad)
    nonce = bytes(out[:aead.NONCE_SIZE])
    assert bytes(out[aead.NONCE_SIZE:]) == \
        bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plain, ad, nonce, key)
    assert aead.decrypt(key, out, ad) == plain
    assert aead.encrypt(key, plain, ad, nonce=nonce) == out  # the fixed-nonce (libsodium) path


def test_hchacha20_matches_libsodium_through_xchacha():
    # XChaCha20-Poly1305(key, n) == ChaCha20-Poly1305-IETF(HChaCha20(key, n[:16]), 0^4 || n[16:])
    key, nonce = os.urandom(32), os.urandom(24)
    sub = aead.hchacha20(key, nonce[:16])
    ietf = bindings.crypto_aead_chacha20poly1305_ietf_encrypt(b"abc", b"ad", b"\0" * 4 + nonce[16:],
                                                               sub)
    assert ietf == bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(b"abc", b"ad", nonce, key)


def test_nonces_never_repeat_across_threads_and_keys():
    seen: list[bytes] = []
    lock = threading.Lock()
    keys = [os.urandom(32) for _ in range(3)]

    def work():
        mine = []
        for i in range(300):
            mine.append(bytes(aead.encrypt(keys[i % 3], b"x" * (i % 50), b""))[:aead.NONCE_SIZE])
        with lock:
            seen.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == len(seen) == 1200


@pytest.mark.parametrize("size", [0, 1, 17, 65537])
def test_decrypt_opens_what_libsodium_sealed_and_refuses_any_change(size):
    key, ad = os.urandom(32), os.urandom(12)
    for _ in range(3):  # random nonces: every one has another prefix (another cached cipher)
        plain, nonce = os.urandom(size), os.urandom(aead.NONCE_SIZE)
        sealed = nonce + bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plain, ad, nonce, key)
        assert aead.decrypt(key, memoryview(sealed), ad) == plain
        for at in (0, 23, 24, len(sealed) - 1):  # nonce, ciphertext or tag
            bad = bytearray(sealed)
            bad[at] ^= 0x01
            with pytest.raises(aead.AuthenticationFailed):
                aead.decrypt(key, bad, ad)
        with pytest.raises(aead.AuthenticationFailed):
            aead.decrypt(key, sealed, ad + b"x")
        with pytest.raises(aead.AuthenticationFailed):
            aead.decrypt(os.urandom(32), sealed, ad)


def test_hchacha20_matches_the_published_vector():
    # draft-irtf-cfrg-xchacha-03, section 2.2.1 (HChaCha20 test vector)
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    assert aead.hchacha20(key, nonce) == bytes.fromhex(
        "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc")


# draft-irtf-cfrg-xchacha-03, section A.3.1 (AEAD_XChaCha20_Poly1305 example)
_A31_PLAIN = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
              b"the future, sunscreen would be it.")
_A31_AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
_A31_KEY = bytes.fromhex("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
_A31_NONCE = bytes.fromhex("404142434445464748494a4b4c4d4e4f5051525354555657")
_A31_SEALED = bytes.fromhex(
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb731c7f1b0b4aa6440bf3a8"
    "2f4eda7e39ae64c6708c54c216cb96b72e1213b4522f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369"
    "488f76b2383565d3fff921f9664c97637da9768812f615c68b13b52e"
    "c0875924c1c7987947deafd8780acf49")   # ciphertext, then the tag


def test_xchacha20_poly1305_matches_the_published_vector():
    sealed = aead.encrypt(_A31_KEY, _A31_PLAIN, _A31_AAD, nonce=_A31_NONCE)
    assert bytes(sealed) == _A31_NONCE + _A31_SEALED
    # libsodium agrees with the draft, and the OpenSSL opening path reads it
    assert bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        _A31_PLAIN, _A31_AAD, _A31_NONCE, _A31_KEY) == _A31_SEALED
    assert aead.decrypt(_A31_KEY, _A31_NONCE + _A31_SEALED, _A31_AAD) == _A31_PLAIN
