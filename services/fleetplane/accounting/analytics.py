"""Analytics over the accounting tables: cost per day, cache savings, cost-to-value,
utilization, queue waits, held time, the fleet overview (see docs/accounting.md).

Values reach SQL only as bound parameters; identifiers come from fixed sets.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from fleetplane.accounting import rollups
from fleetplane.accounting.queries import where_clause
from fleetplane.accounting.store import Store
from fleetplane.core.states import QUEUED_STATES, RUNNING_STATES, TERMINAL_STATES

DailyDimension = Literal["team", "task_type", "model", "tier"]
ValueDimension = Literal["team", "task_type"]

_TERMINAL = tuple(sorted(TERMINAL_STATES))
_TIME = "parseDateTime64BestEffort({%s:String}, 3, 'UTC')"


def task_info(store: Store) -> str:
    """Subquery: task_id, team, task_type and routed model per task (duplicate-safe)."""
    return (f"(SELECT task_id, any(team) AS team, "
            f"argMaxIf(task_type, occurred_at, task_type != '') AS task_type, "
            f"argMaxIf(model, occurred_at, model != '' AND event_type IN "
            f"('TaskRouted', 'TaskDispatched') AND tier != 'cache') AS routed_model "
            f"FROM {store.table('task_transitions')} GROUP BY task_id)")


def _window(column: str, since: datetime | None, until: datetime | None,
            params: dict[str, Any]) -> list[str]:
    clauses = []
    if since is not None:
        clauses.append(f"{column} >= " + _TIME % "since")
        params["since"] = since.isoformat()
    if until is not None:
        clauses.append(f"{column} < " + _TIME % "until")
        params["until"] = until.isoformat()
    return clauses


# -- cost ------------------------------------------------------------------------------------
def cost_daily(store: Store, by: DailyDimension, *, team: str | None = None,
               since: datetime | None = None, until: datetime | None = None
               ) -> list[dict[str, Any]]:
    """Cost and calls per UTC day and `by`, from the daily model-call rollup
    (`model_calls_daily`, the materialized view over model_calls that the other analytics read
    too): [{day, <by>, cost_usd, calls}], oldest day first, then costliest. Whole days: `since`
    and `until` select the days they fall in (`until`'s day excluded)."""
    if by not in get_args(DailyDimension):
        raise ValueError(f"by must be one of {get_args(DailyDimension)}")
    params: dict[str, Any] = {}
    clauses = []
    if team is not None:
        clauses.append("team = {team:String}")
        params["team"] = team
    if since is not None:
        clauses.append("hour >= toStartOfDay(" + _TIME % "since" + ")")
        params["since"] = since.isoformat()
    if until is not None:
        clauses.append("hour < toStartOfDay(" + _TIME % "until" + ")")
        params["until"] = until.isoformat()
    return store.query(
        f"SELECT toDate(hour) AS day, toString({by}) AS {by}, sum(cost_usd) AS cost_usd, "
        f"sum(calls) AS calls FROM {store.table(rollups.DAILY[rollups.CALLS_ROLLUP])} "
        f"{where_clause(clauses)} GROUP BY day, {by} ORDER BY day, cost_usd DESC, {by}",
        params)


def type_model_figures(store: Store, *, team: str | None = None,
                       since: datetime | None = None
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Two rollup reads shared by cache savings and cost-to-value by task type, from `since`
    on: (outcomes per task type x model x cached: finished, ok; model-call cost per task type x
    model)."""
    params: dict[str, Any] = {}
    where = ""
    if team is not None:
        where = "WHERE team = {team:String}"
        params["team"] = team
    outcomes = store.query(
        f"SELECT toString(task_type) AS task_type, toString(model) AS model, cached, "
        f"sum(finished) AS finished, sum(successes) AS ok "
        f"FROM {rollups.attempts_source(store, since, None, params=params)} {where} "
        "GROUP BY task_type, model, cached", params)
    costs = store.query(
        f"SELECT toString(task_type) AS task_type, toString(model) AS model, "
        f"sum(cost_usd) AS cost_usd FROM {rollups.calls_source(store, since, None, params)} "
        f"{where} GROUP BY task_type, model", params)
    return outcomes, costs


def _value_rows(by: str, outcomes: list[dict[str, Any]], costs: list[dict[str, Any]]
                ) -> list[dict[str, Any]]:
    """cost_to_value's rows from (key, finished, successes) and (key, cost) rows."""
    rows: dict[str, dict[str, Any]] = {}
    for r in outcomes:
        row = rows.setdefault(r[by], {by: r[by], "tasks": 0, "successes": 0, "cost_usd": 0.0})
        row["tasks"] += int(r["tasks"])
        row["successes"] += int(r["successes"])
    for r in costs:
        row = rows.setdefault(r[by], {by: r[by], "tasks": 0, "successes": 0, "cost_usd": 0.0})
        row["cost_usd"] += float(r["cost_usd"])
    out = list(rows.values())
    for r in out:
        cost, ok = float(r["cost_usd"]), int(r["successes"])
        r["success_rate"] = ok / int(r["tasks"]) if r["tasks"] else 0.0
        r["successes_per_usd"] = ok / cost if cost > 0 else None
        r["cost_per_success_usd"] = cost / ok if ok else None
    out.sort(key=lambda r: (-(r["cost_per_success_usd"] if r["cost_per_success_usd"] is not None
                              else float("inf")), r[by]))
    return out


def value_by_task_type(figures: tuple[list[dict[str, Any]], list[dict[str, Any]]]
                       ) -> list[dict[str, Any]]:
    """cost_to_value(store, "task_type") from type_model_figures (no further query)."""
    outcomes, costs = figures
    return _value_rows("task_type", [{"task_type": r["task_type"], "tasks": r["finished"],
                                      "successes": r["ok"]} for r in outcomes], costs)


def cache_savings(store: Store, *, team: str | None = None,
                  figures: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None
                  ) -> dict[str, Any]:
    """What the response cache saved: each task completed from the cache (TaskCompleted
    cached=True) is valued at the cost per success of non-cached work of the same task type on
    the model it reused (model-call cost / non-cached successes); when there is none, of the same
    task type on any model; otherwise it counts as unpriced. From the hourly rollups. Returns
    totals and rows per task type."""
    outcomes, costs = figures or type_model_figures(store, team=team)
    outcomes = [r for r in outcomes if int(r["ok"]) > 0]
    cost = {(r["task_type"], r["model"]): float(r["cost_usd"]) for r in costs}
    paid = {(r["task_type"], r["model"]): int(r["ok"]) for r in outcomes if not r["cached"]}
    by_type_cost: dict[str, float] = defaultdict(float)
    by_type_ok: dict[str, int] = defaultdict(int)
    for (task_type, model), n in paid.items():
        by_type_cost[task_type] += cost.get((task_type, model), 0.0)
        by_type_ok[task_type] += n
    rows: dict[str, dict[str, Any]] = {}
    for r in outcomes:
        if not r["cached"]:
            continue
        task_type, model, n = r["task_type"], r["model"], int(r["ok"])
        if paid.get((task_type, model)):
            unit: float | None = cost.get((task_type, model), 0.0) / paid[(task_type, model)]
        elif by_type_ok.get(task_type):
            unit = by_type_cost[task_type] / by_type_ok[task_type]
        else:
            unit = None
        row = rows.setdefault(task_type, {"task_type": task_type, "cached_tasks": 0,
                                          "saved_usd": 0.0, "unpriced_tasks": 0})
        row["cached_tasks"] += n
        if unit is None:
            row["unpriced_tasks"] += n
        else:
            row["saved_usd"] += unit * n
    out = sorted(rows.values(), key=lambda r: (-r["saved_usd"], r["task_type"]))
    return {
        "cached_tasks": sum(r["cached_tasks"] for r in out),
        "saved_usd": sum(r["saved_usd"] for r in out),
        "unpriced_tasks": sum(r["unpriced_tasks"] for r in out),
        "by_task_type": out,
    }


def cost_to_value(store: Store, by: ValueDimension, *, team: str | None = None,
                  since: datetime | None = None, until: datetime | None = None,
                  source: Literal["rollup", "raw"] = "rollup") -> list[dict[str, Any]]:
    """Per `by` over [since, until): tasks finished (a success or a final failure recorded),
    successes (completed, cached ones included), the cost of the model calls made, successes
    per dollar and cost per success; highest cost per success first. From the hourly rollups;
    `source="raw"` computes the same from the raw rows (attempt_outcomes, model_calls FINAL)."""
    if by not in get_args(ValueDimension):
        raise ValueError(f"by must be one of {get_args(ValueDimension)}")
    params: dict[str, Any] = {}
    where = ""
    if team is not None:
        where = "WHERE team = {team:String}"
        params["team"] = team
    if source == "raw":
        win_o = where_clause([*(["team = {team:String}"] if team is not None else []),
                              *_window("occurred_at", since, until, params)])
        outcomes_src = (f"(SELECT task_type, team, toUInt64(countIf(success = 1 OR final = 1)) "
                        f"AS finished, toUInt64(countIf(success = 1)) AS successes "
                        f"FROM {store.table('attempt_outcomes')} FINAL {win_o} "
                        f"GROUP BY task_type, team)")
        calls_src = (f"(SELECT task_type, team, sum(cost_usd) AS cost_usd "
                     f"FROM {store.table('model_calls')} FINAL {win_o} GROUP BY task_type, team)")
        where = ""
    else:
        outcomes_src = rollups.attempts_source(store, since, until, params)
        calls_src = rollups.calls_source(store, since, until, params)
    reads = store.parallel({   # the two reads at once (each on a pooled client)
        "outcomes": lambda s: s.query(
            f"SELECT toString({by}) AS {by}, sum(finished) AS tasks, sum(successes) AS successes "
            f"FROM {outcomes_src} {where} GROUP BY {by}", params),
        "costs": lambda s: s.query(
            f"SELECT toString({by}) AS {by}, sum(cost_usd) AS cost_usd FROM {calls_src} {where} "
            f"GROUP BY {by}", params)}, readers=2)
    return _value_rows(by, reads["outcomes"], reads["costs"])


# -- utilization and waiting -----------------------------------------------------------------
_UTIL_SUMS = ("sum(busy_s) AS busy_s, sum(idle_s) AS idle_s, sum(model_s) AS model_s, "
              "sum(tool_s) AS tool_s, sum(attempts) AS attempts")


def _whole_minutes(bucket_s: int, *bounds: datetime | None) -> bool:
    """Whether a utilization question can be answered from the per-minute rollup."""
    return bucket_s % 60 == 0 and all(
        b is None or (b.second == 0 and b.microsecond == 0) for b in bounds)


def _utilization_windows(store: Store, since: datetime | None, until: datetime | None,
                         params: dict[str, Any]) -> tuple[list[dict[str, Any]],
                                                          list[dict[str, Any]]]:
    """(series, executors) from the reported windows (FINAL: rows stored before the sink
    deduplicated utilization)."""
    clauses = _window("window_start", since, until, params)
    source = f"{store.table('utilization')} FINAL {where_clause(clauses)}"
    series = store.query(
        f"""
        SELECT toStartOfInterval(window_start, toIntervalSecond({{bucket:UInt32}})) AS t,
               uniqExact(executor_id, slot) AS slots, {_UTIL_SUMS}
        FROM {source} GROUP BY t ORDER BY t
        """, params)
    executors = store.query(
        f"""
        SELECT executor_id, uniqExact(slot) AS slots, {_UTIL_SUMS},
               max(window_start) AS last_report
        FROM {source} GROUP BY executor_id ORDER BY executor_id
        """, params)
    return series, executors


def _utilization_minutes(store: Store, since: datetime | None, until: datetime | None,
                         params: dict[str, Any]) -> tuple[list[dict[str, Any]],
                                                          list[dict[str, Any]]]:
    """The same from recent_utilization_minutes (per minute and executor process, last 8 days;
    014_live_state.sql), read by its primary key: a refresh reads minutes x executors rows, not
    every slot's 10-second window. Bounds and buckets are whole minutes."""
    clauses = _window("minute", since, until, params)
    source = f"{store.table('recent_utilization_minutes')} {where_clause(clauses)}"
    series = store.query(
        f"""
        SELECT t, sum(slots) AS slots, {_UTIL_SUMS}
        FROM (SELECT toDateTime64(toStartOfInterval(minute, toIntervalSecond({{bucket:UInt32}})),
                                  3, 'UTC') AS t, executor_id,
                     uniqExactMerge(slots) AS slots, {_UTIL_SUMS}
              FROM {source} GROUP BY t, executor_id)
        GROUP BY t ORDER BY t
        """, params)
    executors = store.query(
        f"""
        SELECT executor_id, uniqExactMerge(slots) AS slots, {_UTIL_SUMS},
               max(last_report) AS last_report
        FROM {source} GROUP BY executor_id ORDER BY executor_id
        """, params)
    return series, executors


def utilization(store: Store, *, bucket_s: int = 60, since: datetime | None = None,
                until: datetime | None = None, recent: bool = False) -> dict[str, Any]:
    """Executor slots busy vs idle per time bucket (from ExecutorUtilization windows), and
    within busy time the seconds waiting on models, running tools and the rest (agent loop,
    queueing inside the executor). Beside the series: the same per executor process
    (`executors`: slots reported, shares, last report) and for the whole fleet (`total`).
    recent=True (the dashboard) reads the per-minute rollup of the last 8 days when the bucket
    and the bounds are whole minutes; otherwise every reported window."""
    params: dict[str, Any] = {"bucket": max(1, int(bucket_s))}
    if recent and _whole_minutes(params["bucket"], since, until):
        series, executors = _utilization_minutes(store, since, until, params)
    else:
        series, executors = _utilization_windows(store, since, until, params)
    total = {k: sum(float(r[k]) for r in series) for k in ("busy_s", "idle_s", "model_s",
                                                           "tool_s")}
    total["slots"] = sum(int(r["slots"]) for r in executors)
    for r in [*series, *executors, total]:
        busy, idle = float(r["busy_s"]), float(r["idle_s"])
        other = max(0.0, busy - float(r["model_s"]) - float(r["tool_s"]))
        r["other_s"] = other
        r["busy_share"] = busy / (busy + idle) if busy + idle > 0 else 0.0
        for part in ("model", "tool", "other"):
            r[f"{part}_share_of_busy"] = float(r[f"{part}_s"]) / busy if busy > 0 else 0.0
    return {"bucket_s": params["bucket"], "series": series, "executors": executors,
            "total": total}


def queue_wait(store: Store, *, by: Literal["team", "task_type"] | None = None
               ) -> list[dict[str, Any]]:
    """Seconds from submission to the first dispatch per task: count, p50, p90, p99, max
    (overall, or per team / task type)."""
    key = f"toString({by})" if by else "'all'"
    return store.query(
        f"""
        SELECT {key} AS `group`, count() AS tasks,
               quantileExact(0.5)(wait_s) AS p50_s, quantileExact(0.9)(wait_s) AS p90_s,
               quantileExact(0.99)(wait_s) AS p99_s, max(wait_s) AS max_s
        FROM (
            SELECT task_id, any(team) AS team,
                   argMaxIf(task_type, occurred_at, task_type != '') AS task_type,
                   (toUnixTimestamp64Milli(minIf(occurred_at, st = 'dispatched'))
                    - toUnixTimestamp64Milli(minIf(occurred_at, st = 'submitted'))) / 1000.0
                       AS wait_s
            FROM (SELECT *, state AS st FROM {store.table('task_transitions')})
            GROUP BY task_id
            HAVING countIf(st = 'dispatched') > 0 AND countIf(st = 'submitted') > 0
        )
        GROUP BY `group` ORDER BY `group`
        """)


def held_time(store: Store, *, now: datetime | None = None) -> list[dict[str, Any]]:
    """Held periods by TaskHeld.kind. A period runs from the TaskHeld to the task's next
    transition that is another hold, a dispatch or a terminal state; a task still held counts
    until `now` (still_held)."""
    now = now or datetime.now(UTC)
    ends = ("held", "dispatched", *_TERMINAL)
    return store.query(
        f"""
        SELECT kind, count() AS holds, uniqExact(task_id) AS tasks,
               sum(held_s) AS total_s, quantileExact(0.5)(held_s) AS p50_s, max(held_s) AS max_s,
               countIf(open) AS still_held
        FROM (
            SELECT h.task_id AS task_id, h.kind AS kind,
                   e.occurred_at = toDateTime64(0, 3, 'UTC') AS open,
                   (toUnixTimestamp64Milli(if(open, {_TIME % 'now'}, e.occurred_at))
                    - toUnixTimestamp64Milli(h.occurred_at)) / 1000.0 AS held_s
            FROM (SELECT task_id, kind, occurred_at FROM {store.table('holds')} FINAL) AS h
            ASOF LEFT JOIN (
                SELECT task_id, occurred_at FROM {store.table('task_transitions')}
                WHERE state IN {{ends:Array(String)}}
            ) AS e ON h.task_id = e.task_id AND e.occurred_at > h.occurred_at
        )
        GROUP BY kind ORDER BY total_s DESC, kind
        """, {"ends": list(ends), "now": now.isoformat()})


# -- fleet overview --------------------------------------------------------------------------

def team_state_counts(counts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rows of (team, state, tasks) bucketed per team: queued, running, held, completed,
    failed (failed, abandoned, rolled back, rejected) and other."""
    teams: dict[str, dict[str, Any]] = {}
    for r in counts:
        t = teams.setdefault(r["team"], {"team": r["team"], "queued": 0, "running": 0,
                                         "held": 0, "completed": 0, "failed": 0, "other": 0,
                                         "held_by_kind": {}})
        state, n = r["state"], int(r["tasks"])
        if state in QUEUED_STATES:
            t["queued"] += n
        elif state in RUNNING_STATES:
            t["running"] += n
        elif state == "held":
            t["held"] += n
        elif state == "completed":
            t["completed"] += n
        elif state in ("failed", "abandoned", "rolled_back", "rejected"):
            t["failed"] += n
        else:
            t["other"] += n
    return teams


def overview_of(counts: list[dict[str, Any]], held: list[dict[str, Any]]) -> dict[str, Any]:
    """The overview's shape from (team, state, tasks) rows and the held tasks (with kind):
    per team counts with the held tasks' kinds, sorted by team; totals; the held tasks."""
    teams = team_state_counts(counts)
    for h in held:
        kinds = teams.get(h["team"], {}).get("held_by_kind")
        if kinds is not None:
            kinds[h["kind"]] = kinds.get(h["kind"], 0) + 1
    rows = sorted(teams.values(), key=lambda t: t["team"])
    total = {k: sum(t[k] for t in rows) for k in ("queued", "running", "held", "completed",
                                                  "failed", "other")}
    return {"teams": rows, "total": total, "held": held}


def fleet_overview(store: Store) -> dict[str, Any]:
    """Per team: queued, running, held (with the held tasks' kinds), finished, failed; and the
    currently held tasks with kind and reason."""
    counts = store.query(
        f"SELECT team, state, count() AS tasks FROM {store.table('task_states')} "
        "GROUP BY team, state")
    held = store.query(
        f"""
        SELECT s.task_id AS task_id, s.team AS team, s.task_type AS task_type, h.kind AS kind,
               h.reason AS reason, h.held_by AS held_by, h.since AS since
        FROM {store.table('task_states')} AS s
        INNER JOIN (SELECT task_id, argMax(kind, occurred_at) AS kind,
                           argMax(reason, occurred_at) AS reason,
                           argMax(held_by, occurred_at) AS held_by, max(occurred_at) AS since
                    FROM {store.table('holds')} GROUP BY task_id) AS h
            ON s.task_id = h.task_id
        WHERE s.state = 'held'
        ORDER BY since LIMIT 500
        """)
    return overview_of(counts, held)


def recent_alerts(store: Store, *, limit: int = 50) -> list[dict[str, Any]]:
    return store.query(
        f"SELECT occurred_at, team, task_id, severity, kind, metric, value, baseline, message, "
        f"event_id FROM {store.table('alerts')} FINAL ORDER BY occurred_at DESC, event_id "
        "LIMIT {limit:UInt32}", {"limit": max(1, min(limit, 10_000))})


def spend_since(store: Store, start: datetime) -> dict[str, float]:
    """Spend per team from model calls at or after `start` (the hourly rollup; raw rows for a
    start that is not on an hour)."""
    params: dict[str, Any] = {}
    src = rollups.calls_source(store, start, None, params)
    rows = store.query(f"SELECT team, sum(cost_usd) AS cost_usd FROM {src} GROUP BY team", params)
    return {r["team"]: float(r["cost_usd"]) for r in rows}


def recent_attempts(store: Store, *, window: int, since: datetime) -> list[dict[str, Any]]:
    """The last `window` finished attempts per task type and model (non-cached) that ended at
    or after `since`, newest first, with cost and tokens from their model calls and duration:
    the anomaly baselines. Only those attempts' tasks are read from the other tables."""
    params: dict[str, Any] = {"window": max(1, window), "since": since.isoformat()}
    recent = (f"(SELECT task_id FROM {store.table('attempt_outcomes')} "
              "WHERE occurred_at >= " + _TIME % "since" + ")")
    return store.query(
        f"""
        SELECT o.task_id AS task_id, o.team AS team, o.attempt AS attempt, o.model AS model,
               ti.task_type AS task_type, o.success AS success, o.occurred_at AS occurred_at,
               o.duration_ms AS duration_ms, c.cost_usd AS cost_usd, c.tokens AS tokens
        FROM {store.table('attempt_outcomes')} AS o FINAL
        INNER JOIN (SELECT task_id, argMaxIf(task_type, occurred_at, task_type != '')
                               AS task_type
                    FROM {store.table('task_transitions')} WHERE task_id IN {recent}
                    GROUP BY task_id) AS ti ON o.task_id = ti.task_id
        LEFT JOIN (SELECT task_id, attempt, sum(cost_usd) AS cost_usd,
                          sum(input_tokens + output_tokens + cache_creation_input_tokens
                              + cache_read_input_tokens) AS tokens
                   FROM {store.table('model_calls')} FINAL WHERE task_id IN {recent}
                   GROUP BY task_id, attempt) AS c
            ON o.task_id = c.task_id AND o.attempt = c.attempt
        WHERE o.cached = 0 AND ti.task_type != '' AND o.occurred_at >= {_TIME % 'since'}
        ORDER BY o.occurred_at DESC, o.task_id
        LIMIT {{window:UInt32}} BY ti.task_type, o.model
        """, params)


def outcomes_ingested_since(store: Store, since: datetime) -> int:
    """Attempt outcomes stored at or after `since` (ingest time): is there anything to score?"""
    return int(store.command(
        f"SELECT count() FROM {store.table('attempt_outcomes')} WHERE ingested_at >= "
        + _TIME % "since", {"since": since.isoformat()}))
