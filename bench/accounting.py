"""Accounting benchmark: sink throughput into ClickHouse, and analytics latency at scale.

    python -m bench.accounting [--sink-tasks 4000] [--rows 1000000,10000000] [--dsn chdb:///dir]
    make bench-accounting BENCH_ARGS="--rows 1000000"

1. Sink: synthetic task lifecycles (15 events each: lifecycle, five model calls, five tool
   calls) mapped to rows and inserted through ClickHouseSink, as the accounting loop does.
2. Sink through Kafka: the same lifecycles produced to a real broker first, then consumed by the
   accounting processor as the service runs it (decode, map, dedupe lookups, columnar inserts).
   The CPU of that window is also given per thread name (the loop, librdkafka's fetchers,
   chdb's pools; from /proc).
2b. `--sink-processes K`: the same through K accounting processes in one consumer group (the
   partitions split between them), each with its own chdb directory (chdb serves one process
   per directory: a stand-in for one shared ClickHouse server).
3. Scale: for each size N, N model-call rows (and the matching tasks: N/5 tasks with submission,
   dispatch and outcome rows) over 30 days are generated inside ClickHouse with INSERT ...
   SELECT FROM numbers(N) (generate_history; the rollups' materialized views see them), then
   cost by team, cost per day, cost-to-value, what-if (20% of frontier -> small; 20% of one task
   type -> a model) and one dashboard refresh are timed (first run and median of three), all
   from the rollups; cost by team from raw rows once for comparison (up to 10M).
   Above --raw-limit (10M) the raw rows of only the last RECENT_S (6 h) are stored; the older
   calls go straight into the rollups (each materialized view's own SELECT over the generated
   rows: what the views would have stored; generate_history(raw=False)). The rollups then hold
   all N calls; the raw tables hold the recent part (the dashboard's live window reads it).
Figures, not assertions. Results go to bench/results/accounting-<time>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.measure import bench_dir
from fleetplane.accounting import analytics, queries
from fleetplane.accounting.bench import generate_history, run_bench, synthetic_events
from fleetplane.accounting.dashboard import dashboard_data
from fleetplane.accounting.main import build_processor
from fleetplane.accounting.rows import rows_for
from fleetplane.accounting.schema import apply_ddl
from fleetplane.accounting.store import connect
from fleetplane.accounting.whatif import Selection, what_if
from fleetplane.core.catalog import catalog_for
from fleetplane.core.kafka import EventProducer
from fleetplane.core.loop import Record
from fleetplane.core.service import freeze_startup_heap
from fleetplane.core.settings import Settings
from fleetplane.core.topics import ensure_topics, load_topics, topic_for
from fleetplane.infra.broker import EmbeddedBroker
from fleetplane.metrics.fleet import FleetMetrics

RESULTS = Path(__file__).resolve().parent / "results"
RAW_LIMIT = 10_000_000
RECENT_S = 6 * 3600
DAYS = 30


def cpu_seconds() -> float:
    """CPU time of this process (every thread: the loop, librdkafka's and chdb's)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def thread_cpu() -> dict[tuple[str, str], float]:
    """CPU seconds of each live thread of this process by (thread id, name), from /proc (empty
    where there is none): which of the loop, librdkafka's and chdb's threads spend the time."""
    out: dict[tuple[str, str], float] = {}
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return out
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(tasks):
        try:
            name = (tasks / tid / "comm").read_text().strip()
            stat = (tasks / tid / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:   # the thread ended meanwhile
            continue
        out[(tid, name)] = (int(stat[11]) + int(stat[12])) / tick
    return out


def cpu_by_thread_name(before: dict[tuple[str, str], float],
                       after: dict[tuple[str, str], float]) -> dict[str, float]:
    """CPU seconds between two thread_cpu() snapshots, summed by thread name (digits cut)."""
    by: dict[str, float] = {}
    for key, value in after.items():
        name = key[1].rstrip("0123456789-") or "?"
        by[name] = by.get(name, 0.0) + value - before.get(key, 0.0)
    return dict(sorted(by.items(), key=lambda kv: -kv[1]))


def timed(fn: Callable[[], Any], repeat: int = 3) -> dict[str, float]:
    """Wall seconds (first run, median) and the process's CPU seconds (median: chdb runs
    in-process, so this is the query work, less dependent on the machine's load than wall)."""
    times, cpu = [], []
    for _ in range(repeat):
        started, cpu_started = time.perf_counter(), cpu_seconds()
        fn()
        times.append(time.perf_counter() - started)
        cpu.append(cpu_seconds() - cpu_started)
    return {"first_s": times[0], "median_s": statistics.median(times),
            "cpu_median_s": statistics.median(cpu), "load_avg": os.getloadavg()[0]}


def settle(store: Any, timeout_s: float = 180.0) -> float:
    """Wait until ClickHouse runs no merge or mutation in the bench database (the generated
    parts merged, as in a live system's steady state): the queries are then timed alone, not
    next to chdb merging fresh parts in the same process. Returns the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        busy = int(store.command(
            "SELECT (SELECT count() FROM system.merges WHERE database = {db:String}) + "
            "(SELECT count() FROM system.mutations WHERE database = {db:String} "
            "AND NOT is_done)", {"db": store.database}))
        if not busy:
            break
        time.sleep(0.5)
    return time.perf_counter() - started


def scale_run(dsn_dir: Path, rows: int, raw_limit: int = RAW_LIMIT) -> dict[str, Any]:
    store = connect(Settings(clickhouse_dsn=f"chdb://{dsn_dir}",
                             clickhouse_database=f"bench_{rows}"))
    try:
        apply_ddl(store)
        if rows <= raw_limit:
            gen_s = generate_history(store, rows, days=DAYS)
        else:
            recent = rows * RECENT_S // (DAYS * 86_400)
            gen_s = generate_history(store, recent, span_s=RECENT_S, prefix="br")
            gen_s += generate_history(store, rows - recent, span_s=DAYS * 86_400 - RECENT_S,
                                      min_age_s=RECENT_S, raw=False)
        merge_started = time.perf_counter()
        for table in ("model_calls_hourly", "attempts_hourly", "model_calls_daily",
                      "attempts_daily"):
            # steady state: a live system's rollup parts are merged in the background
            store.command(f"OPTIMIZE TABLE {store.table(table)} FINAL")
        merge_s = time.perf_counter() - merge_started
        settle_s = settle(store)
        settings = Settings()
        catalog = catalog_for(settings.catalog_file)
        small = catalog.default_model("small")
        frontier_shift = Selection(share=0.2, target=small, from_tier="frontier")
        type_shift = Selection(share=0.2, target=catalog.model("claude-sonnet-4-6"),
                               task_type="debug")
        result: dict[str, Any] = {
            "model_calls": int(store.command(
                f"SELECT sum(calls) FROM {store.table('model_calls_daily')}")),
            "model_call_rows": int(store.command(
                f"SELECT count() FROM {store.table('model_calls')}")),
            "raw": rows <= raw_limit,
            "tasks": rows // 5,
            "generate_s": gen_s,
            "rollup_merge_s": merge_s,
            "settle_s": settle_s,
            "rollup_rows": int(store.command(
                f"SELECT count() FROM {store.table('model_calls_hourly')}")),
            "cost_by_team": timed(lambda: queries.cost_by(store, "team")),
            "cost_daily_by_team": timed(lambda: analytics.cost_daily(store, "team")),
            "cost_to_value_by_task_type": timed(
                lambda: analytics.cost_to_value(store, "task_type")),
            "whatif_frontier_to_small": timed(lambda: what_if(store, catalog, frontier_shift)),
            "whatif_task_type_to_model": timed(lambda: what_if(store, catalog, type_shift)),
            "dashboard": timed(lambda: dashboard_data(store, settings), repeat=5),
            "live_tasks_in_window": int(store.command(
                f"SELECT uniqExact(task_id) FROM {store.table('recent_task_states')} "
                "WHERE minute >= now() - INTERVAL 1 HOUR")),
        }
        if rows <= raw_limit:   # the pre-issue-18 path, for comparison
            result["cost_by_team_raw"] = timed(lambda: queries.cost_by_raw(store, "team"),
                                               repeat=1)
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
            "insert_rows_per_s": r.insert_rows_per_s,
            "statement_rows_per_s": r.statement_rows_per_s, "flush_rows": flush_rows}


def sink_kafka(base: Path, sink_tasks: int, flush_rows: int,
               timeout_s: float = 900.0) -> dict[str, Any]:
    """End to end: the events are first produced to a real broker (pinned embedded noida-db on
    a free port), then the accounting processor (build_processor, as the service runs it)
    consumes, maps and inserts them; timed from its start until every row is in ClickHouse."""
    broker = EmbeddedBroker(base / "broker")
    broker.start()
    try:
        settings = Settings(kafka_bootstrap=broker.bootstrap,
                            clickhouse_dsn=f"chdb://{base}", clickhouse_database="bench_e2e",
                            sink_flush_rows=flush_rows)
        ensure_topics(settings.client_config(), load_topics(settings.topics_file))
        events = list(synthetic_events(sink_tasks, prefix=f"e2e-{time.monotonic_ns()}"))
        expected = sum(len(v) for e in events
                       for v in rows_for(e, Record(topic_for(e), 0, 0, None, b"")).values())
        producer = EventProducer(settings)
        produce_started = time.perf_counter()
        producer.send(events, timeout_s=timeout_s)
        produce_s = time.perf_counter() - produce_started
        producer.close()
        # the service holds no copy of what it consumes: neither does the measured process
        # (the 64,000 events kept alive made the window's collection of Python's oldest
        # generation 0.066-0.088 s of CPU instead of 0.041-0.071; docs/accounting.md)
        n_events = len(events)
        del events
        gc.collect()
        store = connect(settings)
        try:
            apply_ddl(store)
            # with the fleet metrics, which the service always runs (they see every record)
            processor, acct_sink = build_processor(settings, store,
                                                   group_id=f"bench-acct-{time.monotonic_ns()}",
                                                   fleet=FleetMetrics(quota=lambda _team: 20))
            freeze_startup_heap()   # as accounting's main does once started
            thread = threading.Thread(target=processor.run, daemon=True)
            # `first` below is taken once the first batch is handled, which leaves that batch's
            # work out (and, were inserts not on the loop's thread, not its insert): the time
            # of the assignment counts every batch in full, and the wait for the first fetched
            # records too (the wrapped callback is on_assign's)
            assigned: list[float] = []
            reassigned = acct_sink.reassigned

            def noted() -> None:
                assigned.append(time.perf_counter())
                reassigned()

            acct_sink.reassigned = noted  # type: ignore[method-assign]
            threads_started = thread_cpu()
            cpu_started = cpu_seconds()
            started = time.perf_counter()
            thread.start()
            deadline = started + timeout_s
            first = 0.0   # the first record handled: the group joined, partitions assigned
            while acct_sink.stats.rows < expected and time.perf_counter() < deadline:
                if not first and processor.processed:
                    first = time.perf_counter()
                time.sleep(0.01)
            done = time.perf_counter()
            cpu_s = cpu_seconds() - cpu_started
            by_thread = cpu_by_thread_name(threads_started, thread_cpu())
            elapsed = done - (first or started)
            processor.stop()
            thread.join(60)
            stored = int(store.command(f"SELECT count() FROM {store.table('events')}"))
            store.command(f"DROP DATABASE {store.database}")
        finally:
            store.close()
    finally:
        broker.stop()
    return {"events": n_events, "rows": acct_sink.stats.rows, "expected_rows": expected,
            "events_stored": stored, "seconds": elapsed, "join_s": (first or done) - started,
            "lookups": acct_sink.stats.lookups,
            "rows_per_s": acct_sink.stats.rows / elapsed,
            "rows_per_s_from_assignment": (acct_sink.stats.rows / (done - assigned[0])
                                           if assigned else 0.0),
            "events_per_s": n_events / elapsed,
            "cpu_s": cpu_s, "cpu_s_by_thread": by_thread,
            "us_cpu_per_row": 1e6 * cpu_s / acct_sink.stats.rows if acct_sink.stats.rows else 0.0,
            "rows_per_cpu_s": acct_sink.stats.rows / cpu_s if cpu_s else 0.0,
            "load_avg": os.getloadavg(),
            "insert_rows_per_s": acct_sink.stats.rows_per_second(),
            "statement_rows_per_s": acct_sink.stats.statement_rows_per_second(),
            "produce_s": produce_s,
            "flush_rows": flush_rows}


def group_worker(bootstrap: str, group: str, base: str, out: str, go: str) -> None:
    """One accounting processor of `group` with its own chdb directory (`--group-worker`): waits
    for the file `go`, then writes its rows, CPU seconds and first-record time to `out` every
    50 ms until the file `go`.stop appears."""
    settings = Settings(kafka_bootstrap=bootstrap, clickhouse_dsn=f"chdb://{base}",
                        clickhouse_database="bench_group", sink_flush_rows=20_000)
    store = connect(settings)
    apply_ddl(store)
    processor, acct_sink = build_processor(settings, store, group_id=group,
                                           fleet=FleetMetrics(quota=lambda _team: 20))
    while not os.path.exists(go):
        time.sleep(0.05)
    cpu_started = cpu_seconds()
    thread = threading.Thread(target=processor.run, daemon=True)
    thread.start()
    first = 0.0
    while not os.path.exists(go + ".stop"):
        if not first and processor.processed:
            first = time.time()
        Path(out + ".tmp").write_text(json.dumps({"rows": acct_sink.stats.rows, "first": first,
                                                  "cpu_s": cpu_seconds() - cpu_started}))
        os.replace(out + ".tmp", out)
        time.sleep(0.05)
    processor.stop()
    thread.join(60)
    store.close()


def sink_group(base: Path, processes: int, sink_tasks: int, timeout_s: float = 600.0
               ) -> dict[str, Any]:
    """Several accounting processes in one consumer group (the topics' partitions split between
    them), the events produced first as in sink_kafka. chdb serves one process per directory,
    so each process writes its own chdb directory here: a stand-in for one ClickHouse server
    they would share. Timed from the first record any of them handled until all rows are in."""
    broker = EmbeddedBroker(base / "broker-group")
    broker.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        settings = Settings(kafka_bootstrap=broker.bootstrap)
        ensure_topics(settings.client_config(), load_topics(settings.topics_file))
        events = list(synthetic_events(sink_tasks, prefix=f"grp-{time.monotonic_ns()}"))
        expected = sum(len(v) for e in events
                       for v in rows_for(e, Record(topic_for(e), 0, 0, None, b"")).values())
        producer = EventProducer(settings)
        producer.send(events, timeout_s=timeout_s)
        producer.close()
        go = str(base / "group-go")
        outs = [str(base / f"group-{i}.json") for i in range(processes)]
        for i, out in enumerate(outs):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.accounting", "--group-worker", broker.bootstrap,
                 "bench-group", str(base / f"group-ch{i}"), out, go],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        time.sleep(8.0)   # each has applied the schema and imported pandas
        go_at = time.time()
        Path(go).touch()
        stats: list[dict[str, Any]] = []
        while time.time() - go_at < timeout_s:
            stats = [json.loads(Path(o).read_text()) if os.path.exists(o)
                     else {"rows": 0, "first": 0.0, "cpu_s": 0.0} for o in outs]
            if sum(st["rows"] for st in stats) >= expected:
                break
            time.sleep(0.05)
        done = time.time()
        Path(go + ".stop").touch()
        for proc in procs:
            proc.wait(90)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        broker.stop()
    firsts = [st["first"] for st in stats if st["first"]]
    start = min(firsts) if firsts else go_at
    rows = sum(st["rows"] for st in stats)
    cpu_s = sum(st["cpu_s"] for st in stats)
    return {"processes": processes, "expected_rows": expected, "rows": rows,
            "rows_per_process": [st["rows"] for st in stats], "join_s": start - go_at,
            "seconds": done - start, "rows_per_s": rows / (done - start),
            "cpu_s": cpu_s, "us_cpu_per_row": 1e6 * cpu_s / rows if rows else 0.0,
            "load_avg": os.getloadavg()}


def measure(sink_tasks: int, flush_rows: int, sizes: list[int],
            dsn_dir: str = "", kafka: bool = True, raw_limit: int = RAW_LIMIT
            ) -> dict[str, Any]:
    """The sink figures and one scale run per size (used by this bench and by `make bench`)."""
    base = Path(dsn_dir) if dsn_dir else bench_dir("fleetplane-bench-acct-")
    out: dict[str, Any] = {}
    if sink_tasks > 0:
        out["sink"] = sink(base, sink_tasks, flush_rows)
        if kafka:
            out["sink_kafka"] = sink_kafka(base, sink_tasks, flush_rows)
    out["scale"] = [scale_run(base, n, raw_limit) for n in sizes]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sink-tasks", type=int, default=4000)
    parser.add_argument("--flush-rows", type=int, default=20_000)
    parser.add_argument("--rows", default="1000000,10000000",
                        help="comma-separated model-call row counts for the scale runs")
    parser.add_argument("--dsn-dir", default="", help="chdb directory (default: a temp dir)")
    parser.add_argument("--no-kafka", action="store_true",
                        help="skip the end-to-end sink run through the broker")
    parser.add_argument("--no-sink", action="store_true", help="skip both sink runs")
    parser.add_argument("--sink-processes", type=int, default=0,
                        help="also run the sink through Kafka with this many processes in one "
                             "consumer group (each its own chdb directory)")
    parser.add_argument("--group-worker", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--raw-limit", type=int, default=RAW_LIMIT,
                        help="sizes above this keep raw rows of the last 6 h only (see above)")
    args = parser.parse_args()
    if args.group_worker:
        group_worker(*args.group_worker)
        return
    console = Console()
    sizes = [int(x) for x in args.rows.split(",") if x.strip()]
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                       "load_avg": os.getloadavg()}}
    out.update(measure(0 if args.no_sink else args.sink_tasks, args.flush_rows, sizes,
                       args.dsn_dir, kafka=not args.no_kafka, raw_limit=args.raw_limit))
    if args.sink_processes > 0 and not args.no_sink:
        out["sink_group"] = sink_group(
            Path(args.dsn_dir) if args.dsn_dir else bench_dir("fleetplane-bench-group-"),
            args.sink_processes, args.sink_tasks)
        g = out["sink_group"]
        console.print(f"sink through Kafka, {g['processes']} processes in one group: "
                      f"{g['rows']:,} rows ({g['rows_per_process']}) in {g['seconds']:.1f}s: "
                      f"{g['rows_per_s']:,.0f} rows/s, {g['us_cpu_per_row']:.1f} us CPU per row "
                      f"(all processes), load {g['load_avg'][0]:.1f}")
    if "sink" in out:
        r = out["sink"]
        console.print(f"sink: {r['events']:,} events, {r['rows']:,} rows in {r['seconds']:.1f}s: "
                      f"{r['rows_per_s']:,.0f} rows/s end to end, {r['insert_rows_per_s']:,.0f} "
                      f"rows/s inserting ({r['statement_rows_per_s']:,.0f} in the statements "
                      f"alone; {r['events_per_s']:,.0f} events/s)")
    if "sink_kafka" in out:
        r = out["sink_kafka"]
        console.print(f"sink through Kafka: {r['events']:,} events, {r['rows']:,} rows in "
                      f"{r['seconds']:.1f}s from the first record ({r['join_s']:.1f}s group "
                      f"join before it): {r['rows_per_s']:,.0f} rows/s end to end "
                      f"({r['rows_per_s_from_assignment']:,.0f} from the assignment) "
                      f"({r['events_per_s']:,.0f} events/s), {r['insert_rows_per_s']:,.0f} "
                      f"rows/s inserting ({r['statement_rows_per_s']:,.0f} in the statements "
                      f"alone), {r['lookups']} duplicate lookups; "
                      f"{r['rows_per_cpu_s']:,.0f} rows per CPU-second ({r['cpu_s']:.1f} CPU-s "
                      f"over the run, load {r['load_avg'][0]:.1f})")
        rows = r["rows"] or 1
        console.print("  CPU per row by thread: " + ", ".join(
            f"{name} {1e6 * s / rows:.1f} us" for name, s in list(r["cpu_s_by_thread"].items())[:4]
            if s > 0))
    table = Table(title="analytics latency on chdb (first run / median of 3, seconds)")
    for c in ("model calls", "generate", "cost by team", "cost/day", "cost-to-value",
              "what-if tier", "what-if type", "dashboard", "cost by team (raw)"):
        table.add_column(c, justify="right")
    for r in out["scale"]:

        def cell(k: str, r: dict[str, Any] = r) -> str:
            return f"{r[k]['first_s']:.2f} / {r[k]['median_s']:.2f}"

        calls = f"{r['model_calls']:,}" + ("" if r["raw"] else f" ({r['model_call_rows']:,} raw)")
        table.add_row(calls, f"{r['generate_s']:.1f}", cell("cost_by_team"),
                      cell("cost_daily_by_team"), cell("cost_to_value_by_task_type"),
                      cell("whatif_frontier_to_small"), cell("whatif_task_type_to_model"),
                      cell("dashboard"),
                      cell("cost_by_team_raw") if "cost_by_team_raw" in r else "-")
    console.print(table)
    for r in out["scale"]:
        d = r["dashboard"]
        console.print(f"dashboard at {r['model_calls']:,} calls: {d['cpu_median_s'] * 1000:.0f} ms "
                      f"CPU per refresh (median of 5), {r['live_tasks_in_window']:,} tasks in the "
                      f"live window, load {d['load_avg']:.1f}")
    console.print(f"load average during the run: {os.getloadavg()} on {os.cpu_count()} CPUs")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"accounting-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=2))
    console.print(f"written {path}")


if __name__ == "__main__":
    main()
