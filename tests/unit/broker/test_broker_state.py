"""The broker's state, one suite run against every BrokerState: SQLite (a file) and PostgreSQL
(a real server the suite starts, tests/servers.py `postgres`)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from p2pbackup.broker.postgres import PostgresState
from p2pbackup.broker.state import SCHEMA_VERSION, BrokerState, SqliteState
from p2pbackup.errors import UnsupportedFormat
from tests.servers import Postgres

pytestmark = pytest.mark.timeout(120)
A, B, C = "a" * 32, "b" * 32, "c" * 32

Opener = Callable[[], Awaitable[BrokerState]]


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens the same state again each call (a restart)."""
    if request.param == "sqlite":
        async def sqlite() -> BrokerState:
            return SqliteState(tmp_path / "b.sqlite")
        return sqlite
    dsn = request.getfixturevalue("postgres").new_database()

    async def pg() -> BrokerState:
        return await PostgresState.open(dsn)
    return pg


@pytest.fixture
async def state(opener: Opener) -> AsyncIterator[BrokerState]:
    s = await opener()
    yield s
    await s.close()


async def test_a_newer_push_replaces_an_older_one_and_pushes_expire(state: BrokerState) -> None:
    await state.enqueue("acct", B, A, "push", b"head 1", 100.0, collapse=True)
    await state.enqueue("acct", B, A, "push", b"head 2", 100.0, collapse=True)
    await state.enqueue("acct", B, C, "push", b"c's head", 50.0, collapse=True)
    await state.enqueue("acct", B, A, "open-tab", b"x", 100.0, collapse=False)
    got = await state.pending("acct", B, now=10.0)
    assert [(q.sender, q.kind, q.payload) for q in got] == [
        (A, "push", b"head 2"), (C, "push", b"c's head"), (A, "open-tab", b"x")]
    later = await state.pending("acct", B, now=60.0)     # C's push outlived its TTL
    assert [(q.sender, q.payload) for q in later] == [(A, b"head 2"), (A, b"x")]
    await state.forget_devices("acct", [A])              # a removed device's queue goes too
    assert await state.pending("acct", B, now=60.0) == []


async def test_a_roster_is_stored_only_over_the_version_it_replaces(state: BrokerState) -> None:
    assert await state.roster("acct") is None
    assert await state.set_roster("acct", 1, b"r1", replaces=None)
    assert not await state.set_roster("acct", 1, b"other", replaces=None)
    assert not await state.set_roster("acct", 3, b"r3", replaces=2)   # not the one held
    assert await state.set_roster("acct", 2, b"r2", replaces=1)
    assert await state.roster("acct") == b"r2"


async def test_commands_are_listed_after_an_index_and_dropped_once_read(
        state: BrokerState) -> None:
    first = await state.enqueue("acct", B, A, "open-tab", b"1", 100.0, collapse=False)
    second = await state.enqueue("acct", B, A, "open-tab", b"2", 100.0, collapse=False)
    await state.enqueue("acct", B, A, "push", b"head", 100.0, collapse=True)
    await state.enqueue("acct", C, A, "open-tab", b"for c", 100.0, collapse=False)
    assert second > first
    after = await state.pending("acct", B, 0.0, after=first, kind="open-tab")
    assert [q.payload for q in after] == [b"2"]
    await state.drop("acct", B, [first, second])
    assert [q.kind for q in await state.pending("acct", B, 0.0)] == ["push"]
    assert [q.payload for q in await state.pending("acct", C, 0.0)] == [b"for c"]


async def test_device_records_are_replaced_and_forgotten(state: BrokerState) -> None:
    await state.put_device("acct", B, b"old", 1.0)
    await state.put_device("acct", B, b"new", 2.0)
    await state.put_device("acct", A, b"a's", 3.0)
    await state.put_device("other", C, b"c's", 3.0)
    assert [(r.device, r.info, r.updated) for r in await state.devices("acct")] == [
        (A, b"a's", 3.0), (B, b"new", 2.0)]
    await state.forget_devices("acct", [B])
    assert [r.device for r in await state.devices("acct")] == [A]


async def test_a_person_holds_at_most_the_accounts_it_may(state: BrokerState) -> None:
    assert await state.bind_person("acct1", "p", 2)
    assert await state.bind_person("acct2", "p", 2)
    assert not await state.bind_person("acct3", "p", 2)       # a third: beyond the limit
    assert not await state.bind_person("acct1", "q", 2)       # held by another person
    assert await state.person_of("acct1") == "p"
    await state.unbind_person("acct2")
    assert await state.person_of("acct2") is None
    assert await state.bind_person("acct3", "p", 2)


async def test_what_is_stored_outlives_a_restart(opener: Opener) -> None:
    first = await opener()
    await first.set_roster("acct", 1, b"r1", replaces=None)
    await first.enqueue("acct", B, A, "push", b"head", 100.0, collapse=True)
    await first.close()
    again = await opener()
    try:
        assert await again.roster("acct") == b"r1"
        assert [q.payload for q in await again.pending("acct", B, 0.0)] == [b"head"]
    finally:
        await again.close()


async def test_a_database_from_a_newer_broker_is_refused_in_one_line(
        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    await SqliteState(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (SCHEMA_VERSION + 1,))
    with pytest.raises(UnsupportedFormat, match=f"newer p2pbackup .format v{SCHEMA_VERSION + 1}"):
        SqliteState(path)
    pg: Postgres = request.getfixturevalue("postgres")
    dsn = pg.new_database()
    await (await PostgresState.open(dsn)).close()
    db = await asyncpg.connect(dsn)
    await db.execute("UPDATE meta SET value = $1 WHERE key = 'schema'", SCHEMA_VERSION + 1)
    await db.close()
    with pytest.raises(UnsupportedFormat, match="newer p2pbackup") as got:
        await PostgresState.open(dsn)
    assert "\n" not in str(got.value)



async def test_an_invitation_is_spent_once_and_not_after_it_expires(state: BrokerState) -> None:
    await state.add_invitation("d1", 100.0)
    await state.add_invitation("d2", 50.0)
    assert not await state.spend_invitation("unknown", 10.0)
    assert await state.spend_invitation("d1", 10.0)
    assert not await state.spend_invitation("d1", 10.0)      # spent
    assert not await state.spend_invitation("d2", 60.0)      # expired


async def test_a_version_1_database_steps_up_and_a_version_1_broker_refuses_it(
        opener: Opener, monkeypatch: pytest.MonkeyPatch) -> None:
    from p2pbackup.broker import postgres, state as state_module

    first = await opener()
    await first.set_roster("acct", 1, b"r1", replaces=None)
    await first.close()
    monkeypatch.setattr(state_module, "SCHEMA_VERSION", 1)   # as the brokers before mailboxes
    monkeypatch.setattr(postgres, "SCHEMA_VERSION", 1)
    with pytest.raises(UnsupportedFormat, match="newer p2pbackup .format v2"):
        await opener()
    monkeypatch.undo()
    again = await opener()          # what version 1 wrote is read on
    try:
        assert await again.roster("acct") == b"r1"
    finally:
        await again.close()


async def test_a_database_version_1_wrote_is_marked_version_2_once_opened(
        tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    await SqliteState(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = 1 WHERE key = 'schema'")
    await SqliteState(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == (2,)
