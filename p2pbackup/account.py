"""The account's devices: membership, what pairing hands over, revocation, recovery.

Glue between a home (config and keys), its repository and the membership chain; the pairing
wire protocol itself is the sans-I/O machine in crypto/pairing.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from . import grants, ids
from .blobs import StoreSigner, open_store
from .blobs.base import BlobStore
from .config import Config, PeerSettings, init_home, save_keys
from .crypto import recovery
from .crypto.identity import DeviceIdentity, device_id_for, seal_to, verify_signature
from .crypto.keys import AccountKeys
from .device import Device
from .errors import (ConfigError, IntegrityError, NotFound, P2PError, PairingFailed,
                     PeerUnreachable, WrongKey)
from .format.membership import (MEMBER, OWNER, PARTNER, Kept, Member, Membership,
                                record_hash, sign_membership)
from .peer_fetch import is_peer_location
from .format.roster import check_signed, read_roster
from .repo import membership as store_membership
from .repo import roster
from .repo.repository import Repository
from .sizes import format_size

if TYPE_CHECKING:  # the pairing stack (spake2) and WebRTC load only when used
    from .pairing_link import MailboxPipe, PairingHost, Rendezvous
    from .peer_fetch import PeerLocation
    from .session import Unverified

log = logging.getLogger("p2pbackup.account")
PAYLOAD_VERSION = 1


def recovery_signer(keys: AccountKeys) -> DeviceIdentity:
    """The signer only the holder of the newest recovery code (or an owner) can derive."""
    return DeviceIdentity(keys.recovery_seed())


async def membership_of(dev: Device) -> tuple[Membership, list[bytes]]:
    """The account's membership as this device's store holds it; started on first use."""
    got = await store_membership.load(dev.repo)
    if got is not None:
        return got
    if not dev.keys.full:
        raise IntegrityError("this device's store has no membership record")
    now = time.time_ns()
    me = Member(dev.identity.device_id, dev.identity.public_key, dev.config.device_name, OWNER,
                added_ns=now, box_key=dev.identity.box_public_key)
    first = Membership(1, b"", dev.keys.epoch, (me,),
                       recovery_key=recovery_signer(dev.keys).public_key, time_ns=now)
    signed = sign_membership(first, dev.identity.device_id, dev.identity.sign)
    await store_membership.append(dev.repo, signed, None)
    return first, [signed]


async def listed_membership(dev: Device) -> Membership:
    """The membership as `devices` lists it, read only: a home from before membership
    records is this device alone."""
    got = await store_membership.load(dev.repo)
    if got is not None:
        return got[0]
    me = Member(dev.identity.device_id, dev.identity.public_key, dev.config.device_name, OWNER)
    return Membership(0, b"", dev.keys.epoch, (me,))


def find_device(m: Membership, which: str) -> Member:
    """A member named by id prefix or by name; NotFound or ConfigError if none or ambiguous."""
    if not which.strip():  # the empty prefix would name every device
        raise ConfigError("give a device's name or the start of its id (see `p2pbackup devices`)")
    hits = [x for x in m.members if x.device_id.startswith(which.lower()) or x.name == which]
    if not hits:
        if any(r.startswith(which.lower()) for r in m.removed):
            raise NotFound(f"device {which} was already removed from the account")
        raise NotFound(f"no device {which!r} in this account (see `p2pbackup devices`)")
    if len(hits) > 1:
        raise ConfigError(f"{which!r} names {len(hits)} devices; give more of the id")
    return hits[0]


# ---- pairing payloads ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Invitation:
    """What the device running `pair` offers: a member (all or some sources) or a partner."""

    role: str
    sources: tuple[str, ...] | None = None
    quota: int | None = None


def joiner_payload(identity: DeviceIdentity, name: str, has_account: bool,
                   tag_key: bytes) -> bytes:
    """What the joining device says about itself inside the PAKE channel; `tag_key` is the
    discovery tag key it advertises under if it becomes a storage partner (one for all the
    accounts it stores for: the host's devices recognise it by it)."""
    return msgpack.packb({"v": PAYLOAD_VERSION, "id": identity.device_id,
                          "pk": identity.public_key, "box": identity.box_public_key,
                          "name": name, "has_account": has_account, "tag": tag_key},
                         use_bin_type=True)


def _decode(payload: bytes, what: str, fields: dict[str, type]) -> dict:
    try:
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise PairingFailed(f"pairing failed: the other device sent a malformed {what}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("v"), int):
        raise PairingFailed(f"pairing failed: the other device sent a malformed {what}")
    for key, typ in fields.items():
        if not isinstance(obj.get(key), typ):
            raise PairingFailed(f"pairing failed: the other device sent a malformed {what} "
                                f"(field {key!r})")
    return obj


def invitation(dev: Device, role: str, sources: tuple[str, ...] | None,
               quota: int | None) -> Invitation:
    """Check what `pair` (or the console's Devices page) was asked to offer against this
    device's keys and sources: the one place that says which role takes sources or a quota."""
    if role not in (OWNER, MEMBER, PARTNER):
        raise ConfigError(f"unknown pairing role {role!r} (owner, member or partner)")
    if role == PARTNER and sources:
        raise ConfigError("a storage partner gets no keys, so it is granted no sources")
    if role == OWNER and sources:
        raise ConfigError("an owner holds every source; pair a member to grant only some")
    if role == MEMBER and not sources:
        raise ConfigError("a member is granted chosen sources: name at least one")
    if quota is not None and role != PARTNER:
        raise ConfigError("a quota applies to a storage partner only")
    if quota is not None and quota <= 0:
        raise ConfigError("a storage partner's quota must be more than zero")
    if not dev.keys.full:  # an owner holds every root; only an owner signs the next version
        raise WrongKey("only an owner device of the account can pair a new device (this one "
                       "was paired with --sources and holds only those); run `p2pbackup pair` "
                       "on an owner device")
    if sources:
        known = {s.name for s in dev.config.sources}
        if dev.keys.sources_granted() is not None:
            known = set(dev.keys.sources_granted() or [])
        unknown = [s for s in sources if s not in known]
        if unknown:
            raise ConfigError(f"no source named {unknown[0]!r} on this device (sources: "
                              f"{', '.join(sorted(known)) or 'none'})")
    return Invitation(role, sources, quota)


@dataclass(slots=True)
class PendingJoin:
    """A join the host has accepted but not yet committed (until the joiner confirms)."""

    member: Member
    signed: bytes
    welcome: bytes
    roster: tuple[str, bytes] | None = None   # a new roster version the welcome carries


async def prepare_welcome(dev: Device, invite: Invitation, payload: bytes) -> PendingJoin:
    """Check the joiner's request and build the welcome; nothing is stored yet."""
    req = _decode(payload, "join request", {"id": str, "pk": bytes, "name": str})
    if device_id_for(req["pk"]) != req["id"]:
        raise PairingFailed("pairing failed: the joining device's id does not match its key")
    if invite.role != PARTNER and req.get("has_account"):
        raise PairingFailed("pairing failed: the joining device already belongs to an account; "
                            "pair it with a fresh P2PBACKUP_HOME, or use `pair --partner`")
    current, chain = await membership_of(dev)
    if not current.may_change(dev.identity.device_id, None):
        raise WrongKey("only an owner device of the account can pair a new device; run "
                       "`p2pbackup pair` on an owner device")
    if req["id"] in current.removed:
        raise PairingFailed(f"pairing failed: device {req['id'][:12]} was removed from this "
                            "account and cannot join again")
    tag_key = req.get("tag")
    if invite.role == PARTNER and not (isinstance(tag_key, bytes)
                                       and len(tag_key) == grants.TAG_KEY_SIZE):
        raise PairingFailed("pairing failed: the joining device runs an older p2pbackup that "
                            "cannot be a storage partner; upgrade it")
    now = time.time_ns()
    # The joiner chose its name, and people see it in terminals: no control characters.
    name = "".join(ch for ch in req["name"] if ch.isprintable())[:100]
    box = req.get("box")  # a joiner of an older version has none: grants use its signing key
    member = Member(req["id"], req["pk"], name, invite.role,
                    invite.sources if invite.role == MEMBER else None,
                    invite.quota if invite.role == PARTNER else None, now,
                    tag_key if invite.role == PARTNER else b"",
                    box if isinstance(box, bytes) and len(box) == 32 else None)
    nxt = current.with_member(member, now)
    nxt = replace(nxt, prev=record_hash(chain[-1]), grants={}, time_ns=now)
    signed = sign_membership(nxt, dev.identity.device_id, dev.identity.sign)
    doc: dict = {"v": PAYLOAD_VERSION, "role": invite.role, "account": dev.keys.fingerprint(),
                 "host": {"id": dev.identity.device_id, "pk": dev.identity.public_key,
                          "name": dev.config.device_name}}
    made = None
    if invite.role == PARTNER:
        # A partner learns only which devices may talk to it (the signed roster, which it
        # then follows; partners are not listed in it, so it states the membership after
        # this join too) and its quota. `owners` is for partners from before rosters. A new
        # roster version is stored only once the join is committed (the very object sent:
        # the partner follows the chain from it).
        got = await roster.newest(dev.repo.store)
        made = roster.following(got, dev.identity, current)
        if made is None and got is None:
            raise WrongKey("only an owner device can pair a storage partner")
        doc["roster"] = made[1] if made is not None else got[1]
        doc["owners"] = [[m.device_id, m.public_key] for m in nxt.members
                         if m.role != PARTNER]
        doc["quota"] = invite.quota
    else:
        doc["config"] = await dev.repo.config_object()
        doc["chain"] = chain + [signed]
        doc["keys"] = dev.keys.export(list(invite.sources) if invite.sources else None)
    return PendingJoin(member, signed, msgpack.packb(doc, use_bin_type=True), made)


async def commit_join(dev: Device, pending: PendingJoin) -> Membership:
    """Store the new membership version (and the roster version the welcome carried) once
    the joiner confirmed it has everything."""
    current, chain = await membership_of(dev)
    nxt = Membership.decode(_signed_body(pending.signed))
    if nxt.seq != current.seq + 1 or nxt.prev != record_hash(chain[-1]) or \
            pending.roster is not None and await dev.repo.store.has(pending.roster[0]):
        raise PairingFailed("pairing failed: the device list changed during pairing; pair again")
    await store_membership.append(dev.repo, pending.signed, current)
    if pending.roster is not None:
        await dev.repo.store.put(*pending.roster)
    await roster.publish(dev.repo.store, dev.identity, nxt)   # partners: a new device
    return nxt


def _signed_body(signed: bytes) -> bytes:
    from .format.records import Signed

    return Signed.decode(signed, "membership record").body


@dataclass(slots=True)
class Joined:
    """What the joining device ended up with."""

    role: str
    account: str
    host_name: str
    sources: list[str] | None = None
    quota: int | None = None


async def apply_welcome(home: Path, identity: DeviceIdentity, name: str,
                        welcome: bytes, tag_key: bytes = b"") -> Joined:
    """Set this home up from the host's welcome (keys, membership, repository replica);
    `tag_key` is the one this device sent in its request (kept if it becomes a partner)."""
    doc = _decode(welcome, "welcome", {"role": str, "account": str, "host": dict})
    role, account = doc["role"], doc["account"]
    host_name = str(doc["host"].get("name", ""))
    if role == PARTNER:
        grant = _partner_grant(doc)   # checked whole before anything is written
        _may_replace(home, grant)
        if not (home / "config.toml").exists():
            init_home(home, [], identity=identity, keyless=True, device_name=name)
        if tag_key and grants.tag_key(home) is None:
            grants.save_tag_key(home, tag_key)
        grants.write_grant(home, grant)
        return Joined(PARTNER, account, host_name, quota=doc.get("quota"))
    if role not in (OWNER, MEMBER):
        raise PairingFailed(f"pairing failed: the other device offers a role ({role!r}) this "
                            "version does not know; upgrade p2pbackup")
    for key, typ in {"config": bytes, "chain": list, "keys": dict}.items():
        if not isinstance(doc.get(key), typ):
            raise PairingFailed(f"pairing failed: the welcome lacks {key!r}")
    try:
        keys = AccountKeys.from_export(doc["keys"])
    except ValueError:
        raise PairingFailed("pairing failed: the keys in the welcome are malformed") from None
    if keys.fingerprint() != account:
        raise PairingFailed("pairing failed: the keys received do not belong to the account")
    config, _ = init_home(home, [], keys=keys, identity=identity, device_name=name)
    repo = await Repository.create_replica(open_store(str(config.store)), keys, identity,
                                           str(config.cache_dir), name, doc["config"])
    try:
        newest = await store_membership.store_chain(repo, [bytes(x) for x in doc["chain"]])
        if not newest.admits(identity.device_id):
            raise PairingFailed("pairing failed: the membership received does not list this "
                                "device")
    finally:
        await repo.close()
    return Joined(role, account, host_name, keys.sources_granted())


def _partner_grant(doc: dict) -> grants.GrantFile:
    """The grant a partner keeps for the account a welcome names; PairingFailed unless every
    id in it has its exact form (the account becomes a file and a directory name)."""
    account, host = doc["account"], doc["host"]
    if not ids.is_account(account):
        raise PairingFailed(f"pairing failed: the other device names its account "
                            f"{ids.shown(account)}, which is not an account fingerprint")
    if not ids.is_device(host.get("id")):
        raise PairingFailed("pairing failed: the other device sent a malformed welcome "
                            "(its device id)")
    quota = doc.get("quota")
    if quota is not None and (not isinstance(quota, int) or isinstance(quota, bool)
                              or quota < 0):
        raise PairingFailed("pairing failed: the other device sent a malformed welcome "
                            "(the quota)")
    owners = doc.get("owners", [])
    if not isinstance(owners, list) or not all(
            isinstance(o, list) and len(o) == 2 and ids.is_device(o[0])
            and isinstance(o[1], bytes) and device_id_for(o[1]) == o[0] for o in owners):
        raise PairingFailed("pairing failed: the other device sent a malformed welcome "
                            "(the devices that may store here)")
    got = doc.get("roster")
    if not isinstance(got, bytes):
        raise PairingFailed("pairing failed: the other device runs an older p2pbackup (its "
                            "welcome has no roster); upgrade it")
    try:   # the first roster: signed by an owner it lists (the channel is the code's)
        first = read_roster(got, device_id_for)[0]
        check_signed(got, first.owner_key, verify_signature, device_id_for)
    except IntegrityError as exc:
        raise PairingFailed(f"pairing failed: the other device sent a malformed welcome "
                            f"({exc})") from None
    return grants.GrantFile(account, quota, got, [(d, k) for d, k in owners], time.time_ns(),
                            host["id"])


def _may_replace(home: Path, grant: grants.GrantFile) -> None:
    """PairingFailed unless `grant` may replace the one this partner holds for its account (if
    any): its roster signed by an owner of the held roster (or the recovery signer it names),
    and not older. An account's fingerprint is no secret: a stranger's welcome naming an
    account stored here would otherwise hand that account's data to the stranger's roster (who
    reads it, who removes it) and refuse its own devices."""
    held = next((g for g in grants.read_grants(home) if g.account == grant.account), None)
    if held is None or not held.roster:
        return    # nothing held, or a grant from before rosters: pairing again is its remedy
    try:
        current = read_roster(held.roster, device_id_for)[0]
    except IntegrityError:
        return    # a damaged grant (load_grants skips it): pairing again is its remedy
    try:
        new = check_signed(grant.roster, current.next_signer_key(device_id_for),
                           verify_signature, device_id_for)
    except IntegrityError:
        new = None
    if new is None or new.seq < current.seq:
        raise PairingFailed(f"pairing failed: this device stores for account {grant.account} "
                            "already, and the other device is none of its owners (an owner "
                            "this device knows pairs it again)")


# ---- revocation ------------------------------------------------------------------------------

@dataclass(slots=True)
class Removal:
    """The outcome of removing a device."""

    removed: Member
    membership: Membership
    recovery_code: str

    def to_json(self) -> dict:
        return {"removed": {"id": self.removed.device_id, "name": self.removed.name},
                "key_epoch": self.membership.epoch, "version": self.membership.seq,
                "recovery_code": self.recovery_code}


async def remove_device(dev: Device, which: str) -> Removal:
    """Remove a device: sign a new membership version and start a new key epoch."""
    if not dev.keys.full:
        raise WrongKey("only a device holding every source's keys can remove devices")
    current, chain = await membership_of(dev)
    target = find_device(current, which)
    if target.device_id == dev.identity.device_id:
        raise ConfigError("a device cannot remove itself; run `p2pbackup devices remove` on "
                          "another device of the account")
    if not current.may_change(dev.identity.device_id, None):
        raise WrongKey("this device may not change the account's devices (it is not an owner)")
    kept = await what_stays_valid(dev.repo, target.device_id)
    epoch = max(current.epoch, dev.keys.epoch) + 1
    keys = dev.keys.with_epoch(epoch, os.urandom(32))
    remaining = tuple(m for m in current.members if m.device_id != target.device_id)
    grants = {}
    for m in remaining:
        if m.role == PARTNER:
            continue  # partners hold ciphertext only
        material = keys.export(list(m.scopes) if m.role == MEMBER and m.scopes else None,
                               epochs=[epoch])
        grants[m.device_id] = seal_to(m.public_key, msgpack.packb(material, use_bin_type=True),
                                      m.box_key)
    now = time.time_ns()
    nxt = Membership(current.seq + 1, record_hash(chain[-1]), epoch, remaining,
                     current.removed + (target.device_id,),
                     recovery_signer(keys).public_key, grants, now,
                     {**current.kept, target.device_id: kept})
    signed = sign_membership(nxt, dev.identity.device_id, dev.identity.sign)
    # Order matters: the new root is on this device's disk and in the store's keyring before
    # any record names the epoch, so a crash never leaves data nobody can read.
    save_keys(dev.config, keys)
    dev.repo.keys = keys
    await store_membership.write_keyring(dev.repo, keys)
    await store_membership.append(dev.repo, signed, current)
    await roster.publish(dev.repo.store, dev.identity, nxt)   # partners follow it
    dev.keys = keys
    return Removal(target, nxt, recovery.encode(keys.roots[epoch]))


async def what_stays_valid(repo: Repository, device: str) -> Kept:
    """The pin of a device being removed: the snapshots and the log of it that this store
    holds (and that check out). Everything else it signs is refused from now on, by every
    device that reads the membership, whatever date the device puts on it."""
    from .repo.logstore import LogStore

    snaps, _ = await repo.list_snapshots()
    head = await LogStore(repo).read_head(device)
    return Kept(frozenset(bytes.fromhex(s.id) for s in snaps if s.snapshot.device == device),
                head.seq if head else 0, head.segment if head else bytes(32))


async def take_grants(dev: Device) -> bool:
    """Pick up every newer key epoch granted to this device in the membership; True if any.

    Each version that starts an epoch is sealed in the epoch before it, so the grants are
    taken one epoch at a time: the key from one opens the next version."""
    taken = False
    while await _take_grant(dev):
        taken = True
    return taken


async def _take_grant(dev: Device) -> bool:
    got = await store_membership.load(dev.repo)
    if got is None:
        return False
    current, _ = got
    me = dev.identity.device_id
    if me in current.removed:
        raise WrongKey("this device was removed from the account: it can no longer write to it")
    if current.epoch <= dev.keys.epoch or me not in current.grants:
        return False
    plain = dev.identity.open_sealed(current.grants[me])
    if plain is None:
        raise IntegrityError("the key grant for this device does not open")
    try:
        doc = msgpack.unpackb(plain, strict_map_key=False)
        if dev.keys.full:
            keys = dev.keys
            for e, root in doc["roots"].items():
                keys = keys.with_epoch(int(e), bytes(root))
        else:
            mine = dev.keys.export(dev.keys.sources_granted())
            mine["epochs"].update({int(e): g for e, g in doc["epochs"].items()})
            keys = AccountKeys.from_export(mine)
    except (ValueError, KeyError, TypeError, AttributeError, msgpack.ExtraData,
            msgpack.FormatError):
        raise IntegrityError("the key grant for this device is malformed") from None
    if keys.epoch <= dev.keys.epoch:
        raise IntegrityError("the key grant for this device does not hold the epoch it names")
    save_keys(dev.config, keys)
    dev.keys = dev.repo.keys = keys
    return True


# ---- recovery --------------------------------------------------------------------------------

@dataclass(slots=True)
class Recovered:
    """What `recover` restored."""

    config: Config
    membership: Membership
    epoch: int
    newest_epoch: int
    joined: bool


async def recover(home: Path, store_location: str, code: str, name: str, *,
                  peers: PeerSettings | None = None,
                  on_step: Callable[[str], None] | None = None,
                  options: Mapping[str, Any] | None = None, broker: str = "") -> Recovered:
    """Make a new home for this device from a recovery code and a store holding the account
    (a directory, any location open_store opens, with its `options`, or
    `peer:DEVICE[@HOST:PORT]`: a device of the account on the LAN, or through `broker`)."""
    if (home / "config.toml").exists():
        raise ConfigError(f"{home} is already set up; recover into a new P2PBACKUP_HOME")
    root = recovery.decode(code)
    if not is_peer_location(store_location):
        # A store that signs its requests (the storage server) is read as the recovery
        # signer, which the account's roster names.
        keys = AccountKeys(root)
        source = open_store(store_location, options=options, signer=StoreSigner(
            DeviceIdentity(keys.recovery_seed()), keys.fingerprint()))
        try:
            return await _recover_from(home, source, store_location, root, name)
        finally:
            await source.close()
    from .peer_fetch import PeerLocation, recovery_candidates

    where = PeerLocation.parse(store_location)
    signer = DeviceIdentity(AccountKeys(root).recovery_seed())
    errors: list[str] = []
    for candidate in await recovery_candidates(where, peers or PeerSettings.from_env(),
                                               on_step, broker=broker, signer=signer,
                                               account=AccountKeys(root).fingerprint()):
        try:
            source = await candidate.open(signer)
        except P2PError as exc:
            errors.append(str(exc))
            continue
        try:
            return await _recover_from(home, source, store_location, root, name,
                                       peer=(where, candidate.unverified, signer))
        except _NotThisPeer as exc:
            errors.append(str(exc))
        finally:
            await source.close()
    raise PeerUnreachable(f"no device of this account answered for {store_location}: " +
                          ("; ".join(errors) or "nothing p2pbackup is on the LAN"))


class _NotThisPeer(P2PError):
    """{}"""


async def _recover_from(home: Path, source: BlobStore, store_location: str, root: bytes,
                        name: str, peer: "tuple[PeerLocation, Unverified, DeviceIdentity] | None"
                        = None) -> Recovered:
    keys = await store_membership.keys_from_root(source, root)
    identity = DeviceIdentity.generate()
    cache = home / "cache-recover"
    try:
        repo = await Repository.open(source, keys, None, str(cache))
    except WrongKey:
        raise WrongKey(f"the recovery code does not open the repository at {store_location}: "
                       "it belongs to another account") from None
    try:
        got = await store_membership.load(repo)
        if got is None:
            raise NotFound(f"the store at {store_location} holds no membership record")
        current, chain = got
        if peer is not None:  # the peer is a device of this account, and the one named
            where, unverified, signer = peer
            unverified.check(signer.device_id, current)
            if find_device(current, where.which).device_id != unverified.sender:
                raise _NotThisPeer(f"the device that answered is not {where.which!r}")
        config_raw = await repo.config_object()
        signer = recovery_signer(keys)
        joined = current.recovery_key == signer.public_key
        new_roster = None
        if joined:
            now = time.time_ns()
            me = Member(identity.device_id, identity.public_key, name, OWNER, added_ns=now,
                        box_key=identity.box_public_key)
            nxt = current.with_member(me, now)
            nxt = replace(nxt, prev=record_hash(chain[-1]), grants={}, time_ns=now)
            signed = sign_membership(nxt, signer.device_id, signer.sign)
            # A storage partner takes the owners' records from owners only: this device
            # becomes one there through the roster below, and its daemon brings the version.
            partner = peer is not None and find_device(current, peer[0].which).role == PARTNER
            # The storage partners learn of this device from the roster, which the recovery
            # signer may sign when the newest one names it: no owner device may be left.
            new_roster = roster.following(await roster.newest(source), signer, nxt)
            if new_roster is not None:
                try:
                    await source.put(*new_roster)
                    if source.capabilities.signed_requests:
                        # The storage server took the roster: this device is an owner there
                        # now, and the membership version is an owner's to write.
                        source.sign_as(StoreSigner(identity, keys.fingerprint()))
                except P2PError as exc:
                    log.warning("could not store the new roster in %s (the storage partners "
                                "hear of this device once a copy reaches them): %s",
                                store_location, exc)
            if not partner:
                try:
                    await store_membership.append(repo, signed, current)
                except P2PError as exc:
                    log.warning("could not add this device to the membership in %s: %s",
                                store_location, exc)
            current, chain = nxt, chain + [signed]
    finally:
        await repo.close()
    config, _ = init_home(home, [], keys=keys, identity=identity, device_name=name)
    local = await Repository.create_replica(open_store(str(config.store)), keys, identity,
                                            str(config.cache_dir), name, config_raw)
    try:
        await store_membership.store_chain(local, chain)
        if new_roster is not None:   # (replicated from here to the partners)
            await local.store.put(*new_roster)
        # The same keyring object as the store's: one of our own under the same name would
        # differ from every peer's copy, and objects never change.
        name = f"{store_membership.KEYRING_PREFIX}{keys.epoch:06d}"
        try:
            await local.store.put(name, await source.get(name))
        except NotFound:
            await store_membership.write_keyring(local, keys)
    finally:
        await local.close()
    _rmtree(cache)
    return Recovered(config, current, keys.epoch, current.epoch, joined)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ---- pairing, both ends ----------------------------------------------------------------------

def pairing_host(dev: Device, invite: Invitation, code: str, *, rendezvous: "Rendezvous",
                 lifetime: float, confirm: Callable[[str, Member], Awaitable[bool]],
                 lock: asyncio.Lock | None = None, port: int = 0,
                 mailbox: "MailboxPipe | None" = None) -> "PairingHost":
    """A host for one code. Once a device proved the code, its request is checked and the
    welcome built (nothing stored, nothing sent); `confirm(verifier, member)` asks this
    device's user to compare the number; only on yes does the welcome (the keys) leave, and the
    membership changes only once the joiner confirmed it stored everything."""
    from .pairing_link import PairingHost

    pending: list[PendingJoin] = []
    guard = lock or asyncio.Lock()

    async def on_request(payload: bytes, verifier: str) -> bytes:
        async with guard:
            p = await prepare_welcome(dev, invite, payload)
        pending.append(p)
        return p.welcome

    async def ask(verifier: str) -> bool:
        return await confirm(verifier, pending[-1].member)

    async def on_complete() -> str:
        async with guard:
            await commit_join(dev, pending[-1])
        m = pending[-1].member
        granted = (f" of sources {', '.join(m.scopes)}" if m.scopes is not None else "") + \
            (f" with a quota of {format_size(m.quota)}" if m.quota is not None else "")
        return f"{m.name or 'a device'} ({m.device_id[:12]}) joined as {m.role}{granted}"

    return PairingHost(code, on_request, on_complete, confirm=ask, rendezvous=rendezvous,
                       lifetime=lifetime, port=port, mailbox=mailbox)


async def join_account(home: Path, code: str, name: str, *, rendezvous: "Rendezvous",
                       mailbox: str | None = None, find_timeout: float = 10.0,
                       on_verifier: Callable[[str], None] | None = None) -> Joined:
    """Pair this home with the device offering `code` (as a member, or as a partner)."""
    from .config import load_config, load_identity
    from .pairing_link import join

    has_home = (home / "config.toml").exists()
    identity = load_identity(load_config(home)) if has_home else DeviceIdentity.generate()
    # Kept only if this device becomes a partner (a member's is never used).
    tag_key = grants.tag_key(home) or secrets.token_bytes(grants.TAG_KEY_SIZE)
    result: list[Joined] = []

    async def on_welcome(payload: bytes, verifier: str) -> None:
        result.append(await apply_welcome(home, identity, name, payload, tag_key))

    await join(code, joiner_payload(identity, name, has_home, tag_key), on_welcome,
               rendezvous=rendezvous, mailbox=mailbox, find_timeout=find_timeout,
               on_verifier=on_verifier)
    return result[0]
