"""Analytics, budgets, what-if, analyst SQL and audit endpoints of the accounting API."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from clickhouse_connect.driver.exceptions import ClickHouseError
from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel, Field

from fleetplane.accounting import analytics, audit, queries
from fleetplane.accounting.analytics import DailyDimension, ValueDimension
from fleetplane.accounting.budgets import statuses
from fleetplane.accounting.sqlguard import SqlRefused, run_readonly
from fleetplane.accounting.store import Store
from fleetplane.accounting.whatif import Selection, parse_share, resolve_target, what_if
from fleetplane.core.catalog import catalog_for
from fleetplane.core.periods import period_start
from fleetplane.core.settings import Settings
from fleetplane.core.teams import teams_for

Team = Annotated[str | None, Query(min_length=1, max_length=200)]
Since = Annotated[datetime | None, Query(description="occurred_at >= since (ISO-8601)")]
Until = Annotated[datetime | None, Query(description="occurred_at < until (ISO-8601)")]
TaskId = Annotated[str, Path(min_length=1, max_length=200)]


class SqlRequest(BaseModel):
    query: str = Field(min_length=1, max_length=100_000)


def _bad(field: str, message: str, where: str = "query") -> HTTPException:
    return HTTPException(status_code=422, detail=[{"loc": [where, field], "msg": message,
                                                   "type": "value_error"}])


def budgets(store: Store, settings: Settings) -> list[dict[str, Any]]:
    teams = teams_for(settings.teams_file)
    now = datetime.now(UTC)
    periods = {teams.policy(t).budget_period for t in teams.teams} | {teams.defaults.budget_period}
    spent: dict[str, dict[str, float]] = {
        p: analytics.spend_since(store, period_start(p, now)) for p in periods}
    extra = {t for by_team in spent.values() for t in by_team if t}
    out = []
    for s in statuses(teams, spent, now, extra):
        policy = teams.policy(s.team)
        out.append({"team": s.team, "period": s.period, "budget_usd": s.budget_usd,
                    "spent_usd": s.spent_usd, "remaining_usd": s.remaining_usd,
                    "state": s.state, "max_running": policy.max_running})
    return out


def task_entries(store: Store, task_id: str) -> list[audit.Entry]:
    rows = queries.task_events(store, task_id, limit=queries.MAX_EVENTS)
    if not rows:
        raise HTTPException(status_code=404, detail=f"no events for task {task_id!r}")
    return audit.entries_from_rows(rows)


def make_router(store: Store, settings: Settings) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/cost/daily")
    def cost_daily(by: DailyDimension = "team", team: Team = None, since: Since = None,
                   until: Until = None) -> list[dict[str, Any]]:
        return analytics.cost_daily(store, by, team=team, since=since, until=until)

    @r.get("/v1/cache-savings")
    def cache_savings(team: Team = None) -> dict[str, Any]:
        return analytics.cache_savings(store, team=team)

    @r.get("/v1/value")
    def value(by: ValueDimension = "task_type", team: Team = None) -> list[dict[str, Any]]:
        return analytics.cost_to_value(store, by, team=team)

    @r.get("/v1/utilization")
    def utilization(bucket_s: Annotated[int, Query(ge=1, le=86_400)] = 60,
                    since: Since = None, until: Until = None) -> dict[str, Any]:
        return analytics.utilization(store, bucket_s=bucket_s, since=since, until=until)

    @r.get("/v1/queue-wait")
    def queue_wait(by: Literal["team", "task_type"] | None = None) -> list[dict[str, Any]]:
        return analytics.queue_wait(store, by=by)

    @r.get("/v1/held")
    def held() -> list[dict[str, Any]]:
        return analytics.held_time(store)

    @r.get("/v1/overview")
    def overview() -> dict[str, Any]:
        return analytics.fleet_overview(store)

    @r.get("/v1/budgets")
    def budget_list() -> list[dict[str, Any]]:
        return budgets(store, settings)

    @r.get("/v1/alerts")
    def alerts(limit: Annotated[int, Query(ge=1, le=10_000)] = 50) -> list[dict[str, Any]]:
        return analytics.recent_alerts(store, limit=limit)

    @r.get("/v1/whatif")
    def whatif(
        shift: Annotated[str, Query(min_length=1, max_length=20, description="e.g. 20%")],
        from_tier: Annotated[str | None, Query(alias="from", max_length=100)] = None,
        from_model: Annotated[str | None, Query(max_length=200)] = None,
        task_type: Annotated[str | None, Query(max_length=200)] = None,
        to: Annotated[str | None, Query(max_length=100, description="target tier")] = None,
        to_model: Annotated[str | None, Query(max_length=200)] = None,
    ) -> dict[str, Any]:
        catalog = catalog_for(settings.catalog_file)
        try:
            share = parse_share(shift)
        except ValueError as exc:
            raise _bad("shift", str(exc)) from exc
        if from_tier and from_tier not in catalog.tiers:
            raise _bad("from", f"unknown tier {from_tier!r} (tiers: {', '.join(catalog.tiers)})")
        try:
            target = resolve_target(catalog, to_model, to)
        except (KeyError, ValueError) as exc:
            raise _bad("to_model" if to_model else "to", str(exc).strip("'\"")) from exc
        sel = Selection(share=share, target=target, from_tier=from_tier, from_model=from_model,
                        task_type=task_type)
        return what_if(store, catalog, sel)

    @r.post("/v1/sql")
    def sql(body: SqlRequest) -> dict[str, Any]:
        try:
            return run_readonly(store, body.query,
                                max_execution_time_s=settings.sql_max_execution_time_s,
                                max_result_rows=settings.sql_max_result_rows)
        except SqlRefused as exc:
            raise HTTPException(status_code=403, detail=f"refused: {exc}") from exc
        except ClickHouseError as exc:
            raise HTTPException(status_code=400, detail=f"query failed: {str(exc)[:2000]}"
                                ) from exc

    @r.get("/v1/tasks/{task_id}/timeline")
    def task_timeline(task_id: TaskId) -> list[dict[str, Any]]:
        return audit.timeline(task_entries(store, task_id))

    @r.get("/v1/tasks/{task_id}/verify")
    def task_verify(task_id: TaskId) -> dict[str, Any]:
        result = audit.verify_task(task_entries(store, task_id))
        return {"task_id": task_id, "source": "clickhouse", **result}

    return r
