"""The executor as its own OS process on the real broker: TaskStarted, heartbeats and audit events
visible while the attempt runs, cancellation, utilization events, and a SIGKILL mid-attempt
(orphaned worktree cleaned at restart, the redelivered dispatch reported, not re-run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, ConsumerGroupState, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from fleetplane.core import events as ev
from fleetplane.core.kafka import EventProducer, event_headers
from fleetplane.core.serde import DecodeError, default_serde
from fleetplane.core.settings import REPO_ROOT, Settings
from fleetplane.core.topics import DISPATCH, LIFECYCLE, OUTCOMES, TOOL_CALLS, UTILIZATION
from fleetplane.executor.runtime import Journal
from fleetplane.fakeprovider import FakeProvider

from .agentkit import dispatched, git, sample_repo


class Reader:
    """Reads a topic from the start, keeping what matches.

    Every partition is assigned explicitly from its beginning: no consumer group. (It used to
    subscribe as a new group: its partitions came only after a group join, which starts at the
    first poll, i.e. when the test first waits, and which a loaded machine can stretch; a
    reader created early and polled late is now reading at once.)"""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.consumer = Consumer({**settings.consumer_config(f"t-{time.monotonic_ns()}"),
                                  "enable.auto.commit": False})
        parts = self.consumer.list_topics(topic, timeout=30).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(parts)])
        self.serde = default_serde()
        self.seen: list[ev.Event] = []

    def until(self, pred: Callable[[list[ev.Event]], bool], timeout_s: float = 60.0,
              task_id: str | None = None) -> list[ev.Event]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for m in self.consumer.consume(100, 0.1):
                if m.error():
                    continue
                if task_id is not None and m.key() != task_id.encode():
                    continue
                try:
                    e = self.serde.decode(m.value() or b"")
                except DecodeError:  # the session broker's topics also carry other tests'
                    continue  # hostile records (fuzzing, garbage): not this test's business
                if task_id is None or e.task_id == task_id:
                    self.seen.append(e)
            if pred(self.seen):
                return self.seen
        raise AssertionError(f"timed out; saw {[type(e).__name__ for e in self.seen]}")

    def close(self) -> None:
        self.consumer.close()


def start_group_at_end(settings: Settings, group: str, topic: str = DISPATCH) -> None:
    """Commit `group`'s offsets at the end of `topic` (tasks.dispatch): the session broker
    holds every earlier test's records, which a new group would otherwise work through first."""
    c = Consumer({**settings.consumer_config(group), "enable.auto.commit": False})
    try:
        parts = c.list_topics(topic, timeout=30).topics[topic].partitions
        ends = [TopicPartition(topic, p, c.get_watermark_offsets(
            TopicPartition(topic, p), timeout=30)[1]) for p in sorted(parts)]
        c.commit(offsets=ends, asynchronous=False)
    finally:
        c.close()


def wait_group_assigned(settings: Settings, group: str, members: int,
                        timeout_s: float = 120.0,
                        procs: Sequence[ExecutorProcess] = ()) -> dict[str, set[int]]:
    """Wait until the broker reports `group` stable with `members` members, each assigned
    some partitions; returns each member's client id -> its partitions.

    A process logs "partitions assigned" at its own join; a second member joining later
    revokes and splits that assignment, and until then the first one takes every record. A
    test that needs work spread over several members waits here (the broker's own view of the
    group) before producing it.

    `procs`: the members' processes. One that exits fails the wait at once, and a failure says
    how each one stands (exit code, its log's last lines): the embedded broker never expires a
    static member, so a member process that died leaves the group waiting for its rejoin for
    good (a CI run saw the group PREPARING_REBALANCING for 120 s and could not say why)."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    deadline = time.monotonic() + timeout_s
    last = "not described"
    while time.monotonic() < deadline:
        dead = [p for p in procs if p.proc is not None and p.proc.poll() is not None]
        if dead:
            raise AssertionError(f"group {group}: a member process exited\n"
                                 + "\n".join(p.describe() for p in procs))
        try:
            desc = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
        except Exception as exc:  # the group may not exist yet: not an answer, ask again
            last = repr(exc)
        else:
            got = {m.client_id + "/" + (m.group_instance_id or m.member_id):
                   {tp.partition for tp in m.assignment.topic_partitions}
                   for m in desc.members}
            last = f"{desc.state} {got}"
            if (desc.state == ConsumerGroupState.STABLE and len(got) == members
                    and all(got.values())):
                return got
        time.sleep(0.2)
    raise AssertionError(f"group {group} not stable with {members} assigned members: {last}\n"
                         + "\n".join(p.describe() for p in procs))


class ExecutorProcess:
    def __init__(self, settings: Settings, tmp: Path, repo: Path, fake: FakeProvider,
                 unique: str) -> None:
        self.tmp = tmp
        self.settings = settings
        self.env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "services"),
                    "FLEETPLANE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
                    "FLEETPLANE_DATA_DIR": str(tmp / "data"),
                    "FLEETPLANE_ANTHROPIC_BASE_URL": fake.base_url,
                    "FLEETPLANE_OPENAI_BASE_URL": fake.openai_base_url,
                    "FLEETPLANE_EXECUTOR_REPOSITORIES": json.dumps({"sample": str(repo)}),
                    "FLEETPLANE_EXECUTOR_ID": f"exec-{unique}",
                    "FLEETPLANE_INSTANCE_ID": f"exec-{unique}",
                    "FLEETPLANE_EXECUTOR_GROUP_ID": f"executor-{unique}",
                    "FLEETPLANE_EXECUTOR_SLOTS": "2",
                    "FLEETPLANE_EXECUTOR_HEARTBEAT_S": "0.3",
                    "FLEETPLANE_EXECUTOR_UTILIZATION_WINDOW_S": "1",
                    "FLEETPLANE_MODEL_MAX_RETRIES": "0",
                    "FLEETPLANE_LOG_JSON": "false"}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def skip_history(self) -> None:
        """Start the test's executor group at the end of tasks.dispatch: the session broker
        holds every earlier test's dispatches (thousands, from the coordinator burst tests),
        which a new group would otherwise work through first, with two slots."""
        start_group_at_end(self.settings, self.env["FLEETPLANE_EXECUTOR_GROUP_ID"])

    @property
    def log_path(self) -> Path:
        return self.tmp / f"executor-{self.starts}.log"

    def start(self) -> None:
        if self.starts == 0:
            self.skip_history()
        self.starts += 1
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "fleetplane.executor.main"],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_log(self, text: str, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log_path.read_text()
            if text in self.log_path.read_text():
                return
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not logged: {self.log_path.read_text()[-3000:]}")

    def describe(self, lines: int = 25) -> str:
        """How the process stands, for a failure message: its exit code (None: running) and
        its log's last lines; with librdkafka's debug output on, its last group join-state
        changes first."""
        code = None if self.proc is None else self.proc.poll()
        text = self.log_path.read_text(errors="replace").splitlines()
        joins = [ln for ln in text if "CGRPJOINSTATE" in ln or "REBALANCE" in ln
                 or "heartbeat error" in ln.lower()]
        rest = [ln for ln in text if not ln.startswith("%7|")]
        return (f"--- {self.env['FLEETPLANE_EXECUTOR_ID']} exit={code} {self.log_path}\n"
                + "\n".join([*joins[-8:], "...", *rest[-lines:]]))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def leave_open_transaction(settings: Settings, topic: str, key: str, txn_id: str) -> None:
    """A producer process opens a transaction on `key`'s partition of `topic` and dies without
    ending it (as a SIGKILLed service does). Until the broker aborts it (transaction.timeout.ms
    on Kafka; the embedded broker never does) that partition's last stable offset is stuck, and
    read_committed consumers see nothing behind it."""
    code = (
        "import os, sys\n"
        "from confluent_kafka import Producer\n"
        f"p = Producer({settings.producer_config(txn_id)!r})\n"
        "p.init_transactions(30); p.begin_transaction()\n"
        f"p.produce({topic!r}, key={key.encode()!r}, value=b'half a transaction')\n"
        "p.flush(30); os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def end_open_transaction(settings: Settings, txn_id: str) -> None:
    """What the broker's transaction timeout would do: a new producer with the same id fences
    the dead one and aborts its transaction (so later tests on the session broker see on)."""
    fencer = Producer(settings.producer_config(txn_id))
    fencer.init_transactions(30)
    fencer.flush(5)


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as provider:
        yield provider


@pytest.fixture
def executor(base_settings: Settings, tmp_path: Path, fake: FakeProvider,
             unique: str) -> Iterator[ExecutorProcess]:
    repo = sample_repo(tmp_path)
    proc = ExecutorProcess(base_settings, tmp_path, repo, fake, unique)
    proc.repo = repo  # type: ignore[attr-defined]
    yield proc
    proc.kill()


def test_live_events_cancellation_utilization_and_sigkill_mid_attempt(
        base_settings: Settings, executor: ExecutorProcess, fake: FakeProvider,
        producer: EventProducer, unique: str) -> None:
    """One executor process (its start-up dominates the runtime) for both stories."""
    fake.set_script({"replies": [
        {"match": "SLOW", "text": "late", "latency_ms": 30_000},
        {"match": "crash me", "tool_uses": [
            {"name": "write_file", "input": {"path": "half.txt", "content": "x"}}]},
        {"match": "wrote 1 chars", "text": "never", "latency_ms": 60_000}]})
    # a cancel published while the executor is down or starting is honoured when the dispatch
    # comes (before: the watcher started at the end of the topic and never saw it)
    early = f"t-early-{unique}"
    producer.send([ev.TaskCancelled(task_id=early, team="payments", reason="test")])
    executor.start()
    # the start-up (imports, the cancellation and lease windows, the group join) is the
    # executor's to take, up to wait_log's 240 s; what follows is timed from when it holds its
    # partitions (before, the 30 s below began at "watching cancellations" and counted the rest
    # of the start-up: on a loaded machine the first dispatch's outcome came after it)
    executor.wait_log("partitions assigned")
    assert "watching cancellations" in executor.log_path.read_text()
    lifecycle = Reader(base_settings, LIFECYCLE)
    utilization = Reader(base_settings, UTILIZATION)
    tools = Reader(base_settings, TOOL_CALLS)
    dangling = f"dangling-{unique}"
    try:
        producer.send([dispatched(early, "SLOW early", repository=None)])
        seen = lifecycle.until(lambda s: any(isinstance(e, ev.TaskFailed) for e in s),
                               task_id=early, timeout_s=30)
        failed = next(e for e in seen if isinstance(e, ev.TaskFailed))
        assert failed.failure_class == "cancelled" and failed.audit_count == 0, failed
        assert not any("SLOW early" in c.last_user_text for c in fake.calls)

        # 1. while the model call hangs, the attempt is visibly alive; a cancel stops it, also
        # when a dead producer's transaction is still open on the cancel's partition (the cause
        # of the flaky CI runs: earlier tests SIGKILL transactional services on this broker)
        task = f"t-cancel-{unique}"
        leave_open_transaction(base_settings, OUTCOMES, task, dangling)
        producer.send([dispatched(task, "SLOW please", repository=None)])
        lifecycle.until(lambda s: sum(isinstance(e, ev.TaskHeartbeat) and e.task_id == task
                                      for e in s) >= 2
                        and any(isinstance(e, ev.TaskStarted) and e.task_id == task for e in s),
                        task_id=task)
        cancel_at = time.monotonic()
        producer.send([ev.TaskCancelled(task_id=task, team="payments", reason="test")])
        seen = lifecycle.until(lambda s: any(isinstance(e, ev.TaskFailed) and e.task_id == task
                                             for e in s), task_id=task, timeout_s=30)
        stopped_after = time.monotonic() - cancel_at
        failed = next(e for e in seen if isinstance(e, ev.TaskFailed) and e.task_id == task)
        assert failed.failure_class == "cancelled" and not failed.final
        assert failed.audit_count == 1  # the abandoned call is audited
        # far sooner than the 30 s the model call would have taken (the target is < 1 s;
        # bench/executor.py measures it)
        assert stopped_after < 10, stopped_after
        end_open_transaction(base_settings, dangling)
        util = utilization.until(lambda s: any(
            isinstance(e, ev.ExecutorUtilization) and e.executor_id == f"exec-{unique}"
            and e.model_s > 0 for e in s))
        mine = [e for e in util if isinstance(e, ev.ExecutorUtilization)
                and e.executor_id == f"exec-{unique}"]
        assert {e.slot for e in mine} == {0, 1}
        assert all(abs(e.busy_s + e.idle_s - e.window_s) < 1e-6 for e in mine)

        # 2. SIGKILL while an attempt with a worktree runs: at restart the orphan is removed
        # and the redelivered dispatch is reported lost, not run a second time
        task = f"t-crash-{unique}"
        repo: Path = executor.repo  # type: ignore[attr-defined]
        producer.send([dispatched(task, "crash me")])
        tools.until(lambda s: any(isinstance(e, ev.ToolCall) for e in s), task_id=task)
        worktrees = executor.tmp / "data" / "worktrees" / "sample"
        assert [p.name for p in worktrees.iterdir()] == [f"{task}-a1"]
        time.sleep(0.5)  # the second model call is in flight
        executor.kill()
        calls_before = len(fake.calls)
        executor.start()
        crash = task
        seen = lifecycle.until(lambda s: any(isinstance(e, ev.TaskFailed) and e.task_id == crash
                                             for e in s), task_id=task, timeout_s=240)
        failed = next(e for e in seen if isinstance(e, ev.TaskFailed) and e.task_id == crash)
        assert failed.failure_class == "lost_executor" and failed.audit_count >= 2
        assert len(fake.calls) == calls_before  # not run a second time
        # the journal kept the audit events the answer re-published (live copies may be lost)
        state = Journal(executor.tmp / "data" / "executor-runs").read(task, 1)
        assert state is not None
        kept = state["audit"]
        assert len(kept) == failed.audit_count
        assert not any(worktrees.iterdir())
        assert git(repo, "worktree", "list").count("\n") == 1
        assert "orphaned worktrees removed" in executor.log_path.read_text()
    finally:
        end_open_transaction(base_settings, dangling)
        lifecycle.close()
        utilization.close()
        tools.close()
        executor.stop()


def send_dispatches(settings: Settings, events: list[ev.TaskDispatched],
                    partition: int = 0) -> None:
    """Dispatches in this order into one partition (as a coordinator would for tasks whose ids
    hash alike): what head-of-line blocking and offset commits are about."""
    p = Producer(settings.producer_config())
    serde = default_serde()
    for e in events:
        p.produce(DISPATCH, key=e.task_id.encode(), value=serde.encode(e),
                  headers=event_headers(e), partition=partition)
    assert p.flush(30) == 0


def wait_committed_to_end(settings: Settings, group: str, partition: int = 0,
                          timeout_s: float = 60.0) -> None:
    """Until `group` committed tasks.dispatch's `partition` up to its end."""
    c = Consumer({**settings.consumer_config(group), "enable.auto.commit": False})
    try:
        tp = TopicPartition(DISPATCH, partition)
        end = c.get_watermark_offsets(tp, timeout=30)[1]
        deadline = time.monotonic() + timeout_s
        while c.committed([tp], timeout=30)[0].offset < end:
            assert time.monotonic() < deadline, "the redelivered dispatches were not committed"
            time.sleep(0.2)
    finally:
        c.close()


def test_short_tasks_run_while_long_ones_do_and_unfinished_survive_sigkill(
        base_settings: Settings, executor: ExecutorProcess, fake: FakeProvider,
        unique: str) -> None:
    """Continuous dispatch (issue 13): with 3 slots, two 30 s attempts running and six 200 ms
    ones dispatched after them into the same partition, the short ones start and complete
    while the long ones run (the batch loop fetched nothing until its batch was done). Input
    offsets are committed only up to the lowest unfinished attempt: after a SIGKILL the long
    attempts' dispatches come back (reported lost, not re-run) and the finished short ones'
    model calls are not made again."""
    fake.set_script({"replies": [
        {"match": "LONG", "text": "slow answer", "latency_ms": 30_000, "times": None},
        {"match": "SHORT", "text": "quick answer", "latency_ms": 200, "times": None}]})
    executor.env["FLEETPLANE_EXECUTOR_SLOTS"] = "3"
    executor.start()
    executor.wait_log("partitions assigned")
    lifecycle = Reader(base_settings, LIFECYCLE)
    outcomes = Reader(base_settings, OUTCOMES)
    longs = [f"t-long{i}-{unique}" for i in range(2)]
    shorts = [f"t-short{i}-{unique}" for i in range(6)]
    try:
        send_dispatches(base_settings, [dispatched(t, f"LONG {t}", repository=None)
                                        for t in longs])
        lifecycle.until(lambda s: {e.task_id for e in s if isinstance(e, ev.TaskStarted)}
                        >= set(longs))
        long_started = time.monotonic()
        send_dispatches(base_settings, [dispatched(t, f"SHORT {t}", repository=None)
                                        for t in shorts])
        seen = outcomes.until(lambda s: {e.task_id for e in s if isinstance(e, ev.TaskCompleted)}
                              >= set(shorts), timeout_s=20)
        assert time.monotonic() - long_started < 25  # the long calls are still in flight
        done = {e.task_id for e in seen if isinstance(e, ev.TaskCompleted)}
        assert not done & set(longs)
        short_calls = sum("SHORT" in c.last_user_text for c in fake.calls)
        assert short_calls == len(shorts)

        time.sleep(0.5)  # the short outcomes' offsets: committed up to the first long dispatch
        executor.kill()
        executor.start()
        executor.wait_log("partitions assigned")  # start-up: seconds, more under load
        seen = lifecycle.until(lambda s: {e.task_id for e in s if isinstance(e, ev.TaskFailed)}
                               >= set(longs), timeout_s=30)
        lost = [e for e in seen if isinstance(e, ev.TaskFailed) and e.task_id in longs]
        assert {e.failure_class for e in lost} == {"lost_executor"}
        # the short attempts were not run again (redelivered or not, the journal answers)
        assert sum("SHORT" in c.last_user_text for c in fake.calls) == short_calls
        assert sum("LONG" in c.last_user_text for c in fake.calls) == len(longs)
        # every redelivered dispatch was handled (the group committed past all eight), and the
        # short attempts, whose outcomes were committed before the kill, were not answered a
        # second time from the journal: one TaskCompleted each (the chaos runs' duplicates)
        wait_committed_to_end(base_settings, executor.env["FLEETPLANE_EXECUTOR_GROUP_ID"])
        settle = time.monotonic() + 2
        while time.monotonic() < settle:  # what was committed with those offsets, and after
            outcomes.until(lambda s: True)
        completed = Counter(e.task_id for e in outcomes.seen if isinstance(e, ev.TaskCompleted))
        assert {t: completed[t] for t in shorts} == {t: 1 for t in shorts}
    finally:
        lifecycle.close()
        outcomes.close()
        executor.stop()


def test_lease_a_redelivered_dispatch_is_not_run_again_elsewhere(
        base_settings: Settings, executor: ExecutorProcess, fake: FakeProvider,
        producer: EventProducer, unique: str) -> None:
    """The durable attempt lease (issue 13): executor A claims an attempt (TaskStarted with
    lease_ms, acknowledged before the model call) and renews it with heartbeats; A is killed and
    executor B (another id, no journal: another machine) takes its partitions: the redelivered
    dispatch is not run while A's lease is live. A dispatch whose attempt was claimed by an
    executor long gone (expired lease) is reported lost_executor, not run either."""
    fake.set_script({"replies": [
        {"match": "LONG", "text": "slow answer", "latency_ms": 30_000, "times": None}]})
    # longer than B's start-up on a loaded machine (30 s measured at load average 40)
    executor.env["FLEETPLANE_EXECUTOR_LEASE_S"] = "120"
    executor.start()
    executor.wait_log("partitions assigned")
    lifecycle = Reader(base_settings, LIFECYCLE)
    task, gone = f"t-lease-{unique}", f"t-gone-{unique}"
    try:
        producer.send([dispatched(task, "LONG claimed", repository=None)])
        seen = lifecycle.until(lambda s: any(isinstance(e, ev.TaskHeartbeat) for e in s),
                               task_id=task)
        started = next(e for e in seen if isinstance(e, ev.TaskStarted))
        beat = next(e for e in seen if isinstance(e, ev.TaskHeartbeat))
        assert started.lease_ms > 0 and beat.lease_ms > 0
        assert started.executor_id == f"exec-{unique}"
        # killed mid-call: once the provider has the call (claimed is not yet calling: under
        # load the request can leave after the first heartbeats)
        deadline = time.monotonic() + 60
        while not any("LONG claimed" in c.last_user_text for c in fake.calls):
            assert time.monotonic() < deadline, "executor A never called the model"
            time.sleep(0.1)
        executor.kill()
        # an attempt claimed two minutes ago by an executor that is gone
        old = ev.utcnow_ms() - timedelta(minutes=2)
        producer.send([ev.TaskStarted(task_id=gone, team="payments", attempt=1,
                                      executor_id="exec-gone", lease_ms=5_000,
                                      occurred_at=old)])
        executor.env["FLEETPLANE_EXECUTOR_ID"] = f"exec-b-{unique}"
        executor.env["FLEETPLANE_DATA_DIR"] = str(executor.tmp / "data-b")
        executor.start()
        executor.wait_log("partitions assigned")
        deadline = time.monotonic() + 30
        while not any("lease is live on another executor" in line and task in line
                      for line in executor.log_path.read_text().splitlines()):
            assert time.monotonic() < deadline, executor.log_path.read_text()[-3000:]
            time.sleep(0.2)
        producer.send([dispatched(gone, "LONG gone", repository=None)])
        seen = lifecycle.until(lambda s: any(isinstance(e, ev.TaskFailed) for e in s),
                               task_id=gone, timeout_s=30)
        failed = next(e for e in seen if isinstance(e, ev.TaskFailed))
        assert failed.failure_class == "lost_executor" and not failed.final
        # A called the model once; B did not call it for either attempt
        assert sum("LONG claimed" in c.last_user_text for c in fake.calls) == 1
        assert not any("LONG gone" in c.last_user_text for c in fake.calls)
        assert not any(isinstance(e, ev.TaskStarted) and e.executor_id == f"exec-b-{unique}"
                       for e in lifecycle.seen)
    finally:
        lifecycle.close()
        executor.stop()
