"""The dashboard's live sections over a bounded recent window (LIVE_WINDOW, whole UTC minutes),
read from recent_task_states (infra/clickhouse/014_live_state.sql): one pre-aggregated row per
minute and task (the latest state encoded in one UInt64 whose max is the argMax, first and last
transition, first submission and dispatch, hold-ending transition times, holds), fed by
materialized views on task_transitions
and holds. A refresh reads the window's rows through the primary key (minute, task_id) and
merges them per task: what it reads depends on the tasks active in the window, never on the
history, and is one row per task and minute instead of every lifecycle row.

Every figure equals the same definition computed from the raw lifecycle rows (live_raw.py; the
test compares them on generated data with redelivered duplicates). A task with no lifecycle
transition within the window is not counted as queued, running or held here (the /v1/overview
endpoint counts every task from the full history).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fleetplane.accounting.analytics import overview_of
from fleetplane.accounting.store import Store
from fleetplane.core.states import STATES

LIVE_WINDOW = timedelta(hours=1)
TABLE = "recent_task_states"
#: the live tables (014_live_state.sql) and the raw tables their materialized views read
LIVE_TABLES = {TABLE: ("task_transitions", "holds"),
               "recent_utilization_minutes": ("utilization",)}
#: how far back backfill() replays the raw rows into empty live tables
BACKFILL = timedelta(hours=2)
#: what recent_task_states stores as submitted_at / dispatched_at of a minute without one
NEVER = "toDateTime64('2200-01-01 00:00:00', 3, 'UTC')"

#: the state list whose positions recent_task_states.latest encodes (014_live_state.sql)
STATE_CODES = STATES
_DECODE = ("arrayElement([" + ", ".join(f"'{s}'" for s in STATE_CODES)
           + "], toUInt8(bitAnd(max(latest), 31)))")

#: per-task merge of the window's rows: column -> aggregate
_MERGED = {
    "team": "any(team)",
    "task_type": "max(task_type)",
    "state": _DECODE,
    "first_seen": "min(first_at)",
    "updated_at": "max(updated_at)",
    "submitted_at": "min(submitted_at)",
    "dispatched_at": "min(dispatched_at)",
    "ends": "groupUniqArrayArray(ends)",
    "holds": "groupUniqArrayArray(holds)",
}


def window_start(now: datetime, window: timedelta = LIVE_WINDOW) -> datetime:
    """The first whole UTC minute of the window ending at `now` (the rows are per minute)."""
    start = now.astimezone(UTC) - window
    return start.replace(second=0, microsecond=0)


def _params(at: datetime, window: timedelta, **more: Any) -> dict[str, Any]:
    return {"since": window_start(at, window).strftime("%Y-%m-%d %H:%M:%S"), **more}


_WINDOW = "minute >= toDateTime({since:String}, 'UTC')"


def _tasks(store: Store, *columns: str, having: str = "", held: bool = False) -> str:
    """Subquery: each task with a row in the window, its `columns` merged over the window;
    held=True: only the tasks with a hold in the window (found first from the holds column
    alone, so the others are not merged)."""
    select = ", ".join(f"{_MERGED[c]} AS {c}" for c in columns)
    where = _WINDOW
    if held:
        where += (f" AND task_id IN (SELECT task_id FROM {store.table(TABLE)} "
                  f"WHERE {_WINDOW} AND notEmpty(holds))")
    return (f"(SELECT task_id, {select} FROM {store.table(TABLE)} WHERE {where} GROUP BY task_id"
            + (f" HAVING {having}" if having else "") + ")")


def overview(store: Store, now: datetime, window: timedelta = LIVE_WINDOW) -> dict[str, Any]:
    """fleet_overview's shape (teams, total, held) for the tasks active within the window."""
    params = _params(now, window)
    counts = store.query(
        f"SELECT team, state, count() AS tasks FROM {_tasks(store, 'team', 'state')} "
        "WHERE state != '' GROUP BY team, state", params)
    held = store.query(
        f"""
        SELECT task_id, team, task_type, h.2 AS kind, h.3 AS reason, h.4 AS held_by,
               h.1 AS since
        FROM (SELECT task_id, team, task_type, arrayElement(arraySort(holds), -1) AS h
              FROM {_tasks(store, 'team', 'task_type', 'state', 'holds',
                           having="state = 'held' AND notEmpty(holds)", held=True)})
        ORDER BY since LIMIT 500
        """, params)
    return {**overview_of(counts, held), "window_s": window.total_seconds()}


def queue_wait(store: Store, now: datetime, window: timedelta = LIVE_WINDOW
               ) -> dict[str, Any] | None:
    """Submission to first dispatch of the tasks submitted and dispatched within the window."""
    rows = store.query(
        f"""
        SELECT 'all' AS `group`, count() AS tasks,
               quantileExact(0.5)(wait_s) AS p50_s, quantileExact(0.9)(wait_s) AS p90_s,
               quantileExact(0.99)(wait_s) AS p99_s, max(wait_s) AS max_s
        FROM (
            SELECT (toUnixTimestamp64Milli(dispatched_at)
                    - toUnixTimestamp64Milli(submitted_at)) / 1000.0 AS wait_s
            FROM {_tasks(store, 'submitted_at', 'dispatched_at',
                         having=f"submitted_at < {NEVER} AND dispatched_at < {NEVER}")}
        )
        HAVING tasks > 0
        """, _params(now, window))
    return rows[0] if rows else None


def held_time(store: Store, now: datetime, window: timedelta = LIVE_WINDOW
              ) -> list[dict[str, Any]]:
    """analytics.held_time for the holds that started within the window: a hold ends at the
    task's next hold, dispatch or terminal transition within the window, else it is still
    open (counted until now)."""
    return store.query(
        f"""
        SELECT kind, count() AS holds, uniqExact(task_id) AS tasks,
               sum(held_s) AS total_s, quantileExact(0.5)(held_s) AS p50_s, max(held_s) AS max_s,
               countIf(open) AS still_held
        FROM (
            SELECT task_id, h.2 AS kind, arrayFilter(x -> x > h.1, ends) AS later,
                   empty(later) AS open,
                   (toUnixTimestamp64Milli(if(open, parseDateTime64BestEffort({{now:String}}, 3,
                        'UTC'), arrayMin(later)))
                    - toUnixTimestamp64Milli(h.1)) / 1000.0 AS held_s
            FROM {_tasks(store, 'ends', 'holds', having='notEmpty(holds)', held=True)}
            ARRAY JOIN holds AS h
            WHERE h.1 >= toDateTime64({{since:String}}, 3, 'UTC')
        )
        GROUP BY kind ORDER BY total_s DESC, kind
        """, _params(now, window, now=now.isoformat()))


def recent_tasks(store: Store, now: datetime, limit: int = 25,
                 window: timedelta = LIVE_WINDOW) -> list[dict[str, Any]]:
    """The most recently updated tasks within the window with model, cost and calls (task_list's
    shape); model, attempts, reason, cost and calls read only those tasks' rows (by task id)."""
    params = _params(now, window, limit=max(1, min(limit, 1000)))
    # the latest `limit` tasks first (a task's rows in updated_at order: its first row holds
    # its last transition), then the merged columns of those tasks only
    latest = (f"SELECT task_id FROM {store.table(TABLE)} WHERE {_WINDOW} "
              "ORDER BY updated_at DESC, task_id LIMIT 1 BY task_id LIMIT {limit:UInt32}")
    tasks = store.query(
        f"""
        SELECT task_id, team, task_type, state, first_seen AS submitted_at, updated_at
        FROM (SELECT task_id, any(team) AS team, max(task_type) AS task_type,
                     {_DECODE} AS state, min(first_at) AS first_seen,
                     max(updated_at) AS updated_at
              FROM {store.table(TABLE)}
              WHERE {_WINDOW} AND task_id IN ({latest})
              GROUP BY task_id)
        ORDER BY updated_at DESC, task_id
        """, params)
    if not tasks:
        return []
    ids = [t["task_id"] for t in tasks]
    details = {r["task_id"]: r for r in store.query(
        f"""
        SELECT task_id, argMaxIf(model, occurred_at, model != '') AS model,
               argMaxIf(tier, occurred_at, tier != '') AS tier, max(attempt) AS attempts,
               argMax(reason, (terminal, occurred_at, state_rank)) AS reason
        FROM {store.table('task_transitions')} WHERE task_id IN {{ids:Array(String)}}
        GROUP BY task_id""", {"ids": ids})}
    costs = {r["task_id"]: r for r in store.query(
        f"""
        SELECT task_id, sum(cost_usd) AS cost_usd, count() AS model_calls
        FROM {store.table('model_calls')}
        WHERE team IN {{teams:Array(String)}} AND task_id IN {{ids:Array(String)}}
        GROUP BY task_id""", {"ids": ids, "teams": sorted({t["team"] for t in tasks})})}
    for t in tasks:
        d = details.get(t["task_id"], {})
        c = costs.get(t["task_id"], {})
        t.update({"model": d.get("model", ""), "tier": d.get("tier", ""),
                  "attempts": d.get("attempts", 0), "reason": d.get("reason", ""),
                  "cost_usd": float(c.get("cost_usd", 0.0)),
                  "model_calls": int(c.get("model_calls", 0))})
    return tasks


def backfill(store: Store, now: datetime | None = None, span: timedelta = BACKFILL) -> int:
    """Fill each empty live table from the raw rows of the last `span` through its materialized
    views' own SELECTs (a database created before 014_live_state.sql, at its next start; the
    raw rows are read with FINAL: rows stored before the sink deduplicated utilization).
    Returns the number of views replayed."""
    empty = {t for t in LIVE_TABLES
             if not int(store.command(f"SELECT count() FROM {store.table(t)}"))}
    if not empty:
        return 0
    since = (now or datetime.now(UTC)).astimezone(UTC) - span
    bound = f"toDateTime64('{since.strftime('%Y-%m-%d %H:%M:%S')}', 3, 'UTC')"
    views = store.query(
        "SELECT as_select, create_table_query FROM system.tables WHERE database = {db:String} "
        "AND engine = 'MaterializedView'", {"db": store.database})
    replayed = 0
    for view in views:
        select, create = str(view["as_select"]), str(view["create_table_query"])
        target = next((t for t in empty if f" TO {store.table(t)} " in create), None)
        if target is None:
            continue
        for raw in LIVE_TABLES[target]:
            source = f"FROM {store.table(raw)}"
            rest = select.split(source, 1)[1:] if source in select else []
            if not rest or (rest[0][:1] not in ("", " ", ")")):
                continue
            window = f"FROM (SELECT * FROM {store.table(raw)} FINAL WHERE occurred_at >= {bound})"
            replay = select.replace(source, window, 1)
            # a view writes its columns by name; INSERT ... SELECT maps by position
            names = ", ".join(f"`{r['name']}`" for r in store.query(f"DESCRIBE ({replay})"))
            store.command(f"INSERT INTO {store.table(target)} ({names}) SELECT {names} "
                          f"FROM ({replay})")
            replayed += 1
    return replayed
