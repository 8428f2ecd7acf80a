"""What a LAN stranger or a removed device learns from p2pbackup's mDNS adverts: nothing links
two adverts of one device across tag windows, a removed device no longer recognises the
members' tags, and a partner's one advert does not say how many accounts it stores for."""

from __future__ import annotations

import contextlib
import secrets
import time
from pathlib import Path

import pytest

from p2pbackup.config import load_config
from p2pbackup.crypto.identity import DeviceIdentity
from p2pbackup.crypto.tags import which_device
from p2pbackup.daemon.partner import PartnerService
from p2pbackup.repo.partner_store import load_grants
from p2pbackup.daemon.peers import PeerManager
from p2pbackup.device import init_device, open_device
from p2pbackup.format.membership import OWNER, PARTNER
from p2pbackup import account
from tests.adversary.test_partner_roster import join
from tests.integration.test_mdns import PAIR, Agent
from tests.netns import NetLab

pytestmark = pytest.mark.timeout(120)


def test_two_adverts_of_one_device_in_two_tag_windows_share_no_name(netlab: NetLab):
    lan = netlab.lan("lan")
    a, b = netlab.host("a", lan, "10.10.0.1/24"), netlab.host("b", lan, "10.10.0.2/24")
    browse = Agent(b, "browse", PAIR, "*")
    browse.expect(lambda m: "ready" in m)
    device = Agent(a, "rotate", PAIR, "4242")
    first = device.expect(lambda m: "ready" in m)
    seen1 = browse.expect(lambda m: m.get("event") == "added")
    device.send({"tick": 1})             # the next tag window
    second = device.expect(lambda m: "renewed" in m)
    gone = browse.expect(lambda m: m.get("event") == "removed")
    seen2 = browse.expect(lambda m: m.get("event") == "added")
    assert first["tag"] != second["tag"]
    # On the wire: the old advert said goodbye, the new one has a new instance and host name.
    assert gone["name"] == seen1["name"] == first["ready"]
    assert seen2["name"] == second["renewed"] and seen2["name"] != seen1["name"]
    assert seen1["server"] == first["server"] and seen2["server"] == second["server"]
    assert seen2["server"] != seen1["server"]
    assert seen2["name"].split(".")[0] not in seen1["name"] + seen1["server"]
    device.stop()
    device.expect(lambda m: "stopped" in m)
    browse.stop()


@pytest.fixture
async def three_owners(tmp_path: Path):
    """Owner A (writing, as its daemon does), and owners B and C as their daemons see them."""
    await init_device(tmp_path / "a", [])
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_device(tmp_path / "a", write=True))
        await join(a, tmp_path / "b", OWNER)
        await join(a, tmp_path / "c", OWNER)
        out = []
        for dev in (a, *[await stack.enter_async_context(open_device(tmp_path / x))
                         for x in "bc"]):
            pm = PeerManager(dev.config, dev)   # discovery as the daemon runs it (not started)
            await pm.refresh()
            out.append(pm)
        yield out


async def test_after_a_removal_the_removed_device_cannot_map_the_members_tags(three_owners):
    a, b, c = three_owners
    now = time.time()
    before = a.advert_txt(now)["tag"]
    assert b._recognise(before) == (a.me, False)
    await account.remove_device(a.dev, b.me)
    after = a.advert_txt(now)["tag"]
    # B holds every key it ever had, and none of them maps A's tag any more.
    assert b._recognise(after) is None
    assert all(which_device(k, after, [a.me], now) is None
               for k in [b.dev.keys.meta_id_key, *b.dev.keys.record_keys.values()])
    # C has not taken the new epoch yet: A still recognises C's (older) tag, and dials it.
    await a.refresh()
    assert a._recognise(c.advert_txt(now)["tag"]) == (c.me, True)


async def test_a_partner_of_three_accounts_publishes_one_advert_that_does_not_say_three(
        tmp_path: Path):
    partner = DeviceIdentity.generate()
    home = tmp_path / "p"
    owners = []
    async with contextlib.AsyncExitStack() as stack:
        for i in range(3):
            await init_device(tmp_path / f"a{i}", [])
            owners.append(await stack.enter_async_context(open_device(tmp_path / f"a{i}",
                                                                      write=True)))
            await join(owners[-1], home, PARTNER, identity=partner)
        grants = load_grants(home)
        assert len({g.account for g in grants}) == 3
        now = time.time()
        three = PartnerService(load_config(home), partner, grants).advert_txt(now)
        one = PartnerService(load_config(home), partner, grants[:1]).advert_txt(now)
        assert three.keys() == one.keys() == {"v", "port", "tag"}
        assert three["tag"] == one["tag"] and len(three["tag"]) == 16
        # Each account's devices recognise it by that one tag.
        for dev in owners:
            pm = PeerManager(dev.config, dev)
            await pm.refresh()
            assert pm._recognise(three["tag"]) == (partner.device_id, False)


def test_a_strangers_advert_with_an_odd_tag_is_ignored_not_a_crash():
    key, device = secrets.token_bytes(32), "ab" * 16
    for tag in ("é" * 16, "\u0661" * 16, "x" * 10_000, "", "ABCDEF0123456789"):
        assert which_device(key, tag, [device], time.time()) is None


def test_a_strangers_odd_port_in_txt_falls_back_to_the_srv_port():
    from p2pbackup.discovery.mdns import Found

    for said in ("-1", "0", "70000", "\u0663\u0663", "+80", " 80", "80 ", "abc", ""):
        assert Found(["10.0.0.1"], 4242, {"port": said, "tag": "x"}).signaling_port == 4242
    assert Found(["10.0.0.1"], 4242, {"port": "7890"}).signaling_port == 7890
