"""Finished tasks leave the coordinator's table (docs/coordinator.md, "Forgetting finished
tasks"): a real coordinator on the real broker, with a retention of 2 s, forgets the tasks that
completed, writes their deletion into its changelog, and a restart after SIGKILL restores only
the tasks that have not ended, which still finish once."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from fleetplane.coordinator.world import task_key
from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.settings import Settings
from fleetplane.core.topics import DISPATCH
from fleetplane.reconciler.tracker import COORDINATOR_CHANGELOG

from .test_coordinator import CoordinatorProcess, Tail, per_task, routed


@pytest.fixture
def forgetful(base_settings: Settings, tmp_path: Path) -> Iterator[CoordinatorProcess]:
    proc = CoordinatorProcess(base_settings, tmp_path, instance_id=f"test-{uuid.uuid4().hex[:8]}",
                              env={"FLEETPLANE_COORDINATOR_TERMINAL_RETENTION_S": "2"})
    proc.start()
    proc.wait_ready()
    yield proc
    proc.terminate()


@pytest.fixture
def dispatch(base_settings: Settings) -> Iterator[Tail]:
    t = Tail(base_settings, DISPATCH)
    yield t
    t.close()


def changelog_rows(settings: Settings) -> dict[bytes, bytes | None]:
    """The changelog partition read to its end as a committed reader sees it: each key's last
    value (None: deleted)."""
    consumer = Consumer({**settings.client_config(), "group.id": f"t-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "isolation.level": "read_committed"})
    try:
        tp = TopicPartition(COORDINATOR_CHANGELOG, 0)
        _low, high = consumer.get_watermark_offsets(tp, timeout=10)
        consumer.assign([TopicPartition(COORDINATOR_CHANGELOG, 0, 0)])
        rows: dict[bytes, bytes | None] = {}
        deadline = time.monotonic() + 30
        position = 0
        while position < high and time.monotonic() < deadline:
            for msg in consumer.consume(1000, timeout=0.5):
                if msg.error() is None and msg.key() is not None:
                    rows[msg.key()] = msg.value()
                position = max(position, (msg.offset() or 0) + 1)
            position = max(position, consumer.position([tp])[0].offset)
        assert position >= high, f"changelog read to {position} of {high}"
        return rows
    finally:
        consumer.close()


def test_finished_tasks_are_forgotten_and_a_restart_restores_only_the_live_ones(
    forgetful: CoordinatorProcess, producer: EventProducer, base_settings: Settings,
    dispatch: Tail, unique: str,
) -> None:
    done = [routed(f"{unique}-done{i}") for i in range(20)]
    live = [routed(f"{unique}-live{i}") for i in range(5)]
    producer.send([*done, *live])
    assert len(dispatch.wait_for(unique, 25, ev.TaskDispatched, linger_s=0)) == 25
    producer.send([ev.TaskCompleted(task_id=t.task_id, team=t.team, attempt=1, model="m",
                                    output="ok", cost_usd=0.0, duration_ms=1) for t in done])

    # the table may hold earlier tests' finished tasks too (one broker per session): they
    # are forgotten as well, so the changelog, not the counter, says when ours are
    done_keys = [task_key(t.task_id) for t in done]
    deadline = time.monotonic() + 60
    rows = changelog_rows(base_settings)
    while time.monotonic() < deadline and any(rows.get(k, b"") is not None for k in done_keys):
        time.sleep(0.5)
        rows = changelog_rows(base_settings)
    for t in done:
        assert task_key(t.task_id) in rows and rows[task_key(t.task_id)] is None, t.task_id
    for t in live:
        assert rows.get(task_key(t.task_id)), f"{t.task_id}: a live task's row was deleted"
    stats = forgetful.stats()
    assert stats is not None and stats["forgotten"] >= len(done), stats

    forgetful.kill()
    forgetful.start()
    ready = forgetful.wait_ready()
    assert ready["recovered_rows"] >= len(live)

    # the live tasks are still known: their completions end them, nothing is dispatched again
    producer.send([ev.TaskCompleted(task_id=t.task_id, team=t.team, attempt=1, model="m",
                                    output="ok", cost_usd=0.0, duration_ms=1) for t in live])
    forgetful.wait_processed(len(live))
    got = per_task(dispatch.wait_for(unique, 26, ev.TaskDispatched, timeout_s=3, linger_s=0))
    assert sorted(got) == sorted(t.task_id for t in (*done, *live))
    assert all(len(v) == 1 for v in got.values()), "a task was dispatched twice"
