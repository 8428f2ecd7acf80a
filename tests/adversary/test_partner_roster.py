"""A storage partner follows the account's devices through the signed roster: a removed device
loses its sessions, reads, pushes and removal rights there; a scoped member never had removal
rights; and no device may write under another device's id or write the account's records.

The account is made by the real pairing logic (prepare_welcome / apply_welcome / commit_join,
without the PAKE transport) and `devices remove` (account.remove_device); the partner is the
daemon's PartnerService over real stores, fed objects as its sessions feed them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from pathlib import Path

import blake3
import pytest

from p2pbackup import account, grants
from p2pbackup.blobs.quota import QuotaExceeded
from p2pbackup.config import load_config
from p2pbackup.crypto.identity import DeviceIdentity, verify_signature
from p2pbackup.daemon.partner import PartnerService
from p2pbackup.repo.partner_store import load_grants, refusal
from p2pbackup.device import init_device, open_device
from p2pbackup.errors import IntegrityError, PeerNotPaired
from p2pbackup.format.membership import MEMBER, OWNER, PARTNER
from p2pbackup.format.removal import Removal, removal_name, removal_object
from p2pbackup.format.signaling import (OFFER, ReplayGuard, SessionDescription,
                                        check_description, sign_description)
from p2pbackup.protocol.sync import SyncSession
from p2pbackup.repo import replica, roster
from p2pbackup.transport.memory import memory_pair

pytestmark = pytest.mark.timeout(120)


async def join(dev, home: Path, role: str, sources=None, *,
               identity: DeviceIdentity | None = None) -> DeviceIdentity:
    """Pair a device into `dev`'s account, as `p2pbackup pair` does once the code checks."""
    me = identity or DeviceIdentity.generate()
    tag = grants.tag_key(home) or secrets.token_bytes(32)
    invite = account.invitation(dev, role, sources, None)
    pending = await account.prepare_welcome(dev, invite, account.joiner_payload(
        me, home.name, False, tag))
    await account.apply_welcome(home, me, home.name, pending.welcome, tag)
    await account.commit_join(dev, pending)
    return me


@pytest.fixture
async def world(tmp_path: Path):
    """Owner A (running), owner B, scoped member S, and partner P's service for the account."""
    src = tmp_path / "docs"
    src.mkdir()
    await init_device(tmp_path / "a", [str(src)])
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_device(tmp_path / "a", write=True))
        b = await join(a, tmp_path / "b", OWNER)
        s = await join(a, tmp_path / "s", MEMBER, ("docs",))
        p = await join(a, tmp_path / "p", PARTNER)
        (grant,) = load_grants(tmp_path / "p")
        service = PartnerService(load_config(tmp_path / "p"), p, [grant])
        yield a, b, s, p, service, grant


def blob(prefix: str) -> tuple[str, bytes]:
    data = os.urandom(100)
    return prefix + blake3.blake3(data).hexdigest(), data


def offer(sender: DeviceIdentity, partner: DeviceIdentity) -> bytes:
    return sign_description(SessionDescription(OFFER, sender.device_id, partner.device_id,
                                               "v=0", time.time_ns(), os.urandom(16)),
                            sender.sign)


def admitted(service: PartnerService, sender: DeviceIdentity) -> bool:
    """Whether the partner's signaling answers `sender` (the check SignalingServer makes)."""
    try:
        check_description(offer(sender, service.identity), me=service.me,
                          membership=service.membership, now_ns=time.time_ns(),
                          guard=ReplayGuard(), verify=verify_signature, expect=OFFER)
        return True
    except PeerNotPaired:
        return False


async def roster_reaches_partner(a, service: PartnerService, grant) -> None:
    """Owner A replicates its newest roster version to the partner."""
    for name in sorted([n async for n in a.repo.store.list("roster/")]):
        if refusal(grant, a.identity.device_id, name) is None:   # what the partner asks for
            assert await service.accept(grant, a.identity.device_id, name,
                                        await a.repo.store.get(name))
    assert grant.roster.lists_same((await roster.newest(a.repo.store))[0])


async def test_after_devices_remove_the_partner_refuses_the_removed_device(world):
    a, b, s, p, service, grant = world
    name, data = blob("snapshots/")
    assert admitted(service, b) and await service.accept(grant, b.device_id, name, data)

    # B opens a session and is in the middle of it when A removes B.
    here, there = memory_pair()
    session = asyncio.create_task(service.answer(b.device_id, there))
    await here.send(SyncSession(b.device_id, set(), valid_name=replica.is_object_name)
                    .data_to_send())
    assert await asyncio.wait_for(here.recv(), 10) is not None   # the partner answers

    await account.remove_device(a, b.device_id)
    await roster_reaches_partner(a, service, grant)

    # Its open session is closed, new ones are refused, its pushes and reads too.
    await asyncio.wait_for(session, 10)
    while await asyncio.wait_for(here.recv(), 10) is not None:
        pass   # what the partner sent before it closed
    assert not admitted(service, b)
    with pytest.raises(PeerNotPaired, match="removed"):
        check_description(offer(b, p), me=p.device_id, membership=service.membership,
                          now_ns=time.time_ns(), guard=ReplayGuard(), verify=verify_signature,
                          expect=OFFER)
    name, data = blob("snapshots/")
    with pytest.raises(IntegrityError, match="not a device of account"):
        await service.accept(grant, b.device_id, name, data)
    # A removal record B signed (once an owner) no longer counts, whoever brings it.
    record = removal_object(Removal(b.device_id, time.time_ns(), (name,)), b.sign)
    with pytest.raises(IntegrityError, match="not an owner"):
        await service.accept(grant, a.identity.device_id, removal_name(record), record)
    # The remaining devices are still welcome.
    assert admitted(service, a.identity) and admitted(service, s)


async def test_a_scoped_members_removal_record_is_refused_by_the_partner(world):
    a, b, s, p, service, grant = world
    name, data = blob("packs/")
    name = "snapshots/" + blake3.blake3(data).hexdigest()
    assert await service.accept(grant, s.device_id, name, data)   # S may push
    for bringer in (s.device_id, a.identity.device_id):
        record = removal_object(Removal(s.device_id, time.time_ns(), (name,)), s.sign)
        with pytest.raises(IntegrityError, match="not an owner"):
            await service.accept(grant, bringer, removal_name(record), record)
    # An owner's record is taken.
    record = removal_object(Removal(b.device_id, time.time_ns(), (name,)), b.sign)
    assert await service.accept(grant, s.device_id, removal_name(record), record)


async def test_a_device_cannot_write_another_devices_head_or_segments_at_the_partner(world):
    a, b, s, p, service, grant = world
    A, S = a.identity.device_id, s.device_id
    refused = [(S, f"heads/{A}"), (S, f"segments/{A}/000000000001"), (S, f"segments/{A}/anchor"),
               (A, f"heads/{S}"), (A, f"segments/{S}/000000000099"), (S, f"devices/{A}"),
               (S, "config"), (S, "membership/000000000009"), (S, "keyring/000009")]
    for device, name in refused:
        with pytest.raises(IntegrityError, match="only"):
            await service.accept(grant, device, name, os.urandom(64))
        assert not await grant.store.has(name), name
    # Under its own id a device writes, and replaces its own head; owners write the rest.
    assert await service.accept(grant, S, f"segments/{S}/000000000001", b"s1")
    assert await service.accept(grant, S, f"heads/{S}", b"head 1")
    assert await service.accept(grant, S, f"heads/{S}", b"head 2")
    assert await service.accept(grant, S, f"segments/{S}/anchor", b"fold 1")
    assert await service.accept(grant, S, f"segments/{S}/anchor", b"fold 2")  # prune again
    with pytest.raises(IntegrityError, match="never change"):
        await service.accept(grant, S, f"segments/{S}/000000000001", b"other")
    assert await service.accept(grant, A, f"devices/{S}", b"record")
    assert await service.accept(grant, A, "membership/000000000009", b"sealed")


async def test_a_roster_not_signed_by_an_owner_or_not_following_is_refused(world):
    from p2pbackup.format.roster import Roster, RosterEntry, roster_hash, roster_object

    a, b, s, p, service, grant = world
    current, raw = grant.roster, grant.file.roster
    me = RosterEntry(s.device_id, s.public_key, OWNER)
    nxt = f"roster/{current.seq + 1:012d}"
    # S (scoped) lists itself as the only owner: refused. So are a gap, a fork, a roster
    # stored under another version's name.
    forged = Roster(current.seq + 1, roster_hash(raw), (me,), (), time.time_ns())
    gap = Roster(current.seq + 2, roster_hash(raw), current.members, (), 1)
    fork = Roster(current.seq + 1, b"\x01" * 32, current.members, (), 1)
    good = Roster(current.seq + 1, roster_hash(raw), current.members, (), 1)
    for why, name, data in [
            ("not an owner", nxt, roster_object(forged, s.device_id, s.sign)),
            ("does not follow", f"roster/{current.seq + 2:012d}",
             roster_object(gap, b.device_id, b.sign)),
            ("fork", nxt, roster_object(fork, b.device_id, b.sign)),
            ("wrong name", f"roster/{current.seq + 5:012d}",
             roster_object(good, b.device_id, b.sign))]:
        with pytest.raises(IntegrityError, match=why):
            await service.accept(grant, a.identity.device_id, name, data)
        assert not await grant.store.has(name)
    assert admitted(service, a.identity) and service.admits(b.device_id)
    # The partner's grant file still holds the roster from pairing.
    (again,) = load_grants(grant.home)
    assert again.roster == current


async def test_a_member_device_refuses_a_roster_a_scoped_member_forged(world, tmp_path: Path):
    from p2pbackup.format.roster import Roster, RosterEntry, roster_object

    a, b, s, p, service, grant = world
    async with open_device(tmp_path / "b", write=True) as dev_b:
        forged = Roster(1, b"", (RosterEntry(s.device_id, s.public_key, OWNER),), (), 1)
        data = roster_object(forged, s.device_id, s.sign)
        with pytest.raises(IntegrityError, match="not an owner"):
            await replica.accept(dev_b.repo, "roster/000000000001", data)
        # The owner's versions are taken, in order, and only under their own names.
        for name in sorted([n async for n in a.repo.store.list("roster/")]):
            assert await replica.accept(dev_b.repo, name, await a.repo.store.get(name))
        newest = await roster.newest(a.repo.store)
        with pytest.raises(IntegrityError, match="wrong name"):
            await replica.accept(dev_b.repo, "roster/000000000007", newest[1])


async def test_a_partner_over_its_quota_asks_for_no_pack_and_its_owner_rechecks_none(
        world, tmp_path: Path, caplog):
    """A partner whose quota is full does not ask for packs it would refuse (every pack, every
    session) but says once that its quota is full, and a refusal for its quota does not make
    the owner's daemon read its own packs again: only one saying the content did not match
    its name does."""
    from p2pbackup.backup.snapshot import take_snapshot
    from p2pbackup.daemon.peers import PeerState
    from p2pbackup.replication.member import Replicator
    from p2pbackup.protocol.sync import ObjectWanted
    from tests.eventually import eventually

    a, b, s, p, service, grant = world
    (tmp_path / "docs" / "big").write_bytes(os.urandom(300_000))
    await take_snapshot(a.repo, a.config.sources, temp_dir=a.temp_dir)
    sizes = [await a.repo.store.size(n) async for n in a.repo.store.list("packs/")]
    assert sizes
    grant.store.quota = await grant.store.used() + min(sizes) - 1   # no pack fits
    owner = Replicator(a.repo, a.identity.device_id)
    wanted: list[str] = []
    rechecked: list[str] = []
    real = owner._on_event

    async def on_event(driver, st, ev) -> None:
        if isinstance(ev, ObjectWanted):
            wanted.append(ev.name)
        await real(driver, st, ev)

    owner._on_event = on_event                                        # type: ignore[method-assign]
    owner.check_pack_soon = lambda name, **kw: rechecked.append(name)  # type: ignore
    here, there = memory_pair()
    seen = PeerState(p.device_id)
    tasks = [asyncio.create_task(owner.run(p.device_id, here, seen)),
             asyncio.create_task(service.answer(a.identity.device_id, there))]

    def settled() -> bool:
        got = owner.sessions.get(p.device_id)
        return got is not None and got.session.queued == 0 and got.session.in_flight == 0 and \
            "quota exceeded" in (grant.last_error or "")

    try:
        await eventually(settled)
        assert wanted and not [n for n in wanted if n.startswith("packs/")], wanted
        assert rechecked == []
        # The owner heard it in words all the same (its `status` shows the line).
        heard = [r.getMessage() for r in caplog.records if r.module == "member"]
        assert any(f"peer {p.device_id[:12]}: quota exceeded: storing packs" in m
                   for m in heard), heard
        assert "quota exceeded" in (seen.error or "")
    finally:
        await here.close()
        await there.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        await owner.close()


async def test_a_partner_over_its_quota_still_takes_the_roster(world):
    a, b, s, p, service, grant = world
    grant.store.quota = 1   # full: nothing more fits
    name, data = blob("snapshots/")
    with pytest.raises(QuotaExceeded):
        await service.accept(grant, b.device_id, name, data)
    await account.remove_device(a, b.device_id)
    await roster_reaches_partner(a, service, grant)
    assert not admitted(service, b) and admitted(service, s)



def signed_otherwise(r, by: DeviceIdentity) -> list[bytes]:
    """Roster `r` with `by`'s signature, but not one made for a roster: a version-1 envelope
    (the body alone signed) and a version-2 one of another record type."""
    from p2pbackup.format.cleartext import clear_object
    from p2pbackup.format.header import HEADER_SIZE, Kind
    from p2pbackup.format.records import REMOVAL_SIG, Signed
    from p2pbackup.format.roster import roster_object

    body = Signed.decode(roster_object(r, by.device_id, by.sign)[HEADER_SIZE:], "roster").body
    return [clear_object(Kind.ROSTER, Signed(body, by.device_id, by.sign(body))),
            clear_object(Kind.ROSTER, Signed.make(REMOVAL_SIG, body, by.device_id, by.sign))]


async def test_a_roster_signed_in_the_old_envelope_or_as_another_record_is_refused(world,
                                                                                   tmp_path):
    """An owner's signature counts for a roster only if it was made for a roster (envelope
    version 2, type roster). Rosters were never released in the old envelope, so neither a
    partner nor a member device takes one."""
    from p2pbackup.format.roster import Roster, roster_hash, roster_object

    a, b, s, p, service, grant = world
    current, raw = grant.roster, grant.file.roster
    good = Roster(current.seq + 1, roster_hash(raw), current.members, (), time.time_ns())
    name = f"roster/{good.seq:012d}"
    for forged in signed_otherwise(good, b):
        with pytest.raises(IntegrityError, match="bad signature"):
            await service.accept(grant, a.identity.device_id, name, forged)
    assert grant.roster == current
    async with open_device(tmp_path / "s", write=True) as dev_s:   # a member device
        first = Roster(1, b"", current.members, (), 1)
        for forged in signed_otherwise(first, b):
            with pytest.raises(IntegrityError, match="bad signature"):
                await replica.accept(dev_s.repo, "roster/000000000001", forged)
        assert await replica.accept(dev_s.repo, "roster/000000000001",
                                    roster_object(first, b.device_id, b.sign))
    # The same roster, signed as a roster, follows.
    assert await service.accept(grant, a.identity.device_id, name,
                                roster_object(good, b.device_id, b.sign))
    assert grant.roster == good


async def test_a_keyring_an_owner_pushes_must_be_a_whole_signed_keyring_of_its_epoch(world):
    """The partner cannot check a keyring's signer (the epoch's recovery signer is named in
    the sealed membership only), but what is in the clear must say what the name says."""
    a, b, s, p, service, grant = world
    A = a.identity.device_id
    await account.remove_device(a, s.device_id)   # a new epoch: its keyring is written
    names = sorted([n async for n in a.repo.store.list("keyring/")])
    real = bytes(await a.repo.store.get(names[-1]))
    epoch = int(names[-1].split("/")[1])
    for name, data, why in [
            (f"keyring/{epoch + 1:06d}", real, "stored under epoch"),
            (f"keyring/{epoch + 2:06d}", os.urandom(300), "not a p2pbackup object"),
            (f"keyring/{epoch + 3:06d}", real[:-1], "not a whole signed keyring")]:
        with pytest.raises(IntegrityError, match=why):
            await service.accept(grant, A, name, data)
        assert not await grant.store.has(name), name
    assert await service.accept(grant, A, names[-1], real)


async def test_a_roster_or_session_of_a_recovery_signer_the_roster_does_not_name_is_refused(
        world, tmp_path: Path):
    """The roster names its key epoch's recovery signer: only that one may sign the next
    version (for a device recovering the account) and read. A removed owner derives the
    signer of the epochs it held; another account has its own: both are refused, as the
    signer's key under another key is. The signer that is named reads and writes rosters
    only."""
    from p2pbackup.crypto.keys import AccountKeys
    from p2pbackup.format.roster import Roster, RosterEntry, roster_hash, roster_object
    from tests.adversary.accounts import keys_of

    a, b, s, p, service, grant = world
    old_keys, _ = keys_of(tmp_path / "b")
    await account.remove_device(a, b.device_id)
    await roster_reaches_partner(a, service, grant)
    named = DeviceIdentity(a.keys.recovery_seed())
    stale = DeviceIdentity(old_keys.recovery_seed(0))       # what removed owner B derives
    other = DeviceIdentity(AccountKeys(os.urandom(32)).recovery_seed())
    assert set(service.recovery_signers()) == {named.device_id}

    def to_anyone(sender: DeviceIdentity) -> bytes:   # how a recovering device offers
        return sign_description(SessionDescription(OFFER, sender.device_id, "", "v=0",
                                                   time.time_ns(), os.urandom(16)), sender.sign)

    def answered(sender: DeviceIdentity) -> bool:
        try:
            check_description(to_anyone(sender), me=service.me, membership=service.membership,
                              now_ns=time.time_ns(), guard=ReplayGuard(),
                              verify=verify_signature, expect=OFFER,
                              recovery=service.recovery_signers())
            return True
        except PeerNotPaired:
            return False

    current, raw = grant.roster, grant.file.roster
    newcomer = DeviceIdentity.generate()
    nxt = Roster(current.seq + 1, roster_hash(raw), current.members + (RosterEntry(
        newcomer.device_id, newcomer.public_key, OWNER),), current.removed, time.time_ns(),
        current.recovery_key)
    name = f"roster/{nxt.seq:012d}"
    for forger in (stale, other):
        assert not answered(forger)
        with pytest.raises(IntegrityError, match="not an owner"):
            await service.accept(grant, a.identity.device_id, name,
                                 roster_object(nxt, forger.device_id, forger.sign))
    with pytest.raises(IntegrityError, match="bad signature"):   # its id, another's key
        await service.accept(grant, a.identity.device_id, name,
                             roster_object(nxt, named.device_id, stale.sign))
    assert grant.roster == current and not service.admits(newcomer.device_id)
    # The named signer is answered; it reads (no replication session), and writes nothing
    # but the roster, which it may sign.
    assert answered(named)
    here, there = memory_pair()
    session = asyncio.create_task(service.answer(named.device_id, there))
    await here.send(SyncSession(named.device_id, set(), valid_name=replica.is_object_name)
                    .data_to_send())
    assert await asyncio.wait_for(here.recv(), 10) is None
    await asyncio.wait_for(session, 10)
    data = os.urandom(100)
    with pytest.raises(IntegrityError, match="not a device of account"):
        await service.accept(grant, named.device_id,
                             "snapshots/" + blake3.blake3(data).hexdigest(), data)
    assert await service.accept(grant, named.device_id, name,
                                roster_object(nxt, named.device_id, named.sign))
    assert service.admits(newcomer.device_id) and grant.roster.role_of(newcomer.device_id) == OWNER


async def test_removing_an_owner_keeps_the_removals_it_made_before_at_the_partner(world):
    """A removal record an owner signed while it was one still counts once the owner is
    removed (the partner noted the signer when it first held the record): removing a device
    does not cancel what it removed. One it signs later is refused (above)."""
    a, b, s, p, service, grant = world
    data = os.urandom(100)
    name = "snapshots/" + blake3.blake3(data).hexdigest()
    assert await service.accept(grant, b.device_id, name, data)
    record = removal_object(Removal(b.device_id, time.time_ns(), (name,)), b.sign)
    assert await service.accept(grant, a.identity.device_id, removal_name(record), record)
    await account.remove_device(a, b.device_id)
    await roster_reaches_partner(a, service, grant)
    assert removal_name(record) in await grant.refresh_removals()
    assert name in grant.tombstones
    (restarted,) = load_grants(grant.home)      # the note is read back from its file
    assert removal_name(record) in await restarted.refresh_removals()
    later = time.time_ns() + int(service.config.peers.removal_grace * 1e9) + 1
    assert await service.apply_removals(now_ns=later) == 1
    assert not await grant.store.has(name)
