"""The hourly rollups (infra/clickhouse/011_rollups.sql): what the analytics read, and their
migration (backfill from raw rows when a database that predates them is upgraded; rebuild).

`calls_source` / `attempts_source` are subqueries with the rollup's columns for a time window:
whole hours come from the rollup; the parts of the window that do not start or end on an hour
come from the raw rows of those partial hours, aggregated the same way, so any window is exact.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fleetplane.accounting.store import Store
from fleetplane.core.logging import get_logger

log = get_logger(__name__)

CALLS_ROLLUP = "model_calls_hourly"
ATTEMPTS_ROLLUP = "attempts_hourly"
DAILY = {CALLS_ROLLUP: "model_calls_daily", ATTEMPTS_ROLLUP: "attempts_daily"}

_CALLS_SELECT = """
    {bucket}(toDateTime(occurred_at, 'UTC')) AS hour, team, task_type, model, tier,
    toUInt64(count()) AS calls, toUInt64(countIf(outcome != 'ok')) AS errors,
    sum(cost_usd) AS cost_usd, sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cache_creation_input_tokens) AS cache_creation_input_tokens,
    sum(cache_read_input_tokens) AS cache_read_input_tokens,
    sum(latency_ms) AS latency_ms, toUInt64(sum(first_call)) AS first_calls"""
_CALLS_COLUMNS = ("hour, team, task_type, model, tier, calls, errors, cost_usd, input_tokens, "
                  "output_tokens, cache_creation_input_tokens, cache_read_input_tokens, "
                  "latency_ms, first_calls")
_CALLS_GROUP = "hour, team, task_type, model, tier"

_ATTEMPTS_SELECT = """
    {bucket}(toDateTime(occurred_at, 'UTC')) AS hour, team, task_type,
    call_model AS model, tier, cached, toUInt64(count()) AS attempts,
    toUInt64(countIf(success = 1)) AS successes,
    toUInt64(countIf(success = 1 OR final = 1)) AS finished,
    sum(duration_ms) AS duration_ms, sum(cost_usd) AS reported_cost_usd"""
_ATTEMPTS_COLUMNS = ("hour, team, task_type, model, tier, cached, attempts, successes, finished, "
                     "duration_ms, reported_cost_usd")
_ATTEMPTS_GROUP = "hour, team, task_type, model, tier, cached"


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _floor_hour(value: datetime) -> datetime:
    return value.replace(minute=0, second=0, microsecond=0)


def _ceil_hour(value: datetime) -> datetime:
    floor = _floor_hour(value)
    return floor if floor == value else floor + timedelta(hours=1)


def _fmt(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _floor_day(value: datetime) -> datetime:
    return value.replace(hour=0, minute=0, second=0, microsecond=0)


def _ceil_day(value: datetime) -> datetime:
    floor = _floor_day(value)
    return floor if floor == value else floor + timedelta(days=1)


class _Parts:
    """The SELECTs of one source, with their bound parameters."""

    def __init__(self, store: Store, hourly: str, daily: str, raw: str, select: str,
                 columns: str, group: str, params: dict[str, Any]) -> None:
        self.store, self.hourly, self.daily, self.raw = store, hourly, daily, raw
        self.select, self.columns, self.group, self.params = select, columns, group, params
        self.parts: list[str] = []

    def _bound(self, value: datetime, kind: str) -> str:
        name = f"b{len(self.params)}"
        self.params[name] = _fmt(value)[:19] if kind == "DateTime" else _fmt(value)
        if kind == "DateTime":
            return f"toDateTime({{{name}:String}}, 'UTC')"
        return f"toDateTime64({{{name}:String}}, 3, 'UTC')"

    def rollup(self, table: str, lo: datetime | None, hi: datetime | None) -> None:
        clauses = []
        if lo is not None:
            clauses.append(f"hour >= {self._bound(lo, 'DateTime')}")
        if hi is not None:
            clauses.append(f"hour < {self._bound(hi, 'DateTime')}")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        self.parts.append(f"SELECT {self.columns} FROM {self.store.table(table)} {where}")

    def raw_rows(self, lo: datetime, hi: datetime) -> None:
        self.parts.append(
            f"SELECT {self.select.replace('{bucket}', 'toStartOfHour')} "
            f"FROM {self.store.table(self.raw)} "
            f"WHERE occurred_at >= {self._bound(lo, 'DateTime64')} "
            f"AND occurred_at < {self._bound(hi, 'DateTime64')} GROUP BY {self.group}")

    def hours(self, lo: datetime, hi: datetime) -> None:
        """[lo, hi) (both finite): whole hours from the hourly rollup, the rest from raw rows."""
        if hi <= lo:
            return
        first, last = _ceil_hour(lo), _floor_hour(hi)
        if last <= first:
            self.raw_rows(lo, hi)
            return
        if lo < first:
            self.raw_rows(lo, first)
        self.rollup(self.hourly, first, last)
        if last < hi:
            self.raw_rows(last, hi)

    def window(self, since: datetime | None, until: datetime | None) -> str:
        """Whole days from the daily rollup, whole hours from the hourly one, raw rows for the
        partial hours at the ends. An open end needs no split (a rollup holds every row)."""
        first = _ceil_day(since) if since is not None else None
        last = _floor_day(until) if until is not None else None
        if first is not None and last is not None and last <= first:
            assert since is not None and until is not None
            self.hours(since, until)
        else:
            self.rollup(self.daily, first, last)
            if since is not None and first is not None:
                self.hours(since, first)
            if until is not None and last is not None:
                self.hours(last, until)
        if not self.parts:   # an empty window
            self.parts.append(f"SELECT {self.columns} FROM {self.store.table(self.hourly)} "
                              "WHERE 0")
        return "(" + " UNION ALL ".join(self.parts) + ")"


def _source(store: Store, rollup: str, raw: str, select: str, columns: str, group: str,
            since: datetime | None, until: datetime | None, params: dict[str, Any]) -> str:
    """A subquery with the rollup's columns over [since, until)."""
    daily = DAILY[rollup]
    since = _utc(since) if since is not None else None
    until = _utc(until) if until is not None else None
    return _Parts(store, rollup, daily, raw, select, columns, group, params).window(since, until)


def calls_source(store: Store, since: datetime | None = None, until: datetime | None = None,
                 params: dict[str, Any] | None = None) -> str:
    """Model calls per hour x team x task type x model x tier for [since, until)."""
    return _source(store, CALLS_ROLLUP, "model_calls", _CALLS_SELECT, _CALLS_COLUMNS,
                   _CALLS_GROUP, since, until, params if params is not None else {})


def attempts_source(store: Store, since: datetime | None = None, until: datetime | None = None,
                    params: dict[str, Any] | None = None) -> str:
    """Attempt outcomes per hour x team x task type x model x tier x cached for [since, until)."""
    return _source(store, ATTEMPTS_ROLLUP, "attempt_outcomes", _ATTEMPTS_SELECT,
                   _ATTEMPTS_COLUMNS, _ATTEMPTS_GROUP, since, until,
                   params if params is not None else {})


# -- the materialized views and migration ----------------------------------------------------
#: (rollup, raw table, select list, columns, group by): one definition per rollup, used by its
#: hourly and daily materialized views, the raw reads of partial hours and the rebuild
_ROLLUPS = ((CALLS_ROLLUP, "model_calls", _CALLS_SELECT, _CALLS_COLUMNS, _CALLS_GROUP),
            (ATTEMPTS_ROLLUP, "attempt_outcomes", _ATTEMPTS_SELECT, _ATTEMPTS_COLUMNS,
             _ATTEMPTS_GROUP))


def _targets(rollup: str) -> tuple[tuple[str, str], ...]:
    """(table, bucket function) of a rollup's hourly and daily tables."""
    return (rollup, "toStartOfHour"), (DAILY[rollup], "toStartOfDay")


def _view_selects(store: Store) -> dict[str, str]:
    """name -> stored SELECT of the materialized views in the database."""
    rows = store.query(
        "SELECT name, as_select FROM system.tables WHERE database = {db:String} "
        "AND engine = 'MaterializedView'", {"db": store.database})
    return {str(r["name"]): str(r["as_select"]) for r in rows}


def create_views(store: Store) -> bool:
    """The materialized views that feed the hourly and daily rollups from every inserted block
    of model_calls / attempt_outcomes (idempotent; the tables are in 011_rollups.sql). A model
    calls view of a database created before first_calls (013_first_calls.sql) is replaced (at
    the start, before the sink inserts); returns True when that happened (the caller backfills
    the flags: backfill_first_calls)."""
    stored = _view_selects(store)
    replaced = False
    for rollup, raw, select, _columns, group in _ROLLUPS:
        for table, bucket in _targets(rollup):
            name = table + "_mv"
            if rollup == CALLS_ROLLUP and name in stored and "first_call" not in stored[name]:
                log.info("replacing a rollup view that predates first_calls", view=name)
                store.command(f"DROP VIEW IF EXISTS {store.table(name)}")
                replaced = True
            store.command(
                f"CREATE MATERIALIZED VIEW IF NOT EXISTS {store.table(name)} "
                f"TO {store.table(table)} AS SELECT {select.replace('{bucket}', bucket)} "
                f"FROM {store.table(raw)} GROUP BY {group}")
    return replaced


#: model_calls rows that are their task's first model call (lowest attempt, then call_index;
#: event_id breaks a tie), computed from the rows alone: the reference for the sink's flag
FIRST_CALL_WINDOW = ("row_number() OVER (PARTITION BY task_id ORDER BY attempt, call_index, "
                     "event_id) = 1")


def backfill_first_calls(store: Store, rollups_too: bool = True) -> None:
    """Set model_calls.first_call on stored rows (a database that predates the flag), and add
    their counts to the rollups' first_calls (sums: the other columns are left as they are).
    Hours whose raw rows expired keep first_calls 0."""
    t = store.table
    store.command(
        f"ALTER TABLE {t('model_calls')} UPDATE first_call = 1 WHERE event_id IN ("
        f"SELECT event_id FROM (SELECT event_id, {FIRST_CALL_WINDOW} AS first "
        f"FROM {t('model_calls')} FINAL) WHERE first) SETTINGS mutations_sync = 2")
    if not rollups_too:
        return
    for table, bucket in _targets(CALLS_ROLLUP):
        store.command(
            f"INSERT INTO {t(table)} (hour, team, task_type, model, tier, first_calls) "
            f"SELECT {bucket}(toDateTime(occurred_at, 'UTC')) AS hour, team, task_type, model, "
            f"tier, toUInt64(count()) FROM {t('model_calls')} FINAL WHERE first_call = 1 "
            f"GROUP BY hour, team, task_type, model, tier")


def rebuild(store: Store) -> None:
    """Recompute both rollups from the raw rows (after a manual correction of raw rows).
    Hours whose raw rows expired (TTL) are lost from the rollups: rebuild only when needed."""
    for rollup in (CALLS_ROLLUP, ATTEMPTS_ROLLUP, *DAILY.values()):
        store.command(f"TRUNCATE TABLE {store.table(rollup)}")
    for rollup, raw, select, columns, group in _ROLLUPS:
        # FINAL: rows stored before the sink deduplicated may still hold duplicates.
        for table, bucket in _targets(rollup):
            store.command(f"INSERT INTO {store.table(table)} ({columns}) "
                          f"SELECT {select.replace('{bucket}', bucket)} FROM {store.table(raw)} "
                          f"FINAL GROUP BY {group}")


def _update_attempt_columns(store: Store) -> None:
    """Rewrite the rows of attempt_outcomes that lack the sink-filled columns (migration)."""
    t = store.table
    missing = int(store.command(
        f"SELECT count() FROM {t('attempt_outcomes')} WHERE task_type = '' OR call_model = ''"))
    if not missing:
        return
    # Insert completed copies with the same event_id, then collapse: the table is a
    # ReplacingMergeTree on (task_id, event_id) and the copy has the newer ingested_at.
    store.command(f"""
        INSERT INTO {t('attempt_outcomes')}
        SELECT o.* REPLACE (
            if(o.task_type != '', o.task_type, tt.task_type) AS task_type,
            if(o.call_model != '', o.call_model, mc.model) AS call_model,
            if(o.tier != '', o.tier, mc.tier) AS tier,
            now64(3) AS ingested_at)
        FROM {t('attempt_outcomes')} AS o FINAL
        LEFT JOIN (SELECT task_id, argMaxIf(task_type, occurred_at, task_type != '')
                       AS task_type FROM {t('task_transitions')} GROUP BY task_id) AS tt
            ON o.task_id = tt.task_id
        LEFT JOIN (SELECT task_id, attempt, argMax(model, call_index) AS model,
                          argMax(tier, call_index) AS tier
                   FROM {t('model_calls')} FINAL GROUP BY task_id, attempt) AS mc
            ON o.task_id = mc.task_id AND o.attempt = mc.attempt
        WHERE o.task_type = '' OR o.call_model = ''
        SETTINGS join_use_nulls = 0""")
    store.command(f"OPTIMIZE TABLE {t('attempt_outcomes')} FINAL")


def migrate(store: Store) -> bool:
    """Backfill the rollups once when they are empty and raw rows exist (a database created
    before issue 18). Returns True when it backfilled."""
    t = store.table
    if int(store.command(f"SELECT count() FROM {t(CALLS_ROLLUP)}")) or int(store.command(
            f"SELECT count() FROM {t(ATTEMPTS_ROLLUP)}")):
        return False
    raw = int(store.command(f"SELECT count() FROM {t('model_calls')}")) + int(
        store.command(f"SELECT count() FROM {t('attempt_outcomes')}"))
    if not raw:
        return False
    log.info("backfilling the hourly rollups from raw rows", rows=raw)
    _update_attempt_columns(store)
    if not int(store.command(f"SELECT count() FROM {t('model_calls')} WHERE first_call = 1")):
        backfill_first_calls(store, rollups_too=False)
    rebuild(store)
    return True


# -- repair at start ---------------------------------------------------------------------------
#: the materialized views fed by the sink's raw tables, with their target's bucket column
_REPAIRED_SOURCES = ("model_calls", "attempt_outcomes", "utilization")


def repair_recent(store: Store, hours: float, now: datetime | None = None) -> int:
    """Recount the recent buckets of every rollup fed by model_calls / attempt_outcomes /
    utilization (recent_utilization_minutes: its minutes from window_start) from the
    raw rows (FINAL), at the service's start, before the sink inserts.

    A materialized view is not atomic with the insert that feeds it: a process killed during an
    insert can leave the raw part written and the view's part not (or the reverse). The sink
    then skips the raw rows it finds on redelivery (they are in ClickHouse already) and the
    rollups stay short of them for good (the CI chaos run: cost per team 2.2-12.6% low after
    accounting's SIGKILL; raw rows complete). Every bucket (hour, or day for the daily tables)
    that overlaps the last `hours` is deleted and recomputed from raw, so what a crash cut is
    counted again, once. Rows that arrive later than `hours` after their occurred_at, cut by a
    crash, are not repaired (docs/accounting.md). Returns the number of views repaired."""
    if hours <= 0:
        return 0
    now = _utc(now or datetime.now(UTC))
    rows = store.query(
        "SELECT name, as_select, create_table_query FROM system.tables "
        "WHERE database = {db:String} AND engine = 'MaterializedView'", {"db": store.database})
    repaired = 0
    for row in rows:
        select, create = str(row["as_select"]), str(row["create_table_query"])
        raw = next((r for r in _REPAIRED_SOURCES if f"FROM {store.table(r)} " in select + " "),
                   None)
        marker = " TO "
        if raw is None or marker not in create:
            continue
        target = create.split(marker, 1)[1].split()[0]
        columns = [str(c["name"]) for c in store.query(
            "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String} "
            "ORDER BY position", {"db": store.database, "t": target.split(".")[-1]})]
        key = next((k for k in ("hour", "day", "minute") if k in columns), None)
        if key is None:
            continue
        lo = _floor_hour(now - timedelta(hours=hours))
        if key == "day" or "daily" in target:
            lo = _floor_day(lo)
        bound = f"toDateTime('{_fmt(lo)[:19]}', 'UTC')"
        window = (f"FROM (SELECT * FROM {store.table(raw)} FINAL WHERE occurred_at >= "
                  f"{bound}) AS {raw} ")
        recount = (select + " ").replace(f"FROM {store.table(raw)} ", window, 1)
        store.command(f"ALTER TABLE {target} DELETE WHERE {key} >= {bound} "
                      "SETTINGS mutations_sync = 2")
        store.command(f"INSERT INTO {target} ({', '.join(columns)}) "
                      f"SELECT {', '.join(columns)} FROM ({recount}) WHERE {key} >= {bound}")
        repaired += 1
    if repaired:
        log.info("recent rollup buckets recounted from raw rows", views=repaired,
                 since=_fmt(_floor_hour(now - timedelta(hours=hours))))
    return repaired
