import datetime as dt

import pytest

from p2pbackup.timeparse import TimeFormatError, parse_time

TZ = dt.timezone(dt.timedelta(hours=1))
NOW = dt.datetime(2026, 11, 23, 15, 30, 0, tzinfo=TZ)


@pytest.mark.parametrize("text, expected", [
    ("now", NOW),
    ("2 hours ago", NOW - dt.timedelta(hours=2)),
    ("90 minutes ago", NOW - dt.timedelta(minutes=90)),
    ("1 day ago", NOW - dt.timedelta(days=1)),
    ("3 weeks ago", NOW - dt.timedelta(weeks=3)),
    ("10s ago", NOW - dt.timedelta(seconds=10)),
    ("yesterday 14:00", dt.datetime(2026, 11, 22, 14, 0, tzinfo=TZ)),
    ("Yesterday at 9:05:30", dt.datetime(2026, 11, 22, 9, 5, 30, tzinfo=TZ)),
    ("yesterday", dt.datetime(2026, 11, 22, 0, 0, tzinfo=TZ)),
    ("today 08:15", dt.datetime(2026, 11, 23, 8, 15, tzinfo=TZ)),
    ("12:00", dt.datetime(2026, 11, 23, 12, 0, tzinfo=TZ)),
    ("2026-11-20T10:00:00", dt.datetime(2026, 11, 20, 10, 0, tzinfo=TZ)),
    ("2026-11-20T10:00:00+00:00", dt.datetime(2026, 11, 20, 10, 0, tzinfo=dt.timezone.utc)),
])
def test_forms(text, expected):
    assert parse_time(text, NOW) == expected


@pytest.mark.parametrize("text", ["soon", "yesterday 25:00", "2 fortnights ago", ""])
def test_errors_say_what_is_accepted(text):
    with pytest.raises(TimeFormatError, match="ISO 8601|no such time"):
        parse_time(text, NOW)
