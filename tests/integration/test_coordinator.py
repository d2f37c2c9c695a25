"""The coordinator as a subprocess on the real broker: dispatch once, retries, cancel, DLQ, and
SIGKILL + restart (table recovered from its changelog, nothing dispatched twice or lost)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from fleetplane.coordinator.topology import (
    APP_ID,
    BATCH_MAX,
    INPUTS,
    REPARTITION_ROLE,
    SCHEDULER_TOPIC,
)
from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer
from fleetplane.core.loop import headers_dict
from fleetplane.core.serde import default_serde
from fleetplane.core.settings import REPO_ROOT, Settings
from fleetplane.core.topics import CONTROL, DISPATCH, DLQ, LIFECYCLE, OUTCOMES, ROUTED
from fleetplane.infra.broker import free_port

from .test_executor_process import end_open_transaction, leave_open_transaction


class CoordinatorProcess:
    """fleetplane-coordinator in a subprocess (the console script's code, no CLI arguments)."""

    def __init__(self, settings: Settings, data_dir: Path, instance_id: str,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        teams = data_dir / "teams.yaml"  # delivery tests: no team quota or budget in the way
        teams.write_text("defaults: {max_running: 1000000, budget_usd: 1000000}\n")
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO_ROOT / "services"),
            "FLEETPLANE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "FLEETPLANE_DATA_DIR": str(data_dir),
            "FLEETPLANE_COORDINATOR_WEB_PORT": str(self.port),
            "FLEETPLANE_INSTANCE_ID": instance_id,
            "FLEETPLANE_LOG_LEVEL": "INFO",
            # these tests are about delivery (dispatch once, recovery): no fleet capacity limit
            "FLEETPLANE_COORDINATOR_MAX_RUNNING": "1000000",
            "FLEETPLANE_TEAMS_FILE": str(teams),
            "FLEETPLANE_COORDINATOR_BACKOFF_BASE_MS": "200",
            # each start waits this long as a standby for an active to show progress; no other
            # coordinator is alive when these start (the failover test, which starts a standby
            # beside a live active, sets 3 s itself)
            "FLEETPLANE_COORDINATOR_TAKEOVER_S": "1",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.started_at = 0.0

    def start(self) -> None:
        self.starts += 1
        log = open(self.data_dir / f"coordinator-{self.starts}.log", "wb")  # noqa: SIM115
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleetplane.coordinator.main"], env=self.env,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def stats(self) -> dict[str, Any] | None:
        try:
            url = f"http://127.0.0.1:{self.port}/coordinator/stats/"
            with urllib.request.urlopen(url, timeout=1) as resp:
                data: dict[str, Any] = json.load(resp)
                return data
        except OSError:
            return None

    def wait_ready(self, timeout_s: float = 90.0) -> dict[str, Any]:
        """Until the table is recovered and the agent consumes; returns the stats."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"coordinator exited with {self.proc.returncode}: "
                                     f"{self.log_tail()}")
            stats = self.stats()
            if stats and stats.get("ready_s") is not None:
                stats["wall_ready_s"] = round(time.monotonic() - self.started_at, 3)
                return stats
            time.sleep(0.1)
        raise AssertionError(f"coordinator not ready in {timeout_s}s: {self.log_tail()}")

    def wait_processed(self, count: int, timeout_s: float = 60.0) -> dict[str, Any]:
        """Until the schedule step decided `count` task events (`task_events`: not its clock's
        ticks, which a wait on all its records could count instead of the event waited for;
        stop 23's CI rehearsal: a late failure decided before the completion)."""
        deadline = time.monotonic() + timeout_s
        stats = self.stats()
        while time.monotonic() < deadline:
            stats = self.stats()
            if stats and stats["task_events"] >= count:
                return stats
            time.sleep(0.1)
        raise AssertionError(f"decided {stats and stats['task_events']} of {count}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log_tail(self, n: int = 4000) -> str:
        path = self.data_dir / f"coordinator-{self.starts}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""


class Tail:
    """Reads a topic from its end at creation time (read_committed), decoding events."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.consumer = Consumer({**settings.consumer_config(f"tail-{uuid.uuid4().hex}"),
                                  "enable.auto.commit": False})
        meta = self.consumer.list_topics(topic, timeout=10).topics[topic]
        tps = []
        for p in meta.partitions:
            _, high = self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            tps.append(TopicPartition(topic, p, high))
        self.consumer.assign(tps)
        self.serde = default_serde()
        self.records: list[tuple[ev.Event, dict[str, bytes]]] = []
        self.partition_of: dict[str, int] = {}  # event id -> partition

    def poll(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for m in self.consumer.consume(500, 0.1):
                if m.error() is None:
                    headers = headers_dict(m.headers())
                    event = self.serde.decode(m.value() or b"")
                    self.records.append((event, headers))
                    self.partition_of[event.event_id] = m.partition() or 0

    def events(self, prefix: str, cls: type[ev.Event] = ev.Event) -> list[Any]:
        return [e for e, _ in self.records if e.task_id.startswith(prefix) and isinstance(e, cls)]

    def wait_for(self, prefix: str, want: int, cls: type[ev.Event] = ev.Event,
                 timeout_s: float = 30.0, linger_s: float = 1.5) -> list[Any]:
        """Poll until `want` matching events arrived, then `linger_s` more (to catch extras)."""
        deadline = time.monotonic() + timeout_s
        while len(self.events(prefix, cls)) < want and time.monotonic() < deadline:
            self.poll(0.2)
        self.poll(linger_s)
        return self.events(prefix, cls)

    def close(self) -> None:
        self.consumer.close()


def spec(**kw: Any) -> ev.TaskSpec:
    kw.setdefault("write_scope", ["src/**"])
    return ev.TaskSpec(name="n", task_type="refactor", prompt="p", **kw)


def routed(task_id: str, attempt: int = 1, **kw: Any) -> ev.TaskRouted:
    # each task writes its own directory: these tests are not about leases
    return ev.TaskRouted(task_id=task_id, team="team-c",
                         spec=kw.pop("spec", spec(write_scope=[f"{task_id}/**"])),
                         attempt=attempt, model="claude-x", provider="anthropic",
                         tier="standard", reason="test", **kw)


def per_task(events: list[Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for e in events:
        out.setdefault(e.task_id, []).append(e)
    return out


@pytest.fixture(scope="module")
def coordinator(base_settings: Settings, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[CoordinatorProcess]:
    proc = CoordinatorProcess(base_settings, tmp_path_factory.mktemp("coordinator"),
                              instance_id=f"test-{uuid.uuid4().hex[:8]}")
    proc.start()
    proc.wait_ready()
    yield proc
    proc.terminate()


@pytest.fixture
def tail(base_settings: Settings) -> Iterator[Callable[[str], Tail]]:
    tails: list[Tail] = []

    def make(topic: str) -> Tail:
        t = Tail(base_settings, topic)
        tails.append(t)
        return t

    yield make
    for t in tails:
        t.close()


def test_routed_tasks_are_dispatched_once(
    coordinator: CoordinatorProcess, producer: EventProducer,
    tail: Callable[[str], Tail], unique: str,
) -> None:
    dispatch, routed_tail = tail(DISPATCH), tail(ROUTED)
    tasks = [routed(f"{unique}-{i}") for i in range(30)]
    # the same records redelivered, and the router re-publishing (new event ids, same attempt)
    producer.send([*tasks, *tasks[:10], *[routed(t.task_id) for t in tasks[10:20]]])
    got = dispatch.wait_for(unique, 30, ev.TaskDispatched)
    by_task = per_task(got)
    assert sorted(by_task) == sorted(t.task_id for t in tasks)
    assert all(len(v) == 1 for v in by_task.values()), "a task was dispatched twice"
    first = tasks[0]
    d = by_task[first.task_id][0]
    assert (d.attempt, d.model, d.provider, d.tier) == (1, "claude-x", "anthropic", "standard")
    assert d.spec == first.spec and d.leased_paths == [f"{first.task_id}/**"]
    assert d.causation_id == first.event_id and d.team == "team-c"
    headers = next(h for e, h in dispatch.records if e.event_id == d.event_id)
    assert headers["event_type"] == b"TaskDispatched" and headers["team"] == b"team-c"
    # same partitioner as the confluent-kafka producers: a task's events share a partition
    routed_tail.wait_for(unique, 50, ev.TaskRouted, linger_s=0)
    for t in tasks:
        d = by_task[t.task_id][0]
        assert dispatch.partition_of[d.event_id] == routed_tail.partition_of[t.event_id]
    with urllib.request.urlopen(f"http://127.0.0.1:{coordinator.port}/healthz") as resp:
        assert json.load(resp)["ready"] is True


def test_retry_then_final_failure_cancel_and_terminal(
    coordinator: CoordinatorProcess, producer: EventProducer,
    tail: Callable[[str], Tail], unique: str,
) -> None:
    dispatch, lifecycle, outcomes = tail(DISPATCH), tail(LIFECYCLE), tail(OUTCOMES)
    r = routed(f"{unique}-retry", spec=spec(max_attempts=2, write_scope=["retry/**"]))
    producer.send([r])
    dispatch.wait_for(r.task_id, 1, ev.TaskDispatched, linger_s=0)
    started = ev.TaskStarted(task_id=r.task_id, team="team-c", attempt=1, executor_id="ex")
    f1 = ev.TaskFailed(task_id=r.task_id, team="team-c", attempt=1, failure_class="timeout",
                       reason="slow", cost_usd=0.5)
    producer.send([started, f1])
    retrying = lifecycle.wait_for(r.task_id, 1, ev.TaskRetrying, linger_s=0)
    assert retrying[0].attempt == 2 and retrying[0].delay_ms > 0
    assert retrying[0].causation_id == f1.event_id
    second = dispatch.wait_for(r.task_id, 2, ev.TaskDispatched, linger_s=0)
    assert [d.attempt for d in second] == [1, 2]
    f2 = ev.TaskFailed(task_id=r.task_id, team="team-c", attempt=2, failure_class="timeout",
                       reason="slow again")
    producer.send([f2, f1])  # f1 again: redelivered, ignored
    final = outcomes.wait_for(r.task_id, 1, ev.TaskFailed)
    assert len(final) == 1 and final[0].final and final[0].attempt == 2

    c = routed(f"{unique}-cancel")
    producer.send([c])
    dispatch.wait_for(c.task_id, 1, ev.TaskDispatched, linger_s=0)
    cmd = ev.ControlCommand(task_id=c.task_id, team="team-c", command="cancel",
                            requested_by="ops", reason="not needed")
    producer.send([cmd, cmd])
    cancelled = outcomes.wait_for(c.task_id, 1, ev.TaskCancelled)
    assert len(cancelled) == 1 and cancelled[0].reason == "not needed"

    done = routed(f"{unique}-done")
    producer.send([done])
    dispatch.wait_for(done.task_id, 1, ev.TaskDispatched, linger_s=0)
    completed = ev.TaskCompleted(task_id=done.task_id, team="team-c", attempt=1, model="m",
                                 output="ok", cost_usd=0.1, duration_ms=10)
    again = completed.model_copy(update={"event_id": ev.new_event_id(), "output": "again"})
    late_fail = ev.TaskFailed(task_id=done.task_id, team="team-c", attempt=1,
                              failure_class="x", reason="late")
    # topics are ordered only within themselves: let the completion land before the rest
    before = coordinator.stats()
    assert before is not None
    producer.send([completed])
    coordinator.wait_processed(before["task_events"] + 1)
    producer.send([again, late_fail, routed(done.task_id, attempt=2)])
    lifecycle.poll(2.0)
    dispatch.poll(0.5)
    assert lifecycle.events(done.task_id, ev.TaskRetrying) == []
    assert len(dispatch.events(done.task_id, ev.TaskDispatched)) == 1


def test_bad_records_go_to_the_dead_letter_topic(
    coordinator: CoordinatorProcess, base_settings: Settings, producer: EventProducer,
    tail: Callable[[str], Tail], unique: str,
) -> None:
    dlq, dispatch = tail(DLQ), tail(DISPATCH)
    raw = Producer(base_settings.producer_config())
    raw.produce(ROUTED, key=f"{unique}-garbage".encode(), value=b"not avro",
                headers=[("team", b"team-c")])
    mismatched = routed(f"{unique}-real")
    raw.produce(CONTROL, key=f"{unique}-wrong-key".encode(),
                value=default_serde().encode(mismatched))
    raw.flush(10)
    producer.send([routed(f"{unique}-after")])  # the flow goes on
    dead = per_task(dlq.wait_for(unique, 2, ev.DeadLetter))
    garbage = dead[f"{unique}-garbage"][0]
    assert garbage.service == "coordinator" and garbage.source_topic == ROUTED
    assert garbage.payload == b"not avro" and "single-object" in garbage.reason
    assert "is not the task id" in dead[f"{unique}-wrong-key"][0].reason
    assert [d.task_id for d in dispatch.wait_for(unique, 1, ev.TaskDispatched)] == [
        f"{unique}-after"]


def test_a_dead_producers_open_transaction_on_the_scheduler_topic_holds_nothing_back(
    coordinator: CoordinatorProcess, base_settings: Settings, producer: EventProducer,
    tail: Callable[[str], Tail], unique: str,
) -> None:
    """A producer that died with a transaction open on the scheduler topic (a repartition step
    whose transactional id no takeover fenced; the embedded broker never times a transaction
    out) must not stop the schedule step: its input is the repartition step's copies of
    committed events, read uncommitted and deduplicated by event id (coordinator/app.py,
    SCHEDULER_ISOLATION). Read committed, nothing after the open transaction was ever applied."""
    dispatch = tail(DISPATCH)
    dead = f"dead-repartition-{unique}"
    leave_open_transaction(base_settings, SCHEDULER_TOPIC, f"{unique}-dead", dead)
    try:
        tasks = [routed(f"{unique}-{i}") for i in range(5)]
        producer.send(tasks)
        got = per_task(dispatch.wait_for(unique, 5, ev.TaskDispatched, timeout_s=60))
        assert sorted(got) == sorted(t.task_id for t in tasks)
        assert all(len(v) == 1 for v in got.values()), "a task was dispatched twice"
    finally:
        end_open_transaction(base_settings, dead)


def test_sigkill_restart_recovers_the_table_and_dispatches_nothing_twice(
    coordinator: CoordinatorProcess, producer: EventProducer,
    tail: Callable[[str], Tail], unique: str,
) -> None:
    dispatch = tail(DISPATCH)
    first = [routed(f"{unique}-a{i}") for i in range(200)]
    before = coordinator.stats()
    assert before is not None
    producer.send(first)
    assert len(dispatch.wait_for(unique, 200, ev.TaskDispatched, linger_s=0)) == 200
    coordinator.wait_processed(before["task_events"] + 200)
    time.sleep(1.0)  # an offset commit (every 0.5 s) passes

    coordinator.kill()
    backlog = [routed(f"{unique}-b{i}") for i in range(300)]  # arrives while it is down
    producer.send(backlog)
    coordinator.start()
    ready = coordinator.wait_ready()
    print(f"\ncoordinator restart after SIGKILL: ready in {ready['wall_ready_s']}s "
          f"(process start -> table ready {ready['ready_s']}s; partitions assigned -> table "
          f"recovered {ready['recovery_s']}s; {ready['recovered_rows']} rows)")
    assert ready["recovered_rows"] >= 200

    later = [routed(f"{unique}-c{i}") for i in range(100)]
    redelivered = first[:50]  # the very same records again
    republished = [routed(t.task_id) for t in first[50:]]  # new event ids, same attempt
    producer.send([*redelivered, *republished, *later, *backlog[:50]])
    got = per_task(dispatch.wait_for(unique, 600, ev.TaskDispatched, timeout_s=60,
                                     linger_s=3.0))
    want = sorted(t.task_id for t in (*first, *backlog, *later))
    assert sorted(got) == want, f"missing: {sorted(set(want) - set(got))[:10]}"
    twice = {t: len(v) for t, v in got.items() if len(v) > 1}
    assert not twice, f"dispatched twice: {twice}"
    stats = coordinator.stats()
    assert stats is not None and stats["restores"] == 1  # one restore per start, no abort


def test_sigkill_mid_stream_loses_nothing(
    coordinator: CoordinatorProcess, producer: EventProducer,
    tail: Callable[[str], Tail], unique: str,
) -> None:
    """Killed while dispatching: every task is dispatched, no task gets two dispatch decisions.
    (At-least-once: the batch in flight at the kill may be re-published with the same event ids,
    which consumers deduplicate.)"""
    dispatch = tail(DISPATCH)
    tasks = [routed(f"{unique}-{i}") for i in range(1500)]
    start = coordinator.stats()
    assert start is not None
    producer.send(tasks)
    coordinator.wait_processed(start["task_events"] + 300)
    coordinator.kill()
    coordinator.start()
    coordinator.wait_ready()
    got = per_task(dispatch.wait_for(unique, 1500, ev.TaskDispatched, timeout_s=90,
                                     linger_s=3.0))
    assert sorted(got) == sorted(t.task_id for t in tasks)
    decisions = {t: {d.event_id for d in v} for t, v in got.items()}
    assert all(len(ids) == 1 for ids in decisions.values()), "two dispatch decisions"
    duplicates = sum(len(v) - 1 for v in got.values())
    print(f"\nSIGKILL mid-stream: 1500 tasks, {duplicates} re-published dispatch record(s) "
          f"with the same event id")
    assert duplicates <= BATCH_MAX, "at most the one batch in flight is re-published"


def test_a_completion_the_broker_lost_downstream_is_applied_after_a_restart(
    coordinator: CoordinatorProcess, producer: EventProducer, base_settings: Settings,
    tail: Callable[[str], Tail], unique: str,
) -> None:
    """The state a hard broker crash leaves (chaos runs, docs/reliability.md "Stop 20"): the
    coordinator's committed input offsets are past a completion whose forwarded copy (or the
    table change made from it) is gone. After a restart the coordinator reads its recent input
    again: the completion frees the files it held (the next task on them starts) and the
    attempt is not declared lost and run twice."""
    dispatch = tail(DISPATCH)
    scope = spec(write_scope=["src/**"], repository=f"repo-{unique}")
    first, second = routed(f"{unique}-first", spec=scope), routed(f"{unique}-second", spec=scope)
    producer.send([first])
    dispatch.wait_for(first.task_id, 1, ev.TaskDispatched, linger_s=0)
    before = coordinator.stats()
    assert before is not None
    producer.send([ev.TaskStarted(task_id=first.task_id, team="team-c", attempt=1,
                                  executor_id="ex-1", lease_ms=600_000), second])
    coordinator.wait_processed(before["task_events"] + 2)
    dispatch.poll(0.5)
    assert dispatch.events(second.task_id) == []  # waits for the files the first one holds
    time.sleep(1.0)  # an offset commit (every 0.5 s) passes
    coordinator.kill()

    producer.send([ev.TaskCompleted(task_id=first.task_id, team="team-c", attempt=1, model="m",
                                    output="ok", cost_usd=0.1, duration_ms=10)])
    # the broker kept the input offsets and lost what the coordinator wrote with them
    commit_inputs_to_their_ends(base_settings)

    coordinator.start()
    ready = coordinator.wait_ready()
    got = per_task(dispatch.wait_for(unique, 2, ev.TaskDispatched, timeout_s=40, linger_s=2.0))
    assert second.task_id in got, "the completion was never applied: the files stay held"
    assert [d.attempt for d in got[first.task_id]] == [1], "the first task ran twice"
    stats = coordinator.stats()
    assert stats is not None and stats["replayed"] > 0, ready


def commit_inputs_to_their_ends(settings: Settings) -> None:
    """What a hard broker crash can leave: the coordinator's input offsets committed past
    records whose forwarded copies are gone. Committed as the active role's static member (it
    replaces the killed one, and the restarted coordinator replaces it in turn)."""
    group = Consumer({**settings.consumer_config(APP_ID), "enable.auto.commit": False,
                      "group.instance.id": REPARTITION_ROLE})
    group.subscribe(list(INPUTS))
    deadline = time.monotonic() + 30
    while not group.assignment():
        assert time.monotonic() < deadline, "the test never joined the coordinator's group"
        group.poll(0.2)
    ends = []
    for tp in group.assignment():
        _, high = group.get_watermark_offsets(tp, timeout=10)
        ends.append(TopicPartition(tp.topic, tp.partition, high))
    group.commit(offsets=ends, asynchronous=False)
    group.close()


def test_a_start_the_broker_lost_downstream_gives_the_attempt_its_lease_after_a_restart(
    coordinator: CoordinatorProcess, producer: EventProducer, tail: Callable[[str], Tail],
    base_settings: Settings, unique: str,
) -> None:
    """A chaos run's stuck tasks (docs/reliability.md, "Stop 21"): an attempt's TaskStarted
    reached the log but not the coordinator's table before the broker's SIGKILL, and its
    executor died with the broker. Read again after the restart, the start gives the attempt
    its lease, whose expiry retries the task at once; before, the table kept the attempt
    dispatched and never started until the 5-minute start timeout."""
    dispatch, lifecycle = tail(DISPATCH), tail(LIFECYCLE)
    task = routed(f"{unique}-started")
    producer.send([task])
    dispatch.wait_for(task.task_id, 1, ev.TaskDispatched, linger_s=0)
    time.sleep(1.0)  # an offset commit (every 0.5 s) passes
    coordinator.kill()
    producer.send([ev.TaskStarted(task_id=task.task_id, team="team-c", attempt=1,
                                  executor_id="ex-gone", lease_ms=3_000)])
    commit_inputs_to_their_ends(base_settings)
    coordinator.start()
    coordinator.wait_ready()
    got = dispatch.wait_for(task.task_id, 2, ev.TaskDispatched, timeout_s=60, linger_s=0)
    assert [d.attempt for d in got] == [1, 2]
    failed = [e for e in lifecycle.wait_for(task.task_id, 1, ev.TaskFailed, linger_s=0)
              if isinstance(e, ev.TaskFailed)]
    assert "lease of executor ex-gone expired" in failed[0].reason, failed[0].reason


def test_sigterm_stops_cleanly(coordinator: CoordinatorProcess) -> None:
    t0 = time.monotonic()
    assert coordinator.terminate() == 0
    elapsed = time.monotonic() - t0
    assert elapsed < 20, f"SIGTERM took {elapsed:.1f}s"
    coordinator.start()  # the module fixture stops it again at the end
    coordinator.wait_ready()
