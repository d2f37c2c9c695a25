"""Budget periods, defined once: which "today", "this week" or "this month" a timestamp falls in.

Periods are UTC calendar periods: a day from 00:00 UTC, a week from Monday 00:00 UTC (ISO
weeks), a month from the 1st 00:00 UTC. The coordinator enforces budgets per period and
accounting reports them with these same functions, so both always mean the same period. An
unknown period is an error (teams.yaml is refused at load, with the field named).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final, Literal, get_args

BudgetPeriod = Literal["day", "week", "month"]
PERIODS: Final[tuple[str, ...]] = get_args(BudgetPeriod)


def _utc(at: datetime) -> datetime:
    """`at` in UTC; a naive datetime is taken to be UTC already."""
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def period_start(period: str, at: datetime) -> datetime:
    """Start (UTC) of the `period` containing `at`."""
    day = _utc(at).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    raise ValueError(f"unknown budget period {period!r} (one of {', '.join(PERIODS)})")


def period_end(period: str, at: datetime) -> datetime:
    """End (UTC, exclusive) of the `period` containing `at`: the next period's start."""
    start = period_start(period, at)
    if period == "day":
        return start + timedelta(days=1)
    if period == "week":
        return start + timedelta(days=7)
    return (start + timedelta(days=32)).replace(day=1)


def period_name(period: str, at: datetime) -> str:
    """The period's name: ``2026-11-24`` (day), ``2026-W48`` (ISO week), ``2026-11`` (month)."""
    start = period_start(period, at)
    if period == "day":
        return start.strftime("%Y-%m-%d")
    if period == "week":
        year, week, _ = start.isocalendar()
        return f"{year:04d}-W{week:02d}"
    return start.strftime("%Y-%m")
