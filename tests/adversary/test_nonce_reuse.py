"""Nonce reuse: a forked child (restore workers are forked) must never seal with a nonce its
parent also uses (XChaCha20-Poly1305 under one key and one nonce leaks both plaintexts)."""

import os

from p2pbackup.crypto import aead


def test_a_forked_child_cannot_reuse_its_parents_nonces():
    key = os.urandom(32)
    aead.encrypt(key, b"x", b"")   # this thread's nonce state exists before the fork
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: one nonce from each sealing path, to the parent, then out
        try:
            one = bytes(aead.encrypt(key, b"x", b""))[:aead.NONCE_SIZE]
            out = bytearray(41)
            aead.encrypt_many_into(memoryview(out), key, [(0, b"y", b"")])
            os.write(w, one + bytes(out[:aead.NONCE_SIZE]))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        child = f.read()
    os.waitpid(pid, 0)
    parent = bytes(aead.encrypt(key, b"x", b""))[:aead.NONCE_SIZE]
    out = bytearray(41)
    aead.encrypt_many_into(memoryview(out), key, [(0, b"y", b"")])
    parent += bytes(out[:aead.NONCE_SIZE])
    assert len(child) == 2 * aead.NONCE_SIZE
    mine = {parent[:24], parent[24:]}
    assert not mine & {child[:24], child[24:]}
    assert child[:16] != parent[:16]   # a prefix of its own, not just a later counter
