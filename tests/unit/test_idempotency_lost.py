"""Issue 19: a mark whose task the broker lost lets a retry recreate the task
(fleetplane.ingest.idempotency.lost_task / resubmission)."""

from __future__ import annotations

from typing import Any

from fleetplane.core import events as ev
from fleetplane.ingest.handlers import accept
from fleetplane.ingest.idempotency import Mark, lost_task, resubmission, spec_digest
from fleetplane.ingest.taskview import AccountingUnavailable

SPEC = ev.TaskSpec(name="n", task_type="summarize", prompt="p")
MARK = Mark(task_id="t1", event_id="e1", spec_sha256=spec_digest(SPEC), at=1000.0)


def recorded(*types: str) -> Any:
    return lambda task_id: [{"event_type": t, "task_id": task_id} for t in types]


def test_an_old_mark_whose_task_was_never_accepted_names_a_lost_task() -> None:
    assert lost_task(MARK, recorded(), now=1100.0)
    # accounting read the submission before the broker lost it: still lost
    assert lost_task(MARK, recorded("TaskSubmitted"), now=1100.0)


def test_a_recorded_acceptance_a_young_mark_or_no_answer_is_not_a_lost_task() -> None:
    assert not lost_task(MARK, recorded("TaskSubmitted", "TaskAccepted"), now=1100.0)
    assert not lost_task(MARK, recorded("TaskRejected"), now=1100.0)
    assert not lost_task(MARK, recorded(), now=1010.0)  # accounting may not have it yet

    def down(task_id: str) -> list[dict[str, Any]]:
        raise AccountingUnavailable("accounting unreachable")

    assert not lost_task(MARK, down, now=1100.0)


def test_the_resubmission_is_the_original_and_the_validator_accepts_it_again() -> None:
    sub = resubmission(MARK, "payments", SPEC, "key-1", "http")
    assert (sub.task_id, sub.event_id, sub.idempotency_key) == ("t1", "e1", "key-1")
    (out,) = accept(sub, None, lambda team, key: MARK)
    assert isinstance(out, ev.TaskAccepted)
    # the same derived event id as the lost acceptance: a surviving copy is a duplicate
    assert out.event_id == ev.derived_id("e1", "accepted")
