"""The broker's sign-in check (broker/oidc.py) against a local issuer, with an injected clock:
what it takes, what it refuses and why, and how often it fetches the issuer's keys."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from joserfc.jwk import RSAKey

from p2pbackup.broker.oidc import LEEWAY, OidcVerifier, SignInRefused, person_id
from tests.oidc_issuer import AUDIENCE, LocalIssuer, local_issuer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def issuer() -> Iterator[LocalIssuer]:
    with local_issuer() as i:
        yield i


class Clock:
    def __init__(self) -> None:
        import time
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def checked(issuer: LocalIssuer) -> AsyncIterator[tuple[OidcVerifier, Clock]]:
    clock = Clock()
    v = OidcVerifier(issuer.url, AUDIENCE, now=clock)
    yield v, clock
    await v.close()


async def refused(v: OidcVerifier, token: str) -> str:
    with pytest.raises(SignInRefused) as caught:
        await v.person(token)
    return caught.value.line


async def test_a_token_of_the_issuer_names_its_person_hashed(
        checked: tuple[OidcVerifier, Clock], issuer: LocalIssuer) -> None:
    v, _ = checked
    assert await v.person(issuer.token("alice")) == person_id(issuer.url, "alice")
    assert person_id(issuer.url, "alice") != person_id(issuer.url, "bob")
    assert "alice" not in person_id(issuer.url, "alice")


async def test_expiry_and_not_before_follow_the_injected_clock(
        checked: tuple[OidcVerifier, Clock], issuer: LocalIssuer) -> None:
    v, clock = checked
    token = issuer.token(exp=int(clock.t) + 600)
    clock.t += 600 + LEEWAY + 1
    assert "has expired" in await refused(v, token)
    clock.t -= 600 + LEEWAY + 1
    early = issuer.token(nbf=int(clock.t) + 3600, exp=int(clock.t) + 7200)
    assert "is not valid yet" in await refused(v, early)
    clock.t += 3600
    assert await v.person(early)
    assert "no 'exp' claim" in await refused(v, issuer.token(exp=None))


@pytest.mark.parametrize("attack, line", [
    ("wrong issuer", "was not issued by"),
    ("wrong audience", "is not for this broker"),
    ("alg none", "algorithm 'none' is not one this broker takes"),
    ("HS256 keyed with the public key", "algorithm 'HS256' is not one this broker takes"),
    ("a key the issuer does not publish, under its kid", "signature does not verify"),
    ("no sub", "no 'sub' claim"),
    ("not a JWT", "not a signed JWT"),
])
async def test_hostile_tokens_are_refused(checked: tuple[OidcVerifier, Clock],
                                          issuer: LocalIssuer, attack: str, line: str) -> None:
    v, _ = checked
    token = {
        "wrong issuer": lambda: issuer.token(iss="https://accounts.example.org"),
        "wrong audience": lambda: issuer.token(aud="another-client"),
        "alg none": issuer.unsigned,
        "HS256 keyed with the public key": issuer.hmac_with_public_key,
        "a key the issuer does not publish, under its kid":
            lambda: issuer.token(kid="k1", key=RSAKey.generate_key(2048)),
        "no sub": lambda: issuer.token(sub=None),
        "not a JWT": lambda: "bearer-of-nothing",
    }[attack]()
    assert line in await refused(v, token)


async def test_an_unknown_kid_fetches_the_keys_again_at_most_once_a_minute(
        checked: tuple[OidcVerifier, Clock], issuer: LocalIssuer) -> None:
    v, clock = checked
    await v.person(issuer.token())
    assert v.fetches == 1
    stranger = RSAKey.generate_key(2048, {"kid": "made-up"})
    for minute in (0, 1):   # made-up key ids: at most one fetch a minute, else the cache
        for _ in range(5):
            assert "a key the issuer does not publish" in await refused(
                v, issuer.token(kid="made-up", key=stranger))
        assert v.fetches == 1 + minute
        clock.t += 61 * (1 - minute)
    issuer.add_key("k2", "EC")                    # the issuer rotates its keys
    rotated = issuer.token(kid="k2")
    assert "a key the issuer does not publish" in await refused(v, rotated)
    assert v.fetches == 2                         # within the minute: not fetched again
    clock.t += 61
    assert await v.person(rotated) == person_id(issuer.url, "alice")
    assert v.fetches == 3
    del issuer.keys["k2"]


async def test_an_unreachable_issuer_is_one_line_with_503_and_not_asked_again_at_once(
        ) -> None:
    from tests.servers import free_port
    clock = Clock()
    v = OidcVerifier(f"http://127.0.0.1:{free_port()}", AUDIENCE, now=clock)
    token = LocalIssuer(keys={"k1": RSAKey.generate_key(2048, {"kid": "k1"})}, url="x").token()
    for line in ("cannot reach the sign-in issuer", "keys could not be fetched: try again"):
        with pytest.raises(SignInRefused) as caught:
            await v.person(token)
        assert caught.value.status == 503 and line in caught.value.line
    clock.t += 11
    with pytest.raises(SignInRefused, match="cannot reach the sign-in issuer"):
        await v.person(token)
    await v.close()


def test_an_issuer_url_is_https_but_on_loopback() -> None:
    with pytest.raises(ValueError, match="use https://"):
        OidcVerifier("http://accounts.example.org", AUDIENCE)
    OidcVerifier("https://accounts.example.org", AUDIENCE)


async def test_device_sign_in_polls_at_the_issuers_interval_until_signed_in(
        issuer: LocalIssuer) -> None:
    from p2pbackup.discovery.signin import UserCode, device_sign_in
    from p2pbackup.errors import ConfigError

    shown: list[UserCode] = []
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    with pytest.raises(ConfigError, match="offers no sign-in from a terminal"):
        await device_sign_in(issuer.url, AUDIENCE, shown.append, sleep=sleep)
    issuer.device_flow, issuer.signs_in = True, "heidi"
    try:
        token = await device_sign_in(issuer.url, AUDIENCE, shown.append, sleep=sleep)
    finally:
        issuer.device_flow, issuer.signs_in = False, "alice"
    assert shown == [UserCode(f"{issuer.url}/activate", "WDJB-MJHT", None)]
    assert waits == [1.0, 1.0]       # pending, then signed in
    v = OidcVerifier(issuer.url, AUDIENCE)
    assert await v.person(token) == person_id(issuer.url, "heidi")
    await v.close()
