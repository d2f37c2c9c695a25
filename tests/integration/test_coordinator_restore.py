"""The scheduler's table through the real broker: what a failover restores is the world that
decided. The schedule step writes each row a transaction changed once, at its commit (last
value per key), and a large spec in a ``spec/`` record of its own (the rows without it, the
record deleted when the task ends); the restore reads the committed records back
(read_committed, last value per key) and ``World.load`` joins them again."""

from __future__ import annotations

import random
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from fleetplane.coordinator import world as world_module
from fleetplane.coordinator.scheduler import TICK, Scheduler
from fleetplane.coordinator.world import World
from fleetplane.core import events as ev
from fleetplane.core.settings import Settings
from fleetplane.core.table import ChangelogTable
from tests.unit.coordinator_logs import simulate
from tests.unit.coordinator_oracle import FullPassScheduler
from tests.unit.test_coordinator_replay import WORKLOADS, policy


def rows_of(world: World) -> tuple[dict[str, Any], Any]:
    return {t: r.model_dump() for t, r in world.tasks.items()}, world.fleet.model_dump()


def test_a_restore_from_the_broker_is_the_world_that_decided(
        base_settings: Settings, unique: str, monkeypatch: pytest.MonkeyPatch) -> None:
    topic = f"test-scheduler-changelog-{unique}"
    admin = AdminClient(base_settings.client_config())
    for fut in admin.create_topics([NewTopic(topic, 1, 1, config={
            "cleanup.policy": "compact"})]).values():
        fut.result()
    w, seed = WORKLOADS["operators"]
    log = simulate(FullPassScheduler(policy(w)), w, seed)
    # half the specs in spec/ records, half inline in their rows
    sizes = sorted(len(e.spec.model_dump_json(exclude_defaults=True))
                   for e in log if isinstance(e, ev.TaskRouted))
    monkeypatch.setattr(world_module, "SPEC_APART_BYTES", sizes[len(sizes) // 2])
    config = base_settings.client_config()
    producer = Producer(base_settings.producer_config(f"test-restore-{unique}"))
    producer.init_transactions(30)
    table = ChangelogTable(topic)
    world, scheduler = World(), Scheduler(policy(w))
    rng = random.Random(3)
    i, aborted, written = 0, False, 0
    while i < len(log):
        batch = log[i:i + rng.randint(1, 80)]
        before = rows_of(world)
        producer.begin_transaction()
        for event in batch:
            scheduler.apply(world, event)
        for key, value in world.take_rows():  # as Coordinator.changelog, at the commit
            table.put(key, value)
        for rec in table.changes():
            producer.produce(rec.topic, key=rec.key, value=rec.value, partition=rec.partition)
            written += 1
        if not aborted and i > len(log) // 2:
            # an aborted transaction: as the coordinator does, the table is read again and
            # the world rebuilt from it; it must be the world before the batch
            producer.abort_transaction(30)
            aborted = True
            table.invalidate()
            table.restore(config)
            world = World.load(table.items())
            assert rows_of(world) == before
            continue  # the batch is decided again
        producer.commit_transaction(30)
        i += len(batch)
    assert aborted and written

    # the failover: a new process restores the table from the broker
    restored_table = ChangelogTable(topic)
    restored_table.restore(config)
    restored = World.load(restored_table.items())
    assert rows_of(restored) == rows_of(world)
    keys = list(restored_table)
    apart = [k for k in keys if k.startswith(b"spec/")]
    inline = [k for k in keys if k.startswith(b"task/") and b'"spec"' in restored_table[k]]
    assert apart and inline  # both forms were restored
    ended = {t for t, r in world.tasks.items() if r.terminal}
    assert ended and not ended & {k[len(b"spec/"):].decode() for k in apart}
    # and it decides the same from here (the clock far ahead: backoffs, lost attempts)
    tick = ev.ControlCommand(task_id="", team="", command=TICK,
                             occurred_at=log[-1].occurred_at.replace(year=2030))
    other = Scheduler(policy(w))
    assert [e.model_dump() for e in other.apply(restored, tick)] == \
        [e.model_dump() for e in scheduler.apply(world, tick)]
