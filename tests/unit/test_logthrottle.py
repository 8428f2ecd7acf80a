"""A refusal a hostile peer can cause twenty times a second is one log line a minute."""

from __future__ import annotations

import logging

import pytest

from p2pbackup.logthrottle import KINDS, ThrottledLog


def test_a_flood_of_one_kind_is_a_line_a_minute_with_the_count_hidden_and_others_still_said(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttled = ThrottledLog(logging.getLogger("t"), now=lambda: now[0])
    with caplog.at_level(logging.WARNING, "t"):
        for i in range(20):                     # a partner's junk offers, one second
            throttled.warning(f"session offered through the broker refused: bad {i}")
            now[0] += 0.05
        throttled.warning("peer 3f2a at broker (broker): refused")   # another kind: said
        now[0] += 60
        throttled.warning("session offered through the broker refused: bad 20")
    assert [r.getMessage() for r in caplog.records] == [
        "session offered through the broker refused: bad 0",
        "peer 3f2a at broker (broker): refused",
        "session offered through the broker refused: bad 20 (19 more like it in the last "
        "minute)"]


def test_kinds_remembered_are_bounded() -> None:
    throttled = ThrottledLog(logging.getLogger("t"), now=lambda: 0.0)
    for i in range(KINDS * 3):
        throttled.warning(f"kind {i}: x")
    assert len(throttled._kinds) == KINDS
