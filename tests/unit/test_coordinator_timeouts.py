"""The coordinator's timeouts (issue 12, Build 4): an attempt dispatched and never started, a
running attempt held for approval after a conflict that nobody decides, and the executor's
durable lease (TaskStarted/TaskHeartbeat ``lease_ms``) expiring without a heartbeat."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetplane.coordinator.scheduler import INPUTS_READ_UNTIL, TICK, AdmissionPolicy, Scheduler
from fleetplane.coordinator.state import Status, TaskRow
from fleetplane.coordinator.world import World
from fleetplane.core import events as ev
from tests.unit.coordinator_oracle import FullPassScheduler
from tests.unit.test_coordinator_scheduler import Harness, dispatched, held, kinds


def lost(out: list[ev.Event]) -> list[ev.TaskFailed]:
    return [e for e in out if isinstance(e, ev.TaskFailed) and e.failure_class == "lost_executor"]


def test_dispatched_never_started_is_lost_after_the_start_timeout() -> None:
    h = Harness(start_timeout_ms=30_000, backoff_base_ms=1)
    h.route("t1", scope=["src/**"])
    h.route("t2", scope=["src/a"])  # waits for t1's lease
    assert h.state("t1") is Status.DISPATCHED and h.state("t2") is Status.WAITING
    assert h.tick(29.0) == []
    out = h.tick(2.0)
    [f] = lost(out)
    assert f.task_id == "t1" and not f.final and "never started" in f.reason
    assert "TaskRetrying" in kinds(out) and dispatched(out) == ["t2"]  # the lease is released
    assert h.state("t1") is Status.WAITING and h.world.tasks["t1"].next_attempt == 2


def test_a_started_attempt_is_not_lost_by_the_start_timeout() -> None:
    h = Harness(start_timeout_ms=30_000)
    h.route("t1")
    h.send(ev.TaskStarted(task_id="t1", team="a", attempt=1, executor_id="ex",
                          occurred_at=h.now))
    for _ in range(5):
        h.tick(10.0)
        h.send(ev.TaskHeartbeat(task_id="t1", team="a", attempt=1, executor_id="ex",
                                occurred_at=h.now))
    assert not lost(h.log) and h.state("t1") is Status.RUNNING


def conflict_hold(h: Harness) -> None:
    h.route("t1", scope=["src/a/**"], conflict_policy="hold")
    h.route("t2", scope=["src/b/**"])
    h.send(ev.TaskStarted(task_id="t1", team="a", attempt=1, executor_id="ex",
                          occurred_at=h.now))
    out = h.send(ev.WorkspaceChange(
        task_id="t1", team="a", attempt=1, repository="r1", branch="x",
        files=[ev.FileChange(path="src/b/x.py", added=1, removed=0)], occurred_at=h.now))
    assert held(out)[0].kind == "approval" and h.world.tasks["t1"].conflict_hold


def test_a_conflict_hold_nobody_decides_is_stopped_and_rolled_back() -> None:
    h = Harness(conflict_hold_timeout_ms=600_000, heartbeat_timeout_ms=10_000_000,
                start_timeout_ms=0)
    conflict_hold(h)
    assert [e for e in h.tick(599.0) if isinstance(e, ev.TaskDispatched)] == []
    out = h.tick(2.0)
    assert [e.action for e in out if isinstance(e, ev.TaskDispatched)] == ["rollback"]
    assert any("no approve/reject" in e.reason for e in held(out))
    assert h.state("t1") is Status.ROLLING_BACK and not h.world.tasks["t1"].conflict_hold
    assert h.tick(700.0) == []  # stopped once
    out = h.send(ev.TaskRolledBack(task_id="t1", team="a", attempt=1, reason="reverted",
                                   occurred_at=h.now))
    assert h.state("t1") is Status.ROLLED_BACK


def test_an_approved_conflict_hold_is_not_stopped() -> None:
    h = Harness(conflict_hold_timeout_ms=600_000, heartbeat_timeout_ms=10_000_000,
                start_timeout_ms=0)
    conflict_hold(h)
    h.control("approve", "t1", team="a")
    assert not [e for e in h.tick(900.0) if isinstance(e, ev.TaskDispatched)]
    assert h.state("t1") is Status.RUNNING


def test_an_expired_lease_is_lost_and_retried_once_at_once() -> None:
    """The lease (30 s) ends before the heartbeat timeout (60 s): the attempt is declared lost
    when its lease expires, and retried at once even under failure_policy abandon."""
    h = Harness(heartbeat_timeout_ms=60_000)
    h.route("t1", failure_policy="abandon", max_attempts=3)
    h.send(ev.TaskStarted(task_id="t1", team="a", attempt=1, executor_id="ex",
                          lease_ms=30_000, occurred_at=h.now))
    h.tick(20.0)
    h.send(ev.TaskHeartbeat(task_id="t1", team="a", attempt=1, executor_id="ex",
                            lease_ms=30_000, occurred_at=h.now))  # renewed: live 30 s more
    assert h.tick(29.0) == []
    out = h.tick(2.0)
    [f] = lost(out)
    assert "lease of executor ex expired" in f.reason
    [r] = [e for e in out if isinstance(e, ev.TaskRetrying)]
    assert r.attempt == 2 and r.delay_ms == 0
    assert [(e.task_id, e.attempt) for e in out if isinstance(e, ev.TaskDispatched)] == \
        [("t1", 2)]
    # the next attempt is not lost by the first attempt's lease, and is lost once by its own
    h.send(ev.TaskStarted(task_id="t1", team="a", attempt=2, executor_id="ex2",
                          lease_ms=30_000, occurred_at=h.now))
    assert h.tick(10.0) == []
    out = h.tick(25.0)
    assert [f.attempt for f in lost(out)] == [2]


def test_a_lease_is_not_lost_over_inputs_the_scheduler_has_not_seen() -> None:
    """After a restart or a broker outage the repartition step is behind: its ticks say up to
    when it had read the inputs, and silence is counted only up to there (the chaos run: a
    completed attempt declared lost from a backlog, retried, and completed twice)."""
    h = Harness(heartbeat_timeout_ms=60_000)
    h.route("t1")
    started = h.now
    h.send(ev.TaskStarted(task_id="t1", team="a", attempt=1, executor_id="ex",
                          lease_ms=30_000, occurred_at=h.now))

    def tick(seconds: float, read_until: datetime) -> list[ev.Event]:
        h.now += timedelta(seconds=seconds)
        until_ms = int(read_until.timestamp() * 1000)
        return h.send(ev.ControlCommand(task_id="", team="", command=TICK,
                                        reason=f"{INPUTS_READ_UNTIL}{until_ms}",
                                        occurred_at=h.now))

    # 90 s of wall clock, but the inputs were read only 10 s past the start: not lost
    assert lost(tick(90.0, started + timedelta(seconds=10))) == []
    # the backlog is forwarded: the outcome arrives and nothing was declared lost
    h.send(ev.TaskCompleted(task_id="t1", team="a", attempt=1, model="m", output="ok",
                            cost_usd=0.01, duration_ms=8000, occurred_at=started))
    assert h.state("t1") is Status.COMPLETED and not lost(h.log)
    # with the inputs read past the lease, a silent attempt is lost as before
    h.route("t2")
    h.send(ev.TaskStarted(task_id="t2", team="a", attempt=1, executor_id="ex",
                          lease_ms=30_000, occurred_at=h.now))
    [f] = lost(tick(31.0, h.now + timedelta(seconds=31)))
    assert f.task_id == "t2" and "lease of executor ex expired" in f.reason


def test_an_expired_lease_on_the_last_attempt_follows_the_failure_policy() -> None:
    h = Harness(heartbeat_timeout_ms=60_000)
    h.route("t1", failure_policy="retry", max_attempts=1)
    h.send(ev.TaskStarted(task_id="t1", team="a", attempt=1, executor_id="ex",
                          lease_ms=5_000, occurred_at=h.now))
    out = h.tick(6.0)
    assert lost(out) and h.state("t1") is Status.FAILED


# -- issue 16: a task whose dependency failed, was cancelled or rejected fails at once -------
def test_a_dependency_rejected_at_intake_fails_its_dependent_at_once() -> None:
    """The dependency never reaches the router (TaskRejected on tasks.lifecycle): its
    dependent used to wait for it forever ("waits for d1 to complete")."""
    h = Harness()
    out = h.route("t1", depends_on=["d1"])
    assert held(out)[0].kind == "dependency"
    out = h.send(ev.TaskRejected(task_id="d1", team="a", reason="repository: not registered",
                                 field="repository", occurred_at=h.now))
    [f] = [e for e in out if isinstance(e, ev.TaskFailed)]
    assert f.task_id == "t1" and f.final and f.failure_class == "dependency"
    assert "dependency d1 ended failed: rejected: repository: not registered" in f.reason
    assert h.state("t1") is Status.FAILED
    # a dependent arriving after the rejection fails on arrival
    out = h.route("t2", depends_on=["d1"])
    assert [e.task_id for e in out if isinstance(e, ev.TaskFailed) and e.final] == ["t2"]


def test_a_dependent_is_told_why_its_dependency_failed_or_was_cancelled() -> None:
    h = Harness()
    h.route("d1", max_attempts=1)
    h.route("t1", depends_on=["d1"])
    out = h.fail("d1", "model_error")
    [f] = [e for e in out if isinstance(e, ev.TaskFailed) and e.task_id == "t1"]
    assert "dependency d1 ended failed: boom" in f.reason
    h.route("d2")
    h.route("t2", depends_on=["d2"])
    out = h.send(ev.ControlCommand(task_id="d2", team="a", command="cancel",
                                   reason="not needed", occurred_at=h.now))
    [f] = [e for e in out if isinstance(e, ev.TaskFailed) and e.task_id == "t2"]
    assert f.reason.endswith("dependency d2 ended cancelled: not needed")


def test_a_rejection_does_not_touch_a_known_task() -> None:
    h = Harness()
    h.route("t1")
    assert h.send(ev.TaskRejected(task_id="t1", team="a", reason="dup",
                                  occurred_at=h.now)) == []
    assert h.state("t1") is Status.DISPATCHED


def test_heartbeats_write_a_small_beat_record_and_a_failover_still_knows_the_lease() -> None:
    """A heartbeat changes only the heartbeat and lease of a running row: the table gets a
    small beat/ record, not the whole row (spec, 32 event ids); a coordinator restored from
    the table's records (a failover) declares the attempt lost when its latest lease ends,
    not at the lease of the last whole row."""
    h = Harness(heartbeat_timeout_ms=600_000)
    h.route("t1", max_attempts=3, system_prompt="x" * 2_000)
    h.send(ev.TaskStarted(task_id="t1", team="a", attempt=1, executor_id="ex",
                          lease_ms=30_000, occurred_at=h.now))
    table: dict[bytes, bytes] = {}

    def write() -> list[tuple[bytes, bytes | None]]:
        rows = h.world.take_rows()
        for key, value in rows:
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
        return rows

    first = dict(write())
    # the large spec in a spec/ record of its own, the row without it
    spec, whole = first[b"spec/t1"], first[b"task/t1"]
    assert spec is not None and len(spec) > 2_000 and whole is not None and len(whole) < 600
    for _ in range(10):
        h.now += timedelta(seconds=20)
        h.send(ev.TaskHeartbeat(task_id="t1", team="a", attempt=1, executor_id="ex",
                                lease_ms=30_000, occurred_at=h.now))
        rows = write()
        assert [k for k, _ in rows] == [b"beat/t1"]
        # the lease as an offset from the heartbeat, updated_at only when it differs
        assert all(v is not None and len(v) < 80 for _, v in rows), rows
    # the failover: a world restored from the table's records is the world that ran
    restored = World.load(table.items())
    assert restored.tasks["t1"] == h.world.tasks["t1"]
    h.world = restored
    assert h.tick(29.0) == []  # 200 s after the last whole row, but the lease is 29 s old
    [f] = lost(h.tick(2.0))
    assert "lease of executor ex expired" in f.reason
    # the whole row is written again (a new attempt): the beat record is deleted with it
    rows = dict(write())
    assert rows[b"beat/t1"] is None and rows[b"task/t1"] is not None
    assert b"beat/t1" not in table and b"task/t1" in table


def test_an_older_or_repeated_heartbeat_does_not_move_the_lease_back() -> None:
    h = Harness(heartbeat_timeout_ms=600_000)
    h.route("t1")
    h.send(ev.TaskStarted(task_id="t1", team="a", attempt=1, executor_id="ex",
                          lease_ms=30_000, occurred_at=h.now))
    late = ev.TaskHeartbeat(task_id="t1", team="a", attempt=1, executor_id="ex",
                            lease_ms=30_000, occurred_at=h.now + timedelta(seconds=20))
    early = ev.TaskHeartbeat(task_id="t1", team="a", attempt=1, executor_id="ex",
                             lease_ms=30_000, occurred_at=h.now + timedelta(seconds=10))
    h.send(late)
    h.send(early)  # delivered out of order
    h.send(late)  # and again
    row = h.world.tasks["t1"]
    assert row.last_heartbeat_at == late.occurred_at
    assert row.lease_until == late.occurred_at + timedelta(seconds=30)


_T = datetime(2026, 3, 1, tzinfo=UTC)
_OFFSET = st.one_of(st.none(),
                    st.integers(0, 120_000).map(lambda ms: _T + timedelta(milliseconds=ms)))
_ROW = st.fixed_dictionaries({
    "status": st.sampled_from([Status.DISPATCHED, Status.RUNNING, Status.ROLLING_BACK]),
    "dispatched_at": _OFFSET, "last_heartbeat_at": _OFFSET, "lease_until": _OFFSET,
    "conflict_hold": st.booleans(), "conflict_held_at": _OFFSET})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(timeouts=st.tuples(st.integers(1, 60_000), st.integers(0, 60_000), st.integers(0, 60_000)),
       data=st.data())
def test_the_deadline_kept_per_row_finds_what_classifying_every_row_finds(
        timeouts: tuple[int, int, int], data: st.DataObject) -> None:
    """Scheduler._expired compares one deadline per active attempt, kept with the row it was
    computed from; it must name the attempts (and why) that classifying every row names, at
    every tick, also when rows change between ticks (heartbeats) and ticks go back in time
    (a tick's horizon can be behind the previous one's)."""
    heartbeat, start, hold = timeouts
    scheduler = Scheduler(AdmissionPolicy(heartbeat_timeout_ms=heartbeat, start_timeout_ms=start,
                                          conflict_hold_timeout_ms=hold))
    oracle = FullPassScheduler(scheduler.policy)
    world = World()
    scheduler.world = oracle.world = world
    n = data.draw(st.integers(1, 8))
    for _ in range(data.draw(st.integers(1, 12))):
        for i in data.draw(st.lists(st.integers(0, n - 1), max_size=n)):  # rows (re)written
            world.put(TaskRow(task_id=f"t{i}", team="a", updated_at=_T, **data.draw(_ROW)))
        at = _T + timedelta(milliseconds=data.draw(st.integers(0, 200_000)))
        assert scheduler._expired(at) == oracle._expired(at)
