"""The coordinator's state machine (pure): dispatch once, retries, cancel, terminal states."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fleetplane.coordinator.backoff import MAX_DELAY_MS, backoff_ms
from fleetplane.coordinator.handlers import decide
from fleetplane.coordinator.state import SEEN_EVENT_IDS, Status, TaskState
from fleetplane.core import events as ev

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def spec(**kw: object) -> ev.TaskSpec:
    return ev.TaskSpec(name="n", task_type="refactor", prompt="p", write_scope=["src/**"],
                       **kw)  # type: ignore[arg-type]


def routed(attempt: int = 1, task_id: str = "t1", **kw: object) -> ev.TaskRouted:
    return ev.TaskRouted(task_id=task_id, team="team-a", spec=kw.pop("spec", spec()),
                         attempt=attempt, model="claude-x", provider="anthropic", tier="standard",
                         reason="cheapest", **kw)  # type: ignore[arg-type]


def failed(attempt: int = 1, final: bool = False) -> ev.TaskFailed:
    return ev.TaskFailed(task_id="t1", team="team-a", attempt=attempt, failure_class="timeout",
                         reason="took too long", final=final, cost_usd=0.25)


def run(state: TaskState | None, *events: ev.Event) -> tuple[TaskState | None, list[ev.Event]]:
    """Apply events in order; returns the final state and everything emitted."""
    out: list[ev.Event] = []
    for e in events:
        state, emitted = decide(state, e, now=NOW)
        out.extend(emitted)
    return state, out


def test_routed_dispatches_once_with_spec_and_routing() -> None:
    r = routed()
    state, out = decide(None, r, now=NOW)
    assert state is not None and state.status is Status.DISPATCHED and state.attempt == 1
    assert len(out) == 1
    d = out[0]
    assert isinstance(d, ev.TaskDispatched)
    assert (d.task_id, d.team, d.attempt) == ("t1", "team-a", 1)
    assert (d.model, d.provider, d.tier) == ("claude-x", "anthropic", "standard")
    assert d.spec == r.spec
    assert d.leased_paths == ["src/**"]
    assert d.causation_id == r.event_id
    assert state.leased_paths == ["src/**"]


def test_duplicate_routed_is_ignored() -> None:
    r = routed()
    state, _ = decide(None, r, now=NOW)
    # the same record redelivered (same event id) and a re-publication (new id, same attempt)
    for dup in (r, routed()):
        again, out = decide(state, dup, now=NOW)
        assert out == []
        assert again is state  # nothing to write


def test_reprocessing_an_input_derives_identical_events() -> None:
    """After a crash an input may be processed again from the recovered state: the events it
    derives then have the same ids, so downstream deduplication by event_id holds."""
    r = routed()
    _, first = decide(None, r, now=NOW)
    _, second = decide(None, r, now=NOW)
    assert first == second
    assert first[0].event_id != r.event_id


def test_started_and_heartbeat_make_it_running() -> None:
    state, _ = decide(None, routed(), now=NOW)
    started = ev.TaskStarted(task_id="t1", team="team-a", attempt=1, executor_id="ex-1")
    state, out = run(state, started)
    assert out == [] and state is not None
    assert state.status is Status.RUNNING and state.executor_id == "ex-1"
    hb = ev.TaskHeartbeat(task_id="t1", team="team-a", attempt=1, executor_id="ex-1")
    state, out = run(state, hb)
    assert out == [] and state is not None and state.last_heartbeat_at == hb.occurred_at
    # a heartbeat of another attempt changes nothing
    stale = ev.TaskHeartbeat(task_id="t1", team="team-a", attempt=7, executor_id="ex-9")
    assert decide(state, stale, now=NOW) == (state, [])


def test_progress_for_unknown_task_is_ignored() -> None:
    hb = ev.TaskHeartbeat(task_id="nope", team="team-a", attempt=1, executor_id="ex-1")
    assert decide(None, hb, now=NOW) == (None, [])


def test_failure_retries_then_fails_for_good() -> None:
    state, _ = decide(None, routed(spec=spec(max_attempts=2)), now=NOW)
    f1 = failed(1)
    state, out = run(state, f1)
    assert [type(e) for e in out] == [ev.TaskRetrying, ev.TaskDispatched]
    retrying, dispatched = out
    assert isinstance(retrying, ev.TaskRetrying) and isinstance(dispatched, ev.TaskDispatched)
    assert retrying.attempt == 2 and dispatched.attempt == 2
    assert retrying.delay_ms == backoff_ms("t1", 1) > 0
    assert "timeout" in retrying.reason
    assert retrying.causation_id == dispatched.causation_id == f1.event_id
    assert dispatched.model == "claude-x" and dispatched.leased_paths == ["src/**"]
    assert state is not None and state.status is Status.DISPATCHED and state.attempt == 2

    # the same failure redelivered, and a late failure of attempt 1, change nothing
    assert decide(state, f1, now=NOW) == (state, [])
    assert decide(state, failed(1), now=NOW) == (state, [])

    f2 = failed(2)
    state, out = run(state, f2)
    assert len(out) == 1
    final = out[0]
    assert isinstance(final, ev.TaskFailed) and final.final and ev.is_terminal(final)
    assert final.attempt == 2 and final.causation_id == f2.event_id
    assert final.cost_usd == 0.0  # the attempt's cost was reported on the executor's event
    assert state is not None and state.status is Status.FAILED and state.terminal
    assert state.leased_paths == [] and state.spec is None
    # our own TaskFailed(final) comes back on tasks.outcomes: ignored
    assert decide(state, final, now=NOW) == (state, [])


def test_router_reroute_after_retry_is_not_dispatched_twice() -> None:
    state, _ = decide(None, routed(1), now=NOW)
    state, out = run(state, failed(1))
    assert [e.attempt for e in out if isinstance(e, ev.TaskDispatched)] == [2]
    state, out = run(state, routed(2))  # the router re-routing attempt 2 (already dispatched)
    assert out == []
    state, out = run(state, routed(3))  # a next attempt is dispatched
    assert [type(e) for e in out] == [ev.TaskDispatched]
    assert state is not None and state.attempt == 3


def test_backoff_is_deterministic_exponential_and_capped() -> None:
    delays = [backoff_ms("task", a) for a in range(1, 12)]
    assert delays == [backoff_ms("task", a) for a in range(1, 12)]
    for attempt, delay in enumerate(delays, start=1):
        ceiling = min(MAX_DELAY_MS, 1000 * 2 ** (attempt - 1))
        assert ceiling // 2 <= delay <= ceiling
    assert max(delays) <= MAX_DELAY_MS
    assert backoff_ms("task", 3) != backoff_ms("other-task", 3)  # jitter differs per task


@pytest.mark.parametrize("outcome", [
    ev.TaskCompleted(task_id="t1", team="team-a", attempt=1, model="m", output="ok",
                     cost_usd=0.1, duration_ms=5),
    ev.TaskAbandoned(task_id="t1", team="team-a", attempt=1, reason="gave up"),
    ev.TaskRolledBack(task_id="t1", team="team-a", attempt=1, reason="tests broke"),
    ev.TaskFailed(task_id="t1", team="team-a", attempt=1, failure_class="policy",
                  reason="denied", final=True),
])
def test_terminal_outcome_ends_the_task_and_nothing_moves_it(outcome: ev.Event) -> None:
    state, _ = decide(None, routed(), now=NOW)
    state, out = run(state, outcome)
    assert out == []
    assert state is not None and state.terminal and state.outcome == type(outcome).__name__
    assert state.leased_paths == []
    later: list[ev.Event] = [
        ev.TaskCompleted(task_id="t1", team="team-a", attempt=1, model="m", output="again",
                         cost_usd=0.1, duration_ms=5),
        routed(1), routed(2), failed(1),
        ev.TaskHeartbeat(task_id="t1", team="team-a", attempt=1, executor_id="ex"),
        ev.ControlCommand(task_id="t1", team="team-a", command="cancel"),
    ]
    for e in later:
        assert decide(state, e, now=NOW) == (state, [])


def test_outcome_of_a_superseded_attempt_is_ignored() -> None:
    state, _ = decide(None, routed(), now=NOW)
    state, _ = run(state, failed(1))  # attempt 2 dispatched
    late = ev.TaskCompleted(task_id="t1", team="team-a", attempt=1, model="m", output="late",
                            cost_usd=0.1, duration_ms=5)
    assert decide(state, late, now=NOW) == (state, [])


def test_outcome_for_unknown_task_records_it_terminal() -> None:
    """E.g. the router completed the task from its response cache: never dispatch it later."""
    done = ev.TaskCompleted(task_id="t1", team="team-a", attempt=1, model="cache", output="x",
                            cost_usd=0.0, duration_ms=1, cached=True)
    state, out = decide(None, done, now=NOW)
    assert out == [] and state is not None and state.status is Status.COMPLETED
    assert decide(state, routed(), now=NOW) == (state, [])


def test_cancel_running_task() -> None:
    state, _ = decide(None, routed(), now=NOW)
    cmd = ev.ControlCommand(task_id="t1", team="team-a", command="cancel", requested_by="ops",
                            reason="wrong repo")
    state, out = run(state, cmd)
    assert len(out) == 1
    cancelled = out[0]
    assert isinstance(cancelled, ev.TaskCancelled) and ev.is_terminal(cancelled)
    assert cancelled.reason == "wrong repo" and cancelled.requested_by == "ops"
    assert cancelled.causation_id == cmd.event_id
    assert state is not None and state.status is Status.CANCELLED
    # a second cancel and our own TaskCancelled echo are ignored
    assert decide(state, ev.ControlCommand(task_id="t1", team="team-a", command="cancel"),
                  now=NOW) == (state, [])
    assert decide(state, cancelled, now=NOW) == (state, [])


def test_cancel_before_routing_prevents_dispatch() -> None:
    cmd = ev.ControlCommand(task_id="t1", team="team-a", command="cancel")
    state, out = decide(None, cmd, now=NOW)
    assert [type(e) for e in out] == [ev.TaskCancelled]
    assert state is not None and state.status is Status.CANCELLED
    assert decide(state, routed(), now=NOW) == (state, [])


def test_other_commands_and_fleet_wide_commands_are_ignored() -> None:
    state, _ = decide(None, routed(), now=NOW)
    assert decide(state, ev.ControlCommand(task_id="t1", team="team-a", command="pause"),
                  now=NOW) == (state, [])
    assert decide(None, ev.ControlCommand(task_id="", team="", command="cancel"),
                  now=NOW) == (None, [])


def test_events_not_for_the_coordinator_are_ignored() -> None:
    state, _ = decide(None, routed(), now=NOW)
    retry = ev.TaskRetrying(task_id="t1", team="team-a", attempt=2, delay_ms=1, reason="r")
    assert decide(state, retry, now=NOW) == (state, [])


def test_seen_event_ids_are_bounded_and_deduplicate() -> None:
    state, _ = decide(None, routed(), now=NOW)
    beats = [ev.TaskHeartbeat(task_id="t1", team="team-a", attempt=1, executor_id="ex")
             for _ in range(SEEN_EVENT_IDS + 5)]
    state, _ = run(state, *beats)
    assert state is not None and len(state.seen) == SEEN_EVENT_IDS
    assert state.seen[-1] == beats[-1].event_id
    assert decide(state, beats[-1], now=NOW) == (state, [])


def test_state_round_trips_through_json() -> None:
    state, _ = decide(None, routed(), now=NOW)
    assert state is not None
    assert TaskState.from_bytes(state.to_bytes()) == state
