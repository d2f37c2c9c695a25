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


def test_a_retry_the_reconciler_re_drives_is_accepted_again_under_the_first_id() -> None:
    """A client's retry (a new TaskSubmitted, same key and task) is dropped as a duplicate of
    the marked task; when the reconciler re-publishes it because nothing answered the task on
    the log (its acceptance lost in a broker crash that kept the mark), it is accepted under the
    first acceptance's id (chaos run: 4 acknowledged tasks stayed lost through 3 retries)."""
    from fleetplane.core.kafka import REDRIVE_HEADER
    from fleetplane.core.loop import Record

    retry = ev.TaskSubmitted(task_id="t1", team="payments", spec=SPEC, idempotency_key="key-1")
    assert retry.event_id != MARK.event_id
    assert list(accept(retry, None, lambda team, key: MARK)) == []
    rec = Record(topic="tasks.submitted", partition=0, offset=14, key=b"t1", value=b"",
                 headers={REDRIVE_HEADER: b"1"})
    (out,) = accept(retry, rec, lambda team, key: MARK)
    assert isinstance(out, ev.TaskAccepted) and out.task_id == "t1"
    assert out.event_id == ev.derived_id("e1", "accepted")
