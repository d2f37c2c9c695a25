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
