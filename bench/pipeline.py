"""End-to-end pipeline benchmark: N tasks through all five services with the fake provider.

    python -m bench.pipeline --tasks 2000 [--submit http|kafka] [--rate 0] [--latency-ms 0]

Starts its own embedded stack (broker, topics, fake provider, five services) in a temporary
directory, submits the tasks, and watches tasks.outcomes with its own consumer. Prints one table
(tasks/s, submit-to-completed latency p50/p99 as seen by a stream consumer, peak RSS per process)
with the machine it ran on, and writes the figures to bench/results/pipeline-<time>.json.
Figures, not assertions: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml
from confluent_kafka import Consumer
from rich.console import Console
from rich.table import Table

from fleetplane.cli.stack import Stack
from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.serde import default_serde
from fleetplane.core.topics import OUTCOMES

RESULTS = Path(__file__).resolve().parent / "results"
TEAMS = ("payments", "search", "platform")
TYPES = ("summarize", "codegen", "architecture", "classify")


def machine() -> dict[str, Any]:
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {"cores": os.cpu_count(), "memory_gib": round(mem_kb / 1024 / 1024, 1),
            "python": platform.python_version(), "platform": platform.platform()}


def peak_rss_mib(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time a process has used so far."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return round((int(fields[11]) + int(fields[12])) / ticks, 2)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


class OutcomeWatcher:
    """Reads tasks.outcomes and records when each of our tasks reached a terminal state."""

    def __init__(self, stack: Stack) -> None:
        self.settings = stack.settings()
        self.seen: dict[str, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(30)

    def _run(self) -> None:
        c = Consumer({**self.settings.consumer_config(f"bench-{uuid.uuid4().hex[:8]}"),
                      "enable.auto.commit": False, "auto.offset.reset": "latest"})
        c.subscribe([OUTCOMES], on_assign=lambda *_: self._ready.set())
        serde = default_serde()
        try:
            while not self._stop.is_set():
                for m in c.consume(1000, 0.1):
                    if m.error():
                        continue
                    now = time.time()
                    e = serde.decode(m.value() or b"")
                    if e.task_id not in self.seen:
                        self.seen[e.task_id] = (now, type(e).__name__)
        finally:
            c.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


STAGES = (("tasks.accepted", "accepted"), ("tasks.routed", "routed"),
          ("tasks.dispatch", "dispatched"), ("tasks.outcomes", "completed"))


def stage_times(stack: Stack, ids: set[str]) -> dict[str, dict[str, float]]:
    """When (event time, epoch s) each of our tasks passed each stage, read back from the topics."""
    serde = default_serde()
    out: dict[str, dict[str, float]] = {}
    for topic, stage in STAGES:
        c = Consumer({**stack.settings().consumer_config(f"bench-st-{uuid.uuid4().hex[:8]}"),
                      "enable.auto.commit": False})
        c.subscribe([topic])
        times: dict[str, float] = {}
        idle = time.time()
        while time.time() - idle < 2.0:
            for m in c.consume(2000, 0.2):
                if m.error():
                    continue
                idle = time.time()
                key = (m.key() or b"").decode()
                if key in ids and key not in times:
                    times[key] = serde.decode(m.value() or b"").occurred_at.timestamp()
        c.close()
        out[stage] = times
    return out


def stage_summary(submitted: dict[str, float], stages: dict[str, dict[str, float]],
                  t0: float) -> dict[str, dict[str, float]]:
    """Per stage: p50/p99 of time since the previous stage, and when the last task passed it."""
    summary: dict[str, dict[str, float]] = {}
    prev: dict[str, float] = submitted
    for _, stage in STAGES:
        cur = stages.get(stage, {})
        deltas = [(cur[t] - prev[t]) * 1000 for t in cur if t in prev]
        summary[stage] = {
            "p50_ms": round(percentile(deltas, 50), 1),
            "p99_ms": round(percentile(deltas, 99), 1),
            "last_at_s": round(max(cur.values()) - t0, 3) if cur else float("nan"),
        }
        prev = cur
    return summary


def manifest(i: int, run: str) -> dict[str, Any]:
    return {"apiVersion": "fleetplane/v1", "kind": "AgentTask",
            "metadata": {"name": f"bench-{i}", "team": TEAMS[i % 3]},
            "spec": {"taskType": TYPES[i % len(TYPES)], "prompt": f"[{run}:{i}] bench task"}}


def submit_http(stack: Stack, n: int, run: str, rate: float, workers: int
                ) -> dict[str, float]:
    submitted: dict[str, float] = {}
    lock = threading.Lock()
    start = time.time()
    local = threading.local()

    def one(i: int) -> None:
        if rate > 0:
            delay = start + i / rate - time.time()
            if delay > 0:
                time.sleep(delay)
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(timeout=60)
        t0 = time.time()
        resp = client.post(f"{stack.ingest_url}/v1/tasks", json=manifest(i, run),
                           headers={"Authorization": f"Bearer {stack.admin_token}"})
        resp.raise_for_status()
        with lock:
            submitted[resp.json()["task_id"]] = t0

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(n)))
    return submitted


def submit_kafka(stack: Stack, n: int, run: str) -> dict[str, float]:
    producer = EventProducer(stack.settings())
    submitted: dict[str, float] = {}
    batch: list[ev.Event] = []
    for i in range(n):
        task_id = uuid.uuid4().hex
        m = manifest(i, run)
        spec = ev.TaskSpec(name=m["metadata"]["name"], task_type=m["spec"]["taskType"],
                           prompt=m["spec"]["prompt"])
        batch.append(ev.TaskSubmitted(task_id=task_id, team=m["metadata"]["team"], spec=spec,
                                      source="kafka"))
        submitted[task_id] = time.time()
        if len(batch) == 500:
            producer.send(batch)
            batch = []
    producer.send(batch)
    producer.close()
    return submitted


def unlimited_teams_file(data_dir: Path) -> Path:
    """infra/teams.yaml with the intake rate limit lifted: the pipeline bench measures the
    pipeline, not the per-team token bucket (bench/intake.py measures intake)."""
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "infra" / "teams.yaml")
                         .read_text())
    raw.setdefault("defaults", {})["rate_limit"] = {"per_second": 1e6, "burst": 1_000_000}
    for team in (raw.get("teams") or {}).values():
        if isinstance(team, dict):
            team.pop("rate_limit", None)
    path = data_dir / "teams-bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_once(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix="fleetplane-bench-"))
    provider_args = ["--latency-ms", str(args.latency_ms)]
    stack = Stack(data_dir=data_dir, fake_provider_args=provider_args,
                  extra_env={"FLEETPLANE_LOG_LEVEL": "WARNING",
                             "FLEETPLANE_TEAMS_FILE": str(unlimited_teams_file(data_dir)),
                             **dict(args.env or [])})
    console.print(f"starting the stack in {data_dir} ...")
    stack.start(timeout_s=180)
    try:
        watcher = OutcomeWatcher(stack)
        watcher.start()
        run = uuid.uuid4().hex[:6]
        # warm-up: a few tasks so every service has connected and joined its group
        warm = submit_http(stack, 20, f"warm{run}", 0, 4)
        deadline = time.time() + 120
        while any(t not in watcher.seen for t in warm) and time.time() < deadline:
            time.sleep(0.2)
        cpu_before = {name: cpu_seconds(child.pid) for name, child in stack.children.items()}
        console.print(f"submitting {args.tasks} tasks over {args.submit} ...")
        t0 = time.time()
        if args.submit == "http":
            submitted = submit_http(stack, args.tasks, run, args.rate, args.workers)
        else:
            submitted = submit_kafka(stack, args.tasks, run)
        submit_done = time.time()
        deadline = time.time() + args.timeout
        while time.time() < deadline:
            if all(t in watcher.seen for t in submitted):
                break
            time.sleep(0.2)
        watcher.stop()
        done = {t: watcher.seen[t] for t in submitted if t in watcher.seen}
        ends = [v[0] for v in done.values()]
        latencies = [(watcher.seen[t][0] - s) * 1000 for t, s in submitted.items()
                     if t in watcher.seen]
        outcomes: dict[str, int] = {}
        for _, kind in done.values():
            outcomes[kind] = outcomes.get(kind, 0) + 1
        elapsed = (max(ends) - t0) if ends else float("nan")
        stages = stage_summary(submitted, stage_times(stack, set(submitted)), t0)
        memory = {name: peak_rss_mib(child.pid) for name, child in stack.children.items()}
        cpu = {name: round((cpu_seconds(child.pid) or 0) - (cpu_before.get(name) or 0), 2)
               for name, child in stack.children.items()}
        if stack.broker and stack.broker.proc:
            memory["broker"] = peak_rss_mib(stack.broker.proc.pid)
        return {
            "tasks": args.tasks,
            "submit": args.submit,
            "rate": args.rate,
            "provider_latency_ms": args.latency_ms,
            "finished": len(done),
            "outcomes": outcomes,
            "submit_s": round(submit_done - t0, 3),
            "elapsed_s": round(elapsed, 3),
            "tasks_per_s": round(len(done) / elapsed, 1) if ends else 0.0,
            "latency_ms": {"p50": round(percentile(latencies, 50), 1),
                           "p99": round(percentile(latencies, 99), 1),
                           "mean": round(statistics.fmean(latencies), 1) if latencies else None},
            "stages": stages,
            "peak_rss_mib": memory,
            "cpu_s_during_run": cpu,
        }
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--submit", choices=("http", "kafka"), default="http")
    parser.add_argument("--rate", type=float, default=0.0, help="tasks/s (0: as fast as possible)")
    parser.add_argument("--workers", type=int, default=16, help="concurrent HTTP clients")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="fake provider latency")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--env", action="append", type=lambda kv: tuple(kv.split("=", 1)),
                        help="FLEETPLANE_X=value for every service (repeatable)")
    args = parser.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    console = Console()
    result = {"machine": machine(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                time.gmtime()),
              "pipeline": run_once(args, console)}
    r = result["pipeline"]
    table = Table(title=f"fleetplane pipeline bench — {result['machine']['cores']} cores, "
                        f"{result['machine']['memory_gib']} GiB")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("tasks submitted / finished", f"{r['tasks']} / {r['finished']}")
    table.add_row("submit path", f"{r['submit']} (rate {r['rate'] or 'max'})")
    table.add_row("fake provider latency", f"{r['provider_latency_ms']} ms")
    table.add_row("outcomes", ", ".join(f"{k}={v}" for k, v in r["outcomes"].items()))
    table.add_row("throughput", f"{r['tasks_per_s']} tasks/s")
    table.add_row("submission took", f"{r['submit_s']} s")
    table.add_row("submit→completed p50", f"{r['latency_ms']['p50']} ms")
    table.add_row("submit→completed p99", f"{r['latency_ms']['p99']} ms")
    for stage, st in r["stages"].items():
        table.add_row(f"→ {stage}: since previous p50 / p99, last at",
                      f"{st['p50_ms']} / {st['p99_ms']} ms, {st['last_at_s']} s")
    for name, mib in r["peak_rss_mib"].items():
        cpu_s = r["cpu_s_during_run"].get(name)
        table.add_row(f"{name}: peak RSS, CPU during run",
                      f"{mib} MiB, {cpu_s if cpu_s is not None else '-'} s")
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    console.print(f"written to {out}")


if __name__ == "__main__":
    main()
