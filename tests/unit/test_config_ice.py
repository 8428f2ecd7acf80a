"""config.toml's [ice] table (STUN/TURN servers) and [peers.addresses] (static addresses),
and how the dialers turn them into aiortc's ICE configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pbackup.config import StaticAddress, load_config
from p2pbackup.errors import ConfigError
from p2pbackup.peer_fetch import PeerLocation, ice_for
from p2pbackup.transport.datachannel import IceServer


def _home(tmp_path: Path, text: str) -> Path:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text('version = 1\nsources = []\n' + text)
    return home


def test_ice_servers_and_static_addresses_reach_the_dialers(tmp_path: Path):
    home = _home(tmp_path, '''
[peers.addresses]
3f9a2c = "203.0.113.7:7890"
"0badcafe" = "[2001:db8::1]:7890"

[ice]
relay_only = true

[[ice.servers]]
urls = "stun:198.51.100.1:3478"

[[ice.servers]]
urls = ["turn:198.51.100.1:3478", "turn:198.51.100.1:3478?transport=tcp"]
username = "p2p"
credential = "secret"
''')
    peers = load_config(home).peers
    assert peers.addresses == (StaticAddress("3f9a2c", "203.0.113.7", 7890),
                               StaticAddress("0badcafe", "2001:db8::1", 7890))
    ice = ice_for(peers, "203.0.113.7")
    assert ice.servers == (IceServer("stun:198.51.100.1:3478"),
                           IceServer(("turn:198.51.100.1:3478",
                                      "turn:198.51.100.1:3478?transport=tcp"),
                                     "p2p", "secret"))
    assert ice.relay_only and ice.host_addresses is None
    # A loopback peer is this machine: host candidates on lo, never a relay.
    assert ice_for(peers, "127.0.0.1").servers == ()


def test_without_an_ice_table_there_are_no_servers_and_no_google_fallback(tmp_path: Path):
    from p2pbackup.transport.datachannel import _rtc_configuration

    ice = ice_for(load_config(_home(tmp_path, "")).peers, "192.0.2.1")
    assert ice.servers == () and not ice.relay_only
    assert _rtc_configuration(ice).iceServers == []   # None would mean stun.l.google.com


@pytest.mark.parametrize("text, says", [
    ('[ice]\nservers = [{urls = "http://x"}]\n', r"ice.servers\[0\].*needs 'urls'"),
    ('[ice]\nservers = [{urls = "turn:x:3478"}]\n', r"TURN server needs 'username'"),
    ('[ice]\nservers = "stun:x"\n', r"'ice.servers' must be a list"),
    ('[ice]\nrelay_only = "yes"\n', r"'ice.relay_only' = 'yes' must be true or false"),
    ('[ice]\nrelay_only = true\nservers = [{urls = "stun:x:1"}]\n', r"relay_only' needs a TURN"),
    ('[peers.addresses]\n3f9a = "nowhere"\n', r"peers.addresses.3f9a' must map a device id"),
    ('[peers.addresses]\nlaptop = "10.0.0.1:7890"\n', r"peers.addresses.laptop'"),
])
def test_a_bad_ice_or_address_entry_is_one_line_naming_the_key(tmp_path: Path, text, says):
    with pytest.raises(ConfigError, match=says):
        load_config(_home(tmp_path, text))


def test_peer_locations_and_static_addresses_read_host_port_alike():
    assert PeerLocation.parse("peer:3f9a@[2001:db8::1]:7890") == \
        PeerLocation("3f9a", "2001:db8::1", 7890)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        PeerLocation.parse("peer:3f9a@host:99999")


def test_recover_with_an_ice_file_that_has_no_ice_table_is_one_line(tmp_path: Path, cli):
    (tmp_path / "ice.toml").write_text('[peers]\nport = 1\n')
    (tmp_path / "code").write_text("x")
    for ice, says in ((tmp_path / "ice.toml", "has no [ice] table"),
                      (tmp_path / "missing.toml", "cannot read")):
        got = cli("recover", "--from", "peer:3f9a@127.0.0.1:9", "--ice", str(ice),
                  "--recovery-code-file", str(tmp_path / "code"), check=False)
        assert got.returncode == 10 and says in got.stderr, got.stderr
        assert len(got.stderr.strip().splitlines()) == 1 and not cli.home.exists()
