"""The sync protocol driven with bytes only: two machines wired by a pump."""

from __future__ import annotations

import os
import struct

import msgpack
from hypothesis import given, settings, strategies as st

from p2pbackup.protocol.framing import MAX_FRAME
from p2pbackup.protocol.sync import (MISMATCH, Closed, InventoryDone, ObjectReceived,
                                     ObjectRejected, ObjectWanted, PeerHello, PeerNotice,
                                     SyncSession)


def valid(name: str) -> bool:
    return name.startswith(("packs/", "heads/", "snapshots/")) and ".." not in name


class Side:
    def __init__(self, device: str, objects: dict[str, bytes], *, window: int = 1 << 24,
                 refuse: set[str] | None = None, wants=None) -> None:
        self.objects = dict(objects)
        self.s = SyncSession(device, set(objects), valid_name=valid, window=window, wants=wants)
        self.events: list = []
        self.refuse = refuse or set()
        self.max_in_flight = 0

    def handle(self, events: list) -> None:
        for ev in events:
            self.events.append(ev)
            if isinstance(ev, ObjectWanted):
                if ev.name in self.objects:
                    self.s.send_object(ev.name, self.objects[ev.name])
                else:
                    self.s.missing(ev.name)
                self.max_in_flight = max(self.max_in_flight, self.s.in_flight)
            elif isinstance(ev, ObjectReceived):
                if ev.name in self.refuse:
                    self.s.reject(ev.name, "content does not match its id")
                else:
                    self.objects[ev.name] = ev.data
                    self.s.ack(ev.name)


def pump(a: Side, b: Side, *, chunk: int | None = None, rounds: int = 10_000) -> None:
    for _ in range(rounds):
        moved = False
        for src, dst in ((a, b), (b, a)):
            data = src.s.data_to_send()
            if data:
                moved = True
                pieces = [data] if chunk is None else [data[i:i + chunk]
                                                       for i in range(0, len(data), chunk)]
                for p in pieces:
                    dst.handle(dst.s.receive_data(p))
            src.handle(src.s.next_wanted())
        if not moved:
            return


def objs(prefix: str, n: int, size: int = 1000) -> dict[str, bytes]:
    return {f"packs/{prefix}{i:04d}": os.urandom(size) for i in range(n)}


def test_both_sides_end_with_the_union():
    a, b = Side("A", objs("a", 20)), Side("B", objs("b", 30))
    pump(a, b)
    assert a.objects == b.objects and len(a.objects) == 50
    assert any(isinstance(e, PeerHello) and e.device == "B" for e in a.events)
    assert [e.wanted for e in a.events if isinstance(e, InventoryDone)] == [30]
    assert a.s.objects_sent == 20 and b.s.objects_sent == 30 and a.s.in_flight == 0


def test_byte_at_a_time_and_big_objects_in_parts():
    big = {"snapshots/big": os.urandom(5 * 1024 * 1024 + 7)}
    a, b = Side("A", big), Side("B", {})
    pump(a, b, chunk=65536)
    assert b.objects == big
    tiny_a, tiny_b = Side("A", objs("x", 3, 50)), Side("B", {})
    pump(tiny_a, tiny_b, chunk=1)
    assert tiny_b.objects == tiny_a.objects


def test_bytes_behind_counts_down_from_the_inventory_sizes():
    source = objs("a", 10, 30_000)
    a = Side("A", source)
    a.s = SyncSession("A", set(source), valid_name=valid,
                      sizes={n: len(d) for n, d in source.items()})
    b = Side("B", {})
    pump(a, b, rounds=1)
    assert b.s.bytes_behind == 300_000
    pump(a, b)
    assert b.s.bytes_behind == 0 and len(b.objects) == 10


def test_window_bounds_what_is_in_flight():
    a, b = Side("A", objs("a", 200, 100_000), window=1_000_000), Side("B", {})
    pump(a, b)
    assert len(b.objects) == 200
    assert a.max_in_flight <= 1_000_000 + 100_000


def test_announce_is_pulled_at_once_and_heads_again():
    a, b = Side("A", {"heads/d": b"v1"}), Side("B", {})
    pump(a, b)
    assert b.objects == {"heads/d": b"v1"}
    a.objects.update({"heads/d": b"v2", "packs/new": b"n"})
    a.s.announce(["packs/new", "heads/d"])
    pump(a, b)
    assert b.objects == {"heads/d": b"v2", "packs/new": b"n"}


def test_a_rejected_object_is_not_stored_and_the_sender_hears_why():
    a, b = Side("A", objs("a", 3)), Side("B", {}, refuse={"packs/a0001"})
    pump(a, b)
    assert "packs/a0001" not in b.objects and len(b.objects) == 2
    rej = [e for e in a.events if isinstance(e, ObjectRejected)]
    assert [(e.name, e.reason) for e in rej] == [("packs/a0001", "content does not match its id")]


def test_a_refusal_says_whether_the_content_did_not_match_its_name():
    """Only that refusal means the sender's copy may have rotted (it checks it again); a
    refusal for another reason (a quota, a policy), or with a code a newer version sends,
    carries no code."""
    a, b = Side("A", objs("a", 4)), Side("B", {})
    codes = {"packs/a0000": MISMATCH, "packs/a0001": None, "packs/a0002": "from-a-newer-one",
             "packs/a0003": ["not", "a", "code"]}

    def refuse(events: list) -> None:
        for ev in events:
            if isinstance(ev, ObjectReceived):
                b.s.reject(ev.name, "refused", code=codes[ev.name])
            else:
                Side.handle(b, [ev])

    b.handle = refuse  # type: ignore[method-assign]
    pump(a, b)
    rej = {e.name: e.code for e in a.events if isinstance(e, ObjectRejected)}
    assert rej == {"packs/a0000": MISMATCH, "packs/a0001": None, "packs/a0002": None,
                   "packs/a0003": None}


def test_a_notice_reaches_the_peer_and_the_session_goes_on():
    a, b = Side("A", objs("a", 2)), Side("B", {})
    b.s.notice("quota exceeded: storing packs would use 2 GiB of the 1 GiB granted")
    pump(a, b)
    assert [e.reason for e in a.events if isinstance(e, PeerNotice)] == \
        ["quota exceeded: storing packs would use 2 GiB of the 1 GiB granted"]
    assert len(b.objects) == 2 and not a.s.closed and not b.s.closed


def test_wants_can_ask_the_size_the_peers_inventory_gave():
    objects = {"packs/small": b"s" * 50, "packs/large": b"l" * 150}
    a = Side("A", {})
    a.s = SyncSession("A", set(objects), valid_name=valid,
                      sizes={n: len(d) for n, d in objects.items()})
    a.objects = objects
    b = Side("B", {}, wants=lambda name: (b.s.offered_size(name) or 0) <= 100)
    pump(a, b)
    assert set(b.objects) == {"packs/small"}
    assert b.s.offered_size("packs/nothing") is None


def test_resume_after_a_cut_sends_only_what_was_not_acknowledged():
    source = objs("a", 40, 50_000)
    a, b = Side("A", source, window=200_000), Side("B", {})
    pump(a, b, rounds=6)   # cut part-way
    got = dict(b.objects)
    assert 0 < len(got) < 40
    a2, b2 = Side("A", source), Side("B", got)
    pump(a2, b2)
    assert b2.objects == source
    assert a2.s.objects_sent == 40 - len(got)


def test_wants_filter_limits_what_is_fetched():
    a = Side("A", {**objs("a", 5), "snapshots/s": b"s"})
    b = Side("B", {}, wants=lambda n: n.startswith("snapshots/"))
    pump(a, b)
    assert list(b.objects) == ["snapshots/s"]


def frame(msg: dict) -> bytes:
    body = msgpack.packb({"v": 1, **msg}, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def hostile(data: bytes) -> list:
    s = SyncSession("B", set(), valid_name=valid)
    return s.receive_data(frame({"t": "hello", "versions": [1], "device": "X"}) + data)


def test_hostile_frames_close_the_session_with_one_line():
    cases = {
        "garbage": struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1",
        "oversized": struct.pack(">I", MAX_FRAME + 1),
        "unsafe name": frame({"t": "inv", "names": ["../../etc/passwd"], "last": True}),
        "never asked": frame({"t": "obj", "name": "packs/x", "off": 0, "total": 1,
                              "data": b"x", "last": True}),
        "wrong type": frame({"t": "want", "names": "packs/x"}),
        "not a map": struct.pack(">I", 1) + b"\x01",
        "stray ack": frame({"t": "ack", "name": "packs/x"}),
    }
    for why, data in cases.items():
        events = hostile(data)
        closed = [e for e in events if isinstance(e, Closed)]
        assert len(closed) == 1 and "malformed" in closed[0].reason, why
    s = SyncSession("B", set(), valid_name=valid)
    assert s.receive_data(frame({"t": "inv", "names": [], "last": True}))[0].reason.endswith(
        "before hello")


def test_parts_that_do_not_fit_are_refused():
    s = SyncSession("B", set(), valid_name=valid)
    s.receive_data(frame({"t": "hello", "versions": [1], "device": "X"}) +
                   frame({"t": "inv", "names": ["packs/x"], "last": True}))
    ev = s.receive_data(frame({"t": "obj", "name": "packs/x", "off": 0, "total": 10,
                               "data": b"12345", "last": True}))
    assert isinstance(ev[-1], Closed) and "do not fit" in ev[-1].reason


def test_unknown_types_are_ignored_and_versions_negotiated():
    b = Side("B", {})
    b.s.receive_data(frame({"t": "hello", "versions": [1, 2], "device": "A"}) +
                     frame({"t": "future-thing", "x": 1}))
    assert not b.s.closed
    s = SyncSession("B", set(), valid_name=valid)
    ev = s.receive_data(frame({"t": "hello", "versions": [7], "device": "Z"}))
    assert isinstance(ev[0], Closed) and "upgrade" in ev[0].reason


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data: bytes):
    s = SyncSession("B", {"packs/a"}, valid_name=valid)
    s.receive_data(data)
    hostile(data)


def pump_lanes(a: Side, b: Side, *, drop_bulk_after: int | None = None) -> None:
    """Control and bulk bytes travel separately; the bulk lane may 'drop' after N rounds."""
    rounds = 0
    while True:
        moved = False
        for src, dst in ((a, b), (b, a)):
            for lane in ("control", "bulk"):
                data = src.s.data_to_send(lane)
                if data and lane == "bulk" and not src.s.bulk_up:
                    data = b""
                if data:
                    moved = True
                    dst.handle(dst.s.receive_data(data, lane))
            src.handle(src.s.next_wanted())
        rounds += 1
        if drop_bulk_after is not None and rounds == drop_bulk_after:
            for side in (a, b):
                side.s.data_to_send("bulk")   # in flight on the lane: lost
                side.s.bulk_lane_down()
                side.handle(side.s.next_wanted())
            moved = True
        if not moved:
            return


def test_objects_go_over_the_bulk_lane_and_fall_back_when_it_drops():
    source = objs("a", 30, 40_000)
    a, b = Side("A", source, window=200_000), Side("B", {})
    a.s.bulk_lane_up()
    b.s.bulk_lane_up()
    a.s.offer_lane("AB:CD", 4433)
    pump_lanes(a, b, drop_bulk_after=4)
    assert b.objects == source
    from p2pbackup.protocol.sync import LaneOffered
    assert [e for e in b.events if isinstance(e, LaneOffered)] == [LaneOffered("AB:CD", 4433)]
    assert a.s.in_flight == 0 and not a.s.bulk_up


def test_objects_wait_for_a_lane_being_set_up_then_take_it():
    """Nothing goes out on the control lane while a direct lane is awaited: an object handed
    to the data channel would have to finish there, at its few MB/s."""
    source = objs("a", 5, 40_000)
    a, b = Side("A", source), Side("B", {})
    a.s.await_bulk_lane()
    pump_lanes(a, b)
    assert b.objects == {} and a.s.bytes_sent == 0
    assert not any(isinstance(e, ObjectWanted) for e in a.events)
    a.s.bulk_lane_up()
    b.s.bulk_lane_up()
    a.handle(a.s.next_wanted())
    assert a.s.data_to_send("control") == b""   # the objects went to the bulk lane
    pump_lanes(a, b)
    assert b.objects == source


def test_a_lane_that_never_comes_releases_the_objects_to_the_control_lane():
    source = objs("a", 5, 40_000)
    a, b = Side("A", source), Side("B", {})
    a.s.await_bulk_lane()
    pump_lanes(a, b)
    assert b.objects == {}
    a.s.bulk_lane_down()     # the adapter's deadline, or the dial failed
    a.handle(a.s.next_wanted())
    pump_lanes(a, b)
    assert b.objects == source


def test_objects_lost_on_the_way_are_asked_for_again_and_arrive():
    """Bytes of some objects vanish without either lane dropping (the bug this guards against:
    parts queued for a lane and then discarded); the receiver's `rewant` recovers them, and a
    slow copy arriving after the second request is harmless."""
    source = objs("a", 6, 300_000)
    a, b = Side("A", source, window=1 << 20), Side("B", {})
    pump(a, b, rounds=3)                 # hello, inventories, wants; the first objects go out
    a.s.data_to_send()                   # ...and are lost
    pump(a, b)
    assert b.s.pending > 0 and len(b.objects) < len(source)   # stalled: nothing more comes
    assert b.s.rewant() == b.s.pending
    pump(a, b)
    assert b.objects == source and b.s.pending == 0
    assert a.s.in_flight == 0            # the lost copies no longer hold the window

    # The first copy was only slow: it and the second copy both arrive, in either order.
    for first_copy_late in (False, True):
        a, b = Side("A", objs("c", 2, 2_500_000)), Side("B", {})
        pump(a, b, rounds=3)
        slow = a.s.data_to_send()
        b.s.rewant()
        if first_copy_late:
            pump(a, b)
            b.handle(b.s.receive_data(slow))
        else:
            b.handle(b.s.receive_data(slow))
            pump(a, b)
        assert not b.s.closed and b.objects == a.objects and b.s.pending == 0


def test_names_of_kinds_a_newer_version_writes_are_skipped_not_fatal():
    """Downgrade-safe: a newer peer's inventory, announcement or want may name kinds this
    version does not know (as `roster/` once was new); they are passed over and the session
    goes on, while names that could climb out of a store still end it."""
    future = ["rosters2/000000000001", "newkind/ab12/cd-34", "packs/a0000"]
    s = SyncSession("B", set(), valid_name=valid)
    out = s.receive_data(frame({"t": "hello", "versions": [1], "device": "X"})
                         + frame({"t": "inv", "names": future, "last": True})
                         + frame({"t": "announce", "names": ["later/thing"]})
                         + frame({"t": "want", "names": ["future/x", "packs/zz"]}))
    assert not s.closed and not [e for e in out if isinstance(e, Closed)]
    done = [e for e in out if isinstance(e, InventoryDone)]
    assert done and done[0].wanted == 1   # packs/a0000 only
    for unsafe in (["../x"], ["a/../b"], ["/abs/x"], ["a\\b"], ["x" * 300], ["a//b"], [""]):
        s = SyncSession("B", set(), valid_name=valid)
        ev = s.receive_data(frame({"t": "hello", "versions": [1], "device": "X"})
                            + frame({"t": "inv", "names": unsafe, "last": True}))
        assert isinstance(ev[-1], Closed) and "malformed" in ev[-1].reason, unsafe


def test_an_object_found_damaged_here_is_asked_for_again_and_not_awaited_from_a_peer_without_it():
    shared = {"packs/" + "a" * 64: b"intact"}
    a, b = Side("a", shared), Side("b", dict(shared))
    c = Side("c", {})
    pump(a, b)
    b.objects["packs/" + "a" * 64] = b"damaged"
    b.handle(b.s.lost(["packs/" + "a" * 64]))
    pump(a, b)
    assert b.objects["packs/" + "a" * 64] == b"intact" and b.s.pending == 0
    # A peer that never held it says so: nothing stays awaited (no asking again forever).
    d = Side("d", dict(shared))
    pump(c, d)
    d.handle(d.s.lost(["packs/" + "a" * 64]))
    pump(c, d)
    assert d.s.pending == 0 and not any(isinstance(e, Closed) for e in d.events)


def test_what_the_peer_holds_of_ours_counts_its_inventory_and_its_acks():
    """What a peer (a storage partner) holds of this side's objects, for the Devices page:
    those its inventory lists that we hold too, then each it acknowledges storing."""
    ours = objs("a", 10, 1000)
    a = Side("A", ours)
    a.s = SyncSession("A", set(ours), valid_name=valid,
                      sizes={n: len(d) for n, d in ours.items()})
    b = Side("B", dict(list(ours.items())[:4]) | objs("b", 3))
    pump(a, b, rounds=1)
    assert (a.s.peer_holds, a.s.peer_holds_bytes) == (4, 4000)
    pump(a, b)
    assert (a.s.peer_holds, a.s.peer_holds_bytes) == (10, 10_000)
    assert b.s.peer_holds == 4 + 3   # (B knows no sizes of its own: only its acks count bytes)
    assert b.s.peer_holds_bytes == 3000
