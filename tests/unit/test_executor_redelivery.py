"""A dispatch redelivered after the executor stopped is answered from the attempt's journal: the
answer carries the attempt's audit events, so its chain verifies even when the live copies never
reached the log (the process was killed before the broker acknowledged them, or the broker lost
them in a crash)."""

from __future__ import annotations

import time
from pathlib import Path

from fleetplane.core import auditchain
from fleetplane.core import events as ev
from fleetplane.core.catalog import load_catalog
from fleetplane.core.settings import Settings
from fleetplane.executor.chains import UnreportedChains
from fleetplane.executor.handlers import SeenDispatches, _answer_redelivery, execute
from fleetplane.executor.leases import LeaseTable
from fleetplane.executor.models import ModelClients
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


def _declared_lost(d: ev.TaskDispatched, claimed: int) -> LeaseTable:
    """The lease table after the coordinator's (or an executor's) outcome of the attempt."""
    leases = LeaseTable(Settings(), "e2")
    leases.finished(d.task_id, 1, at_ms=1, audit_count=claimed)
    return leases


def _redeliver(tmp_path: Path, d: ev.TaskDispatched, state: dict[str, object],
               leases: LeaseTable) -> list[ev.Event]:
    journal = Journal(tmp_path / "journal")
    journal.write(d.task_id, 1, state)
    rt = Runtime(Settings(), "e2", journal=journal)
    settings = Settings()
    return list(execute(load_catalog(settings.catalog_file), ModelClients(settings), "e2",
                        SeenDispatches(), d, runtime=rt, leases=leases))


def test_an_attempt_declared_lost_while_its_executor_was_down_reports_its_audit_chain(
        tmp_path: Path) -> None:
    """The 2,000-task chaos run: an executor made a model call, was down for longer than the
    lease, and the coordinator declared the attempt lost (claiming no audit events). The
    restarted executor read the dispatch again and, seeing the attempt finished, said nothing:
    no outcome vouched for the model call on the log. It now reports the journal's chain as a
    non-final lost_executor (the coordinator ignores it: the attempt was retried)."""
    d = _dispatch()
    calls, chain = _calls(d, 1)
    running = {"dispatch": d.event_id, "state": "running", "head": chain.head,
               "count": chain.count, "cost": 0.001, "audit": Journal.encode(list(calls))}
    out = _redeliver(tmp_path, d, running, _declared_lost(d, claimed=0))
    failed = out[-1]
    assert isinstance(failed, ev.TaskFailed) and not failed.final
    assert failed.failure_class == "lost_executor"
    assert out[:-1] == calls
    assert auditchain.verify(calls, failed.audit_head, failed.audit_count).ok


def test_a_finished_attempt_declared_lost_first_is_reported_as_superseded_not_completed(
        tmp_path: Path) -> None:
    d = _dispatch()
    calls, chain = _calls(d, 2)
    done = d.derive(ev.TaskCompleted, event_id=f"{d.event_id}-done", attempt=1, model="m",
                    output="ok", cost_usd=0.002, duration_ms=10, audit_head=chain.head,
                    audit_count=chain.count)
    state = {"dispatch": d.event_id, "state": "done", "audit": Journal.encode(list(calls)),
             "outcome": Journal.encode([done])}
    out = _redeliver(tmp_path, d, state, _declared_lost(d, claimed=0))
    assert not any(isinstance(e, ev.TaskCompleted) for e in out)
    failed = out[-1]
    assert isinstance(failed, ev.TaskFailed) and not failed.final
    assert auditchain.verify(calls, failed.audit_head, failed.audit_count).ok


def test_an_attempt_whose_outcome_already_vouches_for_its_chain_is_not_reported_again(
        tmp_path: Path) -> None:
    d = _dispatch()
    calls, chain = _calls(d, 2)
    state = {"dispatch": d.event_id, "state": "running", "head": chain.head,
             "count": chain.count, "cost": 0.002, "audit": Journal.encode(list(calls))}
    assert _redeliver(tmp_path, d, state, _declared_lost(d, claimed=2)) == []


def _sweeper(tmp_path: Path, d: ev.TaskDispatched, state: dict[str, object],
             leases: LeaseTable) -> tuple[UnreportedChains, list[ev.Event], Runtime]:
    journal = Journal(tmp_path / "journal")
    journal.write(d.task_id, 1, state)
    rt = Runtime(Settings(), "e1", journal=journal)
    published: list[ev.Event] = []
    return UnreportedChains(rt, leases, published.append, grace_s=30), published, rt


def test_the_journal_sweep_reports_a_chain_whose_dispatch_never_came_back(
        tmp_path: Path) -> None:
    """Chaos runs Q4 and Q6 of stop 17: the executor was restarted mid-attempt after the
    broker's SIGKILL, the coordinator declared the attempt lost (claiming no audit events), and
    the dispatch never came back to this executor: the model call on the log stayed without an
    outcome vouching for it. The sweep compares the journal with the committed outcomes and
    reports the chain itself, once, after the grace period, as the redelivery answer would."""
    d = _dispatch()
    calls, chain = _calls(d, 2)
    running = {"dispatch": d.event_id, "state": "running", "head": chain.head,
               "count": chain.count, "cost": 0.002, "audit": Journal.encode(list(calls))}
    now = time.time()
    leases = LeaseTable(Settings(), "e1")
    sweeper, published, rt = _sweeper(tmp_path, d, running, leases)
    assert sweeper.sweep(now + 60) == 0 and published == []  # no outcome yet: not its call
    leases.finished(d.task_id, 1, at_ms=int(now * 1000), audit_count=0)  # declared lost
    assert sweeper.sweep(now + 10) == 0  # a fresh outcome: the executor's report may follow
    assert sweeper.sweep(now + 60) == 1
    failed = published[-1]
    assert isinstance(failed, ev.TaskFailed) and not failed.final
    assert failed.failure_class == "lost_executor" and failed.cost_usd == 0.002
    assert published[:-1] == calls
    assert auditchain.verify(calls, failed.audit_head, failed.audit_count).ok
    # the same event id as the redelivery answer's: both reports are one for every consumer
    answer = _answer_redelivery(rt, d, running)
    assert failed.event_id == answer[-1].event_id
    assert sweeper.sweep(now + 90) == 0  # reported once (again only after 5 minutes)
    # once the log holds a report claiming the chain, the attempt is settled
    leases.finished(d.task_id, 1, at_ms=int(now * 1000), audit_count=2)
    assert sweeper.sweep(now + 400) == 0 and len(published) == 3


def test_the_journal_sweep_leaves_alone_what_this_process_still_answers(
        tmp_path: Path) -> None:
    """An attempt running here, or finished here with its outcome waiting for the commit, is
    reported by that outcome (superseded if the coordinator declared it lost first): the sweep
    does not speak for it. Neither for an attempt whose outcome already claims the chain."""
    d = _dispatch()
    calls, chain = _calls(d, 1)
    state = {"dispatch": d.event_id, "state": "running", "head": chain.head,
             "count": chain.count, "cost": 0.001, "audit": Journal.encode(list(calls))}
    now = time.time()
    sweeper, published, rt = _sweeper(tmp_path, d, state, _declared_lost(d, claimed=0))
    run = rt.begin(d.task_id, d.team, 1)
    assert sweeper.sweep(now + 60) == 0
    rt.end(run)
    assert sweeper.sweep(now + 60) == 1 and published
    vouched, nothing, _ = _sweeper(tmp_path / "b", d, state, _declared_lost(d, claimed=1))
    assert vouched.sweep(now + 60) == 0 and nothing == []
