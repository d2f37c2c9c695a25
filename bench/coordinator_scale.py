"""The scheduler at the issue's size, in process (no I/O): decision latency and events/s with
100,000 queued tasks over 500 repositories and 20 teams, and the time to rebuild the scheduler's
state from 100,000 table rows (what a restarted or standby coordinator does after reading the
changelog).

    python -m bench.coordinator_scale [--queued 100000] [--repositories 500] [--teams 20]
                                      [--capacity 500] [--events 20000]

Workload: each task writes one module of its repository (``mod<k>/**``, 40 modules), a file
(``mod<k>/f<j>.py``), or, one task in 25, a broad scope (``**`` or ``mod<k>/**`` and ``docs/**``);
priorities low/normal/high; team quotas 25..40 and weights 1..3; fleet capacity 500. After the
queue is filled, completions of running tasks and new submissions alternate (every 100th event a
timer tick, every 10th a heartbeat); each ``Scheduler.apply`` is timed with its admission pass
and the serialisation of the rows it changed (``World.take_rows``, once per event as in the
coordinator). Figures, not assertions."""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import time
from typing import Any

from fleetplane.coordinator.scheduler import TICK, AdmissionPolicy, Scheduler
from fleetplane.coordinator.world import World, settle_heap
from fleetplane.core import events as ev
from fleetplane.core.teams import parse_teams


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


class Workload:
    def __init__(self, repositories: int, teams: int, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.repositories = repositories
        self.teams = [f"team{i:02d}" for i in range(teams)]
        self.n = 0

    def policy(self, capacity: int) -> AdmissionPolicy:
        teams = parse_teams({"defaults": {"max_running": 25, "budget_usd": 1e12},
                             "teams": {t: {"max_running": 25 + 5 * (i % 4),
                                           "weight": 1.0 + i % 3}
                                       for i, t in enumerate(self.teams)}})
        return AdmissionPolicy(teams=teams, max_running=capacity,
                               heartbeat_timeout_ms=3_600_000)

    def scope(self) -> list[str]:
        rng, k = self.rng, self.rng.randrange(40)
        r = rng.random()
        if r < 0.04:
            return rng.choice([["**"], [f"mod{k}/**", "docs/**"]])
        if r < 0.40:
            return [f"mod{k}/f{rng.randrange(20)}.py"]
        return [f"mod{k}/**"]

    def routed(self, at: Any) -> ev.TaskRouted:
        i, rng = self.n, self.rng
        self.n += 1
        spec = ev.TaskSpec(name=f"s{i}", task_type="refactor", prompt="p",
                           repository=f"repo-{rng.randrange(self.repositories):03d}",
                           write_scope=self.scope(),
                           priority=rng.choice(["low", "normal", "normal", "high"]))
        return ev.TaskRouted(task_id=f"s{i:07d}", team=rng.choice(self.teams), spec=spec,
                             attempt=1, model="m", provider="anthropic", tier="standard",
                             reason="bench", occurred_at=at)


def run(queued: int, repositories: int, teams: int, capacity: int,
        events: int) -> dict[str, Any]:
    from datetime import UTC, datetime, timedelta
    w = Workload(repositories, teams)
    scheduler, world = Scheduler(w.policy(capacity)), World()
    now = datetime(2026, 3, 1, tzinfo=UTC)
    gc.collect()
    gc.freeze()
    t0 = time.perf_counter()
    for _ in range(queued + capacity):
        now += timedelta(microseconds=100)
        scheduler.apply(world, w.routed(now))
    fill_s = time.perf_counter() - t0
    world.take_rows()
    gc.collect()
    settle_heap()  # as the coordinator does after restoring its table
    lat: list[float] = []
    cpu: list[float] = []  # CPU time of the same calls: what a machine of our own would show
    decisions = 0
    apply_cpu = 0.0  # CPU of apply alone (the figure before rows were timed per event)
    rng = random.Random(2)
    active = sorted(world.active)
    t0 = time.perf_counter()
    for k in range(events):
        now += timedelta(milliseconds=1)
        event: ev.Event
        if k % 100 == 99:
            event = ev.ControlCommand(task_id="", team="", command=TICK, occurred_at=now)
        elif k % 10 == 9 and active:
            tid = active[rng.randrange(len(active))]
            st = world.tasks[tid]
            event = ev.TaskHeartbeat(task_id=tid, team=st.team, attempt=st.attempt,
                                     executor_id="x", occurred_at=now)
        elif k % 2 == 0 and world.active:
            if not active or active[-1] not in world.active:
                active = sorted(world.active)
            tid = active.pop(rng.randrange(len(active)))
            st = world.tasks[tid]
            event = ev.TaskCompleted(task_id=tid, team=st.team, attempt=st.attempt,
                                     model="m", output="o", cost_usd=0.0001, duration_ms=1,
                                     occurred_at=now)
        else:
            event = w.routed(now)
        start, cpu_start = time.perf_counter(), time.thread_time()
        out = scheduler.apply(world, event)
        cpu_applied = time.thread_time()
        world.take_rows()  # the changed rows serialised, as the coordinator does per record
        lat.append((time.perf_counter() - start) * 1000)
        cpu.append((time.thread_time() - cpu_start) * 1000)
        apply_cpu += cpu_applied - cpu_start
        decisions += sum(isinstance(e, ev.TaskDispatched | ev.TaskHeld) for e in out)
        for e in out:
            if isinstance(e, ev.TaskDispatched):
                active.append(e.task_id)
    elapsed = time.perf_counter() - t0
    busy = sum(cpu) / 1000
    deciding = sum(lat) / 1000  # wall time inside apply + take_rows
    # restore: the rows of every task (and the fleet row) -> a World with its indexes
    for tid in list(world.tasks):
        world.put(world.tasks[tid])
    world._fleet_dirty = True
    rows = world.take_rows()
    gc.collect()
    t0, cpu0 = time.perf_counter(), time.thread_time()
    restored = World.load(rows)
    restore_s, restore_cpu_s = time.perf_counter() - t0, time.thread_time() - cpu0
    assert len(restored.tasks) == len(world.tasks)
    return {"queued": len(world.waiting), "active": len(world.active),
            "repositories": repositories, "teams": teams, "capacity": capacity,
            "fill_events_per_s": round((queued + capacity) / fill_s, 1),
            "events": events,
            # the scheduler's own rate: wall time of apply + the changed rows per event (what
            # the coordinator runs per record; the records come decoded from Kafka there)
            "events_per_s": round(events / deciding, 1),
            # the bench's loop, building each input event too (pydantic models with a TaskSpec:
            # the bench's cost, not the scheduler's; the coordinator decodes Avro instead)
            "events_per_s_with_building_inputs": round(events / elapsed, 1),
            "building_inputs_us_per_event": round((elapsed - deciding) / events * 1e6, 1),
            "decisions_per_s": round(decisions / deciding, 1),
            "apply_ms_p50": round(pct(lat, 0.5), 3), "apply_ms_p99": round(pct(lat, 0.99), 3),
            "apply_ms_max": round(max(lat), 3),
            "apply_cpu_ms_p50": round(pct(cpu, 0.5), 3),
            "apply_cpu_ms_p99": round(pct(cpu, 0.99), 3),
            "events_per_cpu_s": round(events / busy, 1) if busy else None,
            "events_per_cpu_s_apply_only": round(events / apply_cpu, 1) if apply_cpu else None,
            "restore_rows": len(rows), "restore_s": round(restore_s, 2),
            "restore_cpu_s": round(restore_cpu_s, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--repositories", type=int, default=500)
    parser.add_argument("--teams", type=int, default=20)
    parser.add_argument("--capacity", type=int, default=500)
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}")
    print("scheduler at scale:", json.dumps(run(args.queued, args.repositories, args.teams,
                                                args.capacity, args.events)))


if __name__ == "__main__":
    main()
