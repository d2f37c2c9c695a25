"""End-to-end pipeline runs: batches of tasks through all five services on an embedded stack.

    python -m bench.pipeline --tasks 2000 [--submit http|kafka] [--rate 0] [--latency-ms 0]

The building blocks of `make bench` (bench/suite.py), and one run on its own here: starts an
embedded stack (broker, topics, fake provider, five services) in a temporary directory, submits
the tasks, records when each passed each stage (bench/recorder.py), prints one table and writes
bench/results/pipeline-<time>.json. Figures, not assertions: nothing here passes or fails.

Submission is open-loop when a rate is given: task i is due at start + i/rate, and its latency
counts from when it was due, so a submitter that falls behind shows up in the figures instead of
hiding it (no coordinated omission). At rate 0 the tasks go as fast as `workers` concurrent
clients (HTTP) or batches of 500 (Kafka) allow, timed from when each was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from confluent_kafka import Consumer, TopicPartition
from rich.console import Console
from rich.table import Table

from bench.measure import (
    RESULTS,
    bench_dir,
    busy_share,
    cpu_seconds,
    group_cpu_seconds,
    group_peak_rss_mib,
    machine,
    machine_jiffies,
    percentile,
    py_spy,
    self_cpu_seconds,
)
from bench.recorder import STAGES, StageRecorder, ratios
from fleetplane.cli.stack import BACKGROUND_SERVICES, Stack
from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.topics import SUBMITTED

__all__ = ["RESULTS", "cpu_seconds", "machine", "percentile"]  # used by the per-service benches

TEAMS = ("payments", "search", "platform")
TYPES = ("summarize", "codegen", "architecture", "classify")
REPO_ROOT = Path(__file__).resolve().parents[1]


# -- the stack --------------------------------------------------------------------------------
BENCH_LIFTED = {
    "rate_limit": "intake token bucket per team: 50/s (burst 200) -> 1e6/s (bench/intake.py "
                  "measures intake with it on)",
    "budget_usd": "team budgets: 50-200 USD/day -> 1e9 (20,000 tasks must not be held for "
                  "budget)",
}
"""What the bench's teams file changes from infra/teams.yaml (printed and stored with figures).
Per-team concurrency quotas (max_running 20/20/40), the fleet cap (coordinator_max_running 64)
and the executor's slots (32) are left as shipped."""


def bench_teams_file(data_dir: Path, *, lift_budgets: bool = True,
                     name: str = "teams-bench.yaml", max_running: int | None = None) -> Path:
    """infra/teams.yaml with the intake rate limit and (unless lift_budgets is False) the
    budgets lifted (BENCH_LIFTED), and every team's concurrency quota set to `max_running` when
    given (`lift_concurrency`), written to data_dir / name."""
    raw = yaml.safe_load((REPO_ROOT / "infra" / "teams.yaml").read_text())
    defaults = raw.setdefault("defaults", {})
    defaults["rate_limit"] = {"per_second": 1e6, "burst": 1_000_000}
    if lift_budgets:
        defaults["budget_usd"] = 1e9
    if max_running is not None:
        defaults["max_running"] = max_running
    for team in (raw.get("teams") or {}).values():
        if isinstance(team, dict):
            team.pop("rate_limit", None)
            if lift_budgets:
                team.pop("budget_usd", None)
            if max_running is not None:
                team.pop("max_running", None)
    path = data_dir / name
    path.write_text(yaml.safe_dump(raw))
    return path


def lift_concurrency(n: int) -> dict[str, str]:
    """The settings that, with `bench_teams_file(max_running=n)`, let n tasks run at once: the
    fleet cap and the executor's slots (the CPU-bound ceiling, not the shipped configuration)."""
    return {"FLEETPLANE_COORDINATOR_MAX_RUNNING": str(n), "FLEETPLANE_EXECUTOR_SLOTS": str(n)}


def start_stack(console: Console, latency_ms: float = 0.0,
                env: dict[str, str] | None = None, max_running: int | None = None) -> Stack:
    """`max_running`: lift the team quotas, the fleet cap and the slots to it."""
    data_dir = bench_dir("fleetplane-bench-")
    teams = bench_teams_file(data_dir, max_running=max_running)
    lifted = lift_concurrency(max_running) if max_running is not None else {}
    stack = Stack(data_dir=data_dir, fake_provider_args=["--latency-ms", str(latency_ms)],
                  extra_env={"FLEETPLANE_LOG_LEVEL": "WARNING",
                             "FLEETPLANE_TEAMS_FILE": str(teams), **lifted,
                             **(env or {})})
    console.print(f"starting the stack in {data_dir} ...")
    stack.start(timeout_s=180)
    return stack


def set_provider(stack: Stack, **knobs: Any) -> None:
    """Change the running fake provider's script (POST /_fake/script), e.g. latency_ms=200."""
    httpx.post(f"{stack.provider_url}/_fake/script", json=knobs, timeout=10).raise_for_status()


def processes(stack: Stack) -> dict[str, int]:
    """Process-group leader per service, the fake provider and the broker."""
    pids = {name: child.pid for name, child in stack.children.items() if child.pid}
    if stack.broker and stack.broker.proc:
        pids["broker"] = stack.broker.proc.pid
    return pids


def peak_memory(stack: Stack) -> dict[str, float | None]:
    return {name: group_peak_rss_mib(pid) for name, pid in processes(stack).items()}


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of one process by kind of thread: librdkafka's own threads (named rdk:*:
    fetching, producing, the broker connections) and the Python threads (everything else)."""
    out = {"librdkafka": 0.0, "python": 0.0}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        secs = (int(fields[11]) + int(fields[12])) / tick
        out["librdkafka" if comm.startswith("rdk:") else "python"] += secs
    return out


def threads_now(stack: Stack) -> dict[str, dict[str, float]]:
    return {name: thread_cpu(pid) for name, pid in processes(stack).items()
            if name not in ("broker", "fake-provider")}


def cpu_now(stack: Stack) -> dict[str, float | None]:
    return {name: group_cpu_seconds(pid) for name, pid in processes(stack).items()}


# -- what the run cost the broker: records per topic ------------------------------------------
def topic_counts(stack: Stack) -> dict[str, dict[str, int]]:
    """Per topic: `offsets` (end - start over its partitions: records plus the transaction
    markers, one per partition a transaction wrote) and `records` (what a read_committed reader
    gets). The difference is the markers (and aborted records): every one costs the broker.
    `bytes`: keys and values of those records."""
    settings = stack.settings()
    c = Consumer({**settings.consumer_config(f"bench-count-{uuid.uuid4().hex[:8]}"),
                  "enable.auto.commit": False, "enable.partition.eof": True})
    out: dict[str, dict[str, int]] = {}
    try:
        meta = c.list_topics(timeout=30)
        for topic, tmeta in sorted(meta.topics.items()):
            if topic.startswith("__"):
                continue
            parts, offsets = [], 0
            for p in tmeta.partitions:
                low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=30)
                offsets += max(0, high - low)
                if high > low:
                    parts.append(TopicPartition(topic, p, low))
            seen: set[tuple[int, int]] = set()
            size = 0
            if parts:
                c.assign(parts)
                left = {tp.partition for tp in parts}
                deadline = time.monotonic() + 120
                while left and time.monotonic() < deadline:
                    for m in c.consume(10_000, 1.0):
                        if m.topic() != topic:
                            continue
                        if m.error():
                            left.discard(m.partition() or 0)  # enable.partition.eof
                        elif (m.partition() or 0, m.offset() or 0) not in seen:
                            seen.add((m.partition() or 0, m.offset() or 0))
                            size += len(m.key() or b"") + len(m.value() or b"")
                c.unassign()
            out[topic] = {"offsets": offsets, "records": len(seen), "bytes": size}
    finally:
        c.close()
    return out


class Profiler:
    """py-spy record on every service process while a batch runs (raw collapsed stacks, one
    file per service in `directory`; the top functions per service in `summary()`)."""

    def __init__(self, stack: Stack, directory: Path, rate: int = 50) -> None:
        spy = py_spy()
        if spy is None:
            raise SystemExit("--profile needs py-spy (beside the interpreter or on PATH)")
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        for name, pid in processes(stack).items():
            if name in ("broker", "fake-provider"):
                continue
            self.procs[name] = subprocess.Popen(
                [str(spy), "record", "-p", str(pid),
                 "-r", str(rate), "--gil", "--nonblocking", "-f", "raw",
                 "-o", str(directory / f"{name}.txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGINT)
        for proc in self.procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()

    def summary(self, top: int = 12) -> dict[str, list[tuple[str, float]]]:
        """Per service: the functions with the largest inclusive share of busy samples (idle
        waits in poll/consume/select left out of the total)."""
        idle = ("poll", "consume", "select", "wait", "sleep", "_wait_for_tstate_lock", "accept")
        result: dict[str, list[tuple[str, float]]] = {}
        for name in self.procs:
            path = self.directory / f"{name}.txt"
            if not path.exists():
                continue
            incl: dict[str, int] = {}
            own: dict[str, int] = {}
            busy = 0
            for line in path.read_text().splitlines():
                stack_s, _, n_s = line.rpartition(" ")
                if not n_s.isdigit():
                    continue
                frames = stack_s.split(";")
                leaf = frames[-1].split(" (")[0] if frames else ""
                if leaf in idle:
                    continue
                n = int(n_s)
                busy += n
                own[frames[-1]] = own.get(frames[-1], 0) + n
                for f in set(frames):
                    if "fleetplane/" in f and "main.py" not in f and "_run" not in f:
                        incl[f] = incl.get(f, 0) + n
            ranked = sorted(incl.items(), key=lambda kv: -kv[1])
            leaves = sorted(own.items(), key=lambda kv: -kv[1])
            result[name] = ([(f"incl {f}", round(100 * v / busy, 1)) for f, v in ranked[:top]]
                            + [(f"self {f}", round(100 * v / busy, 1))
                               for f, v in leaves[:top]]) if busy else []
        return result


# -- submission -------------------------------------------------------------------------------
def manifest(i: int, run: str) -> dict[str, Any]:
    return {"apiVersion": "fleetplane/v1", "kind": "AgentTask",
            "metadata": {"name": f"bench-{i}", "team": TEAMS[i % 3]},
            "spec": {"taskType": TYPES[i % len(TYPES)], "prompt": f"[{run}:{i}] bench task"}}


@dataclass
class Submission:
    submitted: dict[str, float] = field(default_factory=dict)
    """task id -> submit time (when due, open loop; when sent, closed loop)."""
    answered_at: list[float] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    late_s: list[float] = field(default_factory=list)
    """How late each request was sent against its due time (open loop)."""


async def _submit_http(url: str, token: str, n: int, run: str, rate: float,
                       concurrency: int) -> Submission:
    out = Submission()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {token}"}
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120,
                                 headers=headers) as client:
        start = time.time()

        async def one(i: int) -> None:
            due = start + i / rate if rate > 0 else 0.0
            if rate > 0:
                delay = due - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            async with sem:
                sent = time.time()
                if rate > 0:
                    out.late_s.append(sent - due)
                try:
                    resp = await client.post("/v1/tasks", json=manifest(i, run))
                except httpx.HTTPError as exc:
                    out.rejected[type(exc).__name__] = out.rejected.get(type(exc).__name__, 0) + 1
                    return
            if resp.status_code in (200, 202):
                out.submitted[resp.json()["task_id"]] = due if rate > 0 else sent
                out.answered_at.append(time.time())
            else:
                key = str(resp.status_code)
                out.rejected[key] = out.rejected.get(key, 0) + 1

        if rate > 0:
            await asyncio.gather(*(one(i) for i in range(n)))
        else:
            queue = iter(range(n))

            async def worker() -> None:
                for i in queue:
                    await one(i)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def submit_http(stack: Stack, n: int, run: str, rate: float = 0.0,
                concurrency: int = 16) -> Submission:
    """POST /v1/tasks with the admin token: open loop at `rate`, else `concurrency` clients."""
    return asyncio.run(_submit_http(stack.ingest_url, stack.admin_token, n, run, rate,
                                    max(concurrency, 256) if rate > 0 else concurrency))


def submit_kafka(stack: Stack, n: int, run: str, rate: float = 0.0) -> Submission:
    """TaskSubmitted records straight onto tasks.submitted (ingest still validates them)."""
    producer = EventProducer(stack.settings())
    producer.connect([SUBMITTED])  # else the first second's submissions wait for it
    out = Submission()
    start = time.time()
    batch: list[ev.Event] = []
    try:
        for i in range(n):
            if rate > 0:
                due = start + i / rate
                delay = due - time.time()
                if delay > 0:
                    time.sleep(delay)
                out.late_s.append(max(0.0, time.time() - due))
            task_id = uuid.uuid4().hex
            m = manifest(i, run)
            spec = ev.TaskSpec(name=m["metadata"]["name"], task_type=m["spec"]["taskType"],
                               prompt=m["spec"]["prompt"])
            event = ev.TaskSubmitted(task_id=task_id, team=m["metadata"]["team"], spec=spec,
                                     source="kafka")
            if rate > 0:
                producer.produce(event)
                out.submitted[task_id] = due
                continue
            batch.append(event)
            out.submitted[task_id] = time.time()
            if len(batch) == 500:
                producer.send(batch)
                batch = []
        producer.send(batch)
        out.answered_at.append(time.time())
    finally:
        producer.close()
    return out


# -- one batch ----------------------------------------------------------------------------------
def _dist(values: list[float]) -> dict[str, float | None]:
    return {"p50": round(percentile(values, 50), 1), "p99": round(percentile(values, 99), 1),
            "max": round(max(values), 1) if values else None,
            "mean": round(statistics.fmean(values), 1) if values else None}


def stage_summary(submitted: dict[str, float], stages: dict[str, dict[str, float]],
                  t0: float) -> dict[str, dict[str, float]]:
    """Per stage: p50/p99 of time since the previous stage, and when the last task passed it."""
    summary: dict[str, dict[str, float]] = {}
    prev: dict[str, float] = submitted
    for stage, _ in STAGES:
        cur = stages.get(stage, {})
        deltas = [(cur[t] - prev[t]) * 1000 for t in cur if t in prev]
        summary[stage] = {
            "p50_ms": round(percentile(deltas, 50), 1),
            "p99_ms": round(percentile(deltas, 99), 1),
            "last_at_s": round(max(cur.values()) - t0, 3) if cur else float("nan"),
        }
        prev = cur
    return summary


WARM_UP_TASKS = 20


def warm_up(stack: Stack, recorder: StageRecorder, n: int = WARM_UP_TASKS) -> None:
    """A few tasks so every service has connected, joined its group and loaded its code."""
    sub = submit_http(stack, n, f"warm{uuid.uuid4().hex[:6]}", 0, 4)
    recorder.wait_done(set(sub.submitted), 120)


def background_settled(stack: Stack, window_s: float = 1.0, busy_s: float = 0.05,
                       timeout_s: float = 120.0) -> float | None:
    """Wait until the background services (accounting, reconciler: they run nicer than the
    dispatch path and may trail the tasks) use less than `busy_s` of CPU in a `window_s`: what
    they spend catching up on a batch is that batch's cost. Seconds waited; None on timeout."""
    pids = {name: pid for name, pid in processes(stack).items() if name in BACKGROUND_SERVICES}
    t0 = time.monotonic()
    last = {name: group_cpu_seconds(pid) or 0.0 for name, pid in pids.items()}
    while time.monotonic() - t0 < timeout_s:
        time.sleep(window_s)
        now = {name: group_cpu_seconds(pid) or 0.0 for name, pid in pids.items()}
        if all(now[name] - last[name] < busy_s for name in pids):
            return round(time.monotonic() - t0, 1)
        last = now
    return None


def run_batch(stack: Stack, recorder: StageRecorder, n: int, submit: str = "kafka",
              rate: float = 0.0, concurrency: int = 16, timeout_s: float = 0.0,
              label: str = "") -> dict[str, Any]:
    """Submit n tasks, wait for their terminal states, and measure. Figures in the result:
    throughput (finished / (last terminal - first submit)), latency submit->dispatched and
    submit->completed, per-stage time, CPU per process during the batch."""
    run = f"{label or 'b'}{uuid.uuid4().hex[:6]}"
    pending_before = recorder.pending()
    background_settled(stack)
    cpu_before = cpu_now(stack)
    threads_before = threads_now(stack)
    client_cpu_before = self_cpu_seconds()
    jiffies_before = machine_jiffies()
    t0 = time.time()
    sub = (submit_http(stack, n, run, rate, concurrency) if submit == "http"
           else submit_kafka(stack, n, run, rate))
    submit_done = time.time()
    ids = set(sub.submitted)
    recorder.tracked |= ids
    all_done = recorder.wait_done(ids, timeout_s or max(300.0, n / 10))
    t_end = time.time()
    stages = recorder.snapshot(ids)
    done = stages["completed"]
    elapsed = (max(done.values()) - t0) if done else float("nan")
    # the dispatch path's processes and the broker as the last task finished; accounting and
    # the reconciler once they caught up (they run nicer and may trail the tasks)
    cpu_after = cpu_now(stack)
    threads_after = threads_now(stack)
    settled = background_settled(stack)
    cpu_after.update({name: v for name, v in cpu_now(stack).items()
                      if name in BACKGROUND_SERVICES})
    threads_after.update({name: v for name, v in threads_now(stack).items()
                          if name in BACKGROUND_SERVICES})
    machine_busy = busy_share(jiffies_before, machine_jiffies())
    wall = t_end - t0
    cpu = {name: round((cpu_after.get(name) or 0) - (cpu_before.get(name) or 0), 2)
           for name in cpu_after}
    span = (max(sub.answered_at) - t0) if sub.answered_at else float("nan")
    dispatch = [(stages["dispatched"][t] - s) * 1000 for t, s in sub.submitted.items()
                if t in stages["dispatched"]]
    completed = [(done[t] - s) * 1000 for t, s in sub.submitted.items() if t in done]
    return {
        "tasks": n,
        "submit": submit,
        "rate_target": rate,
        "accepted": len(ids),
        "rejected": sub.rejected,
        "submit_s": round(submit_done - t0, 3),
        "achieved_rate": round(len(ids) / span, 1) if sub.answered_at and span > 0 else None,
        "submit_late_ms": _dist([x * 1000 for x in sub.late_s]) if sub.late_s else None,
        "finished": len(done),
        "unfinished": len(ids) - len(done),
        "all_finished": all_done,
        "pending_before": pending_before,  # earlier batches' tasks still running at the start
        "outcomes": recorder.outcome_kinds(ids),
        "elapsed_s": round(elapsed, 3),
        "tasks_per_s": round(len(done) / elapsed, 1) if done else 0.0,
        "latency_ms": {"submit_to_dispatched": _dist(dispatch),
                       "submit_to_completed": _dist(completed)},
        "stages": stage_summary(sub.submitted, stages, t0),
        "cpu_s": cpu,
        "cpu_share": {name: round(v / wall, 2) for name, v in cpu.items()},
        # per service, CPU-s in librdkafka's threads vs the Python threads
        "cpu_threads_s": {name: {k: round(v - threads_before.get(name, {}).get(k, 0.0), 2)
                                 for k, v in kinds.items()}
                          for name, kinds in threads_after.items()},
        # after the last task: until accounting and the reconciler were idle (CPU counted)
        "background_settled_s": settled,
        "client_cpu_s": round(self_cpu_seconds() - client_cpu_before, 2),
        "machine_busy": machine_busy,  # share of all cores busy (ours and anyone else's)
        "wall_s": round(wall, 3),
        "task_ids": ids,          # private: not written to JSON (see strip_private)
        "_submitted": sub.submitted,
    }


def strip_private(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch result without the per-task data kept for later figures."""
    return {k: v for k, v in batch.items() if k != "task_ids" and not k.startswith("_")}


# -- one run on its own (python -m bench.pipeline) ---------------------------------------------
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
    parser.add_argument("--profile", type=Path, default=None,
                        help="py-spy every service during the batch (only the thread holding "
                        "the GIL: where the Python CPU goes), raw stacks to this folder")
    parser.add_argument("--lift-concurrency", type=int, default=None, metavar="N",
                        help="team quotas, fleet cap and executor slots all set to N (the "
                        "CPU-bound ceiling instead of the shipped quotas)")
    parser.add_argument("--profile-rate", type=int, default=50, help="py-spy samples per second")
    args = parser.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    console = Console()
    stack = start_stack(console, args.latency_ms, dict(args.env or []), args.lift_concurrency)
    try:
        recorder = StageRecorder(stack)
        recorder.start()
        warm_up(stack, recorder)
        console.print(f"submitting {args.tasks} tasks over {args.submit} ...")
        profiler = (Profiler(stack, args.profile, args.profile_rate) if args.profile
                    else None)
        try:
            r = run_batch(stack, recorder, args.tasks, args.submit, args.rate, args.workers,
                          args.timeout)
        finally:
            if profiler is not None:
                profiler.stop()
        recorder.stop()
        if args.latency_ms > 0:  # per task: submit->completed over the task's model time
            r["over_model"] = ratios(recorder, r)
        memory = peak_memory(stack)
        counts = topic_counts(stack)
    finally:
        stack.stop()
    r = strip_private(r)
    result = {"machine": machine(), "lifted": BENCH_LIFTED,
              "concurrency_lifted_to": args.lift_concurrency,
              "provider_latency_ms": args.latency_ms,
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "pipeline": r, "peak_rss_mib": memory, "topics": counts,
              "profile": profiler.summary() if profiler is not None else None}
    m = result["machine"]
    table = Table(title=f"fleetplane pipeline bench — {m['cores']} cores, {m['memory_gib']} GiB")
    table.add_column("figure")
    table.add_column("value", justify="right")
    lat = r["latency_ms"]
    table.add_row("tasks accepted / finished", f"{r['accepted']} / {r['finished']}")
    table.add_row("submit path", f"{r['submit']} (rate {r['rate_target'] or 'max'}, achieved "
                                 f"{r['achieved_rate']}/s)")
    table.add_row("fake provider latency", f"{args.latency_ms} ms")
    table.add_row("outcomes", ", ".join(f"{k}={v}" for k, v in r["outcomes"].items()))
    table.add_row("throughput", f"{r['tasks_per_s']} tasks/s")
    for name, d in lat.items():
        table.add_row(f"{name.replace('_', ' ')} p50 / p99", f"{d['p50']} / {d['p99']} ms")
    if "over_model" in r:
        om = r["over_model"]
        table.add_row("model time per task p50 / p99",
                      f"{om['model_ms_per_task']['p50']} / {om['model_ms_per_task']['p99']} ms")
        table.add_row("submit→completed / model time p50 / p99",
                      f"{om['e2e_over_model']['p50']} / {om['e2e_over_model']['p99']}")
    for stage, st in r["stages"].items():
        table.add_row(f"→ {stage}: since previous p50 / p99, last at",
                      f"{st['p50_ms']} / {st['p99_ms']} ms, {st['last_at_s']} s")
    for name, mib in memory.items():
        kinds = r["cpu_threads_s"].get(name)
        split = (f" (librdkafka {kinds['librdkafka']}, python {kinds['python']})"
                 if kinds else "")
        table.add_row(f"{name}: peak RSS, CPU during run",
                      f"{mib} MiB, {r['cpu_s'].get(name, '-')} s{split}")
    total_cpu = sum(v for k, v in r["cpu_s"].items() if k != "broker")
    table.add_row("CPU per task, services (broker)",
                  f"{1000 * total_cpu / max(1, r['finished']):.1f} ms "
                  f"({1000 * r['cpu_s'].get('broker', 0) / max(1, r['finished']):.1f} ms)")
    busy = r.get("machine_busy")
    table.add_row("bench process (submitter, recorder): CPU; machine busy",
                  f"{r['client_cpu_s']} s; " + (f"{100 * busy:.0f}% of all cores"
                                                if busy is not None and busy == busy else "-"))
    table.add_row("background services idle after the last task",
                  f"{r['background_settled_s']} s (their CPU until then is counted)")
    n_tasks = args.tasks + WARM_UP_TASKS
    for topic, c in counts.items():
        if c["offsets"]:
            table.add_row(f"{topic}: records (offsets), bytes per task",
                          f"{c['records'] / n_tasks:.2f} ({c['offsets'] / n_tasks:.2f}), "
                          f"{c.get('bytes', 0) / n_tasks:,.0f} B")
    console.print(table)
    if profiler is not None:
        for name, rows in result["profile"].items():
            console.print(f"[bold]{name}[/bold] (share of busy samples: fleetplane functions "
                          "inclusive, then leaf functions)")
            for frame, share in rows:
                console.print(f"  {share:5.1f}%  {frame}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    console.print(f"written to {out}")


if __name__ == "__main__":
    main()
