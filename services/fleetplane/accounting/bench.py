"""Measure how fast the sink writes rows into ClickHouse (no broker involved).

    PYTHONPATH=services python -m fleetplane.accounting.bench --tasks 2000 --dsn chdb:///tmp/bench

Each synthetic task has a full lifecycle, five model calls and five tool calls (15 events,
26 rows). Reports events/s and rows/s end to end (row mapping + inserts) and insert-only rows/s.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from fleetplane.accounting.rows import rows_for
from fleetplane.accounting.schema import apply_ddl
from fleetplane.accounting.sink import ClickHouseSink
from fleetplane.accounting.store import Store, connect
from fleetplane.core import events as ev
from fleetplane.core.loop import Record
from fleetplane.core.settings import Settings


@dataclass(frozen=True)
class BenchResult:
    events: int
    rows: int
    seconds: float
    insert_seconds: float
    statement_seconds: float = 0.0

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds

    @property
    def insert_rows_per_s(self) -> float:
        return self.rows / self.insert_seconds if self.insert_seconds else 0.0

    @property
    def statement_rows_per_s(self) -> float:
        return self.rows / self.statement_seconds if self.statement_seconds else 0.0


def synthetic_events(tasks: int, prefix: str = "bench") -> Iterator[ev.Event]:
    spec = ev.TaskSpec(name="bench", task_type="refactor", prompt="do it")
    model = "claude-sonnet-4-5"
    for i in range(tasks):
        task_id, team = f"{prefix}-{i}", f"team-{i % 7}"
        yield ev.TaskSubmitted(task_id=task_id, team=team, spec=spec)
        yield ev.TaskAccepted(task_id=task_id, team=team, spec=spec)
        yield ev.TaskRouted(task_id=task_id, team=team, spec=spec, attempt=1, model=model,
                            provider="anthropic", tier="standard", reason="bench")
        yield ev.TaskDispatched(task_id=task_id, team=team, spec=spec, attempt=1, model=model,
                                provider="anthropic", tier="standard")
        yield ev.TaskStarted(task_id=task_id, team=team, attempt=1, executor_id="bench")
        for call in range(5):
            yield ev.ModelCall(task_id=task_id, team=team, attempt=1, call_index=call,
                               model=model, provider="anthropic", tier="standard",
                               input_tokens=1200, output_tokens=300, cost_usd=0.0081,
                               latency_ms=850.0, outcome="ok", stop_reason="tool_use")
            yield ev.ToolCall(task_id=task_id, team=team, attempt=1, call_index=call,
                              tool="read_file", arguments='{"path": "src/app.py"}',
                              outcome="ok", result_summary="120 lines", duration_ms=3.5)
        yield ev.TaskCompleted(task_id=task_id, team=team, attempt=1, model=model,
                               output="done", cost_usd=0.0405, duration_ms=5000)


MODELS = ("claude-opus-4-7", "claude-sonnet-4-6", "claude-haiku-4-5")
TIERS = ("frontier", "standard", "small")
TYPES = ("summarize", "classify", "translate", "format", "codegen", "refactor", "review",
         "test", "debug", "architecture", "research")


def _array(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def generate_history(store: Store, rows: int, *, teams: int = 20, types: int = 11,
                     days: int = 30, min_age_s: int = 0, prefix: str = "bt",
                     span_s: int | None = None, raw: bool = True,
                     now: datetime | None = None) -> float:
    """`rows` model calls over rows/5 tasks (5 calls each, one attempt; 90% succeed) spread over
    `days` days (or `span_s` seconds) ending `min_age_s` seconds ago, written inside ClickHouse
    (INSERT ... SELECT FROM numbers) as the sink would store them: model calls with their task
    type, lifecycle rows (submitted, dispatched, completed/failed) and attempt outcomes with task
    type, call model and tier. Every materialized view (rollups, recent copies) sees them.

    raw=False stores no raw rows: each materialized view's own SELECT (read from
    system.tables) is run over the generated rows and inserted into its target, which is what
    the views would have stored (the recent_* copies, kept 8 days, are left out). That is how
    the bench builds 100M calls of history on a small machine (a test checks that it stores
    the same rollups as the raw path). `now` (default: the server's clock) ends the span.
    Returns seconds."""
    tasks = max(1, rows // 5)
    span = max(1, span_s if span_s is not None else days * 86_400)
    models, tiers, kinds = _array(MODELS), _array(TIERS), _array(TYPES[:types])
    # task t starts t/tasks of the way through the span (newest first): a steady fleet
    clock = ("now64(3)" if now is None else
             f"toDateTime64('{now.astimezone(UTC):%Y-%m-%d %H:%M:%S.%f}', 3, 'UTC')")
    age = f"toIntervalSecond({int(min_age_s)} + intDiv(toUInt64(%s) * {span}, {tasks}))"
    calls = f"""
        SELECT concat('{prefix}-', toString(t)) AS task_id,
               toLowCardinality(concat('team-', toString(t % {teams}))) AS team,
               toUInt32(1) AS attempt, toUInt32(number % 5) AS call_index,
               toLowCardinality(arrayElement({models}, 1 + t % 3)) AS model,
               toLowCardinality('anthropic') AS provider,
               toLowCardinality(arrayElement({tiers}, 1 + t % 3)) AS tier,
               toLowCardinality(arrayElement({kinds}, 1 + intDiv(t, 3) % {types})) AS task_type,
               toUInt64(500 + number % 4000) AS input_tokens,
               toUInt64(50 + number % 900) AS output_tokens,
               toUInt64(number % 7 = 0 ? 1000 : 0) AS cache_creation_input_tokens,
               toUInt64(number % 3 = 0 ? 2000 : 0) AS cache_read_input_tokens,
               (500 + number % 4000) * 3e-6 + (50 + number % 900) * 15e-6 AS cost_usd,
               toFloat64(300 + number % 2000) AS latency_ms,
               toLowCardinality('ok') AS outcome, '' AS error,
               toLowCardinality('end_turn') AS stop_reason,
               {clock} - {age % 't'} + toIntervalMillisecond(600 + (number % 5) * 100)
                   AS occurred_at,
               hex(cityHash64(number, '{prefix}', 'call')) AS event_id,
               toUInt8(number % 5 = 0) AS first_call
        FROM (SELECT number, intDiv(number, 5) AS t FROM numbers({rows}))"""
    transitions = f"""
        SELECT concat('{prefix}-', toString(t)) AS task_id,
               toLowCardinality(concat('team-', toString(t % {teams}))) AS team,
               hex(cityHash64(t, k, '{prefix}')) AS event_id,
               toLowCardinality(arrayElement(['TaskSubmitted', 'TaskDispatched', 'TaskCompleted',
                   'TaskFailed'], k + 1 + (k = 2 AND t % 10 = 0 ? 1 : 0))) AS event_type,
               toLowCardinality(arrayElement(['submitted', 'dispatched', 'completed', 'failed'],
                   k + 1 + (k = 2 AND t % 10 = 0 ? 1 : 0))) AS state,
               toUInt8(k = 2) AS terminal, toUInt8(k = 2 ? 9 : k * 4 + 1) AS state_rank,
               {clock} - {age % 't'} + toIntervalMillisecond(k * 500 + (k = 2 ? 1000 : 0))
                   AS occurred_at,
               toUInt32(k > 0) AS attempt,
               toLowCardinality(arrayElement({kinds}, 1 + intDiv(t, 3) % {types})) AS task_type,
               toLowCardinality(k = 1 ? arrayElement({models}, 1 + t % 3) : '') AS model,
               toLowCardinality(k = 1 ? arrayElement({tiers}, 1 + t % 3) : '') AS tier,
               toFloat64(0) AS cost_usd, '' AS reason
        FROM (SELECT intDiv(number, 3) AS t, number % 3 AS k FROM numbers({tasks * 3}))"""
    outcomes = f"""
        SELECT concat('{prefix}-', toString(number)) AS task_id,
               toLowCardinality(concat('team-', toString(number % {teams}))) AS team,
               toUInt32(1) AS attempt,
               toLowCardinality(number % 10 = 0 ? 'TaskFailed' : 'TaskCompleted') AS event_type,
               toUInt8(number % 10 != 0) AS success, toUInt8(1) AS final, toUInt8(0) AS cached,
               toLowCardinality(number % 10 = 0 ? '' : arrayElement({models}, 1 + number % 3))
                   AS model,
               toLowCardinality(number % 10 = 0 ? 'model_error' : '') AS failure_class,
               toFloat64(0) AS cost_usd, toFloat64(1000 + number % 5000) AS duration_ms,
               '' AS audit_head, toUInt32(0) AS audit_count,
               {clock} - {age % 'number'} + toIntervalMillisecond(2000) AS occurred_at,
               hex(cityHash64(number, '{prefix}', 'outcome')) AS event_id,
               toLowCardinality(arrayElement({kinds}, 1 + intDiv(number, 3) % {types}))
                   AS task_type,
               toLowCardinality(arrayElement({models}, 1 + number % 3)) AS call_model,
               toLowCardinality(arrayElement({tiers}, 1 + number % 3)) AS tier
        FROM numbers({tasks})"""
    started = time.perf_counter()
    sources = {"model_calls": calls, "task_transitions": transitions,
               "attempt_outcomes": outcomes}
    if raw:
        for table, select in sources.items():
            cols = ", ".join(f"`{c}`" for c in _aliases(select))
            store.command(f"INSERT INTO {store.table(table)} ({cols}) SELECT {cols} "
                          f"FROM ({select})")
    else:
        for table, select in sources.items():
            for target, view in _views_of(store, table):
                store.command(f"INSERT INTO {target} {view.replace('@SOURCE', f'({select})')}")
    return time.perf_counter() - started


def _aliases(select: str) -> list[str]:
    """The output column names of one of the generator's SELECTs (each ends in `AS name`)."""
    body = select.split("FROM (SELECT")[0].split("FROM numbers")[0]
    return re.findall(r"\bAS\s+(\w+)\s*(?:,|$)", body)


def _views_of(store: Store, table: str) -> list[tuple[str, str]]:
    """(target table, SELECT with @SOURCE for its source) of each materialized view on `table`
    except the recent_* copies."""
    source = re.compile(rf"\bFROM\s+`?{re.escape(store.database)}`?\.`?{table}`?(?![\w`])")
    out = []
    for r in store.query(
            "SELECT name, as_select, create_table_query FROM system.tables "
            "WHERE database = {db:String} AND engine = 'MaterializedView'",
            {"db": store.database}):
        select = str(r["as_select"])
        target = re.search(r"\bTO\s+(\S+)", str(r["create_table_query"]))
        if target is None or not source.search(select) or "recent_" in target.group(1):
            continue
        out.append((target.group(1), source.sub("FROM @SOURCE", select)))
    return out


def run_bench(store: Store, tasks: int, flush_rows: int = 5_000) -> BenchResult:
    sink = ClickHouseSink(store, flush_rows=flush_rows)
    events = list(synthetic_events(tasks, prefix=f"bench-{time.monotonic_ns()}"))
    started = time.perf_counter()
    for offset, event in enumerate(events):
        sink.add(rows_for(event, Record("bench", 0, offset, None, b"")))
    sink.flush()
    elapsed = time.perf_counter() - started
    return BenchResult(len(events), sink.stats.rows, elapsed, sink.stats.insert_seconds,
                       sink.stats.statement_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2_000)
    parser.add_argument("--flush-rows", type=int, default=5_000)
    parser.add_argument("--dsn", default="", help="ClickHouse DSN (default: chdb in a temp dir)")
    args = parser.parse_args()
    dsn = args.dsn or f"chdb://{tempfile.mkdtemp(prefix='fleetplane-bench-')}"
    store = connect(Settings(clickhouse_dsn=dsn))
    try:
        apply_ddl(store)
        r = run_bench(store, args.tasks, args.flush_rows)
    finally:
        store.close()
    print(f"{r.events} events, {r.rows} rows in {r.seconds:.2f}s: {r.events_per_s:,.0f} events/s, "
          f"{r.rows_per_s:,.0f} rows/s end to end, {r.insert_rows_per_s:,.0f} rows/s inserting")


if __name__ == "__main__":
    main()
