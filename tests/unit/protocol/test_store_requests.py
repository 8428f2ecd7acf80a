"""Signed requests to the storage server: what a signature covers, time and nonce checks."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pbackup.crypto.identity import DeviceIdentity, verify_signature
from p2pbackup.protocol import store_requests as req

DEVICE = DeviceIdentity(bytes(range(32)))


def _check(headers: dict[str, str], method: str, path: str, query: str, body: bytes) -> bool:
    got = req.parse(headers)
    assert got is not None
    return verify_signature(DEVICE.public_key, req.message(
        method, path, query, req.body_digest(body), got.device, got.time, got.nonce),
        got.signature)


def test_the_signature_covers_method_path_query_and_body() -> None:
    h = req.sign(DEVICE.device_id, DEVICE.sign, "PUT", "v1/acc/config", "", b"body", 1000)
    assert _check(h, "PUT", "v1/acc/config", "", b"body")
    assert not _check(h, "GET", "v1/acc/config", "", b"body")
    assert not _check(h, "PUT", "v1/acc/other", "", b"body")
    assert not _check(h, "PUT", "v1/acc/config", "x=1", b"body")
    assert not _check(h, "PUT", "v1/acc/config", "", b"bodY")


@given(st.dictionaries(st.sampled_from([req.DEVICE, req.TIME, req.NONCE, req.SIGNATURE]),
                       st.text(max_size=100)))
def test_malformed_signature_headers_parse_to_none_never_raise(headers: dict) -> None:
    assert req.parse(headers) is None


def test_requests_off_the_clock_or_from_before_the_start_are_stale() -> None:
    assert req.stale(1000, 1000 + req.MAX_SKEW) is None
    assert "more than 300 s apart" in req.stale(1000, 1001 + req.MAX_SKEW)
    assert "more than 300 s apart" in req.stale(1001 + req.MAX_SKEW, 1000)
    assert "before the server started" in req.stale(999, 1000, not_before=1000)


def test_a_nonce_counts_once_and_a_full_cache_refuses_rather_than_forgets() -> None:
    cache = req.NonceCache(limit=2)
    assert cache.add("d", "n1", 0) is None
    assert "replayed" in cache.add("d", "n1", 10)
    assert cache.add("e", "n1", 10) is None          # another device's nonce
    assert "busy" in cache.add("d", "n2", 20)        # full of unexpired nonces
    assert cache.add("d", "n2", 2 * req.MAX_SKEW + 1) is None   # n1 of d expired
