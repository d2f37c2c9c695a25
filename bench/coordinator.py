"""Coordinator admission benchmark: decisions per second and decision latency at 1,000 queued
tasks, and the scheduler table's recovery time after SIGKILL.

    python -m bench.coordinator [--queued 1000] [--events 400] [--no-broker]

1. In process (the pure scheduler, no I/O): 1,000 tasks queued behind team quotas and
   overlapping write scopes (3 teams, 2 repositories, fleet capacity 64); then completions and
   new submissions alternate; each ``Scheduler.apply`` is timed (its admission pass included).
2. On the real broker (embedded noida-db, the coordinator as its own process): the same 1,000
   queued tasks, then completions published one at a time; latency = broker timestamp of the
   completion -> broker timestamp of the TaskDispatched it freed; throughput = decisions
   (TaskDispatched + TaskHeld) per second while a backlog of completions drains. Then SIGKILL,
   restart, and the table's recovery time from the coordinator's stats page.
Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from bench.measure import bench_dir
from fleetplane.coordinator.scheduler import AdmissionPolicy, Scheduler
from fleetplane.coordinator.world import World
from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import REPO_ROOT, Settings
from fleetplane.core.teams import parse_teams
from fleetplane.core.topics import DISPATCH, LIFECYCLE, ensure_topics, load_topics
from fleetplane.infra.broker import EmbeddedBroker, free_port

SCOPES = ["src/**", "src/a/*.py", "src/a/x.py", "src/b/**", "docs/**", "docs/*.md", "**/*.md",
          "tests/test_[a-m]*.py", "tests/test_[n-z]*.py", "lib/?.py"]
TEAMS_RAW: dict[str, dict[str, Any]] = {"defaults": {"max_running": 20, "budget_usd": 1e9},
             "teams": {"pay": {"weight": 2.0}, "search": {}, "plat": {"max_running": 30}}}
CAPACITY = 64


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def routed(i: int, rng: random.Random, run: str) -> ev.TaskRouted:
    spec = ev.TaskSpec(name=f"b{i}", task_type="refactor", prompt="p",
                       repository=f"{run}-r{i % 2}",
                       write_scope=[*rng.sample(SCOPES, 1), f"own/{i}/**"],
                       priority=rng.choice(["low", "normal", "high"]))
    return ev.TaskRouted(task_id=f"{run}-{i}", team=f"{run}-" + rng.choice(["pay", "search",
                                                                             "plat"]),
                         spec=spec, attempt=1, model="m", provider="anthropic",
                         tier="standard", reason="bench")


def in_process(queued: int, events: int) -> dict[str, Any]:
    rng = random.Random(1)
    teams = parse_teams({"defaults": TEAMS_RAW["defaults"], "teams": {
        f"x-{k}": v for k, v in TEAMS_RAW["teams"].items()}})
    scheduler, world = Scheduler(AdmissionPolicy(teams=teams, max_running=CAPACITY)), World()
    for i in range(queued + CAPACITY):
        scheduler.apply(world, routed(i, rng, "x"))
    lat: list[float] = []
    decisions = 0
    n = queued + CAPACITY
    t0 = time.perf_counter()
    for k in range(events):
        if k % 2 == 0:
            tid = rng.choice(sorted(world.active))
            st = world.active[tid]
            event: ev.Event = ev.TaskCompleted(task_id=tid, team=st.team, attempt=st.attempt,
                                               model="m", output="o", cost_usd=0.001,
                                               duration_ms=1)
        else:
            event = routed(n, rng, "x")
            n += 1
        start = time.perf_counter()
        out = scheduler.apply(world, event)
        lat.append((time.perf_counter() - start) * 1000)
        decisions += sum(isinstance(e, ev.TaskDispatched | ev.TaskHeld) for e in out)
    elapsed = time.perf_counter() - t0
    return {"queued": len(world.waiting), "active": len(world.active), "events": events,
            "events_per_s": round(events / elapsed, 1),
            "decisions_per_s": round(decisions / elapsed, 1),
            "apply_ms_p50": round(pct(lat, 0.5), 3), "apply_ms_p99": round(pct(lat, 0.99), 3)}


class Coordinator:
    def __init__(self, bootstrap: str, data: Path) -> None:
        self.port = free_port()
        teams = data / "teams.yaml"
        teams.write_text(json.dumps({"defaults": TEAMS_RAW["defaults"], "teams": {
            f"{RUN}-{k}": v for k, v in TEAMS_RAW["teams"].items()}}))
        self.env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "services"),
                    "FLEETPLANE_KAFKA_BOOTSTRAP": bootstrap, "FLEETPLANE_DATA_DIR": str(data),
                    "FLEETPLANE_COORDINATOR_WEB_PORT": str(self.port),
                    "FLEETPLANE_INSTANCE_ID": "bench", "FLEETPLANE_TEAMS_FILE": str(teams),
                    "FLEETPLANE_COORDINATOR_MAX_RUNNING": str(CAPACITY),
                    "FLEETPLANE_LOG_LEVEL": "WARNING"}
        self.data = data
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        t0 = time.monotonic()
        log = open(self.data / "coordinator.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "fleetplane.coordinator.main"],
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT)
        while self.stats().get("ready_s") is None:
            time.sleep(0.1)
        return time.monotonic() - t0

    def stats(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}/coordinator/stats/", timeout=2) as r:
                data: dict[str, Any] = json.load(r)
                return data
        except OSError:
            return {}

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


RUN = uuid.uuid4().hex[:6]


def tail(settings: Settings, topics: list[str]) -> Consumer:
    c = Consumer({**settings.consumer_config(f"bench-{uuid.uuid4().hex}"),
                  "enable.auto.commit": False})
    tps = []
    for topic in topics:
        for p in c.list_topics(topic, timeout=10).topics[topic].partitions:
            _, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            tps.append(TopicPartition(topic, p, high))
    c.assign(tps)
    return c


def on_broker(queued: int, events: int) -> dict[str, Any]:
    tmp = bench_dir("bench-coordinator-")
    broker = EmbeddedBroker(tmp / "broker")
    broker.start()
    coordinator = Coordinator(broker.bootstrap, tmp)
    try:
        settings = Settings(kafka_bootstrap=broker.bootstrap)
        ensure_topics(settings.client_config(), load_topics(settings.topics_file))
        coordinator.start()
        serde = default_serde()
        consumer = tail(settings, [DISPATCH, LIFECYCLE])
        producer = EventProducer(settings)
        rng = random.Random(2)
        tasks = [routed(i, rng, RUN) for i in range(queued + CAPACITY)]
        t_routed = time.monotonic()
        producer.send(tasks)
        dispatched: dict[str, ev.TaskDispatched] = {}
        decided: set[str] = set()
        deadline = time.monotonic() + 300
        while len(decided) < len(tasks) and time.monotonic() < deadline:
            for m in consumer.consume(500, 0.2):
                if m.error() is None:
                    e = serde.decode(m.value() or b"")
                    if isinstance(e, ev.TaskDispatched | ev.TaskHeld):
                        decided.add(e.task_id)
                    if isinstance(e, ev.TaskDispatched):
                        dispatched[e.task_id] = e
        routed_s = time.monotonic() - t_routed
        queued_now = len(tasks) - len(dispatched)
        # latency: one completion at a time -> the dispatch it frees (broker timestamps)
        latencies: list[float] = []
        running = dict(dispatched)
        for _ in range(min(events, 100)):
            tid = sorted(running)[0]
            d = running.pop(tid)
            done = ev.TaskCompleted(task_id=tid, team=d.team, attempt=d.attempt, model="m",
                                    output="o", cost_usd=0.0, duration_ms=1)
            sent = time.time()
            producer.send([done])
            got = None
            end = time.monotonic() + 30
            while got is None and time.monotonic() < end:
                for m in consumer.consume(100, 0.05):
                    if m.error() is None:
                        e = serde.decode(m.value() or b"")
                        if isinstance(e, ev.TaskDispatched) and e.causation_id == done.event_id:
                            running[e.task_id] = e
                            got = m.timestamp()[1] / 1000
            if got is not None:
                latencies.append((got - sent) * 1000)
        # throughput: a backlog of completions at once
        batch = []
        for tid in sorted(running)[: min(CAPACITY, events)]:
            d = running.pop(tid)
            batch.append(ev.TaskCompleted(task_id=tid, team=d.team, attempt=d.attempt,
                                          model="m", output="o", cost_usd=0.0, duration_ms=1))
        before = coordinator.stats()
        t0 = time.monotonic()
        producer.send(batch)
        decisions = 0
        quiet = time.monotonic()
        while time.monotonic() - quiet < 2.0:
            for m in consumer.consume(500, 0.1):
                if m.error() is None and m.topic() in (DISPATCH, LIFECYCLE):
                    e = serde.decode(m.value() or b"")
                    if isinstance(e, ev.TaskDispatched | ev.TaskHeld):
                        decisions += 1
                        quiet = time.monotonic()
        drained = quiet - t0
        after = coordinator.stats()
        # recovery after SIGKILL
        rows = after.get("rows")
        coordinator.kill()
        ready_wall = coordinator.start()
        st = coordinator.stats()
        consumer.close()
        producer.close()
        return {"queued": queued_now,
                "routed_backlog": len(tasks), "routed_backlog_decided_s": round(routed_s, 2),
                "routed_decisions_per_s": round(len(tasks) / routed_s, 1),
                "latency_ms_p50": round(pct(latencies, 0.5), 1),
                "latency_ms_p99": round(pct(latencies, 0.99), 1), "samples": len(latencies),
                "backlog_completions": len(batch), "decisions": decisions,
                "completion_decisions_per_s": round(decisions / drained, 1) if drained else None,
                "records_per_s": round((after["processed"] - before["processed"]) / drained, 1)
                if drained else None,
                "table_rows": rows, "restart_ready_s": round(ready_wall, 2),
                "recovery_s": st.get("recovery_s"), "recovered_rows": st.get("recovered_rows")}
    finally:
        coordinator.stop()
        broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queued", type=int, default=1000)
    parser.add_argument("--events", type=int, default=400)
    parser.add_argument("--no-broker", action="store_true")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}")
    print("in process:", json.dumps(in_process(args.queued, args.events)))
    if not args.no_broker:
        print("on the broker:", json.dumps(on_broker(args.queued, args.events)))


if __name__ == "__main__":
    main()
