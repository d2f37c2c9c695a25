"""Measure how fast the sink writes rows into ClickHouse (no broker involved).

    PYTHONPATH=services python -m fleetplane.accounting.bench --tasks 2000 --dsn chdb:///tmp/bench

Each synthetic task has a full lifecycle, five model calls and five tool calls (15 events,
26 rows). Reports events/s and rows/s end to end (row mapping + inserts) and insert-only rows/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from fleetplane.accounting.rows import rows_for
from fleetplane.accounting.sink import ClickHouseSink
from fleetplane.accounting.store import Store, apply_ddl, connect
from fleetplane.core import events as ev
from fleetplane.core.loop import Record
from fleetplane.core.settings import Settings


@dataclass(frozen=True)
class BenchResult:
    events: int
    rows: int
    seconds: float
    insert_seconds: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds

    @property
    def insert_rows_per_s(self) -> float:
        return self.rows / self.insert_seconds if self.insert_seconds else 0.0


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
                     days: int = 30, min_age_s: int = 0, prefix: str = "bt") -> float:
    """`rows` model calls over rows/5 tasks (5 calls each, one attempt; 90% succeed) spread over
    `days` days ending `min_age_s` seconds ago, written inside ClickHouse (INSERT ... SELECT FROM
    numbers) as the sink would store them: model calls with their task type, lifecycle rows
    (submitted, dispatched, completed/failed) and attempt outcomes with task type, call model
    and tier. Every materialized view (rollups, recent copies) sees them. Returns seconds."""
    tasks = max(1, rows // 5)
    span = max(1, days * 86_400)
    models, tiers, kinds = _array(MODELS), _array(TIERS), _array(TYPES[:types])
    db = store.database
    started = time.perf_counter()
    # task t starts t/tasks of the way through the span (newest first): a steady fleet
    age = f"toIntervalSecond({int(min_age_s)} + intDiv(toUInt64(%s) * {span}, {tasks}))"
    store.command(f"""
        INSERT INTO {db}.model_calls (task_id, team, attempt, call_index, model, provider, tier,
            task_type, input_tokens, output_tokens, cache_creation_input_tokens,
            cache_read_input_tokens, cost_usd, latency_ms, outcome, error, stop_reason,
            occurred_at, event_id)
        SELECT concat('{prefix}-', toString(t)) AS task_id,
               concat('team-', toString(t % {teams})), 1, toUInt32(number % 5),
               arrayElement({models}, 1 + t % 3), 'anthropic', arrayElement({tiers}, 1 + t % 3),
               arrayElement({kinds}, 1 + intDiv(t, 3) % {types}),
               500 + number % 4000, 50 + number % 900, number % 7 = 0 ? 1000 : 0,
               number % 3 = 0 ? 2000 : 0,
               (500 + number % 4000) * 3e-6 + (50 + number % 900) * 15e-6,
               300 + number % 2000, 'ok', '', 'end_turn',
               now64(3) - {age % 't'} + toIntervalMillisecond(600 + (number % 5) * 100),
               hex(cityHash64(number, '{prefix}', 'call'))
        FROM (SELECT number, intDiv(number, 5) AS t FROM numbers({rows}))
    """)
    store.command(f"""
        INSERT INTO {db}.task_transitions (task_id, team, event_id, event_type, state, terminal,
            state_rank, occurred_at, attempt, task_type, model, tier, cost_usd, reason)
        SELECT concat('{prefix}-', toString(t)), concat('team-', toString(t % {teams})),
               hex(cityHash64(t, k, '{prefix}')),
               arrayElement(['TaskSubmitted', 'TaskDispatched', 'TaskCompleted', 'TaskFailed'],
                            k + 1 + (k = 2 AND t % 10 = 0 ? 1 : 0)),
               arrayElement(['submitted', 'dispatched', 'completed', 'failed'],
                            k + 1 + (k = 2 AND t % 10 = 0 ? 1 : 0)),
               k = 2, k = 2 ? 9 : k * 4 + 1,
               now64(3) - {age % 't'} + toIntervalMillisecond(k * 500 + (k = 2 ? 1000 : 0)),
               k > 0, arrayElement({kinds}, 1 + intDiv(t, 3) % {types}),
               k = 1 ? arrayElement({models}, 1 + t % 3) : '',
               k = 1 ? arrayElement({tiers}, 1 + t % 3) : '', 0, ''
        FROM (SELECT intDiv(number, 3) AS t, number % 3 AS k FROM numbers({tasks * 3}))
    """)
    store.command(f"""
        INSERT INTO {db}.attempt_outcomes (task_id, team, attempt, event_type, success, final,
            cached, model, failure_class, cost_usd, duration_ms, audit_head, audit_count,
            occurred_at, event_id, task_type, call_model, tier)
        SELECT concat('{prefix}-', toString(number)), concat('team-', toString(number % {teams})),
               1, number % 10 = 0 ? 'TaskFailed' : 'TaskCompleted', number % 10 != 0, 1, 0,
               number % 10 = 0 ? '' : arrayElement({models}, 1 + number % 3),
               number % 10 = 0 ? 'model_error' : '', 0, 1000 + number % 5000, '', 0,
               now64(3) - {age % 'number'} + toIntervalMillisecond(2000),
               hex(cityHash64(number, '{prefix}', 'outcome')),
               arrayElement({kinds}, 1 + intDiv(number, 3) % {types}),
               arrayElement({models}, 1 + number % 3), arrayElement({tiers}, 1 + number % 3)
        FROM numbers({tasks})
    """)
    return time.perf_counter() - started


def run_bench(store: Store, tasks: int, flush_rows: int = 5_000) -> BenchResult:
    sink = ClickHouseSink(store, flush_rows=flush_rows)
    events = list(synthetic_events(tasks, prefix=f"bench-{time.monotonic_ns()}"))
    started = time.perf_counter()
    for offset, event in enumerate(events):
        sink.add(rows_for(event, Record("bench", 0, offset, None, b"")))
    sink.flush()
    elapsed = time.perf_counter() - started
    return BenchResult(len(events), sink.stats.rows, elapsed, sink.stats.insert_seconds)


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
