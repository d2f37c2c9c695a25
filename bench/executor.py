"""Executor benchmark: overhead of the agent runtime per step, how many agents one process runs
before that overhead doubles, and slot utilization on the demo workload.

    python -m bench.executor [--steps 20] [--latency-ms 100] [--max-agents 64]
    python -m bench.executor --scenario concurrency [--tasks 500 --slots 200 --durations 1,2,5]

In-process (the executor's `execute` with its Runtime, real git worktrees, the real sandbox, the
fake provider over HTTP through the anthropic SDK). A step is one model turn plus the tool call
it asks for; "overhead" is the executor's own time between the end of one model call and the
start of the next (tool execution, audit chain, journal, preflight estimates, context fitting),
i.e. everything but model time. Figures, not assertions; JSON under bench/results/.

The `concurrency` scenario is the executor's loop itself (core.parallel's ParallelProcessor, on
the embedded broker, with `execute` and its Runtime): a burst of `--tasks` dispatches whose model
calls take mixed scripted durations, through `--slots` slots; then a trickle of short tasks
while slots are free. Reported: peak running attempts, slot utilization while work is queued,
free slot -> refilled (while queued) and dispatched -> started (while a slot is free) p50/p99.
`--loop batch` runs the same workload through core.loop's Processor (the former executor loop)
for comparison.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.measure import handoff
from bench.pipeline import machine
from bench.report import write_result
from fleetplane.cli.demo import SAMPLES
from fleetplane.core import events as ev
from fleetplane.core.catalog import catalog_for
from fleetplane.core.logging import configure_logging
from fleetplane.core.loop import Processor, Record
from fleetplane.core.parallel import ParallelProcessor
from fleetplane.core.serde import default_serde
from fleetplane.core.service import freeze_startup_heap
from fleetplane.core.settings import Settings
from fleetplane.core.topics import DISPATCH, ensure_topics, load_topics
from fleetplane.executor.handlers import SeenDispatches, Starter, execute
from fleetplane.executor.models import ModelClients, ModelTurn
from fleetplane.executor.runtime import Runtime
from fleetplane.executor.sandbox import Sandbox
from fleetplane.fakeprovider import FakeProvider
from fleetplane.infra.broker import EmbeddedBroker

CATALOG = catalog_for(Settings().catalog_file)


class TimedClients(ModelClients):
    """Records when each model call of an attempt started and ended (keyed by the attempt's
    first message: the bench gives every attempt its own prompt)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.calls: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self._lock = threading.Lock()

    async def achat(self, *args: Any, **kwargs: Any) -> ModelTurn:
        start = time.perf_counter()
        try:
            return await super().achat(*args, **kwargs)
        finally:
            end = time.perf_counter()
            with self._lock:
                self.calls[str(args[2][0]["content"])].append((start, end))


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def sample_repo(root: Path) -> Path:
    repo = root / "sample"
    repo.mkdir(parents=True)
    run = ["git", "-c", "user.name=b", "-c", "user.email=b@b"]
    subprocess.run([*run, "init", "-q", "-b", "main"], cwd=repo, check=True)
    (repo / "calc.py").write_text("def add(a, b):\n    return a + b\n" * 50)
    (repo / "README.md").write_text("# sample\n")
    subprocess.run([*run, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*run, "commit", "-q", "-m", "init"], cwd=repo, check=True)
    return repo


def make_runtime(tmp: Path, repo: Path, slots: int) -> Runtime:
    s = Settings(executor_repositories={"sample": str(repo)},
                 executor_workspaces_dir=tmp / f"wt-{slots}-{time.monotonic_ns()}",
                 executor_slots=slots)
    return Runtime(s, "bench", sandbox=Sandbox())


def dispatch(task_id: str, prompt: str, repository: str | None, turns: int) -> ev.TaskDispatched:
    spec = ev.TaskSpec(name=task_id, task_type="codegen", prompt=prompt, repository=repository,
                       max_turns=turns)
    return ev.TaskDispatched(task_id=task_id, team="platform", spec=spec, attempt=1,
                             model="claude-haiku-4-5", provider="anthropic", tier="small")


def agents(fake: FakeProvider, rt: Runtime, n: int, steps: int, tool: dict[str, Any],
           latency_ms: float) -> dict[str, Any]:
    """n agents at once, each `steps` turns of (model call -> tool call)."""
    fake.set_script({"latency_ms": latency_ms,
                     "default": {"tool_uses": [tool]}})
    clients = TimedClients(Settings(anthropic_base_url=fake.base_url, model_max_retries=0))
    seen = SeenDispatches()
    runs: dict[str, tuple[float, float]] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        task_id = f"b{n}-{i}-{time.monotonic_ns()}"
        start = time.perf_counter()
        list(execute(CATALOG, clients, "bench", seen,
                     dispatch(task_id, f"work {task_id}", "sample", steps), runtime=rt))
        with lock:
            runs[f"work {task_id}"] = (start, time.perf_counter())

    wall = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, range(n)))
    wall = time.perf_counter() - wall
    gaps: list[float] = []
    for calls in clients.calls.values():
        calls.sort()
        gaps += [(b[0] - a[1]) * 1000 for a, b in itertools.pairwise(calls)]
    setup = [(calls[0][0] - runs[key][0]) * 1000 + (runs[key][1] - calls[-1][1]) * 1000
             for key, calls in clients.calls.items() if key in runs and calls]
    model_ms = [e - s for c in clients.calls.values() for s, e in c]
    return {"agents": n, "steps": len(gaps), "overhead_p50_ms": pct(gaps, 50),
            "overhead_p99_ms": pct(gaps, 99), "attempt_setup_teardown_p50_ms": pct(setup, 50),
            "model_call_p50_ms": pct([m * 1000 for m in model_ms], 50), "wall_s": wall}


def demo_utilization(fake: FakeProvider, tmp: Path, repo: Path, latency_ms: float,
                     per_team: int, slots: int) -> dict[str, Any]:
    """The demo's tasks (plain model calls, no repository) through `slots` slots at once, as
    the Processor's thread pool runs a batch; utilization from the runtime's slot meters."""
    fake.set_script({"latency_ms": latency_ms})
    rt = make_runtime(tmp, repo, slots)
    rt.utilization_events()  # open a fresh window
    clients = ModelClients(Settings(anthropic_base_url=fake.base_url,
                                    openai_base_url=fake.openai_base_url, model_max_retries=0))
    seen = SeenDispatches()
    tasks = [(team, prompt) for team, samples in SAMPLES.items()
             for i in range(per_team) for _, prompt, _ in [samples[i % len(samples)]]]
    with ThreadPoolExecutor(slots) as pool:
        list(pool.map(lambda tp: list(execute(
            CATALOG, clients, "bench", seen,
            dispatch(f"demo-{time.monotonic_ns()}", tp[1], None, 5), runtime=rt)), tasks))
    util = rt.utilization_events()
    rt.close()
    window = sum(u.window_s for u in util)
    used = [u for u in util if u.attempts]
    return {"tasks": len(tasks), "slots": slots, "slots_used": len(used),
            "model_share": sum(u.model_s for u in util) / window,
            "tool_share": sum(u.tool_s for u in util) / window,
            "busy_share": sum(u.busy_s for u in util) / window,
            "idle_share": sum(u.idle_s for u in util) / window,
            "busy_share_of_used_slots": (sum(u.busy_s for u in used)
                                         / max(1e-9, sum(u.window_s for u in used))),
            "model_share_of_busy": (sum(u.model_s for u in util)
                                    / max(1e-9, sum(u.busy_s for u in util)))}


def cancel_latency(fake: FakeProvider, tmp: Path, repo: Path, n: int = 5) -> dict[str, float]:
    """In-process: time from Runtime.cancel (what the cancellation watcher calls) to the
    attempt's outcome, with a model call in flight and with a command running."""
    rt = make_runtime(tmp, repo, 2)
    clients = ModelClients(Settings(anthropic_base_url=fake.base_url, model_max_retries=0))
    results: dict[str, list[float]] = {"model": [], "command": []}
    for kind in results:
        for i in range(n):
            if kind == "model":
                fake.set_script({"default": {"text": "late", "latency_ms": 20_000}})
            else:
                fake.set_script({"default": {"tool_uses": [{"name": "run_command", "input": {
                    "command": ["python3", "-c", "import time; time.sleep(30)"]}}]}})
            task = f"cancel-{kind}-{i}-{time.monotonic_ns()}"
            done: list[float] = []

            def go(task_id: str = task, done: list[float] = done) -> None:
                list(execute(CATALOG, clients, "bench", SeenDispatches(),
                             dispatch(task_id, "wait", "sample", 5), runtime=rt))
                done.append(time.perf_counter())

            th = threading.Thread(target=go)
            th.start()
            time.sleep(1.5)
            at = time.perf_counter()
            rt.cancel(task)
            th.join(60)
            results[kind].append((done[0] - at) * 1000)
    rt.close()
    return {f"cancel_{k}_p50_ms": pct(v, 50) for k, v in results.items()} | {
        f"cancel_{k}_max_ms": max(v) for k, v in results.items()}


def sandbox_cost(n: int = 30) -> dict[str, float]:
    box = Sandbox()
    with tempfile.TemporaryDirectory() as d:
        times = [box.run(["true"], Path(d)).duration_ms for _ in range(n)]
    return {"run_command_true_p50_ms": pct(times, 50), "run_command_true_p99_ms": pct(times, 99)}


def concurrency(fake: FakeProvider, tmp: Path, tasks: int, slots: int,
                durations_s: list[float], trickle: int, loop: str,
                rate: float = 0.0, begin: bool = True,
                at_burst: Callable[[], Callable[[], None]] | None = None) -> dict[str, Any]:
    """The executor loop under a burst of mixed-duration attempts, then a trickle.
    `at_burst` is called when the burst begins; what it returns when every slot has been
    filled once (bench.concurrency: py-spy over the first fill)."""
    from confluent_kafka import Producer

    from fleetplane.core.kafka import event_headers

    broker = EmbeddedBroker(tmp / "broker")
    broker.start()
    try:
        settings = Settings(kafka_bootstrap=broker.bootstrap, executor_slots=slots,
                            anthropic_base_url=fake.base_url, model_max_retries=0,
                            model_timeout_s=max(60.0, 2 * max(durations_s)),
                            executor_workspaces_dir=tmp / "wt-concurrency")
        ensure_topics(settings.client_config(), load_topics(settings.topics_file))
        fake.set_script({"replies": [
            {"match": f"dur={d:g}s", "text": "ok", "latency_ms": d * 1000, "times": None}
            for d in durations_s]})
        rt = Runtime(settings, "bench", sandbox=Sandbox())
        clients = ModelClients(settings)
        seen = SeenDispatches()
        lock = threading.Lock()
        starts: list[float] = []
        ends: list[float] = []
        produced_at: dict[str, float] = {}
        produced = [0]
        started_at: dict[str, float] = {}

        starter = Starter(CATALOG, clients, "bench", seen, rt) if begin else None

        def mark_started(task_id: str) -> None:
            t = time.monotonic()
            with lock:
                if task_id not in started_at:
                    starts.append(t)
                    started_at[task_id] = t

        def begin_hook(rec: Record) -> None:
            # started = claimed: a slot reserved, the journal entry, TaskStarted emitted
            assert starter is not None
            starter.begin(rec)
            if rec.key is not None:
                mark_started(rec.key.decode())

        def handler(event: ev.Event, rec: Record) -> list[ev.Event]:
            mark_started(event.task_id)
            try:
                return list(execute(CATALOG, clients, "bench", seen, event, rec, runtime=rt))
            finally:
                with lock:
                    ends.append(time.monotonic())

        group = f"bench-exec-{time.monotonic_ns()}"
        proc: Processor
        if loop == "batch":
            proc = Processor("executor", [DISPATCH], handler, settings, group_id=group,
                             concurrency=slots)
        else:
            proc = ParallelProcessor("executor", [DISPATCH], handler, settings, group_id=group,
                                     slots=slots, begin=begin_hook if begin else None)
        freeze_startup_heap()  # as the executor's main does before its loop runs
        runner = threading.Thread(target=proc.run, daemon=True)
        runner.start()
        serde = default_serde()
        producer = Producer(settings.producer_config())

        def encode(task_id: str, prompt: str) -> tuple[bytes, bytes, Any]:
            e = dispatch(task_id, prompt, None, 2)
            return task_id.encode(), serde.encode(e), event_headers(e)

        def send(task_id: str, prompt: str,
                 encoded: tuple[bytes, bytes, Any] | None = None) -> None:
            key, value, headers = encoded or encode(task_id, prompt)
            producer.produce(DISPATCH, key=key, value=value, headers=headers)
            produced_at[task_id] = time.monotonic()
            produced[0] += 1

        # warm-up: one attempt through the loop (group join, first fetch, SDK client)
        send("warm", f"dur={min(durations_s):g}s warm")
        produced[0] = 0
        producer.flush(30)
        deadline = time.monotonic() + 120
        while len(ends) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        with lock:
            starts.clear()
            ends.clear()
        samples: list[tuple[float, int, int]] = []  # (t, running, queued)
        stop_sampling = threading.Event()

        def sample() -> None:
            while not stop_sampling.wait(0.02):
                with lock:
                    running, began = len(starts) - len(ends), len(starts)
                samples.append((time.monotonic(), running, produced[0] - began))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # encoded beforehand: the publisher shares this process (and its GIL) with the loop
        burst = [(f"burst-{i}", f"dur={durations_s[i % len(durations_s)]:g}s burst {i}")
                 for i in range(tasks)]
        encoded = [encode(t, p) for t, p in burst]
        stop_probe = at_burst() if at_burst is not None else None
        t0 = time.monotonic()
        for i, (task_id, prompt) in enumerate(burst):
            send(task_id, prompt, encoded[i])
            if rate > 0:
                producer.poll(0)
                time.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))
        producer.flush(30)
        deadline = time.monotonic() + 600
        if stop_probe is not None:
            while len(starts) < min(slots, tasks) and time.monotonic() < deadline:
                time.sleep(0.01)
            stop_probe()
        while len(ends) < tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        burst_s = time.monotonic() - t0
        with lock:
            burst_ends = sorted(ends)
        trickle_t0 = time.monotonic()
        # the trickle: short tasks, one every 50 ms, slots free
        short = min(durations_s)
        for i in range(trickle):
            send(f"trickle-{i}", f"dur={short:g}s trickle {i}")
            producer.flush(10)
            time.sleep(0.05)
        deadline = time.monotonic() + 120
        while len(ends) < tasks + trickle and time.monotonic() < deadline:
            time.sleep(0.05)
        stop_sampling.set()
        sampler.join(2)
        producer.flush(10)
        proc.stop()
        runner.join(60)
        rt.close()
    finally:
        broker.stop()
    # a slot freed by the k-th end is filled by the (slots + k)-th start (FIFO matching),
    # counted while work was queued (there was a (slots + k)-th start of the burst)
    # free slot -> filled: the k-th start (in time order) takes the k-th slot to become free
    # (the slots at t0, then each end); its wait is counted from when both the slot was free and
    # its dispatch was published (0 when it started at once)
    fills = sorted((started_at[t], produced_at[t]) for t in produced_at
                   if t.startswith("burst-") and t in started_at)
    free = sorted([t0] * slots + burst_ends)
    could = [(st, max(free[k], pub)) for k, (st, pub) in enumerate(fills) if k < len(free)]
    fill = [max(0.0, st - ready) * 1000 for st, ready in could]
    # the same without the wait behind the starts ahead of it (bench.measure.handoff)
    hand = [d * 1000 for d in handoff(could)]
    # utilization while the burst's work is queued: not the trickle's samples (a trickle task
    # between its publish and its start counted as queued work with 490 free slots: -4 to -9
    # points at 1,000 tasks)
    in_burst = [(t, r, q) for t, r, q in samples if t < trickle_t0]
    queued = [(r, q) for _, r, q in in_burst if q > 0]
    full_at = next((t for t, r, _ in in_burst if r >= min(slots, tasks)), None)
    after_ramp = [(r, q) for t, r, q in in_burst
                  if q > 0 and full_at is not None and t >= full_at]
    arriving = [(r, q) for t, r, q in samples if t - t0 < tasks / rate] if rate > 0 else []
    d2s = [(started_at[t] - produced_at[t]) * 1000 for t in produced_at
           if t.startswith("trickle-") and t in started_at]
    stats = getattr(proc, "stats", None)
    return {"loop": loop, "tasks": tasks, "slots": slots, "durations_s": durations_s,
            "completed": len(burst_ends), "burst_wall_s": burst_s,
            "ideal_wall_s": sum(durations_s[i % len(durations_s)] for i in range(tasks)) / slots,
            "peak_running": max((r for _, r, _ in samples), default=0),
            "slot_utilization_while_queued": (sum(r for r, _ in queued)
                                              / max(1, len(queued) * slots)),
            "ramp_s": None if full_at is None else full_at - t0,
            "slot_utilization_while_queued_after_ramp": (sum(r for r, _ in after_ramp)
                                                         / max(1, len(after_ramp) * slots)),
            "rate": rate, "running_while_arriving_mean": (sum(r for r, _ in arriving)
                                                          / max(1, len(arriving))),
            "fill_p50_ms": pct(fill, 50), "fill_p99_ms": pct(fill, 99),
            # the first `slots` starts fill the empty slots of the start (the burst's own
            # publish-fetch-start ramp); the rest refill a slot freed by an attempt's end
            "fill_first_p99_ms": pct(fill[:slots], 99),
            "handoff_p50_ms": pct(hand, 50), "handoff_p99_ms": pct(hand, 99),
            "handoff_first_p99_ms": pct(hand[:slots], 99),
            # the first fill's starts per second: a burst of N onto free slots waits N / this
            "first_fill_starts_per_s": (min(slots, len(could)) - 1)
            / max(1e-9, could[min(slots, len(could)) - 1][0] - could[0][0])
            if len(could) > 1 else None,
            "refill_p50_ms": pct(fill[slots:], 50), "refill_p99_ms": pct(fill[slots:], 99),
            "dispatched_to_started_p50_ms": pct(d2s, 50),
            "dispatched_to_started_p99_ms": pct(d2s, 99), "trickle": len(d2s),
            "pauses": stats.pauses if stats is not None else None,
            # where a fill's time goes: the loop took the record (publish -> taken is the
            # fetch) -> a slot thread began it (records taken while a slot was free)
            "taken_to_slot_p50_ms": pct([d * 1000 for d in stats.start_delays], 50)
            if stats is not None and stats.start_delays else None,
            "taken_to_slot_p99_ms": pct([d * 1000 for d in stats.start_delays], 99)
            if stats is not None and stats.start_delays else None,
            "timeline": [(round(t - t0, 2), r, q) for t, r, q in samples[::25]]}


def idle_cpu(seconds: float, settle_s: float) -> dict[str, Any]:
    """CPU of every process of an idle embedded stack (broker, five services, coordinator
    standby, fake provider): CPU-seconds per second over `seconds`, after `settle_s` of start-up
    (psutil; the processes' user+system time)."""
    import psutil

    from fleetplane.cli.stack import Stack

    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(data_dir=Path(tmp))
        try:
            stack.start()
            time.sleep(settle_s)
            procs: dict[str, psutil.Process] = {
                name: psutil.Process(child.pid) for name, child in stack.children.items()
                if child.pid is not None}
            if stack.broker is not None and stack.broker.pid is not None:
                procs["broker"] = psutil.Process(stack.broker.pid)

            def cpu(p: psutil.Process) -> float:
                t = p.cpu_times()
                own = float(t.user + t.system)
                for c in p.children(recursive=True):
                    try:
                        ct = c.cpu_times()
                        own += ct.user + ct.system
                    except psutil.Error:
                        pass
                return own

            before = {n: cpu(p) for n, p in procs.items()}
            t0 = time.monotonic()
            time.sleep(seconds)
            wall = time.monotonic() - t0
            out = {n: round((cpu(p) - before[n]) / wall, 3) for n, p in procs.items()}
            rss = {n: round(p.memory_info().rss / 2**20, 1) for n, p in procs.items()}
        finally:
            stack.stop()
    return {"seconds": seconds, "cpu_core_share": out, "rss_mib": rss,
            "total": round(sum(out.values()), 3), "loadavg": os.getloadavg()}


def hold(tmp: Path, attempts: int, latency_s: float, measure_s: float) -> dict[str, Any]:
    """One executor process (fleetplane.executor.main, `attempts` slots) holding `attempts`
    attempts whose model call takes `latency_s` (the fake provider in a process of its own):
    peak running (TaskStarted seen), the executor's CPU (cores) and RSS while they wait, and
    the time from the dispatches to all started."""
    import psutil
    from confluent_kafka import Consumer, Producer, TopicPartition

    from fleetplane.core.kafka import event_headers
    from fleetplane.core.settings import REPO_ROOT
    from fleetplane.core.topics import LIFECYCLE
    from fleetplane.infra.broker import free_port

    broker = EmbeddedBroker(tmp / "broker-hold")
    broker.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        settings = Settings(kafka_bootstrap=broker.bootstrap)
        ensure_topics(settings.client_config(), load_topics(settings.topics_file))
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "services"),
               "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "fleetplane.fakeprovider.server", "--port", str(port),
             "--latency-ms", str(latency_s * 1000)], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True))
        log_path = tmp / "executor-hold.log"
        with open(log_path, "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "fleetplane.executor.main"],
                env={**env, "FLEETPLANE_KAFKA_BOOTSTRAP": broker.bootstrap,
                     "FLEETPLANE_DATA_DIR": str(tmp / "data-hold"),
                     "FLEETPLANE_ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}",
                     "FLEETPLANE_EXECUTOR_SLOTS": str(attempts),
                     "FLEETPLANE_MODEL_TIMEOUT_S": str(latency_s * 4),
                     "FLEETPLANE_MODEL_MAX_RETRIES": "0", "FLEETPLANE_LOG_LEVEL": "INFO",
                     "FLEETPLANE_LOG_JSON": "false"},
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        executor = psutil.Process(procs[-1].pid)
        lifecycle = Consumer({**settings.consumer_config(f"hold-{time.monotonic_ns()}"),
                              "enable.auto.commit": False, "isolation.level":
                              "read_uncommitted"})
        lifecycle.assign([TopicPartition(LIFECYCLE, p, -1) for p in
                          lifecycle.list_topics(LIFECYCLE, timeout=30)
                          .topics[LIFECYCLE].partitions])
        # the executor is taking dispatches once its consumer group has it
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if procs[-1].poll() is not None:
                raise RuntimeError(f"executor exited: {log_path.read_text()[-2000:]}")
            if "parallel processor started" in log_path.read_text():
                break
            time.sleep(1)
        time.sleep(5)  # group join
        rss_before = executor.memory_info().rss
        serde = default_serde()
        producer = Producer(settings.producer_config())
        t0 = time.monotonic()
        ids = {f"hold-{i}" for i in range(attempts)}
        for task_id in sorted(ids):
            e = dispatch(task_id, f"hold {task_id}", None, 2)
            producer.produce(DISPATCH, key=task_id.encode(), value=serde.encode(e),
                             headers=event_headers(e))
            producer.poll(0)
        producer.flush(60)
        started: set[str] = set()
        all_started_s = None
        deadline = time.monotonic() + latency_s * 0.8
        while time.monotonic() < deadline and len(started) < attempts:
            for m in lifecycle.consume(500, 0.2):
                if m.error() is None and \
                        dict(m.headers() or []).get("event_type") == b"TaskStarted":
                    key = (m.key() or b"").decode()
                    if key in ids:
                        started.add(key)
        if len(started) >= attempts:
            all_started_s = time.monotonic() - t0
        # every attempt is now waiting on its model call: measure
        cpu0 = executor.cpu_times()
        m0 = time.monotonic()
        time.sleep(min(measure_s, max(1.0, t0 + latency_s - time.monotonic() - 1)))
        cpu1 = executor.cpu_times()
        wall = time.monotonic() - m0
        rss = executor.memory_info().rss
        threads = executor.num_threads()
        lifecycle.close()
    finally:
        for p in procs:
            with suppress(ProcessLookupError):
                os.killpg(p.pid, 9)
        broker.stop()
    cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall
    return {"attempts": attempts, "latency_s": latency_s, "peak_running": len(started),
            "all_started_s": all_started_s, "measured_s": round(wall, 1),
            "executor_cpu_cores_waiting": round(cpu, 3), "executor_rss_mib": round(rss / 2**20),
            "executor_rss_before_mib": round(rss_before / 2**20),
            "rss_per_1000_waiting_mib": round((rss - rss_before) / 2**20
                                              / max(1, len(started)) * 1000),
            "cpu_per_1000_waiting_cores": round(cpu / max(1, len(started)) * 1000, 3),
            "threads": threads, "loadavg": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default="all",
                    choices=["all", "overhead", "concurrency", "idle", "hold"])
    ap.add_argument("--tasks", type=int, default=500)
    ap.add_argument("--slots", type=int, default=200)
    ap.add_argument("--durations", default="1,2,5,10,20",
                    help="model call seconds, assigned round-robin")
    ap.add_argument("--trickle", type=int, default=50)
    ap.add_argument("--rate", type=float, default=0.0,
                    help="dispatches per second for the burst (0: all at once)")
    ap.add_argument("--loop", choices=["parallel", "batch"], default="parallel")
    ap.add_argument("--idle-seconds", type=float, default=15.0)
    ap.add_argument("--attempts", type=int, default=2000)
    ap.add_argument("--hold-latency-s", type=float, default=30.0)
    ap.add_argument("--idle-settle", type=float, default=20.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--latency-ms", type=float, default=100.0)
    ap.add_argument("--max-agents", type=int, default=64)
    ap.add_argument("--demo-per-team", type=int, default=4)
    ap.add_argument("--demo-latency-ms", type=float, default=300.0)
    args = ap.parse_args()
    configure_logging("bench", "ERROR", json=False)
    console = Console()
    results: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    if args.scenario == "hold":
        with tempfile.TemporaryDirectory() as tmp_s:
            results["hold"] = h = hold(Path(tmp_s), args.attempts, args.hold_latency_s,
                                       args.idle_seconds)
        console.print(
            f"hold: {h['attempts']} attempts, model call {h['latency_s']:.0f} s: peak running "
            f"{h['peak_running']} (all started after {h['all_started_s']} s); executor while "
            f"they wait: CPU {h['executor_cpu_cores_waiting']} cores, RSS "
            f"{h['executor_rss_mib']} MiB (idle before: {h['executor_rss_before_mib']} MiB), "
            f"{h['threads']} threads; per 1,000 waiting: {h['cpu_per_1000_waiting_cores']} "
            f"cores, {h['rss_per_1000_waiting_mib']} MiB; load average {h['loadavg']}")
        save(console, results)
        return
    if args.scenario == "idle":
        results["idle"] = r = idle_cpu(args.idle_seconds, args.idle_settle)
        t = Table(title=f"idle stack: CPU (cores) and RSS over {r['seconds']:.0f} s")
        for col in ("process", "CPU cores", "RSS MiB"):
            t.add_column(col)
        for name, share in sorted(r["cpu_core_share"].items()):
            t.add_row(name, f"{share:.3f}", f"{r['rss_mib'][name]:.0f}")
        t.add_row("total", f"{r['total']:.3f}", "")
        console.print(t)
        console.print(f"load average {r['loadavg']}")
        save(console, results)
        return
    if args.scenario in ("all", "concurrency"):
        with tempfile.TemporaryDirectory() as tmp_s, FakeProvider() as fake:
            c = concurrency(fake, Path(tmp_s), args.tasks, args.slots,
                            [float(x) for x in args.durations.split(",")], args.trickle,
                            args.loop, args.rate)
        results["concurrency"] = c
        console.print(
            f"concurrency ({c['loop']} loop): {c['tasks']} tasks of {c['durations_s']} s, "
            f"{c['slots']} slots: peak running {c['peak_running']}, slot utilization while "
            f"queued {c['slot_utilization_while_queued']:.1%}, free slot -> refilled p50 "
            f"{c['fill_p50_ms']:.1f} ms p99 {c['fill_p99_ms']:.1f} ms, dispatched -> started "
            f"(slot free) p50 {c['dispatched_to_started_p50_ms']:.1f} ms p99 "
            f"{c['dispatched_to_started_p99_ms']:.1f} ms, burst {c['burst_wall_s']:.1f} s "
            f"(ideal {c['ideal_wall_s']:.1f} s), pauses {c['pauses']}; ramp to full "
            f"{c['ramp_s'] if c['ramp_s'] is None else round(c['ramp_s'], 1)} s, utilization "
            f"while queued after it {c['slot_utilization_while_queued_after_ramp']:.1%}")
    if args.scenario == "concurrency":
        save(console, results)
        return
    read = {"name": "read_file", "input": {"path": "calc.py"}}
    with tempfile.TemporaryDirectory() as tmp_s, FakeProvider() as fake:
        tmp = Path(tmp_s)
        repo = sample_repo(tmp)
        # 1. per-step overhead, one agent, zero model latency
        rt = make_runtime(tmp, repo, 4)
        results["single_read_file"] = agents(fake, rt, 1, args.steps, read, 0)
        results["single_list_dir"] = agents(fake, rt, 1, args.steps,
                                            {"name": "list_dir", "input": {}}, 0)
        results["single_run_command"] = agents(
            fake, rt, 1, max(5, args.steps // 2),
            {"name": "run_command", "input": {"command": "cat README.md"}}, 0)
        rt.close()
        results["sandbox"] = sandbox_cost()
        results["cancel"] = cancel_latency(fake, tmp, repo)
        # 2. concurrency sweep with model latency (agents overlap while they wait)
        sweep = []
        n = 1
        while n <= args.max_agents:
            rt = make_runtime(tmp, repo, n)
            sweep.append(agents(fake, rt, n, args.steps, read, args.latency_ms))
            rt.close()
            console.print(f"  {n} agents: overhead p50 {sweep[-1]['overhead_p50_ms']:.2f} ms")
            n *= 2
        results["sweep"] = sweep
        base = sweep[0]["overhead_p50_ms"]
        doubled = next((s["agents"] for s in sweep if s["overhead_p50_ms"] >= 2 * base), None)
        results["agents_before_overhead_doubles"] = doubled
        # 3. the demo workload
        results["demo"] = demo_utilization(fake, tmp, repo, args.demo_latency_ms,
                                           args.demo_per_team, 32)

    t = Table(title="executor overhead per agent step (excluding model time)")
    for col in ("case", "agents", "steps", "p50 ms", "p99 ms", "attempt setup+teardown p50 ms"):
        t.add_column(col)
    for key in ("single_read_file", "single_list_dir", "single_run_command"):
        r = results[key]
        t.add_row(key, str(r["agents"]), str(r["steps"]), f"{r['overhead_p50_ms']:.2f}",
                  f"{r['overhead_p99_ms']:.2f}", f"{r['attempt_setup_teardown_p50_ms']:.1f}")
    for r in results["sweep"]:
        t.add_row(f"read_file, model {args.latency_ms:.0f} ms", str(r["agents"]),
                  str(r["steps"]), f"{r['overhead_p50_ms']:.2f}", f"{r['overhead_p99_ms']:.2f}",
                  f"{r['attempt_setup_teardown_p50_ms']:.1f}")
    console.print(t)
    console.print(f"sandbox `true`: p50 {results['sandbox']['run_command_true_p50_ms']:.1f} ms, "
                  f"p99 {results['sandbox']['run_command_true_p99_ms']:.1f} ms")
    c = results["cancel"]
    console.print(f"cancel -> outcome: model call in flight p50 {c['cancel_model_p50_ms']:.0f} "
                  f"ms (max {c['cancel_model_max_ms']:.0f}), command running p50 "
                  f"{c['cancel_command_p50_ms']:.0f} ms (max {c['cancel_command_max_ms']:.0f}) "
                  "(+ up to 0.2 s for the watcher's poll of tasks.outcomes)")
    console.print(f"agents per process before the p50 overhead doubles: "
                  f"{results['agents_before_overhead_doubles'] or f'> {args.max_agents}'}")
    d = results["demo"]
    console.print(f"demo workload ({d['tasks']} tasks, {d['slots']} slots, model latency "
                  f"{args.demo_latency_ms:.0f} ms): model {d['model_share']:.1%}, tool "
                  f"{d['tool_share']:.1%}, busy {d['busy_share']:.1%}, idle "
                  f"{d['idle_share']:.1%} of slot time; used slots busy "
                  f"{d['busy_share_of_used_slots']:.1%} (model {d['model_share_of_busy']:.1%} "
                  "of busy)")
    save(console, results)


def save(console: Console, results: dict[str, Any]) -> None:
    console.print(f"machine: {results['machine']}")
    console.print(f"written to {write_result('executor', results)}")


if __name__ == "__main__":
    main()
