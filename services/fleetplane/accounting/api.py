"""The accounting HTTP API: analytics and audit replay for the dashboard and the CLI.

chdb allows one process per data directory, so this service is the only reader of the embedded
ClickHouse; everything else asks it over HTTP. Handlers are plain ``def``: FastAPI runs them in
its thread pool, and the Store lock serializes them with the loop's inserts.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Path, Query
from fastapi.responses import JSONResponse

from fleetplane.accounting import api_analytics, dashboard, queries
from fleetplane.accounting.queries import CostDimension
from fleetplane.accounting.store import Store
from fleetplane.core.settings import Settings
from fleetplane.core.states import TaskState

StatusFn = Callable[[], dict[str, Any]]


def create_app(store: Store, status: StatusFn | None = None,
               settings: Settings | None = None) -> FastAPI:
    """The API over `store`; `status` adds live processor figures to /healthz; `settings` gives
    the catalog, teams and analyst-SQL limits (defaults: the environment's)."""
    settings = settings or Settings()
    app = FastAPI(title="fleetplane accounting", version="1")
    app.include_router(api_analytics.make_router(store, settings))
    app.include_router(dashboard.make_router(store, settings))

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        ok = store.ping()
        body: dict[str, Any] = {
            "status": "ok" if ok else "degraded",
            "service": "accounting",
            "clickhouse": "ok" if ok else "unreachable",
            "database": store.database,
        }
        if status is not None:
            body.update(status())
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/cost")
    def cost(
        by: Annotated[CostDimension, Query(description="grouping dimension")] = "team",
        team: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
        since: Annotated[datetime | None, Query(description="occurred_at >= since")] = None,
        until: Annotated[datetime | None, Query(description="occurred_at < until")] = None,
    ) -> list[dict[str, Any]]:
        return queries.cost_by(store, by, team=team, since=since, until=until)

    @app.get("/v1/tasks")
    def tasks(
        state: Annotated[TaskState | None, Query()] = None,
        team: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
        limit: Annotated[int, Query(ge=1, le=queries.MAX_TASKS)] = 100,
        task_type: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
        task_id: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    ) -> list[dict[str, Any]]:
        return queries.task_list(store, state=state, team=team, limit=limit,
                                 task_type=task_type, task_id=task_id)

    @app.get("/v1/tasks/{task_id}/events")
    def task_events(
        task_id: Annotated[str, Path(min_length=1, max_length=200)],
        limit: Annotated[int, Query(ge=1, le=queries.MAX_EVENTS)] = 10_000,
    ) -> list[dict[str, Any]]:
        rows = queries.task_events(store, task_id, limit=limit)
        if not rows:
            raise HTTPException(status_code=404, detail=f"no events for task {task_id!r}")
        return rows

    @app.get("/v1/states")
    def states(
        team: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    ) -> dict[str, int]:
        return queries.state_counts(store, team=team)

    return app
