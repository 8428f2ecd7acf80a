import datetime as dt

from p2pbackup.backup.retention import Policy, apply_policy
from p2pbackup.format.records import Snapshot
from p2pbackup.repo.repository import StoredSnapshot

UTC = dt.timezone.utc


def snap(i: int, when: dt.datetime, device: str = "a") -> StoredSnapshot:
    ns = int(when.timestamp() * 1e9)
    return StoredSnapshot(f"{i:064x}", Snapshot(ns, device, "h", ()))


def test_keep_last_and_daily():
    base = dt.datetime(2026, 11, 1, 10, tzinfo=UTC)
    snaps = [snap(i, base + dt.timedelta(hours=6 * i)) for i in range(12)]  # 3 days, 4 a day
    keep, forget = apply_policy(snaps, Policy(last=2), UTC)
    assert [s.id for s in keep] == [snaps[10].id, snaps[11].id] and len(forget) == 10
    keep, _ = apply_policy(snaps, Policy(daily=2), UTC)
    # the newest of each of the 2 most recent days
    days = {s.snapshot.time_ns // 86_400_000_000_000 for s in keep}
    assert len(keep) == 2 and len(days) == 2 and snaps[-1] in keep


def test_rules_combine_and_devices_are_separate():
    base = dt.datetime(2026, 1, 5, tzinfo=UTC)
    a = [snap(i, base + dt.timedelta(weeks=i), "a") for i in range(10)]
    b = [snap(100 + i, base + dt.timedelta(days=i), "b") for i in range(3)]
    keep, forget = apply_policy(a + b, Policy(last=1, monthly=2), UTC)
    assert all(s in keep for s in b[-1:]) and b[-1] in keep
    assert a[-1] in keep
    kept_a = [s for s in keep if s.snapshot.device == "a"]
    months = {dt.datetime.fromtimestamp(s.snapshot.time_ns / 1e9, UTC).month for s in kept_a}
    assert len(months) == 2 and len(kept_a) == 2


def test_empty_policy_keeps_nothing_but_is_flagged():
    assert Policy().empty
