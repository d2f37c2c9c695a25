"""Spend vs budget per team (infra/teams.yaml via core.teams): pure status computation.

A team's state: ``ok``; ``low`` when less than its ``low_budget_share`` of the budget is left;
``exhausted`` when nothing is left. Periods are UTC calendar periods (day, week from Monday,
month), named like ``2026-11-24``, ``2026-W48`` and ``2026-11``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

from fleetplane.core.events import BudgetStatus
from fleetplane.core.periods import period_name
from fleetplane.core.teams import TeamPolicy, TeamsConfig


def budget_state(policy: TeamPolicy, spent: float) -> str:
    remaining = policy.budget_usd - spent
    if remaining <= 0:
        return "exhausted"
    if remaining < policy.low_budget_share * policy.budget_usd:
        return "low"
    return "ok"


def statuses(teams: TeamsConfig, spent_by_period: Mapping[str, Mapping[str, float]],
             now: datetime, extra_teams: Iterable[str] = ()) -> list[BudgetStatus]:
    """One BudgetStatus per team of teams.yaml and per other team that spent (defaults apply).

    `spent_by_period`: period (day/week/month) -> team -> spend since that period's start."""
    names = set(teams.teams) | set(extra_teams)
    out = []
    for team in sorted(names):
        policy = teams.policy(team)
        spent = spent_by_period.get(policy.budget_period, {}).get(team, 0.0)
        out.append(BudgetStatus(
            task_id="", team=team, occurred_at=now, period=period_name(policy.budget_period, now),
            budget_usd=policy.budget_usd, spent_usd=round(spent, 9),
            remaining_usd=round(policy.budget_usd - spent, 9),
            state=budget_state(policy, spent)))
    return out


def changed(previous: BudgetStatus | None, current: BudgetStatus, min_delta_usd: float) -> bool:
    """Worth publishing: new team or period, another state, or spend moved by min_delta."""
    if previous is None:
        return True
    return (previous.period != current.period or previous.state != current.state
            or previous.budget_usd != current.budget_usd
            or abs(previous.spent_usd - current.spent_usd) >= min_delta_usd)
