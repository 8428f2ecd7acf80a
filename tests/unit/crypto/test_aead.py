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
