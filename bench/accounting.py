"""Accounting benchmark: sink throughput into ClickHouse, and analytics latency at scale.

    python -m bench.accounting [--sink-tasks 4000] [--rows 1000000,10000000] [--dsn chdb:///dir]
    make bench-accounting BENCH_ARGS="--rows 1000000"

1. Sink: synthetic task lifecycles (15 events each: lifecycle, five model calls, five tool
   calls) mapped to rows and inserted through ClickHouseSink, as the accounting loop does.
2. Scale: for each size N, N model-call rows (and the matching tasks: N/5 tasks with submission,
   dispatch and outcome rows) are generated inside ClickHouse with INSERT ... SELECT FROM
   numbers(N), then cost by team (model_calls FINAL), cost per day (the rollup), cost-to-value
   and what-if (20% of frontier -> small; 20% of one task type -> a model) are timed
   (first run and median of three).
Figures, not assertions. Results go to bench/results/accounting-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fleetplane.accounting import analytics, queries
from fleetplane.accounting.bench import run_bench
from fleetplane.accounting.store import Store, apply_ddl, connect
from fleetplane.accounting.whatif import Selection, what_if
from fleetplane.core.catalog import catalog_for
from fleetplane.core.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = "['claude-opus-4-7', 'claude-sonnet-4-6', 'claude-haiku-4-5']"
TIERS = "['frontier', 'standard', 'small']"
TYPES = ("['summarize', 'classify', 'translate', 'format', 'codegen', 'refactor', 'review', "
         "'test', 'debug', 'architecture', 'research']")


def generate(store: Store, rows: int) -> float:
    """N model calls over N/5 tasks (5 calls each) spread over 30 days; returns seconds."""
    tasks = max(1, rows // 5)
    db = store.database
    started = time.perf_counter()
    store.command(f"""
        INSERT INTO {db}.model_calls (task_id, team, attempt, call_index, model, provider, tier,
            task_type, input_tokens, output_tokens, cache_creation_input_tokens,
            cache_read_input_tokens, cost_usd, latency_ms, outcome, error, stop_reason,
            occurred_at, event_id)
        SELECT concat('bt-', toString(intDiv(number, 5))) AS task_id,
               concat('team-', toString(intDiv(number, 5) % 20)),
               1, toUInt32(number % 5),
               arrayElement({MODELS}, 1 + intDiv(number, 5) % 3), 'anthropic',
               arrayElement({TIERS}, 1 + intDiv(number, 5) % 3),
               arrayElement({TYPES}, 1 + intDiv(number, 15) % 11),
               500 + number % 4000, 50 + number % 900, number % 7 = 0 ? 1000 : 0,
               number % 3 = 0 ? 2000 : 0,
               (500 + number % 4000) * 3e-6 + (50 + number % 900) * 15e-6,
               300 + number % 2000, 'ok', '', 'end_turn',
               now64(3) - toIntervalSecond(intDiv(number, 5) % 2592000),
               hex(cityHash64(number, 'call'))
        FROM numbers({rows})
    """)
    store.command(f"""
        INSERT INTO {db}.task_transitions (task_id, team, event_id, event_type, state, terminal,
            state_rank, occurred_at, attempt, task_type, model, tier, cost_usd, reason)
        SELECT concat('bt-', toString(t)), concat('team-', toString(t % 20)),
               hex(cityHash64(t, k)),
               arrayElement(['TaskSubmitted', 'TaskDispatched', 'TaskCompleted', 'TaskFailed'],
                            k + 1 + (k = 2 AND t % 10 = 0 ? 1 : 0)),
               arrayElement(['submitted', 'dispatched', 'completed', 'failed'],
                            k + 1 + (k = 2 AND t % 10 = 0 ? 1 : 0)),
               k = 2, k = 2 ? 9 : k * 4 + 1,
               now64(3) - toIntervalSecond(t % 2592000) + toIntervalMillisecond(k * 500),
               k > 0, arrayElement({TYPES}, 1 + intDiv(t, 3) % 11),
               k = 1 ? arrayElement({MODELS}, 1 + t % 3) : '',
               k = 1 ? arrayElement({TIERS}, 1 + t % 3) : '', 0, ''
        FROM (SELECT intDiv(number, 3) AS t, number % 3 AS k FROM numbers({tasks * 3}))
    """)
    store.command(f"""
        INSERT INTO {db}.attempt_outcomes (task_id, team, attempt, event_type, success, final,
            cached, model, failure_class, cost_usd, duration_ms, audit_head, audit_count,
            occurred_at, event_id)
        SELECT concat('bt-', toString(number)), concat('team-', toString(number % 20)), 1,
               number % 10 = 0 ? 'TaskFailed' : 'TaskCompleted', number % 10 != 0, 1, 0,
               number % 10 = 0 ? '' : arrayElement({MODELS}, 1 + number % 3),
               number % 10 = 0 ? 'model_error' : '', 0, 1000 + number % 5000, '', 0,
               now64(3) - toIntervalSecond(number % 2592000) + toIntervalSecond(1),
               hex(cityHash64(number, 'outcome'))
        FROM numbers({tasks})
    """)
    return time.perf_counter() - started


def timed(fn: Callable[[], Any], repeat: int = 3) -> dict[str, float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return {"first_s": times[0], "median_s": statistics.median(times)}


def scale_run(dsn_dir: Path, rows: int) -> dict[str, Any]:
    store = connect(Settings(clickhouse_dsn=f"chdb://{dsn_dir}",
                             clickhouse_database=f"bench_{rows}"))
    try:
        apply_ddl(store)
        gen_s = generate(store, rows)
        catalog = catalog_for(Settings().catalog_file)
        small = catalog.default_model("small")
        frontier_shift = Selection(share=0.2, target=small, from_tier="frontier")
        type_shift = Selection(share=0.2, target=catalog.model("claude-sonnet-4-6"),
                               task_type="debug")
        result: dict[str, Any] = {
            "model_call_rows": int(store.command(
                f"SELECT count() FROM {store.table('model_calls')}")),
            "tasks": rows // 5,
            "generate_s": gen_s,
            "cost_by_team": timed(lambda: queries.cost_by(store, "team")),
            "cost_daily_by_team": timed(lambda: analytics.cost_daily(store, "team")),
            "cost_to_value_by_task_type": timed(
                lambda: analytics.cost_to_value(store, "task_type")),
            "whatif_frontier_to_small": timed(lambda: what_if(store, catalog, frontier_shift)),
            "whatif_task_type_to_model": timed(lambda: what_if(store, catalog, type_shift)),
        }
        store.command(f"DROP DATABASE {store.database}")
        return result
    finally:
        store.close()


def sink(base: Path, sink_tasks: int, flush_rows: int) -> dict[str, Any]:
    """Synthetic lifecycles mapped to rows and inserted through ClickHouseSink (chdb in `base`)."""
    store = connect(Settings(clickhouse_dsn=f"chdb://{base}", clickhouse_database="bench_sink"))
    try:
        apply_ddl(store)
        r = run_bench(store, sink_tasks, flush_rows)
        store.command(f"DROP DATABASE {store.database}")
    finally:
        store.close()
    return {"events": r.events, "rows": r.rows, "seconds": r.seconds,
            "events_per_s": r.events_per_s, "rows_per_s": r.rows_per_s,
            "insert_rows_per_s": r.insert_rows_per_s, "flush_rows": flush_rows}


def measure(sink_tasks: int, flush_rows: int, sizes: list[int],
            dsn_dir: str = "") -> dict[str, Any]:
    """The sink figures and one scale run per size (used by this bench and by `make bench`)."""
    base = Path(dsn_dir or tempfile.mkdtemp(prefix="fleetplane-bench-acct-"))
    out: dict[str, Any] = {}
    if sink_tasks > 0:
        out["sink"] = sink(base, sink_tasks, flush_rows)
    out["scale"] = [scale_run(base, n) for n in sizes]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sink-tasks", type=int, default=4000)
    parser.add_argument("--flush-rows", type=int, default=20_000)
    parser.add_argument("--rows", default="1000000,10000000",
                        help="comma-separated model-call row counts for the scale runs")
    parser.add_argument("--dsn-dir", default="", help="chdb directory (default: a temp dir)")
    args = parser.parse_args()
    console = Console()
    sizes = [int(x) for x in args.rows.split(",") if x.strip()]
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                       "load_avg": os.getloadavg()}}
    out.update(measure(args.sink_tasks, args.flush_rows, sizes, args.dsn_dir))
    if "sink" in out:
        r = out["sink"]
        console.print(f"sink: {r['events']:,} events, {r['rows']:,} rows in {r['seconds']:.1f}s: "
                      f"{r['rows_per_s']:,.0f} rows/s end to end, {r['insert_rows_per_s']:,.0f} "
                      f"rows/s inserting ({r['events_per_s']:,.0f} events/s)")
    table = Table(title="analytics latency on chdb (first run / median of 3, seconds)")
    for c in ("model calls", "generate", "cost by team", "cost/day", "cost-to-value",
              "what-if tier", "what-if type"):
        table.add_column(c, justify="right")
    for r in out["scale"]:

        def cell(k: str, r: dict[str, Any] = r) -> str:
            return f"{r[k]['first_s']:.2f} / {r[k]['median_s']:.2f}"

        table.add_row(f"{r['model_call_rows']:,}", f"{r['generate_s']:.1f}", cell("cost_by_team"),
                      cell("cost_daily_by_team"), cell("cost_to_value_by_task_type"),
                      cell("whatif_frontier_to_small"), cell("whatif_task_type_to_model"))
    console.print(table)
    console.print(f"load average during the run: {os.getloadavg()} on {os.cpu_count()} CPUs")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"accounting-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    console.print(f"written {path}")


if __name__ == "__main__":
    main()
