"""`make bench`: the benchmark suite. One embedded stack runs every pipeline scenario, then the
ClickHouse figures are taken with the stack stopped; one table is printed and one JSON file
(bench/results/bench-<time>.json) holds the machine and every figure.

    python -m bench.suite [--quick] [--throughput 2000,20000] [--steady-rate 200]
                          [--steady-seconds 30] [--overhead-tasks 1000] [--accounting-10m]
                          [--accounting-100m]
    make bench BENCH_ARGS="--quick"

Scenarios (docs/benchmarks.md says what each figure means):
1. throughput: N tasks through all five services, fake provider at zero latency.
2. steady: open-loop submission at a fixed rate (200 tasks/s over HTTP by default); latency
   submit->dispatched and submit->completed p50/p99; the rate actually achieved.
3. overhead: the provider at a fixed 200 ms; per-task end-to-end over model time, and the
   pipeline's wall time against the same calls made directly with the anthropic SDK.
4. peak memory (RSS high-water) of each service, the fake provider and the broker.
5. accounting: ClickHouse sink rows/s and analytics latency (bench/accounting.py) on chdb.
6. burst: 20,000 TaskSubmitted at Kafka speed, then 20,000 more with the active coordinator
   SIGKILLed midway (bench/burst.py): drain time, tasks/s, coordinator CPU-s, failover time,
   invariants.
7. concurrency: one executor process holding 2,000 waiting attempts (CPU, RSS), cancels while
   busy, while starting and while a second executor joins (rebalancing), a SIGKILL with the
   attempts in flight (recovery, billing per attempt), mixed 1-120 s attempts through 500
   slots (bench/concurrency.py).
Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console

from bench import accounting, burst, concurrency, overhead
from bench.measure import RESULTS, machine
from bench.pipeline import (
    BENCH_LIFTED,
    lift_concurrency,
    peak_memory,
    run_batch,
    set_provider,
    start_stack,
    strip_private,
    warm_up,
)
from bench.recorder import StageRecorder
from bench.report import render
from fleetplane.cli.stack import Stack
from fleetplane.core.settings import Settings

SCENARIOS = ("throughput", "steady", "overhead", "accounting", "burst", "concurrency")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a few hundred tasks, 100k model calls for ClickHouse")
    p.add_argument("--only", default=",".join(SCENARIOS),
                   help=f"comma-separated scenarios to run ({', '.join(SCENARIOS)})")
    p.add_argument("--throughput", default=None, help="task counts (default 2000,20000)")
    p.add_argument("--throughput-submit", choices=("kafka", "http"), default="kafka")
    p.add_argument("--steady-rate", type=float, default=200.0, help="tasks/s, open loop")
    p.add_argument("--steady-seconds", type=float, default=None, help="default 30")
    p.add_argument("--steady-submit", choices=("http", "kafka"), default="http")
    p.add_argument("--overhead-latency-ms", type=float, default=200.0)
    p.add_argument("--overhead-tasks", type=int, default=None,
                   help="burst size (default 1000)")
    p.add_argument("--overhead-unloaded", type=int, default=None,
                   help="tasks submitted one at a time (default 50)")
    p.add_argument("--overhead-unloaded-rate", type=float, default=2.0,
                   help="tasks/s for the unloaded phase (each task alone in the pipeline)")
    p.add_argument("--sink-tasks", type=int, default=None, help="default 4000 (64,000 events)")
    p.add_argument("--accounting-rows", default=None,
                   help="model-call row counts for the analytics runs (default 1000000)")
    p.add_argument("--accounting-10m", action="store_true",
                   help="add the 10,000,000 model-call analytics run")
    p.add_argument("--accounting-100m", action="store_true",
                   help="add the 100,000,000 model-call analytics run (about 12 days of a "
                        "1,000-agent fleet; generating it takes a long while)")
    p.add_argument("--burst", type=int, default=None, help="burst size (default 20000)")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="seconds to wait for a batch's tasks (default max(300, tasks/10))")
    p.add_argument("--keep-data", action="store_true",
                   help="keep the stack's and chdb's temporary directories (logs, broker data)")
    p.add_argument("--lift-concurrency", type=int, default=None, metavar="N",
                   help="team quotas, fleet cap and executor slots all N: the pipeline "
                   "scenarios measure the CPU-bound ceiling instead of the shipped quotas")
    p.add_argument("--env", action="append", type=lambda kv: tuple(kv.split("=", 1)),
                   help="FLEETPLANE_X=value for every service (repeatable)")
    args = p.parse_args(argv)
    quick = args.quick
    if args.throughput is None:
        args.throughput = "200,400" if quick else "2000,20000"
    if args.steady_seconds is None:
        args.steady_seconds = 2.0 if quick else 30.0
    if args.overhead_tasks is None:
        args.overhead_tasks = 200 if quick else 1000
    if args.overhead_unloaded is None:
        args.overhead_unloaded = 10 if quick else 50
    if args.burst is None:
        args.burst = 400 if quick else 20_000
    if args.sink_tasks is None:
        args.sink_tasks = 500 if quick else 4000
    if args.accounting_rows is None:
        args.accounting_rows = "100000" if quick else "1000000"
    if args.accounting_10m and "10000000" not in args.accounting_rows.split(","):
        args.accounting_rows += ",10000000"
    if args.accounting_100m and "100000000" not in args.accounting_rows.split(","):
        args.accounting_rows += ",100000000"
    args.only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = args.only - set(SCENARIOS)
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    return args


def _throughput(args: argparse.Namespace, console: Console, stack: Stack,
                recorder: StageRecorder, n: int, out: dict[str, Any]) -> None:
    console.print(f"throughput: {n:,} tasks over {args.throughput_submit} ...")
    r = run_batch(stack, recorder, n, args.throughput_submit, 0.0, timeout_s=args.timeout,
                  label="tp")
    out.setdefault("throughput", []).append(strip_private(r))
    out["throughput"].sort(key=lambda x: x["tasks"])
    out["memory_after"][f"throughput_{n}"] = peak_memory(stack)


def pipeline_scenarios(args: argparse.Namespace, console: Console, out: dict[str, Any],
                       save: Callable[[], None]) -> None:
    """Every pipeline scenario on one stack, into `out`; `save` after each (a run cut short
    keeps what it measured). The largest throughput batch runs last."""
    lifted = lift_concurrency(args.lift_concurrency) if args.lift_concurrency else {}
    env = {**lifted, **dict(args.env or [])}
    out["memory_after"] = {}
    stack = start_stack(console, 0.0, env, args.lift_concurrency)
    settings = Settings()
    out["stack"] = {"team_max_running": args.lift_concurrency,
                    "executor_slots": int(env.get("FLEETPLANE_EXECUTOR_SLOTS",
                                                  settings.executor_slots)),
                    "coordinator_max_running": int(env.get("FLEETPLANE_COORDINATOR_MAX_RUNNING",
                                                           settings.coordinator_max_running)),
                    "env": env}
    sizes = sorted(int(x) for x in args.throughput.split(",") if x.strip())
    recorder = StageRecorder(stack)
    try:
        recorder.start()
        warm_up(stack, recorder)
        if "throughput" in args.only:
            for n in sizes[:-1]:
                _throughput(args, console, stack, recorder, n, out)
                save()
        if "steady" in args.only:
            n = int(args.steady_rate * args.steady_seconds)
            console.print(f"steady: {n:,} tasks at {args.steady_rate:g}/s over "
                          f"{args.steady_submit} ...")
            r = run_batch(stack, recorder, n, args.steady_submit, args.steady_rate,
                          timeout_s=args.timeout, label="st")
            out["steady"] = {"seconds": args.steady_seconds, **strip_private(r)}
            out["memory_after"]["steady"] = peak_memory(stack)
            save()
        if "overhead" in args.only:
            console.print(f"overhead: provider at {args.overhead_latency_ms:g} ms; "
                          f"{args.overhead_unloaded} tasks one by one, then a burst of "
                          f"{args.overhead_tasks} ...")
            set_provider(stack, latency_ms=args.overhead_latency_ms)
            try:
                out["overhead"] = {
                    "provider_latency_ms": args.overhead_latency_ms,
                    **overhead.measure(stack, recorder, args.overhead_unloaded,
                                       args.overhead_unloaded_rate, args.overhead_tasks,
                                       out["stack"]["executor_slots"],
                                       args.throughput_submit)}
            finally:
                set_provider(stack, latency_ms=0)
            out["memory_after"]["overhead"] = peak_memory(stack)
            save()
        if "throughput" in args.only and sizes:
            _throughput(args, console, stack, recorder, sizes[-1], out)
        out["peak_rss_mib"] = peak_memory(stack)
    finally:
        recorder.stop()
        stack.stop()
        if args.keep_data:
            console.print(f"stack data kept in {stack.data_dir}")
        else:
            shutil.rmtree(stack.data_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 150))
    started = time.time()
    result: dict[str, Any] = {
        "machine": machine(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
        "lifted": BENCH_LIFTED,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"

    def save() -> None:
        result["duration_s"] = round(time.time() - started, 1)
        path.write_text(json.dumps(result, indent=2, default=str))

    if args.only - {"accounting", "burst", "concurrency"}:
        pipeline_scenarios(args, console, result, save)
        save()
    if "burst" in args.only:
        result["burst"] = burst.scenario(console, args.burst, args.timeout)
        save()
        console.print_json(data=result["burst"])
    if "concurrency" in args.only:  # one executor process (bench/concurrency.py, issue 13)
        result["concurrency"] = concurrency.scenario(console, quick=args.quick)
        save()
    if "accounting" in args.only:
        sizes = [int(x) for x in args.accounting_rows.split(",") if x.strip()]
        console.print(f"accounting: sink {args.sink_tasks:,} task lifecycles, analytics over "
                      f"{', '.join(f'{n:,}' for n in sizes)} model calls ...")
        acct_dir = tempfile.mkdtemp(prefix="fleetplane-bench-acct-")
        try:
            result["accounting"] = accounting.measure(args.sink_tasks, 20_000, sizes, acct_dir)
        finally:
            if not args.keep_data:
                shutil.rmtree(acct_dir, ignore_errors=True)
    result["machine"]["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    save()
    console.print(render(result))
    console.print(f"written to {path}")


if __name__ == "__main__":
    main()
