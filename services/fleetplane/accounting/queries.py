"""Analytics and audit queries over the accounting tables (see infra/clickhouse/).

Values reach SQL only as bound parameters; the database name is a checked identifier and the
grouping dimension one of COST_DIMENSIONS.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal, get_args

from fleetplane.accounting import rollups
from fleetplane.accounting.rows import EVENT_ORDER
from fleetplane.accounting.store import Store

CostDimension = Literal["team", "task_type", "model", "tier"]
COST_DIMENSIONS: tuple[str, ...] = get_args(CostDimension)
Source = Literal["rollup", "raw"]

MAX_TASKS = 100_000
MAX_EVENTS = 100_000

_TIME = "parseDateTime64BestEffort({%s:String}, 3, 'UTC')"


def where_clause(clauses: list[str]) -> str:
    """`WHERE a AND b` for the clauses given, or nothing."""
    return f"WHERE {' AND '.join(clauses)}" if clauses else ""


def _iso(value: datetime) -> str:
    return value.isoformat()


def cost_by(store: Store, by: CostDimension, *, team: str | None = None,
            since: datetime | None = None, until: datetime | None = None,
            source: Source = "rollup") -> list[dict[str, Any]]:
    """Cost, tokens and call counts grouped by `by`, most expensive first.

    Each row: {<by>: value, cost_usd, calls, tasks, input_tokens, output_tokens,
    cache_creation_input_tokens, cache_read_input_tokens}. From the hourly rollup (whole hours;
    raw rows for the partial hours at the ends of the window); `source="raw"` computes the same
    from model_calls FINAL. `tasks` counts each task once, exactly, at its first model call: the
    tasks whose first call falls in the window, under that call's team, task type, model and
    tier (docs/accounting.md, "Counting tasks"). Model calls of tasks whose task type was not
    known when they were stored group under task_type "".
    """
    if by not in COST_DIMENSIONS:
        raise ValueError(f"by must be one of {COST_DIMENSIONS}, not {by!r}")
    if source == "raw":
        return cost_by_raw(store, by, team=team, since=since, until=until)
    params: dict[str, Any] = {}
    src = rollups.calls_source(store, since, until, params)
    where = ""
    if team is not None:
        where = "WHERE team = {team:String}"
        params["team"] = team
    return store.query(f"""
        SELECT toString({by}) AS {by}, sum(cost_usd) AS cost_usd, sum(calls) AS calls,
               sum(first_calls) AS tasks, sum(input_tokens) AS input_tokens,
               sum(output_tokens) AS output_tokens,
               sum(cache_creation_input_tokens) AS cache_creation_input_tokens,
               sum(cache_read_input_tokens) AS cache_read_input_tokens
        FROM {src} {where}
        GROUP BY {by}
        ORDER BY cost_usd DESC, {by}
    """, params)


def cost_breakdown(store: Store, dims: tuple[CostDimension, ...], *, tasks: bool = True,
                   since: datetime | None = None) -> dict[str, list[dict[str, Any]]]:
    """cost_by for several dimensions in one query (GROUPING SETS over the rollups):
    {dimension: rows as cost_by returns them}, from `since` on. tasks=False leaves out the
    task count (the dashboard does not show it)."""
    for by in dims:
        if by not in COST_DIMENSIONS:
            raise ValueError(f"by must be one of {COST_DIMENSIONS}, not {by!r}")
    params: dict[str, Any] = {}
    src = rollups.calls_source(store, since, None, params=params)
    keys = ", ".join(f"toString({by}) AS {by}_key" for by in dims)
    flags = ", ".join(f"grouping({by}) AS {by}_off" for by in dims)
    sets = ", ".join(f"({by})" for by in dims)
    rows = store.query(f"""
        SELECT {keys}, {flags}, sum(cost_usd) AS cost_usd, sum(calls) AS calls,
               {"sum(first_calls)" if tasks else "toUInt64(0)"} AS tasks,
               sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
               sum(cache_creation_input_tokens) AS cache_creation_input_tokens,
               sum(cache_read_input_tokens) AS cache_read_input_tokens
        FROM {src}
        GROUP BY GROUPING SETS ({sets})
    """, params)
    out: dict[str, list[dict[str, Any]]] = {by: [] for by in dims}
    for r in rows:
        # grouping(x) is 0 when x is part of the row's grouping set (standard SQL)
        dim = next(d for d in dims if r[f"{d}_off"] == 0)
        out[dim].append({dim: r[f"{dim}_key"], **{k: r[k] for k in (
            "cost_usd", "calls", *(("tasks",) if tasks else ()), "input_tokens",
            "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")}})
    for key, items in out.items():
        items.sort(key=lambda x, k=key: (-float(x["cost_usd"]), x[k]))  # type: ignore[misc]
    return out


def cost_by_raw(store: Store, by: CostDimension, *, team: str | None = None,
                since: datetime | None = None, until: datetime | None = None
                ) -> list[dict[str, Any]]:
    """cost_by from the raw rows (model_calls FINAL): the drill-down and audit answer, and the
    reference the rollup answers are tested against. Reads grow with history. A task's first
    call is found from the rows themselves (rollups.FIRST_CALL_WINDOW), not from the sink's
    first_call flag, so the rollup's task counts are checked against it."""
    if by not in COST_DIMENSIONS:
        raise ValueError(f"by must be one of {COST_DIMENSIONS}, not {by!r}")
    params: dict[str, Any] = {}
    clauses: list[str] = []
    if team is not None:
        clauses.append("m.team = {team:String}")
        params["team"] = team
    if since is not None:
        clauses.append("m.occurred_at >= " + _TIME % "since")
        params["since"] = _iso(since)
    if until is not None:
        clauses.append("m.occurred_at < " + _TIME % "until")
        params["until"] = _iso(until)
    key = f"m.{by}"
    sql = f"""
        SELECT
            toString({key}) AS {by},
            sum(m.cost_usd) AS cost_usd,
            count() AS calls,
            toUInt64(countIf(m.first)) AS tasks,
            sum(m.input_tokens) AS input_tokens,
            sum(m.output_tokens) AS output_tokens,
            sum(m.cache_creation_input_tokens) AS cache_creation_input_tokens,
            sum(m.cache_read_input_tokens) AS cache_read_input_tokens
        FROM (SELECT *, {rollups.FIRST_CALL_WINDOW} AS first
              FROM {store.table('model_calls')} FINAL) AS m
        {where_clause(clauses)}
        GROUP BY {by}
        ORDER BY cost_usd DESC, {by}
    """
    return store.query(sql, params)


def task_list(store: Store, *, state: str | None = None, team: str | None = None,
              limit: int = 100, task_type: str | None = None,
              task_id: str | None = None) -> list[dict[str, Any]]:
    """Tasks with their latest state, most recently updated first.

    Each row: task_id, team, task_type, state, reason, model, tier, attempts, cost_usd,
    model_calls, submitted_at, updated_at.
    """
    limit = max(1, min(int(limit), MAX_TASKS))
    params: dict[str, Any] = {"limit": limit}
    clauses: list[str] = []
    if state is not None:
        clauses.append("state = {state:String}")
        params["state"] = state
    if team is not None:
        clauses.append("team = {team:String}")
        params["team"] = team
    if task_type is not None:
        clauses.append("task_type = {task_type:String}")
        params["task_type"] = task_type
    if task_id is not None:
        clauses.append("task_id = {task_id:String}")
        params["task_id"] = task_id
    sql = f"""
        SELECT task_id, team, task_type, state, reason, model, tier, attempts, cost_usd,
               model_calls, submitted_at, updated_at
        FROM {store.table('tasks')}
        {where_clause(clauses)}
        ORDER BY updated_at DESC, task_id
        LIMIT {{limit:UInt32}}
    """
    return store.query(sql, params)


def state_counts(store: Store, *, team: str | None = None) -> dict[str, int]:
    """How many tasks are in each (latest) state."""
    params: dict[str, Any] = {}
    where = ""
    if team is not None:
        where = "WHERE team = {team:String}"
        params["team"] = team
    rows = store.query(
        f"SELECT state, count() AS tasks FROM {store.table('task_states')} {where} "
        "GROUP BY state ORDER BY state",
        params,
    )
    return {str(r["state"]): int(r["tasks"]) for r in rows}


def task_events(store: Store, task_id: str, *, limit: int = 10_000) -> list[dict[str, Any]]:
    """A task's events (each once) in timeline order, the payload decoded from JSON.

    Order: occurred_at; within one millisecond the lifecycle order of the event types
    (rows.EVENT_ORDER), then topic, partition and offset (the producer's order within a
    partition), then event_id. All of it is data, so a replay yields the same timeline.
    """
    limit = max(1, min(int(limit), MAX_EVENTS))
    rows = store.query(
        f"""
        SELECT event_id, event_type, task_id, team, occurred_at, causation_id, topic,
               `partition`, `offset`, payload
        FROM {store.table('events')} FINAL
        WHERE task_id = {{task_id:String}}
        ORDER BY occurred_at, indexOf({{order:Array(String)}}, event_type), topic,
                 `partition`, `offset`, event_id
        LIMIT {{limit:UInt32}}
        """,
        {"task_id": task_id, "limit": limit, "order": list(EVENT_ORDER)},
    )
    for row in rows:
        row["payload"] = json.loads(row["payload"])
    return rows


def count_rows(store: Store, table: str, *, final: bool = True) -> int:
    """Rows in one of the accounting tables (deduplicated unless final=False)."""
    suffix = " FINAL" if final else ""
    return int(store.command(f"SELECT count() FROM {store.table(table)}{suffix}"))
