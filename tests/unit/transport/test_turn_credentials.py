"""TURN REST credentials (coturn's --use-auth-secret scheme, draft-uberti-behave-turn-rest)."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from p2pbackup.transport.turn import rest_credentials


def test_rest_credentials_are_coturns_expiry_id_and_hmac_sha1():
    cred = rest_credentials(b"north", ttl=600, id="dev42", now=1_000_000.0)
    assert cred.username == "1000600:dev42"
    # What coturn computes for --static-auth-secret=north, by hand.
    expected = base64.b64encode(hmac.new(b"north", b"1000600:dev42", hashlib.sha1).digest())
    assert cred.credential == expected.decode()
    assert cred.expires == 1_000_600


def test_rest_credentials_take_a_text_secret_as_coturn_reads_it():
    assert rest_credentials("north", 600, "x", now=5.9) == \
        rest_credentials(b"north", 600, "x", now=5.0)


@pytest.mark.parametrize("ttl, id", [(0, "a"), (-5, "a"), (60, ""), (60, "a:b")])
def test_rest_credentials_refuse_what_coturn_would_misread(ttl, id):
    with pytest.raises(ValueError):
        rest_credentials(b"s", ttl, id, now=0)
