"""Capacity model of one scheduler, checked by simulation (docs/coordinator.md, "Capacity").

Model: a fleet of N agents running tasks of mean duration D seconds, each heartbeating every h
seconds, sends the scheduler per second

    events/s = N / h  +  k * N / D  +  1 / tick        (k ~ 5 events per task besides heartbeats:
                                                         TaskRouted, the TaskHeld it may get,
                                                         TaskStarted, the outcome, TaskDispatched
                                                         echoes do not come back; see the doc)

and one scheduler thread spends c CPU-seconds per event, so it saturates at

    N* = (1 / c - 1 / tick) / (1 / h + k / D).

The simulation drives the real ``Scheduler`` (in process, no Kafka) with such a fleet: N agents
kept busy by a backlog, exponential task durations of mean D, heartbeats every h, ticks; it
counts the events and the CPU time ``Scheduler.apply`` took per simulated second, for several
fleet sizes, fits c, and prints the model's prediction next to the measured utilisation.

    python -m bench.coordinator_capacity [--fleets 250,500,1000,2000] [--seconds 60]
                                         [--duration 120] [--heartbeat 2]
Figures, not assertions. The coordinator process adds per-record costs the scheduler does not
see (Avro decoding, the transaction, the changelog row): ``--overhead-ms`` adds a measured
per-record figure from ``make bench-coordinator`` (on the broker) to the model.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.coordinator_scale import Workload
from fleetplane.coordinator.scheduler import TICK, Scheduler
from fleetplane.coordinator.world import BEAT_PREFIX, TASK_PREFIX, World
from fleetplane.core import events as ev

TICK_S = 0.5


def simulate(fleet: int, seconds: float, duration_s: float, heartbeat_s: float,
             seed: int = 3) -> dict[str, Any]:
    w = Workload(repositories=max(50, fleet), teams=20, seed=seed)
    rng = random.Random(seed)
    policy = w.policy(fleet)
    policy = policy.__class__(**{**policy.__dict__, "teams": policy.teams.__class__(
        defaults=policy.teams.defaults.model_copy(update={"max_running": fleet}),
        teams={})})
    scheduler, world = Scheduler(policy), World()
    now = datetime(2026, 3, 1, tzinfo=UTC)
    # a backlog twice the fleet keeps every agent busy
    for _ in range(fleet * 3):
        now += timedelta(microseconds=10)
        scheduler.apply(world, w.routed(now))
    start = now
    pending: list[tuple[datetime, int, ev.Event]] = []
    n = 0

    def later(at: datetime, event: ev.Event) -> None:
        nonlocal n
        n += 1
        heapq.heappush(pending, (at, n, event))

    def react(out: list[ev.Event]) -> None:
        for e in out:
            if isinstance(e, ev.TaskDispatched):
                took = rng.expovariate(1 / duration_s)
                at = now + timedelta(seconds=0.05)
                later(at, ev.TaskStarted(task_id=e.task_id, team=e.team, attempt=e.attempt,
                                         executor_id="x"))
                k = 1
                while k * heartbeat_s < took:
                    later(at + timedelta(seconds=k * heartbeat_s), ev.TaskHeartbeat(
                        task_id=e.task_id, team=e.team, attempt=e.attempt, executor_id="x"))
                    k += 1
                later(at + timedelta(seconds=took), ev.TaskCompleted(
                    task_id=e.task_id, team=e.team, attempt=e.attempt, model="m", output="o",
                    cost_usd=0.0, duration_ms=int(took * 1000)))
                later(at + timedelta(seconds=took, milliseconds=1), w.routed(now))  # refill
            if isinstance(e, ev.TaskHeld):
                pass  # published on tasks.lifecycle; echoes are counted below

    # warm-up: the agents start (not measured)
    for d in world.active.values():
        react([ev.TaskDispatched(task_id=d.task_id, team=d.team, attempt=d.attempt,
                                 spec=d.spec, model="m", provider="p", tier="t")]
              if d.spec is not None else [])
    end = start + timedelta(seconds=seconds)
    next_tick = start
    events = echoes = completed = 0
    cpu = 0.0
    # changelog bytes: what the table gets; for heartbeats also what the whole row (the former
    # write per heartbeat) would have been
    written = {"heartbeat": 0, "other": 0}
    heartbeats = heartbeat_records = 0
    whole_rows_for_beats = 0
    while now < end:
        if pending and pending[0][0] <= next_tick:
            at, _, event = heapq.heappop(pending)
            now = max(now, at)
        else:
            now = next_tick
            event = ev.ControlCommand(task_id="", team="", command=TICK)
            next_tick = now + timedelta(seconds=TICK_S)
        event = event.model_copy(update={"occurred_at": now})
        t0 = time.thread_time()
        out = scheduler.apply(world, event)
        rows = world.take_rows()  # the changed rows, serialised for the changelog
        cpu += time.thread_time() - t0
        kind = "heartbeat" if isinstance(event, ev.TaskHeartbeat) else "other"
        if kind == "heartbeat":
            heartbeats += 1
            heartbeat_records += len(rows)
        for key, value in rows:
            written[kind] += len(key) + len(value or b"")
            if key.startswith(BEAT_PREFIX):
                row = world.tasks.get(key[len(BEAT_PREFIX):].decode())
                if row is not None:
                    whole_rows_for_beats += len(TASK_PREFIX + key[len(BEAT_PREFIX):]) \
                        + len(row.to_bytes())
        events += 1
        completed += isinstance(event, ev.TaskCompleted)
        # what the coordinator publishes on tasks.lifecycle / tasks.outcomes comes back to it
        # as input (it consumes those topics): applied and ignored, counted as events
        for e in out:
            if not isinstance(e, ev.TaskDispatched):
                t0 = time.thread_time()
                scheduler.apply(world, e)
                rows = world.take_rows()
                cpu += time.thread_time() - t0
                written["other"] += sum(len(k) + len(v or b"") for k, v in rows)
                echoes += 1
        react(out)
    total = events + echoes
    return {"fleet": fleet, "sim_s": seconds, "events": total,
            "events_per_sim_s": round(total / seconds, 1),
            "cpu_s": round(cpu, 3), "utilisation": round(cpu / seconds, 4),
            "cpu_us_per_event": round(cpu / total * 1e6, 1) if total else None,
            "tasks_completed": completed,
            "changelog_bytes_per_task": round(sum(written.values()) / completed)
            if completed else None,
            "changelog_heartbeat_share": round(written["heartbeat"] / sum(written.values()), 3)
            if sum(written.values()) else None,
            # per heartbeat: the changelog records and bytes (key + value) it costs
            "changelog_records_per_heartbeat": round(heartbeat_records / heartbeats, 3)
            if heartbeats else None,
            "changelog_bytes_per_heartbeat": round(written["heartbeat"] / heartbeats, 1)
            if heartbeats else None,
            "changelog_bytes_per_task_if_heartbeats_wrote_whole_rows": round(
                (written["other"] + whole_rows_for_beats) / completed) if completed else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fleets", default="250,500,1000,2000")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--duration", type=float, default=120.0, help="mean task seconds")
    parser.add_argument("--heartbeat", type=float, default=2.0, help="executor_heartbeat_s")
    parser.add_argument("--overhead-ms", type=float, default=0.0,
                        help="per-record cost of the process around the scheduler")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}")
    runs = [simulate(int(f), args.seconds, args.duration, args.heartbeat)
            for f in args.fleets.split(",") if f.strip()]
    total_events = sum(r["events"] for r in runs)
    c = sum(r["cpu_s"] for r in runs) / total_events + args.overhead_ms / 1000
    per_agent = sum(r["events_per_sim_s"] / r["fleet"] for r in runs) / len(runs)
    k = max(0.0, (per_agent - 1 / args.heartbeat) * args.duration)
    for r in runs:
        predicted = (r["fleet"] / args.heartbeat + k * r["fleet"] / args.duration
                     + 1 / TICK_S) * c
        r["model_utilisation"] = round(predicted, 4)
        print("simulated:", json.dumps(r))
    saturation = (1 / c - 1 / TICK_S) / (1 / args.heartbeat + k / args.duration)
    print("model:", json.dumps({
        "cpu_us_per_event": round(c * 1e6, 1), "events_per_task_besides_heartbeats": round(k, 2),
        "decisions_per_s_one_scheduler": round(1 / c),
        "heartbeat_s": args.heartbeat, "mean_task_s": args.duration,
        "saturates_at_agents": round(saturation)}))


if __name__ == "__main__":
    main()
