"""Registering an account on a real `p2pbackup-broker` that asks for a sign-in with a (local)
OpenID Connect issuer, or for an operator's invitation: expired, misissued, misaddressed,
unsigned, HMAC-with-the-public-key and unknown-key tokens, another person's token against a
held account, a person beyond their accounts, a roster beyond the devices an account may
list, missing and spent invitations. Each is refused with one line, logged once."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from joserfc.jwk import RSAKey

from p2pbackup.broker.oidc import person_id
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.discovery.broker import BrokerClient
from tests.oidc_issuer import AUDIENCE, LocalIssuer, local_issuer
from tests.servers import RunningBroker, StorageAccount, broker_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def issuer() -> Iterator[LocalIssuer]:
    with local_issuer() as i:
        yield i


@pytest.fixture(scope="module")
def broker(issuer: LocalIssuer, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[RunningBroker]:
    with broker_server(tmp_path_factory.mktemp("broker"), "--oidc-issuer", issuer.url,
                       "--oidc-audience", AUDIENCE, "--max-accounts-per-person", "2",
                       "--max-devices", "3") as b:
        yield b


async def register(url: str, acct: StorageAccount, **how: str) -> None:
    client = BrokerClient(url, acct.owner, acct.fingerprint)
    try:
        await client.publish_rosters([acct.rosters[-1] if acct.rosters else acct.roster()[1]],
                                     **how)
    finally:
        await client.close()


async def refused_once(broker: RunningBroker, acct: StorageAccount, line: str,
                       **how: str) -> None:
    with pytest.raises(Exception, match=line):
        await register(broker.url, acct, **how)
    assert broker.log_text().count(f"{acct.fingerprint}/roster") == 1, broker.log_text()
    assert line.split(" ", 1)[1] in broker.log_text()


async def test_registering_without_a_sign_in_is_refused(broker: RunningBroker) -> None:
    await refused_once(broker, StorageAccount(), "401 registering an account on this broker "
                       "needs a sign-in with")


@pytest.mark.parametrize("attack, line", [
    ("expired", "401 the sign-in token has expired"),
    ("wrong issuer", "401 the sign-in token was not issued by"),
    ("wrong audience", "401 the sign-in token is not for this broker"),
    ("alg none", "401 the sign-in token's algorithm 'none' is not one this broker takes"),
    ("HS256 keyed with the public key",
     "401 the sign-in token's algorithm 'HS256' is not one this broker takes"),
    ("unknown kid", "401 the sign-in token names a key the issuer does not publish"),
    ("forged under the issuer's kid", "401 the sign-in token's signature does not verify"),
])
async def test_a_hostile_sign_in_token_registers_nothing(
        broker: RunningBroker, issuer: LocalIssuer, attack: str, line: str) -> None:
    token = {
        "expired": lambda: issuer.token(exp=int(time.time()) - 3600),
        "wrong issuer": lambda: issuer.token(iss="https://accounts.example.org"),
        "wrong audience": lambda: issuer.token(aud="another-client"),
        "alg none": issuer.unsigned,
        "HS256 keyed with the public key": issuer.hmac_with_public_key,
        "unknown kid": lambda: issuer.token(kid="made-up",
                                            key=RSAKey.generate_key(2048, {"kid": "made-up"})),
        "forged under the issuer's kid": lambda: issuer.token(kid="k1",
                                                              key=RSAKey.generate_key(2048)),
    }[attack]()
    acct = StorageAccount()
    await refused_once(broker, acct, line, token=token)
    await register(broker.url, acct, token=issuer.token(attack))   # a real sign-in registers it


async def test_another_person_cannot_take_a_signed_in_account(
        broker: RunningBroker, issuer: LocalIssuer) -> None:
    acct = StorageAccount()
    await register(broker.url, acct, token=issuer.token("alice"))
    # Mallory signs in as herself and brings a first roster of her own devices for the id: a
    # held account follows only rosters its own owners sign, whoever signed in
    thief = StorageAccount(fingerprint=acct.fingerprint)
    await refused_once(broker, thief, f"403 device {thief.owner.device_id[:12]} is not a "
                       f"device of account {acct.fingerprint}", token=issuer.token("mallory"))
    # the account is Alice's: her devices follow their rosters without a token
    acct.members.append(DeviceIdentity.generate())
    acct.roster()
    await register(broker.url, acct)
    assert f"(person {person_id(issuer.url, 'alice')[:12]})" in broker.log_text()
    assert "alice" not in broker.log_text() and "mallory" not in broker.log_text()


async def test_a_person_registers_at_most_the_accounts_the_broker_allows(
        broker: RunningBroker, issuer: LocalIssuer) -> None:
    for _ in range(2):
        await register(broker.url, StorageAccount(), token=issuer.token("carol"))
    await refused_once(broker, StorageAccount(), "403 this sign-in has registered 2 accounts",
                       token=issuer.token("carol"))


async def test_a_roster_beyond_the_devices_an_account_may_list_is_refused(
        broker: RunningBroker, issuer: LocalIssuer) -> None:
    acct = StorageAccount(members=[DeviceIdentity.generate() for _ in range(3)])
    await refused_once(broker, acct, "403 the roster lists 4 devices, more than the 3",
                       token=issuer.token("dave"))


async def test_a_roster_naming_partners_beyond_the_devices_an_account_may_list_is_refused(
        broker: RunningBroker, issuer: LocalIssuer) -> None:
    """Storage partners count against the account's limit as its devices do (each may hold
    a socket there), at registration and in a later version."""
    many = [DeviceIdentity.generate() for _ in range(3)]
    await refused_once(broker, StorageAccount(partners=many),
                       "403 the roster lists 4 devices, more than the 3",
                       token=issuer.token("frank"))
    acct = StorageAccount()
    await register(broker.url, acct, token=issuer.token("frank"))
    acct.partners = many
    acct.roster()   # the next version, naming them
    with pytest.raises(Exception, match="403 the roster lists 4 devices, more than the 3"):
        await register(broker.url, acct)
    (line,) = [x for x in broker.log_text().splitlines() if f"{acct.fingerprint}/roster" in x]
    assert "403 the roster lists 4 devices" in line      # refused with one log line


@pytest.fixture(scope="module")
def invite_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    with broker_server(tmp_path_factory.mktemp("broker"), "--invites") as b:
        yield b


def invitation(broker: RunningBroker) -> str:
    data = broker.log.parent / "data"
    return subprocess.run([sys.executable, "-m", "p2pbackup.broker.main", "invite", "--data",
                           str(data)], check=True, capture_output=True,
                          text=True).stdout.strip()


async def test_registering_needs_an_invitation_spent_once(invite_broker: RunningBroker) -> None:
    await refused_once(invite_broker, StorageAccount(), "403 registering an account on this "
                       "broker needs an invitation")
    token = invitation(invite_broker)
    await refused_once(invite_broker, StorageAccount(), "403 this invitation is not valid",
                       invite=token[:-2])
    await register(invite_broker.url, StorageAccount(), invite=token)
    await refused_once(invite_broker, StorageAccount(), "403 this invitation is not valid",
                       invite=token)   # spent
