"""Devices in different homes, each behind its own NAT router, reach each other across a
pretend internet (tests/nat.py): the signaling port is forwarded by the router and dialed at
its static address ([peers.addresses]); the data channel crosses the NATs by ICE, hole punched
with STUN through cone-like NATs, relayed by coturn through symmetric ones; `status` says which.
With the broker (on the public host beside coturn, handing out its STUN/TURN servers and REST
credentials) no port is forwarded and no [ice] table written: signaling and ICE servers come
from the broker alone; it may restart, or be down, without losing anything.

One topology for the module: the internet with coturn and the broker, and five homes.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

from tests.conftest import Cli, tree_state
from tests.eventually import eventually_sync
from tests.integration.test_peers_lan import (paired_homes, pack_names, peers, start_daemon,
                                              stop_all, wait_replicated)
from tests.nat import Internet, NatBroker, coturn_available
from tests.netns import NetLab, available

SIGNALING_PORT = 7890


@pytest.fixture(scope="module")
def world():
    if not available():
        pytest.skip("network namespaces need root and iproute2 (ip)")
    if not coturn_available():
        pytest.skip("coturn (turnserver) is not installed")
    with NetLab() as lab:
        internet = Internet(lab)
        turn = internet.coturn(user=("p2p", "secret"))
        # The broker's scheme: short-lived credentials from a secret shared with coturn.
        rest_turn = internet.coturn(secret="shared-with-the-broker", port=3479)
        cone = [internet.home(f"c{i}") for i in (1, 2)]
        symmetric = [internet.home(f"s{i}", symmetric=True) for i in (1, 2, 3)]
        devices = {h.router.name: h.device(f"{h.router.name}d") for h in cone + symmetric}
        homes = {h.router.name: h for h in cone + symmetric}
        yield internet, turn, homes, devices, rest_turn


@pytest.fixture(scope="module")
def broker(world, tmp_path_factory):
    internet, _, _, _, rest_turn = world
    return internet.broker(tmp_path_factory.mktemp("broker"), rest_turn)


@pytest.fixture
def trusting(broker: NatBroker, monkeypatch):
    """Daemons and CLIs started from here trust the broker's certificate."""
    for k, v in broker.env.items():
        monkeypatch.setenv(k, v)
    return broker


def _fill(src: Path, big: int = 0) -> None:
    src.mkdir()
    (src / "notes.txt").write_text("across the internet\n" * 50)
    for i in range(3):
        (src / f"f{i}.bin").write_bytes(os.urandom(400_000))
    if big:
        (src / "big.bin").write_bytes(os.urandom(big))


def _homes_in(world, tmp_path: Path, where: tuple[str, str], ice: str):
    """a (with data) in home where[0], its signaling port forwarded; b in where[1] dials it."""
    internet, turn, homes, devices, _ = world
    a, b, src, a_id = paired_homes(tmp_path, _fill, seal_interval=1)
    address = homes[where[0]].forward(SIGNALING_PORT, devices[where[0]])
    with open(a.home / "config.toml", "a") as f:
        f.write(f"\n[peers]\nport = {SIGNALING_PORT}\n{ice}")
    with open(b.home / "config.toml", "a") as f:
        f.write(f'\n[peers.addresses]\n{a_id[:8]} = "{address}"\n{ice}')
    a("snapshot")
    return a, b, src, a_id, devices[where[0]], devices[where[1]]


def _homes_via_broker(world, broker: NatBroker, tmp_path: Path, where: tuple[str, str],
                      big: int = 0):
    """a (with data) in home where[0], b in where[1]: no port forwarded, no [ice] table, only
    the broker's URL."""
    _, _, _, devices, _ = world
    a, b, src, a_id = paired_homes(tmp_path, lambda src: _fill(src, big), seal_interval=1)
    for cli in (a, b):
        with open(cli.home / "config.toml", "a") as f:
            f.write(f'\n[broker]\nurl = "{broker.url}"\n')
    a("snapshot")
    return a, b, src, a_id, devices[where[0]], devices[where[1]]


def _run_in(host, cli: Cli, *args: str) -> str:
    """`p2pbackup ARGS` of home `cli` inside `host`'s namespace (LAN discovery on); its
    stdout and stderr."""
    got = host.run(cli.argv(*args), env=cli.env() | {"P2PBACKUP_LAN": "on"},
                   capture_output=True, text=True, timeout=180)
    assert got.returncode == 0, got.stderr
    return got.stdout + got.stderr


def _peer(cli: Cli, device: str) -> dict:
    return next((p for p in peers(cli) if p["device"] == device), {})


def _signaling_port(cli: Cli) -> int:
    """The port the daemon of home `cli` takes offers on (0 until it listens)."""
    proc = cli("status", "--json", check=False)
    return json.loads(proc.stdout)["lan"]["signaling_port"] if proc.returncode == 0 else 0


def _broker_connected(cli: Cli) -> bool:
    proc = cli("status", "--json", check=False)
    return proc.returncode == 0 and bool((json.loads(proc.stdout).get("broker") or {})
                                         .get("connected"))


WORDS = {"reflexive": "hole punched", "relay": "TURN relay"}   # status's words for a path


def _replicate_and_check(world, tmp_path: Path, where: tuple[str, str], ice: str,
                         path: str | tuple[str, ...], homes=None) -> None:
    """a and b in homes `where` replicate, then restore; the data channel took `path` (or
    one of them), and status says which in words."""
    a, b, src, a_id, ha, hb = homes or _homes_in(world, tmp_path, where, ice)
    procs = [start_daemon(ha, a, tmp_path, "a"), start_daemon(hb, b, tmp_path, "b")]
    try:
        eventually_sync(lambda: _peer(b, a_id).get("connected"), timeout=90, interval=0.3)
        wait_replicated(a, b, 90)
        took = _peer(b, a_id)["ice_path"]
        assert took in ((path,) if isinstance(path, str) else path), took
        b_id = json.loads(b("devices", "--json").stdout)["devices"][1]["id"]
        assert _peer(a, b_id)["ice_path"] == took
        assert f"connected over the data channel ({WORDS[took]})" in b("status").stdout
    finally:
        stop_all(procs)
    for cli in (a, b):
        assert "no problems found" in cli("verify", "--read-data").stdout
    b("restore", "latest", "--to", str(tmp_path / "out"))
    assert tree_state(tmp_path / "out" / "src") == tree_state(src)


def test_cone_nat_homes_replicate_hole_punched_with_stun_only(world, tmp_path: Path):
    turn = world[1]
    _replicate_and_check(world, tmp_path, ("c1", "c2"), turn.toml(stun_only=True),
                         "reflexive")


def test_symmetric_nat_homes_replicate_through_the_turn_relay(world, tmp_path: Path):
    turn = world[1]
    _replicate_and_check(world, tmp_path, ("s1", "s2"), turn.toml(), "relay")


def test_relay_only_sends_even_hole_punchable_homes_through_turn(world, tmp_path: Path):
    # (so neither device learns the other's addresses)
    turn = world[1]
    _replicate_and_check(world, tmp_path, ("c1", "c2"), turn.toml(relay_only=True), "relay")


def test_without_ice_servers_nated_homes_do_not_connect_and_status_says_why(world,
                                                                           tmp_path: Path):
    a, b, src, a_id, ha, hb = _homes_in(world, tmp_path, ("c1", "c2"), "")
    procs = [start_daemon(ha, a, tmp_path, "a")]
    try:
        # b dials only once a listens: a dial refused before that is another error, which
        # status rightly shows until b's next dial.
        eventually_sync(lambda: _signaling_port(a), timeout=60, interval=0.3)
        procs.append(start_daemon(hb, b, tmp_path, "b"))
        # ICE between two NATs never fails on its own: the session's own timeout (30 s) ends it.
        eventually_sync(lambda: _peer(b, a_id).get("error"), timeout=90, interval=0.5)
        assert not _peer(b, a_id)["connected"]
        lines = [ln for ln in b("status").stdout.splitlines() if a_id[:12] in ln]
        assert len(lines) == 1 and "no STUN/TURN server is configured" in lines[0], lines
        assert f"not connected, dialing {world[2]['c1'].public_ip}:{SIGNALING_PORT}" \
            in lines[0] and "peer ? " not in lines[0]
        print(lines[0])
        assert pack_names(b) == set()
    finally:
        stop_all(procs)


def test_a_new_device_in_a_third_home_recovers_through_turn_from_a_peer_behind_nat(
        world, tmp_path: Path):
    internet, turn, homes, devices, rest_turn = world
    a, b, src, a_id, ha, hb = _homes_in(world, tmp_path, ("s1", "s2"), turn.toml())
    from p2pbackup.crypto import recovery

    code_file = tmp_path / "code"
    code_file.write_text(recovery.encode((a.home / "keys" / "account.key").read_bytes()))
    ice_file = tmp_path / "ice.toml"
    # The new device holds REST credentials (as the broker will hand out), not the user's.
    ice_file.write_text(rest_turn.toml(id="newdevice"))
    procs = [start_daemon(ha, a, tmp_path, "a")]
    try:
        eventually_sync(lambda: a("status", check=False).returncode == 0, timeout=60,
                        interval=0.3)   # its signaling endpoint answers
        new = Cli(tmp_path / "home-new")
        where = f"peer:{a_id[:8]}@{homes['s1'].public_ip}:{SIGNALING_PORT}"
        _run_in(devices["s3"], new, "recover", "--from", where, "--ice", str(ice_file),
                "--name", "new", "--recovery-code-file", str(code_file))
        out = tmp_path / "restored"
        assert "TURN relay" in _run_in(devices["s3"], new, "restore", "latest", "--from",
                                       where, "--to", str(out))
    finally:
        stop_all(procs)
    assert tree_state(out / "src") == tree_state(src)
    # The new home keeps the [ice] table: its daemon reaches the others the same way.
    assert 'urls = "turn:' in (new.home / "config.toml").read_text()


# -- through the broker --------------------------------------------------------------------

def test_cone_nat_homes_replicate_through_the_broker_hole_punched_or_relayed(
        world, trusting, tmp_path: Path):
    """With the broker's STUN and TURN, ICE may nominate the relay pair: aioice nominates
    the first pair whose check succeeds (aggressive nomination), and a hole is punched
    only once both sides have sent, so under load the relay pair sometimes answers first
    (a clean-clone run got relay once). Hole punching itself is checked with STUN alone
    (test_cone_nat_homes_replicate_hole_punched_with_stun_only)."""
    homes = _homes_via_broker(world, trusting, tmp_path, ("c1", "c2"))
    _replicate_and_check(world, tmp_path, ("c1", "c2"), "", ("reflexive", "relay"),
                         homes=homes)


def test_symmetric_nat_homes_replicate_through_the_brokers_turn_relay(world, trusting,
                                                                      tmp_path: Path):
    homes = _homes_via_broker(world, trusting, tmp_path, ("s1", "s2"))
    _replicate_and_check(world, tmp_path, ("s1", "s2"), "", "relay", homes=homes)


def test_the_broker_killed_mid_transfer_loses_nothing_and_daemons_reconnect(world, trusting,
                                                                            tmp_path: Path):
    broker = trusting
    a, b, src, a_id, ha, hb = _homes_via_broker(world, broker, tmp_path, ("c1", "c2"),
                                                big=24_000_000)
    procs = [start_daemon(ha, a, tmp_path, "a"), start_daemon(hb, b, tmp_path, "b")]
    try:
        eventually_sync(lambda: _peer(b, a_id).get("connected"), timeout=90, interval=0.2)
        broker.kill()          # kill -9, mid-transfer: the session's data channel goes on
        assert not pack_names(a) <= pack_names(b), "the transfer was over before the kill"
        broker.start()         # again, on the same data directory
        eventually_sync(lambda: _broker_connected(a) and _broker_connected(b), timeout=120,
                        interval=0.5)
        wait_replicated(a, b, 120)
        # Nothing lost after the restart either: a new snapshot still reaches b.
        (src / "after.txt").write_text("written after the broker came back\n")
        a("snapshot")
        eventually_sync(lambda: len(json.loads(b("snapshots", "--json").stdout)) >= 2,
                        timeout=120, interval=0.5)
        wait_replicated(a, b, 120)
    finally:
        stop_all(procs)
        if broker.proc is None or broker.proc.poll() is not None:
            broker.start()
    for cli in (a, b):
        assert "no problems found" in cli("verify", "--read-data").stdout
    b("restore", "latest", "--to", str(tmp_path / "out"))
    assert tree_state(tmp_path / "out" / "src") == tree_state(src)


def test_with_the_broker_down_two_daemons_on_one_lan_keep_replicating(world, trusting,
                                                                      tmp_path: Path):
    internet, _, homes, devices, _ = world
    broker = trusting
    second = homes["c2"].device("c2e")     # beside c2d, on the same home LAN
    a, b, src, a_id, ha, _ = _homes_via_broker(world, broker, tmp_path, ("c2", "c2"))
    broker.kill()
    try:
        procs = [start_daemon(ha, a, tmp_path, "a"), start_daemon(second, b, tmp_path, "b")]
        try:
            eventually_sync(lambda: _peer(b, a_id).get("connected"), timeout=60, interval=0.3)
            wait_replicated(a, b, 90)
            assert _peer(b, a_id)["ice_path"] == "host"
            assert not _broker_connected(a) and not _broker_connected(b)
        finally:
            stop_all(procs)
    finally:
        broker.start()
    b("restore", "latest", "--to", str(tmp_path / "out"))
    assert tree_state(tmp_path / "out" / "src") == tree_state(src)


@contextlib.contextmanager
def _a_new_device_beside_a_nated_peer(world, broker: NatBroker, tmp_path: Path):
    """a (with data, its daemon running and connected to the broker) behind symmetric NAT,
    and a fresh home for a new device in a third home; at the end, what that device restored
    from a through the broker (no address, nothing of the account on its LAN) must equal a's
    sources. Yields (a, a's id, the new home, its host)."""
    _, _, _, devices, _ = world
    a, _, src, a_id, ha, _ = _homes_via_broker(world, broker, tmp_path, ("s1", "s2"))
    procs = [start_daemon(ha, a, tmp_path, "a")]
    new, out = Cli(tmp_path / "home-new"), tmp_path / "restored"
    try:
        eventually_sync(lambda: _broker_connected(a), timeout=60, interval=0.3)
        yield a, a_id, new, devices["s3"]
        # The new device uses the broker from now on.
        assert f'url = "{broker.url}"' in (new.home / "config.toml").read_text()
        assert "over the data channel (TURN relay)" in _run_in(
            devices["s3"], new, "restore", "latest", "--from", f"peer:{a_id[:8]}", "--to",
            str(out))
    finally:
        stop_all(procs)
    assert tree_state(out / "src") == tree_state(src)


def test_a_device_in_a_third_home_pairs_through_the_brokers_mailbox_and_restores_from_a_nated_peer(
        world, trusting, tmp_path: Path):
    from tests.integration.test_pairing import Host

    mailbox = trusting.url.replace("https://", "wss://") + "/v1/mailbox"
    with _a_new_device_beside_a_nated_peer(world, trusting, tmp_path) as (a, _, new, host_s3):
        host = Host(a, "--mailbox", mailbox)   # through a's daemon, in its NATed home
        _run_in(host_s3, new, "pair", host.code, "--mailbox", mailbox, "--name", "far")
        assert host.finish()[0] == 0


def test_a_new_device_recovers_through_the_broker_from_a_peer_behind_nat(world, trusting,
                                                                         tmp_path: Path):
    from p2pbackup.crypto import recovery

    with _a_new_device_beside_a_nated_peer(world, trusting, tmp_path) as (a, a_id, new,
                                                                          host_s3):
        code_file = tmp_path / "code"
        code_file.write_text(recovery.encode((a.home / "keys" / "account.key").read_bytes()))
        # The recovery code and the broker's address: no peer address, no [ice] table.
        _run_in(host_s3, new, "recover", "--from", f"peer:{a_id[:8]}", "--broker",
                trusting.url, "--name", "new", "--recovery-code-file", str(code_file))


def test_a_storage_partner_in_another_home_is_reached_across_the_nats_through_the_broker(
        world, trusting, tmp_path: Path):
    """No LAN, no forwarded port: the owner dials its partner (a home with no account of its
    own) through the broker, and the data channel crosses both cone NATs with the broker's
    STUN/TURN servers (hole punched, or relayed: which pair ICE nominates first varies here
    under load, 'relay' in about half the runs at load 13)."""
    import asyncio

    from tests.integration.test_broker_partner import objects, pair_partner

    _, _, _, devices, _ = world
    src = tmp_path / "src"
    _fill(src)
    a, friend = Cli(tmp_path / "home-a"), Cli(tmp_path / "home-friend")
    a("init", "--source", str(src))
    partner_id = asyncio.run(pair_partner(a.home, friend.home))
    for cli in (a, friend):
        with open(cli.home / "config.toml", "a") as f:
            f.write(f'\n[broker]\nurl = "{trusting.url}"\n')
    a("snapshot")
    account = next((friend.home / "partners").glob("*.grant")).stem
    kept = friend.home / "partners" / account / "store"
    procs = [start_daemon(devices["c1"], a, tmp_path, "a"),
             start_daemon(devices["c2"], friend, tmp_path, "friend")]
    try:
        eventually_sync(lambda: _peer(a, partner_id).get("connected"), timeout=90, interval=0.3)
        assert _peer(a, partner_id)["ice_path"] in ("reflexive", "relay")
        assert _peer(a, partner_id)["signaled"] == "broker"
        mine = objects(a.home / "store")
        eventually_sync(lambda: mine <= objects(kept), timeout=90, interval=0.3)
    finally:
        stop_all(procs)
