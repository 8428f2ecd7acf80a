"""The control protocol's parsing and the daemon's write gate, without a daemon."""

from __future__ import annotations

import asyncio
import json

import pytest

from p2pbackup import control
from p2pbackup.daemon.gate import WriteGate
from p2pbackup.errors import LocalProtocolError


def test_a_message_nested_too_deeply_is_a_protocol_error():
    for line in (b"[" * 100_000, b'{"v": 1, "args": ' + b'{"a": ' * 50_000):
        with pytest.raises(LocalProtocolError, match="nested too deeply"):
            control.decode(line)


def test_an_empty_reply_says_the_daemon_closed_the_connection():
    with pytest.raises(LocalProtocolError, match="closed the control connection"):
        control.decode(b"")


def test_arguments_are_checked_by_type():
    args = json.loads('{"pid": 12, "flag": true, "name": "x", "n": 1.5, "bad": [1]}')
    assert control.arg(args, "pid", int) == 12
    assert control.arg(args, "flag", bool) is True
    assert control.arg(args, "absent", str, "default") == "default"
    assert control.arg(args, "n", (int, float)) == 1.5
    for name, kind in (("flag", int), ("pid", bool), ("bad", str), ("name", int)):
        with pytest.raises(LocalProtocolError, match=repr(name)):
            control.arg(args, name, kind)


@pytest.mark.parametrize("bad", [{"expires": True}, {"expires": "600"}, {"port": 7000.5},
                                 {"port": "7000"}, {"quota": "50G"}, {"quota": 1.5},
                                 {"mdns": "no"}, {"mdns": 0}, {"mailbox": 5}])
async def test_pair_start_checks_its_arguments_by_type_before_anything_else(bad):
    """A malformed pair_start request is refused in words (exit 20) before the daemon does
    anything with it (no daemon here: nothing else may be reached)."""
    from p2pbackup.daemon.account_ops import AccountOps

    with pytest.raises(LocalProtocolError, match=repr(next(iter(bad)))):
        await AccountOps(None).pair_start({"role": "owner", **bad})  # type: ignore[arg-type]


async def test_closing_the_gate_waits_for_those_inside_and_holds_newcomers():
    gate = WriteGate()
    inside, leave, order = asyncio.Event(), asyncio.Event(), []

    async def writer(name: str, hold: asyncio.Event | None = None) -> None:
        async with gate.passing():
            order.append(f"{name} in")
            if hold is not None:
                inside.set()
                await hold.wait()
            order.append(f"{name} out")

    first = asyncio.create_task(writer("first", leave))
    await inside.wait()
    closing = asyncio.create_task(gate.close())
    await asyncio.sleep(0)
    assert not closing.done() and gate.closed      # the one inside is waited for
    late = asyncio.create_task(writer("late"))
    leave.set()
    await closing
    assert order == ["first in", "first out"]      # the late one waits at the closed gate
    await gate.open()
    await asyncio.gather(first, late)
    assert order[-2:] == ["late in", "late out"] and not gate.closed


async def test_a_pause_cancelled_while_waiting_leaves_the_gate_open():
    gate = WriteGate()
    inside, leave = asyncio.Event(), asyncio.Event()

    async def writer() -> None:
        async with gate.passing():
            inside.set()
            await leave.wait()

    busy = asyncio.create_task(writer())
    await inside.wait()
    closing = asyncio.create_task(gate.close())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert not gate.closed
    leave.set()
    await busy
    async with gate.passing():
        pass
