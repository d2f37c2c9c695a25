"""Per-team policy (infra/teams.yaml): quotas, budgets, fair-share weight, intake rate limits and
the tools and commands a team's agents may use. One file, read by every service that needs it."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleetplane.core.periods import BudgetPeriod


class RateLimit(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    per_second: float = Field(default=50.0, gt=0)
    burst: int = Field(default=200, ge=1)


class TeamPolicy(BaseModel):
    """What one team may do. Every field has a default; teams.yaml overrides per team."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_running: int = Field(default=20, ge=0)
    budget_usd: float = Field(default=50.0, ge=0)
    budget_period: BudgetPeriod = "day"
    low_budget_share: float = Field(default=0.2, ge=0, le=1)
    # the router's q (success >= q x the best model's), for all task types / per task type
    quality_share: float | None = Field(default=None, ge=0, le=1)
    quality_shares: dict[str, float] = Field(default_factory=dict)
    weight: float = Field(default=1.0, gt=0)
    rate_limit: RateLimit = Field(default_factory=RateLimit)
    tools: list[str] = Field(default_factory=list)
    commands: list[str] = Field(default_factory=list)
    max_subtask_depth: int = Field(default=2, ge=0)
    max_subtasks: int = Field(default=10, ge=0)


class TeamsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    defaults: TeamPolicy = Field(default_factory=TeamPolicy)
    teams: dict[str, TeamPolicy] = Field(default_factory=dict)

    def policy(self, team: str) -> TeamPolicy:
        """The team's policy (the defaults for a team that is not listed)."""
        return self.teams.get(team, self.defaults)


class TeamsFileError(ValueError):
    """teams.yaml is not valid: the message names each field at fault (`teams.<team>.<key>`)."""


def _policy(where: str, raw: Any) -> TeamPolicy:
    try:
        return TeamPolicy.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join([where, *(str(p) for p in e['loc'])])}: {e['msg']}"
            for e in exc.errors())
        raise TeamsFileError(problems) from exc


def parse_teams(raw: dict[str, Any]) -> TeamsConfig:
    """Teams inherit every key they do not set from `defaults`. Refused (TeamsFileError, naming
    the field) when a value is not allowed, e.g. an unknown budget period."""
    defaults = _policy("defaults", raw.get("defaults") or {})
    base = defaults.model_dump()
    teams = {
        name: _policy(f"teams.{name}", {**base, **(overrides or {})})
        for name, overrides in (raw.get("teams") or {}).items()
    }
    return TeamsConfig(defaults=defaults, teams=teams)


def load_teams(path: Path) -> TeamsConfig:
    raw = yaml.safe_load(path.read_text()) if path.exists() else {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with `defaults` and `teams`")
    return parse_teams(raw)


@lru_cache(maxsize=4)
def teams_for(path: Path) -> TeamsConfig:
    return load_teams(path)
