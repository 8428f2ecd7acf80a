import datetime as dt

import pytest

from p2pbackup.backup.retention import GroupPlan, Policy, plan_policy
from p2pbackup.config import Source
from p2pbackup.errors import ConfigError, NotFound
from p2pbackup.format.records import SourceRoot, Snapshot
from p2pbackup.repo.snapshots import GroupKey, choose_latest, parse_group_by, source_asked
from p2pbackup.repo.repository import StoredSnapshot

UTC = dt.timezone.utc
_ids = iter(range(1, 1_000_000))


def snap(i: int | None, when: dt.datetime, device: str = "a",
         sources: tuple[tuple[str, str], ...] = (), host: str = "h") -> StoredSnapshot:
    ns = int(when.timestamp() * 1e9)
    roots = tuple(SourceRoot(name, path, b"t" * 32) for name, path in sources)
    return StoredSnapshot(f"{i if i is not None else next(_ids) + 10_000:064x}",
                          Snapshot(ns, device, host, roots))


def kept(plans: list[GroupPlan]) -> list[StoredSnapshot]:
    """What every group keeps, oldest first."""
    return sorted((s for p in plans for s, _ in p.keep), key=lambda s: s.snapshot.time_ns)


def test_keep_last_and_daily():
    base = dt.datetime(2026, 11, 1, 10, tzinfo=UTC)
    snaps = [snap(i, base + dt.timedelta(hours=6 * i)) for i in range(12)]  # 3 days, 4 a day
    (one,) = plan_policy(snaps, Policy(last=2), UTC)
    assert [s.id for s, _ in one.keep] == [snaps[10].id, snaps[11].id] and len(one.forget) == 10
    keep = kept(plan_policy(snaps, Policy(daily=2), UTC))
    # the newest of each of the 2 most recent days
    days = {s.snapshot.time_ns // 86_400_000_000_000 for s in keep}
    assert len(keep) == 2 and len(days) == 2 and snaps[-1] in keep


def test_rules_combine_and_devices_are_separate():
    base = dt.datetime(2026, 1, 5, tzinfo=UTC)
    a = [snap(i, base + dt.timedelta(weeks=i), "a") for i in range(10)]
    b = [snap(100 + i, base + dt.timedelta(days=i), "b") for i in range(3)]
    plans = plan_policy(a + b, Policy(last=1, monthly=2), UTC)
    assert len(plans) == 2
    keep = kept(plans)
    assert all(s in keep for s in b[-1:]) and b[-1] in keep
    assert a[-1] in keep
    kept_a = [s for s in keep if s.snapshot.device == "a"]
    months = {dt.datetime.fromtimestamp(s.snapshot.time_ns / 1e9, UTC).month for s in kept_a}
    assert len(months) == 2 and len(kept_a) == 2


def test_empty_policy_keeps_nothing_but_is_flagged():
    assert Policy().empty


A = (("A", "/home/u/A"),)
B = (("B", "/tmp/B"),)


def _readme_scenario() -> tuple[list[StoredSnapshot], list[StoredSnapshot], StoredSnapshot]:
    """A daily on Feb 17 and 24 (Mondays) and every day from Mar 3 (a Monday) to Mar 16, 2025,
    an earlier one on Mar 16, then an ad-hoc snapshot of B later that day."""
    days = [dt.datetime(2025, 2, 17, 12, tzinfo=UTC), dt.datetime(2025, 2, 24, 12, tzinfo=UTC)]
    days += [dt.datetime(2025, 3, d, 12, tzinfo=UTC) for d in range(3, 17)]
    a = [snap(None, t, sources=A) for t in days]
    early = snap(None, dt.datetime(2025, 3, 16, 8, tzinfo=UTC), sources=A)
    b = snap(None, dt.datetime(2025, 3, 16, 18, tzinfo=UTC), sources=B)
    snaps = sorted(a + [early, b], key=lambda s: s.snapshot.time_ns)
    expected_a = [s for s in a if s.snapshot.time_ns >= days[-7].timestamp() * 1e9
                  or dt.datetime.fromtimestamp(s.snapshot.time_ns / 1e9, UTC).day in (17, 24, 9)]
    return snaps, expected_a, b


def test_adhoc_snapshot_of_other_sources_does_not_crowd_out_the_configured_ones():
    snaps, expected_a, b = _readme_scenario()
    plans = plan_policy(snaps, Policy(daily=7, weekly=4), UTC)
    assert kept(plans) == sorted(expected_a + [b], key=lambda s: s.snapshot.time_ns)
    by_paths = {p.key.paths: p for p in plans}
    assert set(by_paths) == {("/home/u/A",), ("/tmp/B",)}
    a_plan = by_paths[("/home/u/A",)]
    assert [s for s, _ in a_plan.keep] == expected_a            # 7 daily + 3 older weeks
    assert len(a_plan.forget) == 7 and len(expected_a) == 10    # Mar 3..8 and the early Mar 16
    assert [s for s, _ in by_paths[("/tmp/B",)].keep] == [b]
    reasons = dict((s.id, r) for s, r in a_plan.keep)
    assert reasons[expected_a[-1].id] == ("daily", "weekly")
    assert reasons[expected_a[0].id] == ("weekly",)


def test_one_group_per_device_and_path_set_whatever_the_names_or_order():
    t = dt.datetime(2026, 5, 1, tzinfo=UTC)
    same = [snap(None, t, "d1", (("docs", "/x/docs"), ("pics", "/x/pics")), host="laptop"),
            # device renamed, a source renamed, the sources in another order: still one group
            snap(None, t + dt.timedelta(hours=1), "d1", (("pics", "/x/pics"), ("d", "/x/docs")),
                 host="new-name")]
    other_device = snap(None, t, "d2", (("docs", "/x/docs"), ("pics", "/x/pics")))
    fewer_paths = snap(None, t, "d1", (("docs", "/x/docs"),))
    plans = plan_policy(same + [other_device, fewer_paths], Policy(last=1), UTC)
    assert sorted((p.key.device, p.key.paths) for p in plans) == [
        ("d1", ("/x/docs",)), ("d1", ("/x/docs", "/x/pics")), ("d2", ("/x/docs", "/x/pics"))]
    grouped = next(p for p in plans if p.key == GroupKey("d1", ("/x/docs", "/x/pics")))
    assert [s for s, _ in grouped.keep] == [same[1]] and grouped.forget == [same[0]]
    assert grouped.hostname == "new-name"


def test_group_by_device_paths_or_nothing():
    snaps, _, b = _readme_scenario()
    other = snap(None, dt.datetime(2025, 3, 16, 20, tzinfo=UTC), "z", sources=A)
    snaps = snaps + [other]
    assert parse_group_by("device,paths") == parse_group_by("paths, device") == \
        ("device", "paths")
    by_device = plan_policy(snaps, Policy(last=1, group_by=parse_group_by("device")), UTC)
    assert [(p.key, [s for s, _ in p.keep]) for p in by_device] == [
        (GroupKey("a", None), [b]), (GroupKey("z", None), [other])]  # the old behaviour
    by_paths = plan_policy(snaps, Policy(last=1, group_by=parse_group_by("paths")), UTC)
    assert [[s for s, _ in p.keep] for p in by_paths] == [[other], [b]]
    for none in ("none", ""):
        (one,) = plan_policy(snaps, Policy(last=1, group_by=parse_group_by(none)), UTC)
        assert one.key == GroupKey(None, None) and [s for s, _ in one.keep] == [other]
        assert one.key.describe() == "all snapshots"
    with pytest.raises(ConfigError, match="device, paths"):
        parse_group_by("host")


# ---- which snapshot `latest` names ---------------------------------------------------------

T0 = dt.datetime(2026, 6, 1, tzinfo=UTC)


def at(hours: int) -> dt.datetime:
    return T0 + dt.timedelta(hours=hours)


CONFIG = (Source("A", "/home/u/A"),)


def test_latest_is_the_newest_of_the_configured_sources_not_the_newest_snapshot():
    a1, a2 = snap(None, at(1), "me", A), snap(None, at(2), "me", A)
    adhoc = snap(None, at(3), "me", B)
    foreign = snap(None, at(4), "peer", A)  # the same paths, on another device
    snaps = [a1, a2, adhoc, foreign]
    chosen = choose_latest(snaps, device="me", sources=CONFIG)
    assert chosen.stored is a2 and "this device" in chosen.why
    with_b = choose_latest(snaps, device="me", sources=CONFIG, source=source_asked(snaps, "B/x"))
    assert with_b.stored is adhoc and "holding source B" in with_b.why
    with_a = choose_latest(snaps, device="me", sources=CONFIG, source="A")
    assert with_a.stored is a2


def test_latest_on_a_device_without_sources_is_the_only_group_or_refused():
    a = [snap(None, at(i), "old", A, host="laptop") for i in range(3)]
    chosen = choose_latest(a, device="new", sources=())
    assert chosen.stored is a[-1] and "laptop" in chosen.why
    adhoc = snap(None, at(5), "old", B, host="laptop")
    with pytest.raises(NotFound) as refused:
        choose_latest(a + [adhoc], device="new", sources=())
    msg = str(refused.value)
    assert "ambiguous" in msg and a[-1].short_id in msg and adhoc.short_id in msg
    assert "\n" not in msg and "--path" in msg
    assert choose_latest(a + [adhoc], device="new", source="B").stored is adhoc
    # this device's own snapshots come first, even when another device's are newer
    mine = snap(None, at(0), "new", (("C", "/c"),))
    assert choose_latest(a + [adhoc, mine], device="new").stored is mine


def test_latest_with_a_source_several_devices_hold_picks_the_configured_path():
    theirs = snap(None, at(9), "peer", (("A", "/elsewhere/A"),))
    mine_old = snap(None, at(1), "me", (("A", "/home/u/A"), ("C", "/c")))
    mine_adhoc = snap(None, at(2), "me", (("A", "/tmp/A"),))
    snaps = [mine_old, mine_adhoc, theirs]
    assert choose_latest(snaps, device="me", sources=CONFIG, source="A").stored is mine_old
    with pytest.raises(NotFound, match="ambiguous"):  # two paths named A here, none configured
        choose_latest(snaps, device="me", sources=(), source="A")
    with pytest.raises(NotFound, match="no snapshot holds source Z"):
        choose_latest(snaps, device="me", source="Z")
    assert source_asked(snaps, "not-a-source/x") is None
