"""The pairing state machine, driven with bytes only."""

import re

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from p2pbackup.crypto.pairing import (
    MAX_FRAME, MAX_JOIN_PAYLOAD, Completed, Failed, HostPairing, JoinerPairing, JoinRequest, PairingCode, PakeDone,
    State, Welcome, make_code, parse_code, rendezvous_tag)
from p2pbackup.crypto.wordlist import EVEN_WORDS, ODD_WORDS
from p2pbackup.errors import LocalProtocolError, PairingFailed
from tests.pairing_frames import frame, frames

CODE = "7-guitarist-revenge"
OTHER_CODE = f"7-{ODD_WORDS[1]}-{EVEN_WORDS[2]}"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def new_host(code: str = CODE, clock: Clock | None = None) -> HostPairing:
    clock = clock or Clock()
    return HostPairing(code, expires_at=clock.t + 600, now=clock)


def only_failure(events: list) -> Failed:
    assert len(events) == 1 and isinstance(events[0], Failed), events
    assert "\n" not in events[0].reason
    return events[0]


def sent_error(machine) -> dict:
    (message,) = frames(machine.data_to_send())
    assert message["t"] == "error" and message["v"] == 1
    return message


def to_join_request(code: str = CODE, clock: Clock | None = None):
    """A host and a joiner up to the host's JoinRequest; returns them and the wire so far."""
    host, joiner = new_host(code, clock), JoinerPairing(code, b"joiner record")
    hello = joiner.data_to_send()
    assert isinstance(host.receive_data(hello)[0], PakeDone)
    pake = host.data_to_send()
    assert isinstance(joiner.receive_data(pake)[0], PakeDone)
    join = joiner.data_to_send()
    events = host.receive_data(join)
    assert isinstance(events[0], JoinRequest)
    return host, joiner, {"hello": hello, "pake": pake, "join": join}


def to_welcome(code: str = CODE):
    host, joiner, wire = to_join_request(code)
    host.accept(b"account key and records")
    wire["welcome"] = host.data_to_send()
    assert isinstance(joiner.receive_data(wire["welcome"])[0], Welcome)
    return host, joiner, wire


# --- the happy path ---------------------------------------------------------------------------

def test_happy_path_delivers_both_payloads_and_completes_only_after_done():
    host, joiner = new_host(), JoinerPairing(CODE, b"joiner record")
    assert host.state is State.WAIT_HELLO and joiner.state is State.WAIT_PAKE
    assert host.data_to_send() == b""

    (host_pake,) = host.receive_data(joiner.data_to_send())
    (joiner_pake,) = joiner.receive_data(host.data_to_send())
    assert host_pake == joiner_pake == PakeDone(host.verifier)
    assert re.fullmatch(r"\d{3} \d{3}", host.verifier) and host.verifier == joiner.verifier

    (request,) = host.receive_data(joiner.data_to_send())
    assert request == JoinRequest(b"joiner record", host.verifier)
    assert host.state is State.WAIT_DECISION
    host.accept(b"account key and records")
    assert host.state is State.WAIT_DONE and not host.finished

    (welcome,) = joiner.receive_data(host.data_to_send())
    assert welcome == Welcome(b"account key and records", joiner.verifier)
    assert joiner.state is State.WAIT_CONFIRM
    joiner.confirm()
    assert joiner.state is State.DONE and joiner.finished

    assert host.receive_data(joiner.data_to_send()) == [Completed()]
    assert host.state is State.DONE and host.finished
    assert host.data_to_send() == b"" and joiner.data_to_send() == b""
    # After DONE, input is ignored.
    assert host.receive_data(b"\x00\x00\x00\x01\xc0garbage") == []
    assert host.state is State.DONE


def test_verifiers_differ_between_sessions():
    a, _, _ = to_join_request()
    b, _, _ = to_join_request()
    assert a.verifier != b.verifier  # 1 in a million flakes; acceptable


def run_session(feed) -> tuple[list, list]:
    """Run a whole session, delivering each side's bytes through `feed(machine, data)`."""
    host, joiner = new_host(), JoinerPairing(CODE, b"J" * 300)
    host_events = feed(host, joiner.data_to_send())
    joiner_events = feed(joiner, host.data_to_send())
    host_events += feed(host, joiner.data_to_send())
    host.accept(b"W" * 300)
    joiner_events += feed(joiner, host.data_to_send())
    joiner.confirm()
    host_events += feed(host, joiner.data_to_send())
    return host_events, joiner_events


def test_byte_at_a_time_feeding():
    def one_byte_at_a_time(machine, data):
        events = []
        for i in range(len(data)):
            got = machine.receive_data(data[i:i + 1])
            assert not got or i == len(data) - 1  # an event only with a frame's last byte
            events += got
        return events

    host_events, joiner_events = run_session(one_byte_at_a_time)
    assert [type(e) for e in host_events] == [PakeDone, JoinRequest, Completed]
    assert [type(e) for e in joiner_events] == [PakeDone, Welcome]
    assert host_events[1].payload == b"J" * 300 and joiner_events[1].payload == b"W" * 300


@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6))
@settings(max_examples=15, deadline=None)
def test_any_chunking_gives_the_same_events(cuts):
    def chunked(machine, data):
        events, start = [], 0
        for cut in sorted(set(cuts)) + [len(data)]:
            events += machine.receive_data(data[start:max(start, cut)])
            start = max(start, cut)
        return events

    host_events, joiner_events = run_session(chunked)
    assert [type(e) for e in host_events] == [PakeDone, JoinRequest, Completed]
    assert [type(e) for e in joiner_events] == [PakeDone, Welcome]


def test_coalesced_frames_are_all_processed():
    host, joiner = new_host(), JoinerPairing(CODE, b"j")
    error = frame({"v": 1, "t": "error", "reason": "cancelled", "msg": "user pressed Ctrl-C"})
    host.receive_data(joiner.data_to_send())
    events = joiner.receive_data(host.data_to_send() + error)
    assert isinstance(events[0], PakeDone)
    assert events[1] == Failed("pairing failed: the other device stopped: user pressed Ctrl-C")
    assert joiner.state is State.FAILED


def test_frame_plus_partial_next_frame():
    host, joiner = new_host(), JoinerPairing(CODE, b"j")
    host.receive_data(joiner.data_to_send())
    error = frame({"v": 1, "t": "error", "reason": "cancelled", "msg": "bye"})
    assert [type(e) for e in joiner.receive_data(host.data_to_send() + error[:6])] == [PakeDone]
    assert joiner.state is State.WAIT_WELCOME
    only_failure(joiner.receive_data(error[6:]))


# --- wrong code, replay, reorder, other sessions ----------------------------------------------

def test_wrong_code_fails_closed_after_one_attempt():
    host, joiner = new_host(CODE), JoinerPairing(OTHER_CODE, b"j")
    host.receive_data(joiner.data_to_send())
    joiner.receive_data(host.data_to_send())  # SPAKE2 cannot tell yet: both get a key
    failure = only_failure(host.receive_data(joiner.data_to_send()))
    assert failure.wrong_code and "wrong code" in failure.reason and "new one" in failure.reason
    assert host.state is State.FAILED and host.finished

    error = host.data_to_send()
    assert frames(error)[0]["reason"] == "wrong-code"
    failure = only_failure(joiner.receive_data(error))
    assert failure.wrong_code and "code was wrong" in failure.reason
    assert "new code" in failure.reason
    assert joiner.state is State.FAILED

    # The code is burned: a later attempt with the right code gets nothing from this host.
    honest = JoinerPairing(CODE, b"j")
    assert host.receive_data(honest.data_to_send()) == []
    assert host.data_to_send() == b"" and host.state is State.FAILED
    with pytest.raises(PairingFailed, match="wrong code"):
        host.accept(b"w")


def test_replayed_hello():
    host, joiner = new_host(), JoinerPairing(CODE, b"j")
    hello = joiner.data_to_send()
    host.receive_data(hello)
    host.data_to_send()
    failure = only_failure(host.receive_data(hello))
    assert "'hello' where 'join' was due" in failure.reason
    assert sent_error(host)["reason"] == "unexpected"
    assert host.state is State.FAILED


def test_replayed_pake_at_joiner():
    host, joiner, wire = to_join_request()
    only_failure(joiner.receive_data(wire["pake"]))
    assert joiner.state is State.FAILED


def test_join_before_pake():
    _, _, wire = to_join_request()
    host = new_host()
    failure = only_failure(host.receive_data(wire["join"]))
    assert "'join' where 'hello' was due" in failure.reason and not failure.wrong_code


def test_second_join_while_deciding():
    host, _, wire = to_join_request()
    failure = only_failure(host.receive_data(wire["join"]))
    assert "'join' while this device waits for its user" in failure.reason
    with pytest.raises(PairingFailed):
        host.accept(b"w")


def test_done_before_welcome():
    host, joiner, _ = to_join_request()
    fake_done = frame({"v": 1, "t": "done", "box": bytes(24) + b"x" * 48})
    only_failure(host.receive_data(fake_done))
    assert host.state is State.FAILED


def test_welcome_before_pake_at_joiner():
    _, _, wire = to_welcome()
    joiner = JoinerPairing(CODE, b"j")
    failure = only_failure(joiner.receive_data(wire["welcome"]))
    assert "'welcome' where 'pake' was due" in failure.reason


def test_replayed_box_with_an_old_nonce():
    host, _, wire = to_join_request()
    host.accept(b"w")
    host.data_to_send()
    # The join box (counter 0) sent again as `done` (which must carry counter 1).
    join_box = frames(wire["join"])[0]["box"]
    failure = only_failure(host.receive_data(frame({"v": 1, "t": "done", "box": join_box})))
    assert "replayed or out-of-order" in failure.reason
    assert sent_error(host)["reason"] == "out-of-order"
    assert host.state is State.FAILED


def test_boxes_from_another_session_never_open():
    host1, joiner1, wire1 = to_join_request()
    _, joiner2, wire2 = to_welcome()
    # A welcome from session 2 at session 1's joiner.
    host1.accept(b"w")
    failure = only_failure(joiner1.receive_data(wire2["welcome"]))
    assert "could not be decrypted" in failure.reason
    # A done from session 2 at session 1's host.
    joiner2.confirm()
    failure = only_failure(host1.receive_data(joiner2.data_to_send()))
    assert "does not match" in failure.reason
    # A join from another session at a fresh host with the same code fails closed.
    host3, joiner3 = new_host(), JoinerPairing(CODE, b"j")
    host3.receive_data(joiner3.data_to_send())
    assert only_failure(host3.receive_data(wire1["join"])).wrong_code


def test_welcome_box_in_the_wrong_slot_does_not_open():
    # Same keys and nonce counter 0, but the associated data names the message type.
    host, joiner, wire = to_join_request()
    join_box = frames(wire["join"])[0]["box"]
    failure = only_failure(joiner.receive_data(frame({"v": 1, "t": "welcome", "box": join_box})))
    assert "could not be decrypted" in failure.reason


# --- malformed input --------------------------------------------------------------------------

def test_partial_frame_waits_for_more_data():
    host, joiner = new_host(), JoinerPairing(CODE, b"j")
    hello = joiner.data_to_send()
    assert host.receive_data(hello[:3]) == [] and host.receive_data(hello[3:10]) == []
    assert host.receive_data(b"") == []
    assert host.state is State.WAIT_HELLO
    assert [type(e) for e in host.receive_data(hello[10:])] == [PakeDone]


@pytest.mark.parametrize("body, detail", [
    (b"", "not valid msgpack"),
    (b"\xc1", "not valid msgpack"),
    (b"\x81\xa1v\x01trailing", "not valid msgpack"),
    (msgpack.packb([1, "hello"]), "not a map"),
    (msgpack.packb({"t": "hello"}), "missing field 'v'"),
    (msgpack.packb({"v": "1", "t": "hello"}), "field 'v' has the wrong type"),
    (msgpack.packb({"v": True, "t": "hello"}), "field 'v' has the wrong type"),
    (msgpack.packb({"v": 0, "t": "hello"}), "unknown version v0"),
    (msgpack.packb({"v": 1}), "missing field 't'"),
    (msgpack.packb({"v": 1, "t": 5}), "field 't' has the wrong type"),
    (msgpack.packb({"v": 1, "t": "hello"}), "missing field 'pake'"),
    (msgpack.packb({"v": 1, "t": "hello", "pake": "text"}), "field 'pake' has the wrong type"),
    (msgpack.packb({"v": 1, "t": "hello", "pake": b"A" * 5}), "field 'pake' has the wrong length"),
    (msgpack.packb({"v": 1, "t": "hello", "pake": b"A" + b"\xff" * 32}), "not a valid SPAKE2"),
    (msgpack.packb({"v": 1, "t": "hello", "pake": b"B" + bytes(32)}), "not a valid SPAKE2"),
    (msgpack.packb({"v": 1, "t": "error"}), "missing field 'reason'"),
])
def test_malformed_frames_fail_with_a_readable_reason(body, detail):
    host = new_host()
    failure = only_failure(host.receive_data(len(body).to_bytes(4, "big") + body))
    assert failure.reason.startswith("pairing failed: the other device sent a malformed message (")
    assert detail in failure.reason
    assert sent_error(host)["reason"] == "malformed"
    assert host.receive_data(b"more") == [] and host.data_to_send() == b""


def test_unknown_message_type():
    failure = only_failure(new_host().receive_data(frame({"v": 1, "t": "party\n\x1b[31m"})))
    assert "unknown message type 'party [31m'" in failure.reason


def test_own_hello_reflected_back_to_the_joiner():
    joiner = JoinerPairing(CODE, b"j")
    hello = frames(joiner.data_to_send())[0]
    failure = only_failure(joiner.receive_data(frame({**hello, "t": "pake"})))
    assert "not a valid SPAKE2" in failure.reason


def test_oversized_length_header_fails_without_the_body():
    joiner = JoinerPairing(CODE, b"j")
    joiner.data_to_send()
    failure = only_failure(joiner.receive_data((MAX_FRAME + 1).to_bytes(4, "big")))
    assert f"{MAX_FRAME + 1}-byte message" in failure.reason
    assert sent_error(joiner)["reason"] == "too-large"
    # A frame of exactly the maximum is legal and just waits for its body.
    joiner = JoinerPairing(CODE, b"j")
    assert joiner.receive_data(MAX_FRAME.to_bytes(4, "big") + b"\x81") == []
    assert joiner.state is State.WAIT_PAKE


def test_host_reads_no_frame_larger_than_a_join():
    # Everything a host reads is small; a stranger must not make it buffer megabytes.
    host = new_host()
    failure = only_failure(host.receive_data((MAX_JOIN_PAYLOAD + 1025).to_bytes(4, "big")))
    assert "-byte message" in failure.reason and sent_error(host)["reason"] == "too-large"
    big = JoinerPairing(CODE, b"J" * MAX_JOIN_PAYLOAD)  # the largest join still fits
    host = new_host()
    host.receive_data(big.data_to_send())
    big.receive_data(host.data_to_send())
    assert isinstance(host.receive_data(big.data_to_send())[0], JoinRequest)
    with pytest.raises(ValueError):
        JoinerPairing(CODE, b"J" * (MAX_JOIN_PAYLOAD + 1))


@pytest.mark.parametrize("reason", ["wrong-code", "expired"])
def test_a_peer_cannot_tell_the_host_its_code_is_wrong_or_expired(reason):
    # Only the host's own key confirmation or clock may say so: the transport burns the code on
    # these flags, and anyone on the LAN can send an error frame.
    host = new_host()
    failure = only_failure(host.receive_data(frame({"v": 1, "t": "error", "reason": reason})))
    assert not failure.wrong_code and not failure.expired
    # The joiner does take the host's word for it.
    joiner = JoinerPairing(CODE, b"j")
    joiner.data_to_send()
    failure = only_failure(joiner.receive_data(frame({"v": 1, "t": "error", "reason": reason})))
    assert failure.wrong_code or failure.expired


def test_a_man_in_the_middle_without_the_code_shows_different_numbers():
    # Mallory runs one session with each side, guessing the code (wrongly) in both: the two
    # people then see different numbers, since each comes from its own SPAKE2 key.
    host, joiner = new_host(CODE), JoinerPairing(CODE, b"j")
    mallory_host, mallory_joiner = new_host(OTHER_CODE), JoinerPairing(OTHER_CODE, b"m")
    mallory_host.receive_data(joiner.data_to_send())
    joiner.receive_data(mallory_host.data_to_send())
    host.receive_data(mallory_joiner.data_to_send())
    mallory_joiner.receive_data(host.data_to_send())
    assert joiner.verifier and host.verifier and joiner.verifier != host.verifier
    # And whatever Mallory forwards, the host's key confirmation fails: a wrong code.
    assert only_failure(host.receive_data(mallory_joiner.data_to_send())).wrong_code


def test_newer_protocol_version():
    host = new_host()
    failure = only_failure(host.receive_data(frame({"v": 2, "t": "hello2", "new": True})))
    assert failure.reason == ("pairing failed: the other device runs a newer pairing protocol "
                              "(v2); upgrade p2pbackup")
    assert sent_error(host)["reason"] == "unsupported-version"


def test_unknown_extra_fields_are_ignored():
    def with_extras(data: bytes) -> bytes:
        return b"".join(frame({**m, "future": [1, {"x": b"y"}], "hint": "z"}) for m in frames(data))

    def feed(machine, data):
        return machine.receive_data(with_extras(data))

    host_events, joiner_events = run_session(feed)
    assert [type(e) for e in host_events] == [PakeDone, JoinRequest, Completed]
    assert [type(e) for e in joiner_events] == [PakeDone, Welcome]


def test_peer_error_text_is_sanitised_and_bounded():
    joiner = JoinerPairing(CODE, b"j")
    joiner.data_to_send()
    nasty = "line one\nline two\x1b[2J\u202e" + "x" * 1000
    failure = only_failure(joiner.receive_data(
        frame({"v": 1, "t": "error", "reason": "cancelled", "msg": nasty})))
    assert failure.reason.isprintable() and len(failure.reason) < 260
    assert failure.reason.startswith("pairing failed: the other device stopped: line one line two")
    assert joiner.data_to_send() == b""  # no error answers an error


def test_error_without_msg_names_the_reason():
    host = new_host()
    failure = only_failure(host.receive_data(frame({"v": 1, "t": "error", "reason": "busy"})))
    assert failure.reason == "pairing failed: the other device stopped: busy"


# --- expiry, accept, reject, confirm ----------------------------------------------------------

def test_expiry():
    clock = Clock()
    host, joiner = new_host(clock=clock), JoinerPairing(CODE, b"j")
    assert host.check_expiry() == []
    clock.t += 599
    assert host.check_expiry() == []
    clock.t += 1
    failure = only_failure(host.check_expiry())
    assert failure.expired and "the pairing code expired" in failure.reason
    assert host.check_expiry() == [] and host.state is State.FAILED
    error = host.data_to_send()
    assert frames(error)[0]["reason"] == "expired"
    assert only_failure(joiner.receive_data(error)).expired


def test_input_after_expiry_fails_expired():
    clock = Clock()
    host, joiner = new_host(clock=clock), JoinerPairing(CODE, b"j")
    clock.t += 601
    failure = only_failure(host.receive_data(joiner.data_to_send()))
    assert failure.expired
    assert host.verifier is None  # the late hello was not even looked at


def test_accept_after_expiry_raises():
    clock = Clock()
    host, _, _ = to_join_request(clock=clock)
    clock.t += 600
    with pytest.raises(PairingFailed, match="expired"):
        host.accept(b"w")
    assert host.state is State.FAILED and host.failure.expired
    assert sent_error(host)["reason"] == "expired"


def test_accept_and_confirm_in_the_wrong_state():
    host, joiner = new_host(), JoinerPairing(CODE, b"j")
    with pytest.raises(LocalProtocolError, match="only valid after a JoinRequest"):
        host.accept(b"w")
    with pytest.raises(LocalProtocolError, match="only valid after a Welcome"):
        joiner.confirm()


def test_accept_after_failure_raises_a_clear_error():
    host, joiner, _ = to_join_request()
    host.receive_data(frame({"v": 1, "t": "error", "reason": "cancelled",
                             "msg": "changed my mind"}))
    with pytest.raises(PairingFailed) as info:
        host.accept(b"w")
    assert str(info.value) == "pairing failed: the other device stopped: changed my mind"
    assert info.value.exit_code == 24
    assert host.data_to_send() == b""


def test_reject_path():
    host, joiner, _ = to_join_request()
    host.reject("the numbers did not match")
    assert host.state is State.FAILED and "declined on this device" in host.failure.reason
    error = host.data_to_send()
    assert frames(error)[0]["reason"] == "rejected"
    failure = only_failure(joiner.receive_data(error))
    assert failure.reason == "pairing failed: the other device declined: the numbers did not match"
    with pytest.raises(PairingFailed):
        host.accept(b"w")
    host.reject("again")  # already over: nothing more happens
    assert host.data_to_send() == b""


def test_reject_before_anyone_joined_cancels():
    host = new_host()
    host.reject("user pressed Ctrl-C")
    assert sent_error(host)["reason"] == "cancelled"


def test_joiner_cancel_reaches_the_host():
    host, joiner, _ = to_welcome()
    joiner.cancel("the numbers did not match")
    failure = only_failure(host.receive_data(joiner.data_to_send()))
    assert failure.reason == "pairing failed: the other device stopped: the numbers did not match"


def test_welcome_then_unexpected_data_at_the_joiner():
    host, joiner, wire = to_welcome()
    failure = only_failure(joiner.receive_data(wire["welcome"]))
    assert "while this device waits for its user" in failure.reason
    with pytest.raises(PairingFailed):
        joiner.confirm()


# --- codes ------------------------------------------------------------------------------------

def test_make_code_parses_back():
    for _ in range(50):
        text = make_code()
        code = parse_code(text)
        assert code.text == text and 1 <= code.nameplate <= 999
        assert re.fullmatch(r"\d{1,3}-[a-z]+-[a-z]+", text)


def test_parse_code_normalises_case_and_spaces():
    code = parse_code("  7-GUITARIST-Revenge \n")
    assert code == PairingCode(7, "guitarist-revenge") and code.text == CODE
    assert parse_code("7 guitarist revenge") == code
    assert parse_code("007-guitarist-revenge") == code
    assert parse_code(code) is code


def test_different_spellings_of_one_code_pair():
    host, joiner = new_host("7-guitarist-revenge"), JoinerPairing(" 7-Guitarist-REVENGE ", b"j")
    host.receive_data(joiner.data_to_send())
    joiner.receive_data(host.data_to_send())
    assert isinstance(host.receive_data(joiner.data_to_send())[0], JoinRequest)


@pytest.mark.parametrize("text", [
    "", "7", "7-guitarist", "guitarist-revenge", "0-guitarist-revenge", "1000-guitarist-revenge",
    "7-guitarist-revenge-extra", "x-guitarist-revenge", "-7-guitarist-revenge",
    "7_guitarist_revenge",
    "7-guitar1st-revenge", "٧-guitarist-revenge",
])
def test_parse_code_rejects_bad_shapes(text):
    with pytest.raises(PairingFailed, match="a pairing code looks like 7-guitarist-revenge"):
        parse_code(text)


def test_parse_code_names_a_mistyped_word():
    with pytest.raises(PairingFailed, match="'guitarst' is not a pairing code word "
                                            r"\(did you mean 'guitarist'\?\)"):
        parse_code("7-guitarst-revenge")
    with pytest.raises(PairingFailed, match="'zzzzqq' is not a pairing code word; check"):
        parse_code("7-guitarist-zzzzqq")


def test_parse_code_word_order():
    with pytest.raises(PairingFailed, match="swapped: did you mean 7-guitarist-revenge"):
        parse_code("7-revenge-guitarist")
    with pytest.raises(PairingFailed, match="'gazelle' cannot be the first word"):
        parse_code("7-gazelle-revenge")


def test_rendezvous_tag_depends_on_the_nameplate_only():
    tag = rendezvous_tag(CODE)
    assert re.fullmatch(r"[0-9a-f]{16}", tag)
    assert rendezvous_tag(OTHER_CODE) == tag == rendezvous_tag(parse_code(CODE))
    assert rendezvous_tag("8-guitarist-revenge") != tag
    assert len({rendezvous_tag(f"{n}-guitarist-revenge") for n in range(1, 1000)}) == 999


# --- fuzz -------------------------------------------------------------------------------------

message_types = st.sampled_from(["hello", "pake", "join", "welcome", "done", "error", "x"])
field_values = st.one_of(st.binary(max_size=80), st.text(max_size=20),
                         st.integers(-2**63, 2**64 - 1),
                         st.none(), st.lists(st.integers(-9, 9), max_size=3))
framed_messages = st.builds(
    lambda v, t, extra: frame({"v": v, "t": t, **extra}),
    st.one_of(st.just(1), st.integers(min_value=-2, max_value=3)),
    message_types,
    st.dictionaries(st.sampled_from(["pake", "box", "reason", "msg", "other"]), field_values,
                    max_size=4))
framed_garbage = st.binary(max_size=64).map(lambda b: len(b).to_bytes(4, "big") + b)
inputs = st.lists(st.one_of(st.binary(max_size=64), framed_garbage, framed_messages), max_size=4)


def check_never_raises(machine, chunks) -> None:
    failures = 0
    for chunk in chunks:
        for event in machine.receive_data(chunk):
            failures += isinstance(event, Failed)
            if isinstance(event, Failed):
                assert event.reason.isprintable() and event.reason.startswith("pairing failed: ")
        machine.data_to_send()
    assert failures <= 1
    assert (failures == 1) == (machine.state is State.FAILED)


@given(chunks=inputs)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_fresh_machines_never_raise(chunks):
    check_never_raises(new_host(), chunks)
    check_never_raises(JoinerPairing(CODE, b"j"), chunks)


@given(chunks=inputs)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_mid_session_never_raises(chunks):
    host, joiner, _ = to_join_request()
    host.accept(b"w")
    joiner.data_to_send()
    check_never_raises(host, chunks)
    check_never_raises(joiner, chunks)


def test_a_code_takes_the_number_a_mailbox_allocated():
    code = make_code(42)
    assert code.startswith("42-") and parse_code(code).nameplate == 42
    for outside in (0, 1000):
        with pytest.raises(ValueError):
            make_code(outside)
