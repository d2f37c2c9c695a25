"""A dispatch redelivered after the executor stopped is answered from the attempt's journal: the
answer carries the attempt's audit events, so its chain verifies even when the live copies never
reached the log (the process was killed before the broker acknowledged them, or the broker lost
them in a crash)."""

from __future__ import annotations

from pathlib import Path

from fleetplane.core import auditchain
from fleetplane.core import events as ev
from fleetplane.core.settings import Settings
from fleetplane.executor.handlers import _answer_redelivery
from fleetplane.executor.runtime import Journal, Runtime


def _dispatch() -> ev.TaskDispatched:
    spec = ev.TaskSpec(name="t", task_type="codegen", prompt="p")
    return ev.TaskDispatched(task_id="t-1", team="a", spec=spec, attempt=1, model="m",
                             provider="anthropic", tier="small", action="run", inputs={})


def _calls(d: ev.TaskDispatched, n: int) -> tuple[list[ev.ModelCall], auditchain.Chain]:
    chain = auditchain.Chain()
    calls = [chain.link(d.derive(ev.ModelCall, event_id=f"{d.event_id}-c{i}", attempt=1,
                                 call_index=i, model="m", provider="anthropic", tier="small",
                                 input_tokens=10, output_tokens=5, cost_usd=0.001,
                                 latency_ms=100.0, outcome="ok"))
             for i in range(n)]
    return calls, chain


def test_an_interrupted_attempt_is_reported_with_its_audit_events(tmp_path: Path) -> None:
    d = _dispatch()
    calls, chain = _calls(d, 2)
    previous = {"dispatch": d.event_id, "state": "running", "head": chain.head,
                "count": chain.count, "cost": 0.002, "audit": Journal.encode(list(calls))}
    out = _answer_redelivery(Runtime(Settings(), "e1"), d, previous)
    failed = out[-1]
    assert isinstance(failed, ev.TaskFailed) and failed.failure_class == "lost_executor"
    assert out[:-1] == calls
    assert auditchain.verify(calls, failed.audit_head, failed.audit_count).ok


def test_a_finished_attempt_is_answered_with_its_outcome_and_audit_events(
        tmp_path: Path) -> None:
    d = _dispatch()
    calls, chain = _calls(d, 3)
    done = d.derive(ev.TaskCompleted, event_id=f"{d.event_id}-done", attempt=1, model="m",
                    output="ok", cost_usd=0.003, duration_ms=10, audit_head=chain.head,
                    audit_count=chain.count)
    journal = Journal(tmp_path)
    journal.write(d.task_id, 1, {"dispatch": d.event_id, "state": "done",
                                 "audit": Journal.encode(list(calls)),
                                 "outcome": Journal.encode([done])})
    previous = journal.read(d.task_id, 1)
    assert previous is not None
    out = _answer_redelivery(Runtime(Settings(), "e1"), d, previous)
    assert out == [*calls, done]


def test_a_finished_attempt_whose_lease_ran_out_is_answered_as_lost_not_completed(
        tmp_path: Path) -> None:
    """Lease semantics for a redelivered, finished attempt: with most of its lease left the
    journal's TaskCompleted is published; with the lease expired (or nearly) the coordinator may
    already have declared the attempt lost and retried it, so the answer is a non-final
    lost_executor carrying the same cost and audit chain (one terminal record per task)."""
    d = _dispatch()
    calls, chain = _calls(d, 2)
    done = d.derive(ev.TaskCompleted, event_id=f"{d.event_id}-done", attempt=1, model="m",
                    output="ok", cost_usd=0.002, duration_ms=10, audit_head=chain.head,
                    audit_count=chain.count)
    previous = {"dispatch": d.event_id, "state": "done", "audit": Journal.encode(list(calls)),
                "outcome": Journal.encode([done])}
    rt = Runtime(Settings(), "e1")
    assert _answer_redelivery(rt, d, previous, lease_left_ms=rt.lease_ms - 1000) == [*calls, done]
    for left in (rt.lease_ms // 10, -1):
        out = _answer_redelivery(rt, d, previous, lease_left_ms=left)
        assert out[:-1] == calls
        lost = out[-1]
        assert isinstance(lost, ev.TaskFailed) and not lost.final
        assert lost.failure_class == "lost_executor"
        assert (lost.cost_usd, lost.audit_head, lost.audit_count) == (0.002, chain.head, 2)
        assert not any(isinstance(e, ev.TaskCompleted) for e in out)
