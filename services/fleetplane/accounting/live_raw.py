"""The dashboard's live sections computed from the raw lifecycle rows (task_transitions,
holds FINAL) of the window: the definition the pre-aggregated sections in live.py are tested
against (tests/integration/test_accounting_live.py), and an auditor's cross-check. Not on the
dashboard's path: these read every lifecycle row of the window (task_transitions is sorted by
task, so the time filter scans the month partition).

The window starts at live.window_start(now) (a whole UTC minute); a task counts with its latest
state among its transitions inside the window.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from fleetplane.accounting.analytics import overview_of
from fleetplane.accounting.live import LIVE_WINDOW, window_start
from fleetplane.accounting.store import Store
from fleetplane.core.states import TERMINAL_STATES

_TERMINAL = tuple(sorted(TERMINAL_STATES))
_SOURCE = "task_transitions"


def _since(now: datetime, window: timedelta) -> str:
    return window_start(now, window).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _states(store: Store) -> str:
    """Subquery: each task seen within the window with its latest state."""
    return (f"(SELECT task_id, any(team) AS team, "
            f"argMaxIf(task_type, occurred_at, task_type != '') AS task_type, "
            f"argMax(state, (terminal, occurred_at, state_rank)) AS state, "
            f"min(occurred_at) AS first_seen, max(occurred_at) AS updated_at "
            f"FROM {store.table(_SOURCE)} "
            "WHERE occurred_at >= toDateTime64({since:String}, 3, 'UTC') GROUP BY task_id)")


def overview(store: Store, now: datetime, window: timedelta = LIVE_WINDOW) -> dict[str, Any]:
    """fleet_overview's shape (teams, total, held) for the tasks active within the window."""
    params = {"since": _since(now, window)}
    counts = store.query(
        f"SELECT team, state, count() AS tasks FROM {_states(store)} GROUP BY team, state",
        params)
    held = store.query(
        f"""
        SELECT s.task_id AS task_id, s.team AS team, s.task_type AS task_type, h.kind AS kind,
               h.reason AS reason, h.held_by AS held_by, h.since AS since
        FROM (SELECT * FROM {_states(store)} WHERE state = 'held') AS s
        INNER JOIN (SELECT task_id, argMax(kind, occurred_at) AS kind,
                           argMax(reason, occurred_at) AS reason,
                           argMax(held_by, occurred_at) AS held_by, max(occurred_at) AS since
                    FROM {store.table('holds')}
                    WHERE task_id IN (SELECT task_id FROM {_states(store)} WHERE state = 'held')
                    GROUP BY task_id) AS h
            ON s.task_id = h.task_id
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
            SELECT task_id,
                   (toUnixTimestamp64Milli(minIf(occurred_at, state = 'dispatched'))
                    - toUnixTimestamp64Milli(minIf(occurred_at, state = 'submitted'))) / 1000.0
                       AS wait_s
            FROM {store.table(_SOURCE)}
            WHERE occurred_at >= toDateTime64({{since:String}}, 3, 'UTC')
            GROUP BY task_id
            HAVING countIf(state = 'dispatched') > 0 AND countIf(state = 'submitted') > 0
        )
        HAVING tasks > 0
        """, {"since": _since(now, window)})
    return rows[0] if rows else None


def held_time(store: Store, now: datetime, window: timedelta = LIVE_WINDOW
              ) -> list[dict[str, Any]]:
    """analytics.held_time for the holds that started within the window."""
    ends = ("held", "dispatched", *_TERMINAL)
    return store.query(
        f"""
        SELECT kind, count() AS holds, uniqExact(task_id) AS tasks,
               sum(held_s) AS total_s, quantileExact(0.5)(held_s) AS p50_s, max(held_s) AS max_s,
               countIf(open) AS still_held
        FROM (
            SELECT h.task_id AS task_id, h.kind AS kind,
                   e.occurred_at = toDateTime64(0, 3, 'UTC') AS open,
                   (toUnixTimestamp64Milli(if(open, parseDateTime64BestEffort({{now:String}}, 3,
                        'UTC'), e.occurred_at))
                    - toUnixTimestamp64Milli(h.occurred_at)) / 1000.0 AS held_s
            FROM (SELECT task_id, kind, occurred_at FROM {store.table('holds')} FINAL
                  WHERE task_id IN (SELECT task_id FROM {store.table(_SOURCE)}
                                    WHERE occurred_at >= toDateTime64({{since:String}}, 3, 'UTC')
                                      AND state = 'held')
                    AND occurred_at >= toDateTime64({{since:String}}, 3, 'UTC')) AS h
            ASOF LEFT JOIN (
                SELECT DISTINCT task_id, occurred_at FROM {store.table(_SOURCE)}
                WHERE occurred_at >= toDateTime64({{since:String}}, 3, 'UTC')
                  AND state IN {{ends:Array(String)}}
            ) AS e ON h.task_id = e.task_id AND e.occurred_at > h.occurred_at
        )
        GROUP BY kind ORDER BY total_s DESC, kind
        """, {"ends": list(ends), "now": now.isoformat(), "since": _since(now, window)})


def recent_tasks(store: Store, now: datetime, limit: int = 25,
                 window: timedelta = LIVE_WINDOW) -> list[dict[str, Any]]:
    """The most recently updated tasks within the window with model, cost and calls (task_list's
    shape); cost and calls read only those tasks' model calls."""
    params: dict[str, Any] = {"since": _since(now, window), "limit": max(1, min(limit, 1000))}
    tasks = store.query(
        f"""
        SELECT task_id, any(team) AS team,
               argMaxIf(task_type, occurred_at, task_type != '') AS task_type,
               argMax(state, (terminal, occurred_at, state_rank)) AS state,
               min(occurred_at) AS submitted_at, max(occurred_at) AS updated_at
        FROM {store.table(_SOURCE)}
        WHERE occurred_at >= toDateTime64({{since:String}}, 3, 'UTC')
        GROUP BY task_id ORDER BY updated_at DESC, task_id LIMIT {{limit:UInt32}}
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
