"""One vocabulary: budget periods and task states are defined once (core.periods, core.states),
and the coordinator's enforcement and accounting's reporting agree on the period of any instant."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetplane.accounting.budgets import statuses
from fleetplane.accounting.rows import state_of
from fleetplane.coordinator.scheduler import AdmissionPolicy, Scheduler
from fleetplane.coordinator.world import World
from fleetplane.core import events as ev
from fleetplane.core.periods import PERIODS, period_end, period_name, period_start
from fleetplane.core.states import STATE_RANK, STATES, TERMINAL_STATES, TaskState
from fleetplane.core.teams import TeamsFileError, parse_teams

# instants near the edges that matter: midnights, Mondays, month and year ends, leap days
EDGES = [datetime(2026, 12, 31, 23, 30, tzinfo=UTC), datetime(2027, 1, 1, 0, 30, tzinfo=UTC),
         datetime(2028, 2, 29, 23, 59, tzinfo=UTC), datetime(2026, 11, 30, 0, 0, tzinfo=UTC),
         datetime(2026, 11, 29, 23, 59, 59, tzinfo=UTC), datetime(2026, 6, 30, 22, 0, tzinfo=UTC)]
instants = st.builds(lambda base, minutes: base + timedelta(minutes=minutes),
                     st.sampled_from(EDGES), st.integers(-26 * 60, 26 * 60))
zones = st.integers(-12 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))


def coordinator_period(team_period: str, at: datetime) -> str:
    """The period the coordinator charges a completed task's cost to (what it enforces)."""
    teams = parse_teams({"defaults": {"budget_period": team_period, "budget_usd": 100.0}})
    world = World()
    Scheduler(AdmissionPolicy(teams=teams)).apply(world, ev.TaskCompleted(
        task_id="t1", team="a", attempt=1, model="m", output="", cost_usd=1.0, duration_ms=1,
        occurred_at=at))
    return world.fleet.spend["a"].period


def accounting_period(team_period: str, at: datetime) -> str:
    """The period accounting reports spend against (/v1/budgets, BudgetStatus)."""
    teams = parse_teams({"defaults": {"budget_period": team_period}})
    (status,) = statuses(teams, {}, at, extra_teams=["a"])
    return status.period


@given(at=instants, zone=zones, period=st.sampled_from(PERIODS))
def test_coordinator_and_accounting_agree_on_the_period_in_any_time_zone(
        at: datetime, zone: timezone, period: str) -> None:
    local = at.astimezone(zone)  # the same instant, written in another time zone
    assert coordinator_period(period, local) == accounting_period(period, local) == \
        period_name(period, at)
    start, end = period_start(period, local), period_end(period, local)
    assert start.tzinfo == UTC and start <= at < end
    assert period_name(period, end) != period_name(period, start)
    assert period_name(period, end - timedelta(microseconds=1)) == period_name(period, start)


def test_period_names() -> None:
    at = datetime(2026, 11, 24, 23, 30, tzinfo=timezone(timedelta(hours=-5)))  # 04:30 UTC 25th
    assert [period_name(p, at) for p in PERIODS] == ["2026-11-25", "2026-W48", "2026-11"]
    assert period_name("week", datetime(2027, 1, 1, tzinfo=UTC)) == "2026-W53"
    with pytest.raises(ValueError, match="unknown budget period 'fortnight'"):
        period_start("fortnight", at)


def test_an_unknown_budget_period_is_refused_when_teams_are_loaded() -> None:
    with pytest.raises(TeamsFileError, match=r"teams\.payments\.budget_period"):
        parse_teams({"teams": {"payments": {"budget_period": "daily"}}})
    with pytest.raises(TeamsFileError, match=r"defaults\.budget_period"):
        parse_teams({"defaults": {"budget_period": "quarter"}})


def test_states_are_one_vocabulary() -> None:
    assert get_args(TaskState) == STATES and set(STATE_RANK) == set(STATES)
    assert set(STATES) > TERMINAL_STATES
    # every terminal event maps to a terminal state, and only those
    for event_type in (ev.TaskCompleted, ev.TaskAbandoned, ev.TaskCancelled, ev.TaskRolledBack):
        assert event_type.__name__ and ev.is_terminal(_sample(event_type))
        assert state_of(_sample(event_type)) in TERMINAL_STATES
    assert state_of(_sample(ev.TaskStarted)) not in TERMINAL_STATES


def _sample(event_type: type[ev.Event]) -> ev.Event:
    fields = {"task_id": "t", "team": "a"}
    extra = {ev.TaskCompleted: {"attempt": 1, "model": "m", "output": "", "cost_usd": 0.0,
                                "duration_ms": 1},
             ev.TaskAbandoned: {"attempt": 1, "reason": "r"}, ev.TaskCancelled: {"reason": "r"},
             ev.TaskRolledBack: {"attempt": 1, "reason": "r"},
             ev.TaskStarted: {"attempt": 1, "executor_id": "e", "slot": 0}}
    return event_type(**fields, **extra.get(event_type, {}))
