"""Ingest handler for raw submissions on tasks.submitted (any producer): validate, accept or
reject. Rejections go to fleet.dlq with the reason and a TaskRejected for the submitter."""

from __future__ import annotations

from collections.abc import Iterable

from fleetplane.core.events import Event, TaskAccepted, TaskRejected, TaskSubmitted
from fleetplane.core.loop import Record, Rejected
from fleetplane.ingest.manifest import check_spec

MAX_TASK_ID = 128


def accept(event: Event, record: Record | None = None) -> Iterable[Event]:
    if not isinstance(event, TaskSubmitted):
        raise Rejected(f"tasks.submitted takes TaskSubmitted, not {type(event).__name__}")
    if not event.task_id or len(event.task_id) > MAX_TASK_ID:
        raise Rejected(f"task_id: must be 1-{MAX_TASK_ID} characters")
    problem = check_spec(event.team, event.spec)
    if problem is not None:
        field, reason = problem
        rejected = event.derive(TaskRejected, reason=f"{field}: {reason}", field=field,
                                source=event.source)
        raise Rejected(f"{field}: {reason}", emit=[rejected])
    return [event.derive(TaskAccepted, spec=event.spec, source=event.source)]
