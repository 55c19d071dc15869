"""Billing periods in Python, matching month_bounds() of lua/_prelude.lua."""

import functools
from datetime import UTC, datetime


def calendar_month(now: datetime) -> tuple[datetime, datetime]:
    """The UTC calendar month that contains `now`: FREE users' period."""
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    end = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def from_unix(seconds: int | str) -> datetime:
    return datetime.fromtimestamp(int(seconds), tz=UTC)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@functools.lru_cache(maxsize=4096)
def unix_rfc3339(seconds: int | str) -> str:
    """Cached: every answer repeats its period's bounds and the current second."""
    return rfc3339(from_unix(seconds))
