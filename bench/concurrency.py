"""The `concurrency` scenario of `make bench` (issue 13): what one executor process holds.

    python -m bench.concurrency [--quick] [--attempts 2000] [--latency-s 30] [--mixed-tasks 3000]
                                [--mixed-slots 500] [--mixed-durations 1,2,5,10,20,30,60,90,120]
    make bench BENCH_ARGS="--only concurrency [--quick]"

Two parts, figures not assertions (JSON under bench/results/):

* **hold, cancel, kill** - the executor as its own process (`fleetplane.executor.main`, every
  attempt a slot), the fake provider in a process of its own answering after `--latency-s`, the
  embedded broker:
  1. start-up: process spawned -> "parallel processor started";
  2. `--attempts` dispatches at once: peak running (TaskStarted seen, no outcome yet), the time
     until all started, then the executor's CPU (cores), RSS and threads while they wait;
  3. cancel while busy: `--cancels` TaskCancelled for running attempts, one every 20 ms:
     cancel published -> the attempt's TaskFailed(cancelled) committed, p50/p99/max;
  4. SIGKILL with the attempts in flight, then a restart (same executor id and data
     directory, as a restarted pod); right after the spawn `--start-cancels` new dispatches and
     their TaskCancelled are published, so the cancels arrive while the executor starts:
     cancel -> TaskFailed(cancelled) (start-up included) and the model calls they made (0 is
     right);
  5. recovery: SIGKILL -> every attempt has an outcome (the interrupted ones are reported
     `lost_executor` from the journal, never re-run), and the billing check: the fake
     provider's call log, per attempt (one model call each; two would be billed twice).
* **rebalance** (`--rebalance-cancels N`, 0 skips it; ~20 s at quick size) - cancel while
  rebalancing: executor A (its own process) runs 2N attempts (`--rebalance-latency-s`, 120 s
  calls), a second executor B starts in the same group, and N TaskCancelled for A's attempts
  are published from B's spawn until after the group has settled (half while B starts, half
  50 ms apart from B's ready, across its join and A's revocation): cancel ->
  TaskFailed(cancelled) p50/p99/max and its stages (received / stopped / committed, in A's
  log), what B did with the dispatches it re-read, and the billing check (call log per task).
* **mixed** - the executor's loop (core.parallel's ParallelProcessor with `execute`, in this
  process, the fake provider in this process too) with `--mixed-tasks` attempts whose calls take
  `--mixed-durations` seconds round-robin through `--mixed-slots` slots (bench.executor's
  concurrency scenario): slot utilization while work is queued, free slot -> filled p99, and
  dispatched -> started with a free slot (a trickle of short tasks afterwards), p50/p99.

`--quick` (a loaded machine): 500 attempts, 100 cancels, 30 cancels while rebalancing, 600 mixed
tasks through 100 slots of 1-20 s calls.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.executor import concurrency as mixed_loop
from bench.executor import dispatch, pct
from bench.measure import handoff, machine, py_spy
from bench.report import write_result
from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.serde import DecodeError, default_serde
from fleetplane.core.settings import REPO_ROOT, Settings
from fleetplane.core.topics import DISPATCH, LIFECYCLE, OUTCOMES, ensure_topics, load_topics
from fleetplane.infra.broker import EmbeddedBroker, free_port

QUICK = {"attempts": 500, "cancels": 100, "start_cancels": 20, "rebalance_cancels": 30,
         "mixed_tasks": 600, "mixed_slots": 100, "mixed_durations": "1,2,5,10,20"}
FULL = {"attempts": 2000, "cancels": 200, "start_cancels": 50, "rebalance_cancels": 100,
        "mixed_tasks": 3000, "mixed_slots": 500, "mixed_durations": "1,2,5,10,20,30,60,90,120"}


class Watch:
    """Follows tasks.lifecycle and tasks.outcomes from their ends, read_committed (what a user
    sees): when each task started and got its first outcome (and which)."""

    def __init__(self, settings: Settings, poll_s: float = 0.05) -> None:
        from confluent_kafka import Consumer, TopicPartition

        #: librdkafka's consume(n, t) waits all of t unless n records came: a read's latency
        self.poll_s = poll_s

        self.started: dict[str, float] = {}
        #: the first fill, as the executor recorded it: TaskStarted.occurred_at (the claim) and
        #: the dispatch record's CreateTime (its produce call), both epoch ms
        self.claimed_ms: dict[str, int] = {}
        self.dispatched_ms: dict[str, int] = {}
        self.outcome: dict[str, tuple[float, str]] = {}  # task -> (time, type or failure class)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._serde = default_serde()
        self._consumers = []
        for topic, isolation in ((LIFECYCLE, "read_committed"), (OUTCOMES, "read_committed"),
                                 (DISPATCH, "read_committed")):
            c = Consumer({**settings.consumer_config(f"watch-{topic}-{time.monotonic_ns()}"),
                          "enable.auto.commit": False, "isolation.level": isolation})
            parts = c.list_topics(topic, timeout=30).topics[topic].partitions
            c.assign([TopicPartition(topic, p, c.get_watermark_offsets(
                TopicPartition(topic, p), timeout=30)[1]) for p in sorted(parts)])
            self._consumers.append(c)
        self._threads = [threading.Thread(target=self._run, args=(c,), daemon=True)
                         for c in self._consumers]
        for t in self._threads:
            t.start()

    def _run(self, consumer: Any) -> None:
        while not self._stop.is_set():
            for m in consumer.consume(1000, self.poll_s):
                if m.error() is not None:
                    continue
                kind = dict(m.headers() or []).get("event_type", b"").decode()
                task = (m.key() or b"").decode()
                now = time.monotonic()
                if kind == "TaskDispatched":
                    with self._lock:
                        self.dispatched_ms.setdefault(task, m.timestamp()[1])
                elif kind == "TaskStarted":
                    with self._lock:
                        self.started.setdefault(task, now)
                    try:
                        at = self._serde.decode(m.value() or b"").occurred_at
                        with self._lock:
                            self.claimed_ms.setdefault(task, int(at.timestamp() * 1000))
                    except DecodeError:
                        pass
                elif kind in ("TaskCompleted", "TaskFailed"):  # TaskFailed(final=false):
                    # tasks.lifecycle
                    label = kind
                    if kind == "TaskFailed":
                        try:
                            e = self._serde.decode(m.value() or b"")
                            label = getattr(e, "failure_class", kind)
                        except DecodeError:
                            pass
                    with self._lock:
                        self.outcome.setdefault(task, (now, label))

    def running(self, tasks: set[str]) -> int:
        with self._lock:
            return sum(1 for t in tasks if t in self.started and t not in self.outcome)

    def fill_ms(self, tasks: set[str]) -> list[float]:
        """Dispatch produced -> attempt claimed (TaskStarted.occurred_at), per task."""
        return [float(claimed - produced) for claimed, produced in self.claims(tasks)]

    def claims(self, tasks: set[str]) -> list[tuple[int, int]]:
        """(claimed, dispatch produced), epoch ms, per task."""
        with self._lock:
            return [(self.claimed_ms[t], self.dispatched_ms[t]) for t in tasks
                    if t in self.claimed_ms and t in self.dispatched_ms]

    def counts(self, tasks: set[str]) -> tuple[int, int]:
        with self._lock:
            return (sum(1 for t in tasks if t in self.started),
                    sum(1 for t in tasks if t in self.outcome))

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        for c in self._consumers:
            c.close()


class ExecutorProc:
    """fleetplane.executor.main as a child process (its own session: SIGKILL takes it all)."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env, self.tmp = env, tmp
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.tmp / f"executor-{self.starts}.log"

    def start(self) -> float:
        self.starts += 1
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "fleetplane.executor.main"],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return time.monotonic()

    def wait_log(self, text: str, timeout_s: float = 600.0) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"executor exited: {self.log_path.read_text()[-2000:]}")
            if text in self.log_path.read_text():
                return time.monotonic()
            time.sleep(0.1)
        raise RuntimeError(f"{text!r} not logged in {timeout_s} s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def _calls(port: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_fake/calls", timeout=60) as resp:
        calls: list[dict[str, Any]] = json.load(resp)
    return calls


def _set_script(port: int, script: dict[str, Any]) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/_fake/script",
                                 data=json.dumps(script).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    urllib.request.urlopen(req, timeout=30).close()


@contextmanager
def _provider(latency_s: float) -> Iterator[int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "services")}
    proc = subprocess.Popen([sys.executable, "-m", "fleetplane.fakeprovider.server", "--port",
                             str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                _set_script(port, {"latency_ms": latency_s * 1000, "replies": [
                    {"match": "WARM", "text": "ok", "latency_ms": 0, "times": None}]})
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        yield port
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _spy(pid: int, path: Path, seconds: float | None = None,
         gil: bool = False, rate: int = 50) -> subprocess.Popen[bytes] | None:
    """py-spy recording `pid` (collapsed stacks, --nonblocking: the target is not paused), for
    `seconds` or until SIGINT; None without py-spy (beside the interpreter, or on PATH).
    `gil`: only the thread holding the GIL (where a GIL-bound process's time goes)."""
    spy = py_spy()
    if spy is None:
        return None
    cmd = [str(spy), "record", "-p", str(pid), "-r", str(rate), "--nonblocking", "-f", "raw",
           "-o", str(path), "--threads", *(["--gil"] if gil else [])]
    if seconds is not None:
        cmd += ["-d", str(max(1, round(seconds)))]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop_spy(spy: subprocess.Popen[bytes] | None) -> None:
    if spy is not None:
        if spy.poll() is None:
            spy.send_signal(signal.SIGINT)
        with suppress(subprocess.TimeoutExpired):
            spy.wait(60)


def top_frames(path: Path, n: int = 12) -> dict[str, Any]:
    """A py-spy raw profile summed up: samples, per thread name, the functions with the most
    samples on top of the stack (own time) and the fleetplane functions most often on the
    stack (inclusive of their callees), as shares of all samples."""
    if not path.exists():
        return {}
    total = 0
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = stack.split(";")
        threads[frames[0].split(": ", 1)[-1].rstrip("0123456789_")] += k
        own[frames[-1]] += k
        for f in {f for f in frames[1:] if "fleetplane" in f}:
            inclusive[f] += k

    def share(c: Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(v / max(1, total), 3)) for f, v in c.most_common(n)]

    return {"samples": total, "threads": share(threads), "own": share(own),
            "inclusive": share(inclusive)}


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Per OS thread of `pid`: (name, CPU seconds so far), from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            raw = (task / "stat").read_text()
        except OSError:
            continue
        name = raw[raw.index("(") + 1:raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2:].split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def python_thread_names(pid: int) -> dict[int, str]:
    """Thread id -> Python thread name (py-spy dump; {} without py-spy). Python 3.11 does not
    name OS threads, so /proc shows them all as "python"."""
    spy = py_spy()
    if spy is None:
        return {}
    try:
        text = subprocess.run([str(spy), "dump", "--pid", str(pid), "--nonblocking"],
                              capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names: dict[int, str] = {}
    for line in text.splitlines():
        if line.startswith("Thread ") and '"' in line:
            head, name = line.split('"', 2)[:2]
            with suppress(ValueError):
                names[int(head.split()[1], 0)] = name
    return names


def cpu_split(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
              wall: float) -> dict[str, float]:
    """Cores per thread kind over `wall` seconds: librdkafka's threads (rdk:*) by name, the
    Python threads (named by the interpreter after their threading name, cut to 15 chars)
    grouped by their name without a trailing number."""
    cores: dict[str, float] = {}
    for tid, (name, cpu) in after.items():
        kind = name.rstrip("0123456789_-") or name
        cores[kind] = cores.get(kind, 0.0) + cpu - before.get(tid, (name, 0.0))[1]
    return {k: round(v / wall, 3)
            for k, v in sorted(cores.items(), key=lambda kv: -kv[1])[:12] if v > 0}


def busiest_threads(pid: int, before: dict[int, tuple[str, float]],
                    after: dict[int, tuple[str, float]], wall: float,
                    floor: float = 0.005) -> dict[str, float]:
    """Cores of each thread above `floor` over `wall` seconds, in creation order (thread id),
    Python ones by their name (py-spy)."""
    names = python_thread_names(pid)
    return {f"{tid} {names.get(tid, name)}":
            round((cpu - before.get(tid, (name, 0.0))[1]) / wall, 3)
            for tid, (name, cpu) in sorted(after.items())
            if cpu - before.get(tid, (name, 0.0))[1] > floor * wall}


def _wait(pred: Any, timeout_s: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def _log_times(path: Path, event: str) -> dict[str, float]:
    """task_id -> monotonic time of the executor's JSON log line `event` (its wall-clock stamp
    moved onto this process's monotonic clock; same machine)."""
    from datetime import datetime

    shift = time.monotonic() - time.time()
    out: dict[str, float] = {}
    for line in path.read_text(errors="replace").splitlines():
        if event not in line:
            continue
        try:
            rec = json.loads(line)
            ts = datetime.fromisoformat(str(rec["timestamp"]).replace("Z", "+00:00"))
        except (ValueError, KeyError):
            continue
        if rec.get("event") == event and rec.get("task_id"):
            out.setdefault(str(rec["task_id"]), ts.timestamp() + shift)
    return out


def _log_time(path: Path, event: str, after: float | None = None) -> float | None:
    """Monotonic time of the first JSON log line `event` of the executor (see `_log_times`),
    the first one at or after `after` if given."""
    from datetime import datetime

    shift = time.monotonic() - time.time()
    for line in path.read_text(errors="replace").splitlines():
        if event not in line:
            continue
        try:
            rec = json.loads(line)
            ts = datetime.fromisoformat(str(rec["timestamp"]).replace("Z", "+00:00"))
        except (ValueError, KeyError):
            continue
        if rec.get("event") == event and (after is None or ts.timestamp() + shift >= after):
            return ts.timestamp() + shift
    return None


def start_cancel_stages(log: Path, ready: float, sent: dict[str, float],
                        outcome: dict[str, tuple[float, str]]) -> dict[str, Any]:
    """Where a cancel that arrived while the executor started spends its time after "parallel
    processor started": -> the group gave the loop its partitions ("partitions assigned"),
    -> the attempt refused ("attempt failed", p50 / p99 ms after the later of the assignment
    and the cancel), -> its TaskFailed committed and read."""
    assigned = _log_time(log, "partitions assigned")
    failed = _log_times(log, "attempt failed")
    out: dict[str, Any] = {"assigned_ms": None if assigned is None
                           else round((assigned - ready) * 1000)}
    base = assigned if assigned is not None else ready
    handled = [(failed[t] - max(base, at)) * 1000 for t, at in sent.items() if t in failed]
    committed = [(outcome[t][0] - failed[t]) * 1000 for t in sent
                 if t in failed and t in outcome]
    if handled:
        out["handled"] = [round(pct(handled, 50)), round(pct(handled, 99))]
    if committed:
        out["committed"] = [round(pct(committed, 50)), round(pct(committed, 99))]
    return out


def cancel_stages(log: Path, sent: dict[str, float],
                  outcome: dict[str, tuple[float, str]]) -> dict[str, Any]:
    """Where a cancel's time goes, p50 / p99 ms: published -> the executor's cancellation reader
    has it ("cancelling running attempt"), -> the attempt stopped ("attempt failed"), -> its
    TaskFailed committed and read (the commit, and the reader's lag)."""
    seen = _log_times(log, "cancelling running attempt")
    failed = _log_times(log, "attempt failed")
    stages: dict[str, list[float]] = {"received": [], "stopped": [], "committed": []}
    for t, at in sent.items():
        if t in seen and t in failed and t in outcome:
            stages["received"].append((seen[t] - at) * 1000)
            stages["stopped"].append((failed[t] - seen[t]) * 1000)
            stages["committed"].append((outcome[t][0] - failed[t]) * 1000)
    return {k: [round(pct(v, 50)), round(pct(v, 99))] for k, v in stages.items() if v}


def cancel_figures(sent: dict[str, float], watch: Watch, log: Path) -> dict[str, Any]:
    """Cancels published at `sent` (task -> monotonic time): how many stopped (TaskFailed
    cancelled), cancel -> outcome read p50 / p99 / max ms, and the stages in the executor's
    `log` (`cancel_stages`)."""
    with watch._lock:
        outcome = dict(watch.outcome)
    lat = [(outcome[t][0] - at) * 1000 for t, at in sent.items() if t in outcome]
    return {"n": len(sent), "stopped": sum(1 for t in sent
                                          if outcome.get(t, (0, ""))[1] == "cancelled"),
            "p50_ms": round(pct(lat, 50)), "p99_ms": round(pct(lat, 99)),
            "max_ms": round(max(lat, default=float("nan"))),
            "stages": cancel_stages(log, sent, outcome)}


def calls_per_task(port: int, prefix: str) -> Counter[str]:
    """The fake provider's call log: model calls per task whose prompt is `prefix` + task id
    (one attempt per task: two calls would be billed twice)."""
    return Counter(c["last_user_text"].split(" ", 1)[1] for c in _calls(port)
                   if c["last_user_text"].startswith(prefix))


def _executor_env(broker: EmbeddedBroker, tmp: Path, port: int, name: str, slots: int,
                  **extra: str) -> dict[str, str]:
    """The environment of a bench's executor process on its own broker and fake provider."""
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT / "services"),
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "FLEETPLANE_KAFKA_BOOTSTRAP": broker.bootstrap,
            "FLEETPLANE_DATA_DIR": str(tmp / "data"),
            "FLEETPLANE_ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}",
            "FLEETPLANE_EXECUTOR_SLOTS": str(slots), "FLEETPLANE_EXECUTOR_ID": name,
            "FLEETPLANE_INSTANCE_ID": name, "FLEETPLANE_MODEL_MAX_RETRIES": "0",
            "FLEETPLANE_LOG_LEVEL": "INFO", "FLEETPLANE_LOG_JSON": "true", **extra}


def hold_cancel_kill(tmp: Path, attempts: int, latency_s: float, cancels: int,
                     start_cancels: int, measure_s: float,
                     profile: Path | None = None) -> dict[str, Any]:
    import psutil

    out: dict[str, Any] = {"attempts": attempts, "latency_s": latency_s}
    broker = EmbeddedBroker(tmp / "broker")
    broker.start()
    watch: Watch | None = None
    executor: ExecutorProc | None = None
    try:
        settings = Settings(kafka_bootstrap=broker.bootstrap)
        ensure_topics(settings.client_config(), load_topics(settings.topics_file))
        with _provider(latency_s) as port:
            env = _executor_env(broker, tmp, port, "bench-exec", attempts,
                                FLEETPLANE_MODEL_TIMEOUT_S=str(max(60.0, latency_s * 4)))
            watch = Watch(settings)
            producer = EventProducer(settings)
            executor = ExecutorProc(env, tmp)
            spawned = executor.start()
            out["startup_s"] = round(executor.wait_log("parallel processor started")
                                     - spawned, 2)
            producer.send([dispatch("warm", "WARM", None, 2)])
            if not _wait(lambda: "warm" in watch.outcome, 300):
                raise RuntimeError("the warm-up attempt got no outcome in 300 s")
            proc = psutil.Process(executor.proc.pid)  # type: ignore[union-attr]
            out["rss_idle_mib"] = round(proc.memory_info().rss / 2**20)

            # 2. hold: every attempt waits on its model call
            hold = {f"hold-{i}" for i in range(attempts)}
            spy = None
            if profile:  # the thread holding the GIL, attached before the burst
                spy = _spy(proc.pid, profile / "ramp.txt", gil=True, rate=1000)
                time.sleep(2.0)
            # the slot threads are spawned in the background from the loop's start: how many
            # exist when the burst comes (a burst right after a start waits for the rest)
            out["threads_at_burst"] = proc.num_threads()
            t0 = time.monotonic()
            producer.send([dispatch(t, f"HOLD {t}", None, 2) for t in sorted(hold)],
                          timeout_s=120)
            peak = 0
            deadline = t0 + latency_s * 0.8
            while time.monotonic() < deadline:
                peak = max(peak, watch.running(hold))
                if watch.counts(hold)[0] >= attempts:
                    break
                time.sleep(0.1)
            started, _ = watch.counts(hold)
            out["all_started_s"] = round(time.monotonic() - t0, 2) if started >= attempts \
                else None
            out["started_within_window"] = started
            fill = watch.fill_ms(hold)
            # the first fill onto empty slots: dispatch produced -> claimed (TaskStarted)
            # min: when the loop took the burst's first record (+ one claim); p99 - min: the
            # claims (docs/executor.md stop 19 separates the two)
            out["first_fill_ms"] = {"n": len(fill), "min": min(fill, default=float("nan")),
                                    "p50": pct(fill, 50), "p99": pct(fill, 99),
                                    # not counting the claims ahead of it (measure.handoff)
                                    "handoff_p99": pct([float(d) for d in handoff(
                                        [(float(c), float(p)) for c, p in watch.claims(hold)])],
                                        99),
                                    "max": max(fill, default=float("nan"))}
            _stop_spy(spy)
            # waiting means every request is out: a claimed attempt (TaskStarted) may still
            # wait for the asyncio loop to send its request; measuring from "all started"
            # counted the end of the ramp (about 0.1 core of request building at load 20-40)
            _wait(lambda: len(_calls(port)) > started, t0 + latency_s * 0.6 - time.monotonic(),
                  step=1.0)
            out["all_calls_sent_s"] = round(time.monotonic() - t0, 2)
            window = max(1.0, min(measure_s, t0 + latency_s - time.monotonic() - 3))
            cpu0, m0 = proc.cpu_times(), time.monotonic()
            threads0 = thread_cpu(proc.pid)
            spy = _spy(proc.pid, profile / "waiting.txt", window) if profile else None
            time.sleep(window)
            cpu1, wall = proc.cpu_times(), time.monotonic() - m0
            threads1 = thread_cpu(proc.pid)
            out["cpu_by_thread_waiting"] = cpu_split(threads0, threads1, wall)
            out["busiest_threads_waiting"] = busiest_threads(proc.pid, threads0, threads1, wall)
            _stop_spy(spy)
            if profile:
                out["profile"] = {"ramp": top_frames(profile / "ramp.txt"),
                                  "waiting": top_frames(profile / "waiting.txt")}
            waiting = watch.running(hold)
            peak = max(peak, waiting)
            # claimed is not calling: how many of them the provider has seen (minus the warm-up)
            out["provider_calls_while_waiting"] = len(_calls(port)) - 1
            cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall
            rss = proc.memory_info().rss
            out.update({"peak_running": peak, "waiting_while_measured": waiting,
                        "measured_s": round(wall, 1), "cpu_cores_waiting": round(cpu, 3),
                        "rss_mib": round(rss / 2**20), "threads": proc.num_threads(),
                        "cpu_per_1000_waiting": round(cpu / max(1, waiting) * 1000, 3),
                        "rss_per_1000_waiting_mib": round(
                            (rss / 2**20 - out["rss_idle_mib"]) / max(1, waiting) * 1000)})

            # 3. cancels while busy
            with watch._lock:
                running = sorted(t for t in hold if t in watch.started
                                 and t not in watch.outcome)
            targets = random.Random(7).sample(running, min(cancels, len(running)))
            sent: dict[str, float] = {}
            for t in targets:
                producer.send([ev.TaskCancelled(task_id=t, team="platform",
                                                reason="bench: cancel while busy")])
                sent[t] = time.monotonic()
                time.sleep(0.02)
            _wait(lambda: all(t in watch.outcome for t in targets), 60)
            out["cancel_busy"] = cancel_figures(sent, watch, executor.log_path)

            # 4. SIGKILL with the attempts in flight, then a restart
            with watch._lock:
                out["outcomes_before_kill"] = dict(Counter(
                    watch.outcome[t][1] for t in hold if t in watch.outcome))
            out["calls_before_kill"] = len(_calls(port))
            in_flight = watch.running(hold)
            executor.kill()
            killed = time.monotonic()
            out["killed_in_flight"] = in_flight
            late = {f"late-{i}" for i in range(start_cancels)}
            respawned = executor.start()
            producer.send([dispatch(t, f"HOLD {t}", None, 2) for t in sorted(late)])
            late_sent: dict[str, float] = {}
            for t in sorted(late):
                producer.send([ev.TaskCancelled(task_id=t, team="platform",
                                                reason="bench: cancel while starting")])
                late_sent[t] = time.monotonic()
            ready = executor.wait_log("parallel processor started")
            out["restart_startup_s"] = round(ready - respawned, 2)
            everyone = hold | late
            _wait(lambda: all(t in watch.outcome for t in everyone), max(300.0, latency_s * 4),
                  step=0.2)
            done_at = max((watch.outcome[t][0] for t in everyone if t in watch.outcome),
                          default=time.monotonic())
            missing = sorted(t for t in everyone if t not in watch.outcome)
            lat = [(watch.outcome[t][0] - late_sent[t]) * 1000 for t in late
                   if t in watch.outcome]
            out["cancel_starting"] = {
                "n": len(late), "stopped": sum(1 for t in late
                                               if watch.outcome.get(t, (0, ""))[1]
                                               == "cancelled"),
                "p50_ms": round(pct(lat, 50)), "p99_ms": round(pct(lat, 99)),
                "after_ready_p99_ms": round(pct([(watch.outcome[t][0] - ready) * 1000
                                                 for t in late if t in watch.outcome], 99)),
                "stages": start_cancel_stages(executor.log_path, ready, late_sent,
                                              watch.outcome)}
            outcomes = Counter(watch.outcome[t][1] for t in hold if t in watch.outcome)
            out["recovery"] = {"recover_s": round(done_at - killed, 2),
                               "without_outcome": len(missing), "missing": missing[:10],
                               "outcomes": dict(outcomes)}
            # 5. billing: the provider's call log, per attempt (one attempt per task here)
            per_task = calls_per_task(port, "HOLD ")
            out["billing"] = {"calls": sum(per_task.values()),
                              "attempts_billed_twice": sorted(t for t, n in per_task.items()
                                                              if n > 1)[:10],
                              "billed_twice": sum(1 for n in per_task.values() if n > 1),
                              "cancelled_while_starting_called": sum(per_task[t]
                                                                     for t in late)}
            producer.close()
    finally:
        if executor is not None:
            executor.kill()
            if profile:  # keep the executor's logs beside the profiles
                for i in range(1, executor.starts + 1):
                    with suppress(OSError):
                        (profile / f"executor-{i}.log").write_bytes(
                            (tmp / f"executor-{i}.log").read_bytes())
        if watch is not None:
            watch.close()
        broker.stop()
    out["loadavg"] = [round(x, 1) for x in os.getloadavg()]
    return out


def _close(executors: list[ExecutorProc], watch: Watch | None,
           broker: EmbeddedBroker) -> None:
    """A part's end: its executors killed, its reader closed, its broker stopped."""
    for e in executors:
        e.kill()
    if watch is not None:
        watch.close()
    broker.stop()


def serial(tmp: Path, tasks: int, latency_s: float,
           profile: Path | None = None) -> dict[str, Any]:
    """One task at a time through the executor process (an idle stack, the fake provider
    answering after `latency_s`): dispatch published -> its TaskCompleted committed and read
    (read_committed, as a user reads it), minus the model time; and dispatched -> TaskStarted
    read. The executor's per-call overhead: the claim, the journal, the audit events, the
    outcome's transaction and the reads."""
    out: dict[str, Any] = {"tasks": tasks, "latency_s": latency_s}
    broker = EmbeddedBroker(tmp / "broker")
    broker.start()
    watch: Watch | None = None
    executor: ExecutorProc | None = None
    try:
        settings = Settings(kafka_bootstrap=broker.bootstrap)
        ensure_topics(settings.client_config(), load_topics(settings.topics_file))
        with _provider(latency_s) as port:
            env = _executor_env(broker, tmp, port, "bench-serial", 4)
            watch = Watch(settings, poll_s=0.005)
            producer = EventProducer(settings)
            executor = ExecutorProc(env, tmp)
            executor.start()
            executor.wait_log("parallel processor started", 240)
            for i in range(3):  # warm-up: group join, SDK client, connections
                producer.send([dispatch(f"warm-{i}", f"WARM {i}", None, 2)])
                if not _wait(lambda i=i: f"warm-{i}" in watch.outcome, 300):
                    raise RuntimeError("the warm-up attempt got no outcome in 300 s")
            spy = _spy(executor.proc.pid, profile / "serial.txt") if profile else None  # type: ignore[union-attr]
            extra, started = [], []
            for i in range(tasks):
                task = f"serial-{i}"
                t0 = time.monotonic()
                producer.send([dispatch(task, f"SERIAL {task}", None, 2)])
                if not _wait(lambda task=task: task in watch.outcome, 120, 0.002):
                    raise RuntimeError(f"{task}: no outcome in 120 s")
                with watch._lock:
                    done, _ = watch.outcome[task]
                    st = watch.started.get(task)
                extra.append((done - t0 - latency_s) * 1000)
                if st is not None:
                    started.append((st - t0) * 1000)
            _stop_spy(spy)
            if profile:
                out["profile"] = top_frames(profile / "serial.txt")
        out.update({"overhead_p50_ms": pct(extra, 50), "overhead_p90_ms": pct(extra, 90),
                    "ratio_p50": (latency_s * 1000 + pct(extra, 50)) / (latency_s * 1000),
                    "dispatched_to_started_p50_ms": pct(started, 50),
                    "dispatched_to_started_p90_ms": pct(started, 90)})
    finally:
        _close([executor] if executor is not None else [], watch, broker)
    out["loadavg"] = [round(x, 1) for x in os.getloadavg()]
    return out


def rebalance_cancels(tmp: Path, cancels: int, latency_s: float,
                      attempts: int | None = None) -> dict[str, Any]:
    """Cancel while rebalancing: executor A runs `attempts` (default 2 x `cancels`) attempts
    (model calls of `latency_s`, longer than the part), then executor B starts in the same
    group (A's partitions revoked, shared out again), and from B's spawn `cancels`
    TaskCancelled for A's running attempts are published: half while B starts (spread over
    A's own start-up time), half 50 ms apart from B's ready (its join, A's revocation). Cancel ->
    TaskFailed(cancelled) read, p50 / p99 / max, its stages in A's log, when each cancel came
    relative to the rebalance, and the billing check (B re-reads the dispatches A has not
    committed - its running attempts - and must not call the model for them)."""
    attempts = max(cancels, attempts or 2 * cancels)
    out: dict[str, Any] = {"cancels": cancels, "attempts": attempts, "latency_s": latency_s}
    broker = EmbeddedBroker(tmp / "broker")
    broker.start()
    watch: Watch | None = None
    execs: list[ExecutorProc] = []
    try:
        settings = Settings(kafka_bootstrap=broker.bootstrap)
        ensure_topics(settings.client_config(), load_topics(settings.topics_file))
        with _provider(latency_s) as port:
            watch = Watch(settings)
            producer = EventProducer(settings)
            for name in ("a", "b"):
                (tmp / name).mkdir()
                execs.append(ExecutorProc(_executor_env(
                    broker, tmp / name, port, f"bench-rebalance-{name}", attempts,
                    FLEETPLANE_MODEL_TIMEOUT_S=str(latency_s * 2)), tmp / name))
            a, b = execs
            spawned = a.start()
            startup = a.wait_log("parallel processor started") - spawned
            producer.send([dispatch("warm", "WARM", None, 2)])
            if not _wait(lambda: "warm" in watch.outcome, 300):
                raise RuntimeError("the warm-up attempt got no outcome in 300 s")
            hold = {f"hold-{i}" for i in range(attempts)}
            producer.send([dispatch(t, f"HOLD {t}", None, 2) for t in sorted(hold)],
                          timeout_s=120)
            if not _wait(lambda: len(calls_per_task(port, "HOLD ")) >= len(hold), 120):
                raise RuntimeError("A's attempts did not all call the model in 120 s")
            targets = random.Random(7).sample(sorted(hold), cancels)
            b_spawned = b.start()
            # half of them while B starts (spread over A's start-up time, until B is ready),
            # the rest 50 ms apart from B's ready: its join and the rebalance come then
            half, gap = cancels // 2, startup / max(1, cancels // 2)

            def ready() -> bool:
                return "parallel processor started" in b.log_path.read_text(errors="replace")
            sent: dict[str, float] = {}
            for i, t in enumerate(targets):
                if i == half:
                    _wait(ready, 120, 0.01)
                producer.send([ev.TaskCancelled(task_id=t, team="platform",
                                                reason="bench: cancel while rebalancing")])
                sent[t] = time.monotonic()
                if i < half - 1:
                    _wait(ready, gap - (time.monotonic() - sent[t]), 0.01)
                else:
                    time.sleep(0.05)
            b.wait_log("partitions assigned", 120)
            _wait(lambda: all(t in watch.outcome for t in targets), 60)
            time.sleep(3.0)  # B has handled the dispatches it re-read
            # the rebalance, from B's spawn: B ready, B assigned; A revoked, A assigned again
            marks = {"b_ready": _log_time(b.log_path, "parallel processor started"),
                     "b_assigned": _log_time(b.log_path, "partitions assigned"),
                     "a_revoked": _log_time(a.log_path, "partitions revoked", b_spawned),
                     "a_assigned": _log_time(a.log_path, "partitions assigned", b_spawned)}
            out["rebalance_s"] = {k: None if v is None else round(v - b_spawned, 2)
                                  for k, v in marks.items()}
            settled = max((v for k, v in marks.items() if k != "b_ready" and v is not None),
                          default=b_spawned)
            revoked = marks["a_revoked"] or settled
            out["sent_s"] = [round(min(sent.values()) - b_spawned, 2),
                             round(max(sent.values()) - b_spawned, 2)]
            out["sent_when"] = dict(Counter(
                "B starting" if marks["b_ready"] and at < marks["b_ready"] else
                "B joining" if at < revoked else
                "revocation -> settled" if at <= settled else "after settled"
                for at in sent.values()))
            out["cancel"] = cancel_figures(sent, watch, a.log_path)
            # the cancels published from 1 s before A's revocation to 1 s after the settling
            near = {t: at for t, at in sent.items() if revoked - 1.0 <= at <= settled + 1.0}
            out["cancel_near_revocation"] = cancel_figures(near, watch, a.log_path)
            # what B did with the dispatches it re-read (A's running attempts, uncommitted)
            out["b_reread"] = {event: sum(1 for t in _log_times(b.log_path, event) if t in hold)
                               for event in ("dispatch not run: the attempt's lease is live on "
                                             "another executor",
                                             "dispatch not run: the attempt already has an "
                                             "outcome",
                                             "dispatch not run: the attempt was claimed before "
                                             "and interrupted", "attempt failed")}
            per_task = calls_per_task(port, "HOLD ")
            with watch._lock:
                not_started = sum(1 for t in hold if t not in watch.started)
            out["billing"] = {"calls": sum(per_task.values()),
                              "billed_twice": sum(1 for n in per_task.values() if n > 1),
                              "attempts_billed_twice": sorted(
                                  t for t, n in per_task.items() if n > 1)[:10],
                              "not_started": not_started}
            producer.close()
    finally:
        _close(execs, watch, broker)
    out["loadavg"] = [round(x, 1) for x in os.getloadavg()]
    return out


class RemoteFake:
    """The fake provider of `_provider` (a process of its own) as bench.executor uses one: its
    HTTP server does not share the GIL with the loop it answers, as a real provider would not."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"

    def set_script(self, script: dict[str, Any]) -> None:
        _set_script(self.port, script)


def mixed(tasks: int, slots: int, durations: list[float], claim_in_loop: bool | None = None,
          profile: Path | None = None) -> dict[str, Any]:
    """The mixed part. `claim_in_loop` None: the setting's default; `profile`: py-spy (only the
    thread holding the GIL) from the burst until every slot has been filled once."""
    begin = Settings().executor_claim_in_loop if claim_in_loop is None else claim_in_loop

    def at_burst() -> Any:
        """From the burst until every slot was filled once: CPU per thread kind (this
        process: the loop, its slots, librdkafka's threads) and, with `profile`, py-spy."""
        path, proc = None, None
        if profile is not None:
            path = profile / f"first-fill-{'loop' if begin else 'slots'}-{time.time():.0f}.txt"
            proc = _spy(os.getpid(), path, gil=True, rate=1000)
            time.sleep(0.5)  # py-spy attached before the burst
        before, t0 = thread_cpu(os.getpid()), time.monotonic()

        def stop() -> None:
            wall, after = time.monotonic() - t0, thread_cpu(os.getpid())
            summary["first_fill_cpu"] = {"wall_s": round(wall, 3),
                                         **cpu_split(before, after, wall)}
            summary["first_fill_busiest_threads"] = busiest_threads(os.getpid(), before,
                                                                    after, wall, 0.02)
            if path is not None:
                _stop_spy(proc)
                summary["profile"] = top_frames(path, 25)
        return stop

    summary: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, _provider(1.0) as port:
        r = mixed_loop(RemoteFake(port), Path(tmp), tasks, slots,  # type: ignore[arg-type]
                       durations, 50, "parallel", begin=begin, at_burst=at_burst)
    r.update(summary, claim_in_loop=begin)
    r["loadavg"] = [round(x, 1) for x in os.getloadavg()]
    r.pop("timeline", None)
    return r


def scenario(console: Console, quick: bool = False, **overrides: Any) -> dict[str, Any]:
    """Both parts; returns the figures (printed as a table)."""
    size = {**(QUICK if quick else FULL), **{k: v for k, v in overrides.items()
                                             if v is not None}}
    latency_s = float(size.get("latency_s") or 30.0)
    result: dict[str, Any] = {"quick": quick, "size": size}
    result["hold"] = {}
    if not size.get("skip_hold"):
        console.print(f"concurrency: hold/cancel/kill with {size['attempts']} attempts "
                      f"({latency_s:g} s calls) ...")
        with tempfile.TemporaryDirectory() as tmp:
            profile = Path(size["profile"]) if size.get("profile") else None
            if profile:
                profile.mkdir(parents=True, exist_ok=True)
            result["hold"] = hold_cancel_kill(Path(tmp), int(size["attempts"]), latency_s,
                                              int(size["cancels"]), int(size["start_cancels"]),
                                              float(size.get("measure_s") or 10.0), profile)
    if size.get("serial"):
        console.print(f"concurrency: {size['serial']} tasks one at a time, "
                      f"{size.get('serial_latency_s') or 0.2:g} s calls ...")
        with tempfile.TemporaryDirectory() as tmp:
            profile = Path(size["profile"]) if size.get("profile") else None
            if profile:
                profile.mkdir(parents=True, exist_ok=True)
            result["serial"] = serial(Path(tmp), int(size["serial"]),
                                      float(size.get("serial_latency_s") or 0.2), profile)
        console.print(result["serial"])
    if size.get("rebalance_cancels"):
        console.print(f"concurrency: {size['rebalance_cancels']} cancels while a second "
                      "executor joins ...")
        with tempfile.TemporaryDirectory() as tmp:
            result["rebalance"] = rebalance_cancels(
                Path(tmp), int(size["rebalance_cancels"]),
                float(size.get("rebalance_latency_s") or 120.0), size.get("rebalance_attempts"))
    if not size.get("skip_mixed"):
        durations = [float(x) for x in str(size["mixed_durations"]).split(",")]
        console.print(f"concurrency: mixed, {size['mixed_tasks']} tasks of {durations} s "
                      f"through {size['mixed_slots']} slots ...")
        profile = Path(size["profile"]) if size.get("profile") else None
        if profile:
            profile.mkdir(parents=True, exist_ok=True)
        claim = size.get("claim_in_loop")
        result["mixed"] = mixed(int(size["mixed_tasks"]), int(size["mixed_slots"]), durations,
                                None if claim is None else claim == "on", profile)
    console.print(table(result))
    profiles = dict(result["hold"].get("profile", {}))
    if result.get("mixed", {}).get("profile"):
        profiles["mixed first fill (GIL holder)"] = result["mixed"]["profile"]
    for phase, prof in profiles.items():
        for kind in ("threads", "own", "inclusive"):
            console.print(f"py-spy {phase} ({prof.get('samples')} samples), {kind}: "
                          + "; ".join(f"{f} {v:.0%}" for f, v in prof.get(kind, [])[:8]))
    return result


def table(result: dict[str, Any]) -> Table:
    t = Table(title="executor concurrency (one process)")
    for col in ("figure", "value", "target"):
        t.add_column(col)
    h = result["hold"]
    if h:
        hold_rows(t, h)
    if "mixed" in result:
        m = result["mixed"]
        t.add_row(f"mixed: {m['tasks']} tasks, {m['slots']} slots: slot utilization while "
                  "queued (after the first fill)",
                  f"{m['slot_utilization_while_queued']:.1%} "
                  f"({m['slot_utilization_while_queued_after_ramp']:.1%})", ">= 95 %")
        t.add_row("mixed: free slot -> filled p50 / p99", f"{m['fill_p50_ms']:.1f} / "
                  f"{m['fill_p99_ms']:.1f} ms", "p99 <= 100 ms")
        if m.get("refill_p99_ms") is not None:
            t.add_row("mixed: of which the first fill p99 / a freed slot refilled p50 / p99",
                      f"{m['fill_first_p99_ms']:.1f} / {m['refill_p50_ms']:.1f} / "
                      f"{m['refill_p99_ms']:.1f} ms", "")
        if m.get("handoff_p99_ms") is not None:
            t.add_row("mixed: free slot -> filled, not counting the starts ahead of it "
                      "(hand-off) p50 / p99; first fill p99; first fill starts per s",
                      f"{m['handoff_p50_ms']:.1f} / {m['handoff_p99_ms']:.1f} ms; "
                      f"{m['handoff_first_p99_ms']:.1f} ms; "
                      f"{m['first_fill_starts_per_s'] or float('nan'):.0f}/s", "p99 <= 100 ms")
        if m.get("first_fill_cpu"):
            t.add_row("mixed: the first fill's wall and cores per thread kind (this process)",
                      str(m["first_fill_cpu"]), "")
        t.add_row("mixed: dispatched -> started, slot free, p50 / p99",
                  f"{m['dispatched_to_started_p50_ms']:.1f} / "
                  f"{m['dispatched_to_started_p99_ms']:.1f} ms", "")
        t.add_row("mixed: wall / ideal", f"{m['burst_wall_s']:.1f} / {m['ideal_wall_s']:.1f} s",
                  "")
        t.add_row("mixed: load average at the end", f"{m.get('loadavg')}", "")
    if "rebalance" in result:
        r = result["rebalance"]
        c = r["cancel"]
        t.add_row(f"cancel while rebalancing ({c['n']} of {r['attempts']} on A, B joins): "
                  "stopped, p50 / p99 / max", f"{c['stopped']}, {c['p50_ms']} / {c['p99_ms']}"
                  f" / {c['max_ms']} ms", "p99 <= 2 s")
        t.add_row("  of which: received / stopped / committed+read, p50 / p99",
                  "; ".join(f"{k} {v[0]} / {v[1]} ms" for k, v in c["stages"].items()), "")
        n = r["cancel_near_revocation"]
        t.add_row(f"  of which sent within 1 s of A's revocation ({n['n']}): stopped, p50 / p99"
                  " / max", f"{n['stopped']}, {n['p50_ms']} / {n['p99_ms']} / {n['max_ms']} ms",
                  "")
        t.add_row("  the rebalance (s after B's spawn); cancels sent (s), when",
                  f"{r['rebalance_s']}; {r['sent_s']}, {r['sent_when']}", "")
        t.add_row("  billed twice (fake provider call log) / calls; B's re-read dispatches",
                  f"{r['billing']['billed_twice']} / {r['billing']['calls']}; "
                  f"{r['b_reread']}", "0")
        t.add_row("  load average at the end", f"{r['loadavg']}", "")
    if h:
        t.add_row("load average", f"{h.get('loadavg')}", "")
    return t


def hold_rows(t: Table, h: dict[str, Any]) -> None:
    t.add_row("start-up (spawn -> taking dispatches) / restart", f"{h.get('startup_s')} s / "
              f"{h.get('restart_startup_s')} s", "")
    t.add_row(f"peak running of {h['attempts']} ({h['latency_s']:g} s calls)",
              f"{h.get('peak_running')} (all started after {h.get('all_started_s')} s; "
              f"{h.get('threads_at_burst')} threads when they came)", ">= 2,000")
    ff = h.get("first_fill_ms") or {}
    t.add_row("first fill: dispatch produced -> claimed (TaskStarted.occurred_at) min / p50 / "
              "p99", f"{ff.get('min', float('nan')):.0f} / {ff.get('p50', float('nan')):.0f} / "
              f"{ff.get('p99', float('nan')):.0f} ms (n={ff.get('n')}); not counting the claims "
              f"ahead of it p99 {ff.get('handoff_p99', float('nan')):.0f} ms", "p99 <= 100 ms")
    t.add_row("model calls the provider received by then",
              f"{h.get('provider_calls_while_waiting')}", "= running")
    t.add_row("executor CPU while they wait", f"{h.get('cpu_cores_waiting')} cores "
              f"({h.get('waiting_while_measured')} waiting)", "<= 0.3 core")
    t.add_row("  of which, per thread kind (cores)", str(h.get("cpu_by_thread_waiting")), "")
    t.add_row("executor RSS / threads", f"{h.get('rss_mib')} MiB (idle {h.get('rss_idle_mib')})"
              f" / {h.get('threads')}", "<= 1.5 GiB")
    t.add_row("per 1,000 waiting attempts", f"{h.get('cpu_per_1000_waiting')} cores, "
              f"{h.get('rss_per_1000_waiting_mib')} MiB", "")
    if "cancel_busy" in h:
        c = h["cancel_busy"]
        t.add_row(f"cancel while busy ({c['n']}): stopped, p50 / p99 / max",
                  f"{c['stopped']}, {c['p50_ms']} / {c['p99_ms']} / {c['max_ms']} ms",
                  "p99 <= 2 s")
        if c.get("stages"):
            t.add_row("  of which: received / stopped / committed+read, p50 / p99",
                      "; ".join(f"{k} {v[0]} / {v[1]} ms" for k, v in c["stages"].items()), "")
    if "cancel_starting" in h:
        c = h["cancel_starting"]
        t.add_row(f"cancel while starting ({c['n']}): stopped, p50 / p99 (start-up included)",
                  f"{c['stopped']}, {c['p50_ms']} / {c['p99_ms']} ms (p99 after ready "
                  f"{c['after_ready_p99_ms']} ms)", "p99 <= 2 s")
        if c.get("stages"):
            t.add_row("  after ready: partitions assigned / refused p50, p99 / committed+read "
                      "p50, p99", str(c["stages"]), "")
    if "recovery" in h:
        r, b = h["recovery"], h["billing"]
        t.add_row(f"SIGKILL with {h['killed_in_flight']} in flight: every attempt an outcome "
                  "after", f"{r['recover_s']} s; without outcome {r['without_outcome']}; "
                  f"{r['outcomes']}", "all terminal")
        t.add_row("attempts billed twice (fake provider call log)",
                  f"{b['billed_twice']} of {b['calls']} calls; cancelled-while-starting "
                  f"called {b['cancelled_while_starting_called']}", "0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--attempts", type=int)
    ap.add_argument("--latency-s", type=float)
    ap.add_argument("--cancels", type=int)
    ap.add_argument("--start-cancels", type=int)
    ap.add_argument("--measure-s", type=float)
    ap.add_argument("--mixed-tasks", type=int)
    ap.add_argument("--mixed-slots", type=int)
    ap.add_argument("--mixed-durations")
    ap.add_argument("--skip-mixed", action="store_true")
    ap.add_argument("--claim-in-loop", choices=["on", "off"], help="mixed part: claims in the "
                    "poll loop or in the slot threads (default: FLEETPLANE_EXECUTOR_CLAIM_IN_LOOP)")
    ap.add_argument("--serial", type=int, help="also N tasks one at a time: the executor's "
                    "per-call overhead (dispatched -> completed minus the model time)")
    ap.add_argument("--serial-latency-s", type=float)
    ap.add_argument("--rebalance-cancels", type=int, help="also N cancels while a second "
                    "executor joins the group (A runs 2N attempts; 0: skip)")
    ap.add_argument("--rebalance-latency-s", type=float)
    ap.add_argument("--rebalance-attempts", type=int, help="attempts running on A (2N)")
    ap.add_argument("--skip-hold", action="store_true", help="the mixed part only")
    ap.add_argument("--profile", help="directory: py-spy profiles of the executor (ramp, "
                    "waiting), collapsed stacks")
    args = ap.parse_args()
    from fleetplane.core.logging import configure_logging

    configure_logging("bench", "ERROR", json=False)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    console = Console(width=160)
    overrides = {k: v for k, v in vars(args).items() if k != "quick"}
    result = {"machine": machine(), "concurrency": scenario(console, args.quick, **overrides)}
    console.print(f"written to {write_result('concurrency', result)}")


if __name__ == "__main__":
    main()
