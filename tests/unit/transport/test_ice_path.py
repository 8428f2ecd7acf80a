"""Which way a data channel crosses the network, from the ICE candidate pair selected."""

from __future__ import annotations

import pytest

from p2pbackup.peer_fetch import _lane_reachable
from p2pbackup.transport.datachannel import IcePath
from p2pbackup.views import ice_path_words


@pytest.mark.parametrize("local, remote, kind, words", [
    ("host", "host", "host", "LAN"),
    ("host", "srflx", "reflexive", "hole punched"),
    ("srflx", "prflx", "reflexive", "hole punched"),
    ("host", "relay", "relay", "TURN relay"),
    ("relay", "srflx", "relay", "TURN relay"),
])
def test_the_selected_pair_names_the_path(local, remote, kind, words):
    assert IcePath(local, remote).kind == kind
    assert ice_path_words(kind) == words


class _Link:
    def __init__(self, route: IcePath | None) -> None:
        self.route = route

    def ice_path(self) -> IcePath | None:
        return self.route


def test_a_direct_lane_is_tried_only_when_the_data_channel_did_not_cross_a_nat():
    # A lane's TCP connection to a NATed peer waits for its whole timeout (10 s) and fails.
    assert _lane_reachable(_Link(IcePath("host", "host")))
    assert _lane_reachable(_Link(None))
    assert not _lane_reachable(_Link(IcePath("host", "srflx")))
    assert not _lane_reachable(_Link(IcePath("relay", "relay")))


def test_status_and_the_console_name_the_data_channels_route():
    from p2pbackup.views import peer_route
    from p2pbackup.web.pages import devices

    relayed = {"connected": True, "path": "data channel", "ice_path": "relay"}
    assert peer_route(relayed) == "data channel (TURN relay)"
    assert peer_route({"path": "direct lane", "ice_path": "host"}) == "direct lane"
    assert peer_route({"path": "data channel", "ice_path": None}) == "data channel"
    assert peer_route({"path": "data channel", "ice_path": "reflexive", "signaled": "broker"}) \
        == "data channel (hole punched), signaled through the broker"
    page = devices({"devices": [{"id": "ab" * 16, "name": "laptop", "this_device": False,
                                 "sources": None, "quota": None, "role": "member",
                                 "peer": relayed}], "removed": [], "version": 3,
                  "key_epoch": 0}, can_change=False)
    assert "online, over the data channel (TURN relay)" in page
