"""The invariant checker (fleetplane.testing.invariants) flags each kind of violation it claims to
find, and passes a clean log: the chaos run's verdict is only as good as this."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fleetplane.core import events as ev
from fleetplane.core.auditchain import Chain
from fleetplane.core.topics import ACCEPTED, DISPATCH, LIFECYCLE, MODEL_CALLS, OUTCOMES, WORKSPACE
from fleetplane.testing.invariants import Log, check

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def spec(scope: list[str] | None = None) -> ev.TaskSpec:
    return ev.TaskSpec(name="t", task_type="codegen", prompt="p",
                       repository="repo" if scope else None, write_scope=scope or [])


def run_task(log: Log, task: str, team: str, start: float, end: float,
             scope: list[str] | None = None, attempt: int = 1) -> None:
    chain = Chain()
    call = chain.link(ev.ModelCall(event_id=f"{task}-call-0", task_id=task, team=team,
                                   attempt=attempt, call_index=0, model="m",
                                   provider="anthropic", tier="small", input_tokens=1,
                                   output_tokens=1, cost_usd=0.01, latency_ms=1, outcome="ok",
                                   occurred_at=at(start)))
    log.records += [
        (ACCEPTED, ev.TaskAccepted(task_id=task, team=team, spec=spec(scope), occurred_at=at(0))),
        (DISPATCH, ev.TaskDispatched(task_id=task, team=team, spec=spec(scope), attempt=attempt,
                                     model="m", provider="anthropic", tier="small",
                                     leased_paths=scope or [], occurred_at=at(start))),
        (MODEL_CALLS, call),
        (OUTCOMES, ev.TaskCompleted(event_id=f"{task}-done", task_id=task, team=team,
                                    attempt=attempt, model="m", output="ok", cost_usd=0.01,
                                    duration_ms=1, occurred_at=at(end), audit_head=chain.head,
                                    audit_count=chain.count)),
    ]


def quota(_team: str) -> int:
    return 2


def clean_log() -> Log:
    log = Log()
    run_task(log, "a", "pay", 0, 10, ["src/**"])
    run_task(log, "b", "pay", 10, 20, ["src/x/**"])   # starts when a ends: no overlap
    run_task(log, "c", "pay", 0, 20, ["docs/**"])
    return log


def test_a_clean_log_passes_with_its_figures() -> None:
    v = check(clean_log(), {"a", "b", "c"}, quota)
    assert v.ok, v.counts()
    assert (v.accepted, v.attempts, v.model_calls) == (3, 3, 3)
    assert v.terminal == {"TaskCompleted": 3}
    assert v.audits_verified == 3
    assert v.max_running == {"pay": 2}


def test_an_acknowledged_submission_never_accepted_is_lost() -> None:
    v = check(clean_log(), {"a", "b", "c", "ghost"}, quota)
    assert v.lost == ["ghost"] and not v.ok


def test_an_accepted_task_without_terminal_state_is_stuck() -> None:
    log = clean_log()
    log.records = [(t, e) for t, e in log.records if e.event_id != "c-done"]
    v = check(log, {"a", "b", "c"}, quota)
    assert "c" in v.stuck and any("c/a1" in s for s in v.stuck)


def test_two_terminal_events_or_one_delivered_twice_are_duplicates() -> None:
    log = clean_log()
    log.records.append((OUTCOMES, ev.TaskFailed(task_id="a", team="pay", attempt=1,
                                                failure_class="model_error", reason="x",
                                                final=True, occurred_at=at(11))))
    done_b = next(e for _, e in log.records if e.event_id == "b-done")
    log.records.append((OUTCOMES, done_b))
    v = check(log, {"a", "b", "c"}, quota)
    assert v.duplicated == ["a", "b"]


def test_a_model_call_recorded_twice_or_two_commits_of_one_attempt_are_double_effects() -> None:
    log = clean_log()
    call = next(e for _, e in log.records if isinstance(e, ev.ModelCall) and e.task_id == "a")
    log.records.append((MODEL_CALLS, call.model_copy(update={"event_id": "a-call-0-again"})))
    for sha in ("1" * 40, "2" * 40):
        log.records.append((WORKSPACE, ev.WorkspaceChange(task_id="b", team="pay", attempt=1,
                                                          repository="repo", branch="br",
                                                          commit=sha)))
    v = check(log, {"a", "b", "c"}, quota)
    assert len(v.double_effects) == 2, v.double_effects
    assert v.ok is False


def test_overlapping_scopes_running_together_are_flagged_disjoint_ones_are_not() -> None:
    log = clean_log()
    run_task(log, "d", "search", 5, 15, ["src/x/y.py"])   # overlaps a (src/**) and b in time
    run_task(log, "e", "search", 5, 15, ["tests/**"])
    v = check(log, {"a", "b", "c", "d", "e"}, quota)
    assert len(v.lease_overlaps) == 2, v.lease_overlaps
    assert all("d/a1" in o for o in v.lease_overlaps)


def test_more_attempts_of_a_team_than_its_quota_is_a_breach() -> None:
    log = clean_log()
    run_task(log, "d", "pay", 5, 6)
    v = check(log, {"a", "b", "c", "d"}, quota)
    assert v.max_running["pay"] == 3
    assert v.quota_breaches == ["pay: 3 running, quota 2"]


def test_a_non_final_failure_ends_the_attempt_and_a_retry_is_a_new_interval() -> None:
    log = Log()
    run_task(log, "a", "pay", 10, 20, ["src/**"], attempt=2)
    log.records += [
        (DISPATCH, ev.TaskDispatched(task_id="a", team="pay", spec=spec(["src/**"]), attempt=1,
                                     model="m", provider="anthropic", tier="small",
                                     leased_paths=["src/**"], occurred_at=at(0))),
        (LIFECYCLE, ev.TaskFailed(task_id="a", team="pay", attempt=1,
                                  failure_class="lost_executor", reason="killed",
                                  occurred_at=at(9))),
    ]
    run_task(log, "b", "pay", 9.5, 9.8, ["src/b/**"])  # between the two attempts of a
    v = check(log, {"a", "b"}, quota)
    assert v.ok, (v.counts(), v.lease_overlaps)
    assert v.attempts == 3


def test_an_audit_event_missing_or_changed_breaks_the_chain() -> None:
    log = clean_log()
    log.records = [(t, e) for t, e in log.records if e.event_id != "a-call-0"]
    i, (topic, call) = next((i, r) for i, r in enumerate(log.records)
                            if r[1].event_id == "b-call-0")
    assert isinstance(call, ev.ModelCall)
    log.records[i] = (topic, call.model_copy(update={"cost_usd": 0.0}))
    v = check(log, {"a", "b", "c"}, quota)
    assert [b.split(":")[0] for b in v.audit_breaks] == ["a/a1", "b/a1"], v.audit_breaks


def test_the_executors_report_vouches_for_the_chain_not_the_coordinators_declaration() -> None:
    """The coordinator declares an attempt lost_executor without its audit events (it claims
    none); the executor's own report of the attempt, later on the log, carries the chain. The
    chain is checked against that report; with no report claiming them the events stay a
    break."""
    log = clean_log()
    i = next(i for i, r in enumerate(log.records) if r[1].event_id == "a-done")
    declared = ev.TaskFailed(event_id="a-lost", task_id="a", team="pay", attempt=1,
                             failure_class="lost_executor", final=False,
                             reason="no heartbeat from executor e1 for 31.0s", occurred_at=at(9))
    log.records.insert(i, (OUTCOMES, declared))
    v = check(log, {"a", "b", "c"}, quota)
    assert v.audit_breaks == [] and v.audits_verified == 3, v.audit_breaks

    log.records = [(t, e) for t, e in log.records if e.event_id != "a-done"]
    v = check(log, {"a", "b", "c"}, quota)
    assert [b.split(":")[0] for b in v.audit_breaks] == ["a/a1"], v.audit_breaks
