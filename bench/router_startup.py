"""The router's start-up (rebuild) against the history the topics keep: a figure, not a test.

Writes a fleet's history on a broker of its own: ``--tasks`` tasks spread evenly over
``--days`` days (each a TaskRouted, a TaskStarted and a TaskCompleted, timestamped at its
place in the history), and ``--held`` tasks held for budget on its first day (their TaskHeld
on tasks.lifecycle and their records on router.holds, as a router writes them). Then times
``rebuild`` in this process for each ``--lookbacks`` value (seconds; 0: the whole history, as
before stop 30) and prints the seconds, the events read per topic and the held tasks found.

    .venv/bin/python -m bench.router_startup --tasks 100000 --days 30 --held 50
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import Producer

from fleetplane.core import events as ev
from fleetplane.core.catalog import load_catalog
from fleetplane.core.kafka import event_headers
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import ensure_topics, key_for, load_topics, topic_for
from fleetplane.infra.broker import EmbeddedBroker
from fleetplane.router import holds
from fleetplane.router.rebuild import rebuild
from fleetplane.router.state import RouterState, TaskRecord

DAY_S = 86_400


def write_history(settings: Settings, tasks: int, days: float, held: int) -> None:
    serde, producer = default_serde(), Producer(
        {**settings.client_config(), "linger.ms": 50, "compression.type": "lz4"})
    now = time.time()
    spec = ev.TaskSpec(name="bench", task_type="summarize", prompt="summarize the report " * 8)

    def spec_of(i: int) -> ev.TaskSpec:  # a prompt of its own: each completion is cached
        return spec.model_copy(update={"prompt": f"{spec.prompt} number {i}"})

    def put(event: ev.Event, at_s: float) -> None:
        while True:
            try:
                producer.produce(topic_for(event), key=key_for(event),
                                 value=serde.encode(event), headers=event_headers(event),
                                 timestamp=int(at_s * 1000))
                return
            except BufferError:
                producer.poll(0.1)

    first_day = now - days * DAY_S
    for j in range(held):
        tid = f"held-{j:05d}"
        when = datetime.fromtimestamp(first_day, UTC)
        put(ev.TaskHeld(task_id=tid, team="held-team", attempt=1, kind="budget",
                        reason="monthly budget spent", held_by="budget:held-team",
                        occurred_at=when), first_day)
        rec = TaskRecord(team="held-team", spec=spec, held=1, held_at=when)
        record = holds.hold_record(tid, rec)
        producer.produce(record.topic, key=record.key, value=record.value, partition=0,
                         timestamp=int(first_day * 1000))
    for i in range(tasks):
        at = now - days * DAY_S * (1 - i / tasks)
        when = datetime.fromtimestamp(at, UTC)
        tid = f"task-{i:08d}"
        put(ev.TaskRouted(task_id=tid, team="bench", spec=spec_of(i), attempt=1,
                          model="gpt-4o-mini", provider="openai", tier="small", reason="bench",
                          occurred_at=when), at)
        put(ev.TaskStarted(task_id=tid, team="bench", attempt=1, executor_id="bench",
                           occurred_at=when), at)
        put(ev.TaskCompleted(task_id=tid, team="bench", attempt=1, model="gpt-4o-mini",
                             output=f"answer {i}", cost_usd=0.0004, duration_ms=900,
                             occurred_at=when), at)
        if i % 10_000 == 0:
            producer.poll(0)
    assert producer.flush(120) == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--days", type=float, default=30.0)
    ap.add_argument("--held", type=int, default=50)
    ap.add_argument("--lookbacks", default="0,172800",
                    help="comma-separated FLEETPLANE_ROUTER_REBUILD_LOOKBACK_S values")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fp-router-startup-") as tmp:
        broker = EmbeddedBroker(Path(tmp) / "broker")
        broker.start()
        try:
            settings = Settings(kafka_bootstrap=broker.bootstrap)
            ensure_topics(settings.client_config(), load_topics(settings.topics_file))
            started = time.monotonic()
            write_history(settings, args.tasks, args.days, args.held)
            print(f"history: {args.tasks:,} tasks over {args.days:g} days, {args.held} held "
                  f"on the first day; written in {time.monotonic() - started:.1f} s")
            catalog = load_catalog(settings.catalog_file)
            results = []
            for lookback in (float(x) for x in args.lookbacks.split(",")):
                state = RouterState(catalog, settings.router_cache_ttl_s)
                s = settings.model_copy(update={"router_rebuild_lookback_s": lookback})
                t0, c0 = time.monotonic(), time.process_time()
                counts = rebuild(state, s)
                wall, cpu = time.monotonic() - t0, time.process_time() - c0
                found = sum(1 for r in state.tasks.values() if r.waiting)
                results.append({"lookback_s": lookback, "seconds": round(wall, 2),
                                "cpu_s": round(cpu, 2), "events": counts, "held": found,
                                "cache_entries": len(state.cache)})
                print(f"lookback {lookback:>9g} s: start-up {wall:6.2f} s ({cpu:.2f} CPU-s), "
                      f"held tasks found {found}/{args.held}, cache {len(state.cache):,}, "
                      f"events {counts}")
            print(json.dumps(results))
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
