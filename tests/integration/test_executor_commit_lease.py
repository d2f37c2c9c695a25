"""A finished attempt's lease is renewed until its outcome is committed (issue 13, the chaos run's
duplicated terminal records and audit breaks).

The executor's outcome is committed in a transaction some time after the attempt finishes; a
commit that stalls (a broker restart, a slow transaction) for longer than the lease used to leave
the attempt without heartbeats, and the coordinator declared the finished attempt lost_executor
and ran it again; the late outcome was then a second terminal record. Here the real executor
handler runs in the real ParallelProcessor on the broker, with a sink (the loop's real flush
point, inside the outcome's transaction) that holds the outcome's commit back for four leases;
the events the executor published are then replayed, in time order with ticks every 0.1 s up
to the moment the outcome was committed, through the coordinator's scheduler (its lease rule),
which must not declare the attempt lost."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pytest
from confluent_kafka import Consumer

from fleetplane.coordinator.scheduler import TICK
from fleetplane.coordinator.state import Status
from fleetplane.core import events as ev
from fleetplane.core.catalog import load_catalog
from fleetplane.core.kafka import EventProducer
from fleetplane.core.parallel import ParallelProcessor
from fleetplane.core.serde import DecodeError, default_serde
from fleetplane.core.settings import Settings
from fleetplane.core.topics import DISPATCH, LIFECYCLE, OUTCOMES
from fleetplane.executor.handlers import SeenDispatches, execute
from fleetplane.executor.leases import LeaseTable
from fleetplane.executor.models import ModelClients
from fleetplane.executor.runtime import Journal, LiveEmitter, Runtime
from fleetplane.fakeprovider import FakeProvider
from tests.integration.test_executor_process import start_group_at_end
from tests.unit.test_coordinator_scheduler import Harness

LEASE_S = 1.5
HEARTBEAT_S = 0.25
STALL_S = 4 * LEASE_S


class StalledSink:
    """The loop flushes its sink inside each transaction, before the outputs are produced: the
    first flush (the outcome's commit) is held back for `stall_s`."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.stalls = 0

    def flush(self) -> None:
        if self.stalls == 0:
            self.stalls += 1
            time.sleep(self.stall_s)


def read_task(settings: Settings, topic: str, task_id: str, until: float,
              done: type[ev.Event] | None = None) -> list[tuple[ev.Event, int]]:
    """The task's events on `topic` (read_committed, from the start) with their record
    timestamps (ms), until `done` was seen or the monotonic deadline `until`."""
    c = Consumer({**settings.consumer_config(f"t-{time.monotonic_ns()}"),
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    serde, seen = default_serde(), []
    try:
        while time.monotonic() < until:
            for m in c.consume(200, 0.1):
                if m.error() or m.key() != task_id.encode():
                    continue
                try:
                    e = serde.decode(m.value() or b"")
                except DecodeError:
                    continue
                seen.append((e, m.timestamp()[1]))
            if done is not None and any(isinstance(e, done) for e, _ in seen):
                break
    finally:
        c.close()
    return seen


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as provider:
        yield provider


def test_a_finished_attempt_keeps_its_lease_until_its_outcome_is_committed(
        base_settings: Settings, tmp_path: Path, unique: str, fake: FakeProvider) -> None:
    settings = Settings(kafka_bootstrap=base_settings.kafka_bootstrap,
                        anthropic_base_url=fake.base_url, openai_base_url=fake.openai_base_url,
                        model_max_retries=0, executor_slots=2, executor_lease_s=LEASE_S,
                        executor_heartbeat_s=HEARTBEAT_S, executor_utilization_window_s=60,
                        instance_id=f"exec-{unique}", data_dir=tmp_path / "data")
    executor_id = f"exec-{unique}"
    task = f"{unique}-stalled-commit"

    # the coordinator's scheduler (pure) routes the task and decides its dispatch
    coordinator = Harness()
    coordinator.now = datetime.now(UTC)
    spec = ev.TaskSpec(name=task, task_type="codegen", prompt=f"STALL {task}")
    out = coordinator.send(ev.TaskRouted(task_id=task, team="a", spec=spec, attempt=1,
                                         model="claude-haiku-4-5", provider="anthropic",
                                         tier="small", reason="test",
                                         occurred_at=coordinator.now))
    [dispatch] = [e for e in out if isinstance(e, ev.TaskDispatched)]

    # the executor: the production handler, runtime and live channel in the parallel loop
    runtime = Runtime(settings, executor_id, live=LiveEmitter(settings),
                      journal=Journal(tmp_path / "journal"))
    runtime.start()
    handler = partial(execute, load_catalog(settings.catalog_file), ModelClients(settings),
                      executor_id, SeenDispatches(), runtime=runtime)
    group = f"executor-{unique}"
    start_group_at_end(settings, group)
    sink = StalledSink(STALL_S)
    processor = ParallelProcessor("executor", [DISPATCH], handler, settings, group_id=group,
                                  slots=2, sink=sink, on_committed=runtime.committed)
    runtime.track_commits = True
    loop = threading.Thread(target=processor.run, daemon=True)
    loop.start()
    producer = EventProducer(settings)
    try:
        producer.send([dispatch])
        outcomes = read_task(settings, OUTCOMES, task, time.monotonic() + 120, ev.TaskCompleted)
        seen_at = datetime.now(UTC)  # committed (read_committed): the loop's hook has run
        time.sleep(4.0)  # heartbeats after the commit, if any, are out
        lifecycle = read_task(settings, LIFECYCLE, task, time.monotonic() + 5)
    finally:
        producer.close()
        processor.stop()
        loop.join(30)
        runtime.close()

    [(completed, committed_ms)] = [(e, ts) for e, ts in outcomes
                                   if isinstance(e, ev.TaskCompleted)]
    assert sink.stalls == 1
    committed_at = datetime.fromtimestamp(committed_ms / 1000, tz=UTC)
    # the scenario happened: the outcome was committed more than two leases after it was made
    assert committed_at - completed.occurred_at > timedelta(seconds=2 * LEASE_S), \
        (committed_at, completed.occurred_at)
    progress = sorted((e for e, _ in lifecycle
                       if isinstance(e, ev.TaskStarted | ev.TaskHeartbeat)),
                      key=lambda e: e.occurred_at)
    assert progress and isinstance(progress[0], ev.TaskStarted)

    # replay what the coordinator reads, in time order, ticking every 0.1 s until the commit
    pending, t = list(progress), progress[0].occurred_at
    while t <= committed_at:
        while pending and pending[0].occurred_at <= t:
            coordinator.send(pending.pop(0))
        coordinator.now = t
        coordinator.send(ev.ControlCommand(task_id="", team="", command=TICK, occurred_at=t))
        t += timedelta(seconds=0.1)
    coordinator.send(completed)
    lost = [e for e in coordinator.log if isinstance(e, ev.TaskFailed)]
    assert not lost, [e.reason for e in lost]
    assert not [e for e in coordinator.log if isinstance(e, ev.TaskRetrying)]
    assert coordinator.state(task) is Status.COMPLETED
    # one terminal record on the log
    assert len([e for e, _ in outcomes if ev.is_terminal(e)]) == 1
    # and the heartbeats stopped once the outcome was committed (a heartbeat built just before
    # the commit's hook may carry a later time on a loaded machine: 2.5 s of slack)
    late = [e.occurred_at for e in progress if isinstance(e, ev.TaskHeartbeat)
            and e.occurred_at > seen_at + timedelta(seconds=2.5)]
    assert not late, (seen_at, late)


def test_an_attempt_the_coordinator_declared_lost_while_it_ran_does_not_complete_the_task(
        tmp_path: Path, fake: FakeProvider) -> None:
    """The residual case: the executor's heartbeats stopped while the attempt ran (the process
    frozen, or cut off from the broker, for longer than the lease), the coordinator declared it
    lost and retried it; when the attempt then completes, its TaskCompleted would be a second
    terminal record beside the retry's. It is reported as a non-final lost_executor instead,
    with its cost and audit chain."""
    fake.set_script({"replies": [{"match": "LATE", "text": "done", "latency_ms": 1_500}]})
    settings = Settings(anthropic_base_url=fake.base_url, openai_base_url=fake.openai_base_url,
                        model_max_retries=0, data_dir=tmp_path / "data")
    runtime = Runtime(settings, "e1", journal=Journal(tmp_path / "journal"))
    leases = LeaseTable(settings, "e1")
    dispatch = ev.TaskDispatched(
        task_id="late-1", team="a", attempt=1, model="claude-haiku-4-5", provider="anthropic",
        tier="small", action="run", spec=ev.TaskSpec(name="n", task_type="codegen",
                                                     prompt="LATE answer"))

    def declare_lost_during_the_call() -> None:
        deadline = time.monotonic() + 30
        while not fake.calls and time.monotonic() < deadline:
            time.sleep(0.02)
        # what the table records when it reads the coordinator's committed lost_executor
        leases.finished("late-1", 1, int(time.time() * 1000))

    declarer = threading.Thread(target=declare_lost_during_the_call)
    declarer.start()
    out = list(execute(load_catalog(settings.catalog_file), ModelClients(settings), "e1",
                       SeenDispatches(), dispatch, runtime=runtime, leases=leases))
    declarer.join()
    assert fake.calls, "the model was not called"
    assert not [e for e in out if ev.is_terminal(e)], out
    [failed] = [e for e in out if isinstance(e, ev.TaskFailed)]
    assert failed.failure_class == "lost_executor" and not failed.final
    assert "declared it lost" in failed.reason
    calls = [e for e in out if isinstance(e, ev.ModelCall)]
    assert failed.audit_count == len(calls) == 1 and failed.cost_usd == calls[0].cost_usd > 0
